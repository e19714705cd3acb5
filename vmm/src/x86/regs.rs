//! The initial register state of a test-guest vCPU: long mode at CPL 3.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::{gdt, paging};

pub(crate) const CR0_PE: u64 = 1;
pub(crate) const CR0_MP: u64 = 1 << 1;
pub(crate) const CR0_ET: u64 = 1 << 4;
pub(crate) const CR0_NE: u64 = 1 << 5;
pub(crate) const CR0_WP: u64 = 1 << 16;
pub(crate) const CR0_PG: u64 = 1 << 31;
pub(crate) const CR4_PAE: u64 = 1 << 5;
pub(crate) const CR4_OSFXSR: u64 = 1 << 9;
pub(crate) const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub(crate) const EFER_LME: u64 = 1 << 8;
pub(crate) const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is always set. IOPL stays 0: PVM does not honour a guest's IOPL, so the test
/// guest uses MMIO for its devices.
const RFLAGS_FIXED: u64 = 1 << 1;

/// Special registers: paging, long mode, flat ring-3 segments, SSE enabled.
pub fn sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    gdt::load_segments(&mut sregs, gdt::segments(), gdt::table().len());
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = paging::PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers: entry point, stack, boot info in rdi and the vCPU index in rsi.
pub fn regs(entry: u64, stack_top: u64, boot_info: u64, index: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        // The System V ABI enters a function with rsp + 8 16-byte aligned.
        rsp: (stack_top & !0xf) - 8,
        rdi: boot_info,
        rsi: index,
        rflags: RFLAGS_FIXED,
        ..Default::default()
    }
}

/// x87 and SSE state at their reset values.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_state_is_long_mode_cpl3_with_sse() {
        let s = sregs(kvm_sregs::default());
        assert_eq!(s.cs.dpl, 3);
        assert_eq!(s.cs.selector & 3, 3);
        assert_eq!(s.ss.dpl, 3);
        assert_eq!(s.cs.l, 1);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr4 & CR4_OSFXSR, 0);
        assert_eq!(s.cr3, paging::PML4_ADDR);
        assert_eq!(s.gdt.limit, 55);
    }

    #[test]
    fn entry_registers_follow_the_abi() {
        let r = regs(0x10_0000, 0x50_0000, 0x8000, 1);
        assert_eq!((r.rip, r.rdi, r.rsi), (0x10_0000, 0x8000, 1));
        assert_eq!((r.rsp + 8) % 16, 0);
        assert_eq!(r.rflags & (1 << 9), 0, "interrupts off");
    }
}
