//! The 64-bit boot state of Linux's boot CPU: long mode, ring 0, flat segments with the
//! selectors the boot protocol names (`__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18), identity-mapped
//! page tables, `rsi` = the zero page.

use kvm_bindings::{kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::{BOOT_STACK, ZERO_PAGE};
use crate::memory::GuestMemoryMmap;
use crate::x86::gdt::{self, GDT_ADDR};
use crate::x86::paging::{self, PML4_ADDR};
use crate::x86::regs::{CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};

/// Boot code segment selector.
pub const BOOT_CS: u16 = 0x10;
/// Boot data segment selector.
pub const BOOT_DS: u16 = 0x18;
/// TSS selector.
pub const BOOT_TSS: u16 = 0x20;

fn segments() -> (kvm_segment, kvm_segment, kvm_segment) {
    let tr = gdt::tss(BOOT_TSS);
    (
        gdt::flat(BOOT_CS, 0xb, 0, true),
        gdt::flat(BOOT_DS, 0x3, 0, false),
        tr,
    )
}

/// The boot GDT: null, null, code (0x10), data (0x18), TSS (0x20, two slots).
pub fn gdt_table() -> [u64; 6] {
    let (cs, ds, tr) = segments();
    let [tss_lo, tss_hi] = gdt::encode_system(&tr);
    [0, 0, gdt::encode(&cs), gdt::encode(&ds), tss_lo, tss_hi]
}

/// Writes the GDT and identity page tables covering `[0, top)`.
pub fn write_boot_tables(
    memory: &GuestMemoryMmap,
    top: u64,
) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, word) in gdt_table().iter().enumerate() {
        memory.write_obj(*word, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    for (addr, table) in paging::identity_tables(top, &[]) {
        for (i, entry) in table.iter().enumerate() {
            memory.write_obj(*entry, GuestAddress(addr + 8 * i as u64))?;
        }
    }
    Ok(())
}

/// Special registers of the boot CPU.
pub fn sregs(mut s: kvm_sregs) -> kvm_sregs {
    gdt::load_segments(&mut s, segments(), gdt_table().len());
    s.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    s.cr3 = PML4_ADDR;
    s.cr4 = CR4_PAE;
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// General registers of the boot CPU.
pub fn regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        rflags: 2,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const MODE_NMI: u32 = 4;
const MODE_EXTINT: u32 = 7;

/// Local APIC with LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware leaves it.
pub fn lapic(mut l: kvm_lapic_state) -> kvm_lapic_state {
    let mut set = |off: usize, mode: u32| {
        let raw: [u8; 4] = std::array::from_fn(|i| l.regs[off + i] as u8);
        let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            l.regs[off + i] = *b as _;
        }
    };
    set(APIC_LVT0, MODE_EXTINT);
    set(APIC_LVT1, MODE_NMI);
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_gdt_has_the_protocol_selectors() {
        let gdt = gdt_table();
        assert_eq!(
            gdt[(BOOT_CS >> 3) as usize],
            0x00af_9b00_0000_ffff,
            "64-bit code, DPL 0"
        );
        assert_eq!(
            gdt[(BOOT_DS >> 3) as usize],
            0x00cf_9300_0000_ffff,
            "data, DPL 0"
        );
        let s = sregs(kvm_sregs::default());
        assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (BOOT_CS, 0, 1));
        assert_eq!(s.ss.selector, BOOT_DS);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(regs(0x100_0000).rsi, ZERO_PAGE);
    }

    #[test]
    fn lapic_lint_pins_are_extint_and_nmi() {
        let l = lapic(kvm_lapic_state::default());
        let read = |off: usize| u32::from_le_bytes(std::array::from_fn(|i| l.regs[off + i] as u8));
        assert_eq!((read(APIC_LVT0) >> 8) & 7, MODE_EXTINT);
        assert_eq!((read(APIC_LVT1) >> 8) & 7, MODE_NMI);
    }
}
