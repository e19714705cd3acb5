//! The GDT and TSS of the ring-3 boot state.
//!
//! Descriptors are written with their accessed bit already set so that loading a segment never
//! makes the CPU write the GDT (which would show up as a dirty page in every checkpoint).

use kvm_bindings::{kvm_segment, kvm_sregs};

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// Guest-physical address of the 64-bit TSS.
pub const TSS_ADDR: u64 = 0x2000;
/// Size of a 64-bit TSS minus one.
pub const TSS_LIMIT: u32 = 0x67;

/// Ring-0 code, kept for completeness (interrupt gates would need it).
pub const KERNEL_CS: u16 = 0x08;
/// Ring-0 data.
pub const KERNEL_DS: u16 = 0x10;
/// Ring-3 data/stack selector, RPL 3.
pub const USER_DS: u16 = 0x18 | 3;
/// Ring-3 64-bit code selector, RPL 3.
pub const USER_CS: u16 = 0x20 | 3;
/// TSS selector (a 16-byte system descriptor in slots 5 and 6).
pub const TSS_SEL: u16 = 0x28;

/// Segment types (the 4-bit type field).
const TYPE_CODE_XR_ACCESSED: u8 = 0xb;
const TYPE_DATA_RW_ACCESSED: u8 = 0x3;
const TYPE_TSS64_BUSY: u8 = 0xb;

/// A flat segment as KVM wants it.
pub(crate) fn flat(selector: u16, type_: u8, dpl: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The segment registers of the boot state: (cs, data segments, tr).
pub fn segments() -> (kvm_segment, kvm_segment, kvm_segment) {
    let cs = flat(USER_CS, TYPE_CODE_XR_ACCESSED, 3, true);
    let ds = flat(USER_DS, TYPE_DATA_RW_ACCESSED, 3, false);
    let tr = tss(TSS_SEL);
    (cs, ds, tr)
}

/// The busy 64-bit TSS at [`TSS_ADDR`] as KVM wants it, with `selector`.
pub(crate) fn tss(selector: u16) -> kvm_segment {
    kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT,
        selector,
        type_: TYPE_TSS64_BUSY,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Loads flat segments `cs`, `ds` (for all data segments) and `tr` and a GDT of `entries`
/// descriptors at [`GDT_ADDR`] into `sregs`, with no LDT and no IDT.
pub(crate) fn load_segments(
    sregs: &mut kvm_sregs,
    (cs, ds, tr): (kvm_segment, kvm_segment, kvm_segment),
    entries: usize,
) {
    sregs.cs = cs;
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.tr = tr;
    sregs.ldt.unusable = 1;
    sregs.ldt.present = 0;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (entries * 8 - 1) as u16;
    // No IDT: an exception the boot state cannot handle triple-faults and the VMM reports it.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
}

/// Encodes a code/data segment as an 8-byte descriptor.
pub fn encode(seg: &kvm_segment) -> u64 {
    let limit = u64::from(seg.limit >> if seg.g != 0 { 12 } else { 0 });
    let access = u64::from(seg.type_)
        | u64::from(seg.s) << 4
        | u64::from(seg.dpl & 3) << 5
        | u64::from(seg.present) << 7;
    let flags =
        u64::from(seg.avl) | u64::from(seg.l) << 1 | u64::from(seg.db) << 2 | u64::from(seg.g) << 3;
    (limit & 0xffff)
        | (seg.base & 0xff_ffff) << 16
        | access << 40
        | ((limit >> 16) & 0xf) << 48
        | flags << 52
        | ((seg.base >> 24) & 0xff) << 56
}

/// Encodes a 64-bit system segment (the TSS) as two descriptor words.
pub fn encode_system(seg: &kvm_segment) -> [u64; 2] {
    let low = encode(&kvm_segment {
        base: seg.base & 0xffff_ffff,
        ..*seg
    });
    [low, seg.base >> 32]
}

/// The whole GDT: null, kernel code, kernel data, user data, user code, TSS (two slots).
pub fn table() -> [u64; 7] {
    let (cs, ds, tr) = segments();
    let kcs = flat(KERNEL_CS, TYPE_CODE_XR_ACCESSED, 0, true);
    let kds = flat(KERNEL_DS, TYPE_DATA_RW_ACCESSED, 0, false);
    let [tss_lo, tss_hi] = encode_system(&tr);
    [
        0,
        encode(&kcs),
        encode(&kds),
        encode(&ds),
        encode(&cs),
        tss_lo,
        tss_hi,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_code_descriptor_is_64bit_dpl3_and_accessed() {
        let gdt = table();
        let cs = gdt[(USER_CS >> 3) as usize];
        // Well-known encoding of a flat 64-bit DPL-3 code segment with the accessed bit:
        // limit 0xfffff, access 0xfb (P, DPL 3, S, type 0xb), flags 0xa (G, L).
        assert_eq!(cs, 0x00af_fb00_0000_ffff);
        let ds = gdt[(USER_DS >> 3) as usize];
        assert_eq!(ds, 0x00cf_f300_0000_ffff);
        assert_eq!(gdt[(KERNEL_CS >> 3) as usize], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[0], 0);
    }

    #[test]
    fn tss_descriptor_carries_base_and_limit() {
        let gdt = table();
        let lo = gdt[(TSS_SEL >> 3) as usize];
        assert_eq!(lo & 0xffff, u64::from(TSS_LIMIT));
        assert_eq!((lo >> 16) & 0xff_ffff, TSS_ADDR & 0xff_ffff);
        assert_eq!((lo >> 40) & 0xff, 0x8b, "present, DPL 0, busy 64-bit TSS");
        assert_eq!(gdt[(TSS_SEL >> 3) as usize + 1], 0, "base bits 63:32");
    }

    #[test]
    fn selectors_index_the_table_with_rpl3_for_user() {
        let (cs, ds, tr) = segments();
        assert_eq!((cs.selector & 3, cs.dpl, cs.l, cs.db), (3, 3, 1, 0));
        assert_eq!((ds.selector & 3, ds.dpl, ds.db), (3, 3, 1));
        assert_eq!(tr.selector, TSS_SEL);
        assert!(((TSS_SEL >> 3) as usize) + 1 < table().len());
    }
}
