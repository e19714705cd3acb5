//! CPUID for the guest: what KVM supports, with per-vCPU topology filled in.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
/// CPUID.1:ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;

/// Adapts the supported CPUID to vCPU `index` of `count`: APIC ids, logical processor count,
/// the hypervisor bit.
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(count) << 16) | (u32::from(index) << 24);
                entry.ecx |= ECX_HYPERVISOR;
                // HTT: several logical processors in the package.
                if count > 1 {
                    entry.edx |= 1 << 28;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => entry.edx = u32::from(index),
            _ => {}
        }
    }
    cpuid
}

/// Whether /dev/kvm is PVM, whose instruction emulator (which runs guest ring-0 code) lacks
/// some instructions.
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Features whose instructions PVM's emulator cannot run, by (leaf, register, bit): XSAVE
/// (and so OSXSAVE, AVX), CMPXCHG16B, POPCNT, RDRAND, PCID; FSGSBASE, INVPCID, RDSEED, SMAP;
/// RDPID. A guest that does not see them does not use them.
const PVM_HIDDEN: &[(u32, Reg, u32)] = &[
    (1, Reg::Ecx, 26),
    (1, Reg::Ecx, 27),
    (1, Reg::Ecx, 28),
    (1, Reg::Ecx, 13),
    (1, Reg::Ecx, 23),
    (1, Reg::Ecx, 30),
    (1, Reg::Ecx, 17),
    (7, Reg::Ebx, 0),
    (7, Reg::Ebx, 10),
    (7, Reg::Ebx, 18),
    (7, Reg::Ebx, 20),
    (7, Reg::Ecx, 22),
];

#[derive(Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
}

/// Hides the features PVM's emulator lacks (see [`PVM_HIDDEN`]).
pub fn hide_unemulated(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice() {
        for &(leaf, reg, bit) in PVM_HIDDEN {
            if entry.function == leaf && (leaf != 7 || entry.index == 0) {
                match reg {
                    Reg::Ebx => entry.ebx &= !(1 << bit),
                    Reg::Ecx => entry.ecx &= !(1 << bit),
                }
            }
        }
        // Without XSAVE there are no XSAVE state components to describe.
        if entry.function == 0xd {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_ids_and_counts_are_per_vcpu() {
        let supported = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                edx: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xd,
                eax: 0x1234,
                ..Default::default()
            },
        ])
        .unwrap();
        let c = for_vcpu(&supported, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx, 0x0304_0800);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & (1 << 28), 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].eax, 0x1234, "other leaves untouched");
    }

    #[test]
    fn pvm_hides_what_its_emulator_cannot_run() {
        let all = u32::MAX;
        let mut c = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ecx: all,
                edx: all,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                ebx: all,
                ecx: all,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 1,
                ebx: all,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xd,
                eax: 7,
                ..Default::default()
            },
        ])
        .unwrap();
        hide_unemulated(&mut c);
        let e = c.as_slice();
        for bit in [26, 27, 28, 13, 23, 30, 17] {
            assert_eq!(e[0].ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_eq!(e[0].ecx & (1 << 0), 1, "SSE3 stays");
        assert_eq!(e[0].edx, all);
        for bit in [0, 10, 18, 20] {
            assert_eq!(e[1].ebx & (1 << bit), 0, "leaf 7 ebx bit {bit}");
        }
        assert_eq!(e[1].ecx & (1 << 22), 0, "RDPID");
        assert_eq!(e[2].ebx, all, "leaf 7 subleaf 1 untouched");
        assert_eq!(e[3].eax, 0, "no XSAVE components");
    }
}
