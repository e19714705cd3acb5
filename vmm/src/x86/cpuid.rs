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
}
