//! Identity-mapped page tables with 2 MiB user pages.
//!
//! Every entry is present, writable, user-accessible, and has its accessed (and, for leaves,
//! dirty) bit preset, so the CPU never writes the tables and they never appear as dirty pages.

/// Guest-physical address of the PML4; the PDPT and the page directories follow it.
pub const PML4_ADDR: u64 = 0x1_0000;
/// Highest address the page-table area may reach (exclusive).
pub const TABLES_END: u64 = 0x8_0000;
/// Bytes mapped by one page directory (1 GiB).
pub const GIB: u64 = 1 << 30;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const HUGE: u64 = 1 << 7;

/// Flags of a non-leaf entry.
pub const TABLE_FLAGS: u64 = PRESENT | WRITABLE | USER | ACCESSED;
/// Flags of a 2 MiB leaf entry.
pub const LEAF_FLAGS: u64 = PRESENT | WRITABLE | USER | ACCESSED | DIRTY | HUGE;

/// Most guest-physical address space the tables can map.
pub const MAX_MAPPED: u64 = (TABLES_END - PML4_ADDR - 0x2000) / 0x1000 * GIB;

/// Page tables mapping `[0, top)` one to one, as (guest-physical address, 4 KiB page) pairs.
///
/// `top` is rounded up to a whole GiB and must not exceed [`MAX_MAPPED`].
pub fn identity_tables(top: u64) -> Vec<(u64, Vec<u64>)> {
    assert!(top <= MAX_MAPPED, "page tables cannot map {top:#x} bytes");
    let dirs = top.div_ceil(GIB).max(1);
    let pdpt_addr = PML4_ADDR + 0x1000;
    let mut pml4 = vec![0u64; 512];
    pml4[0] = pdpt_addr | TABLE_FLAGS;
    let mut pdpt = vec![0u64; 512];
    let mut out = Vec::new();
    for d in 0..dirs {
        let pd_addr = pdpt_addr + 0x1000 * (d + 1);
        pdpt[d as usize] = pd_addr | TABLE_FLAGS;
        let pd = (0..512u64)
            .map(|i| (d * GIB + (i << 21)) | LEAF_FLAGS)
            .collect();
        out.push((pd_addr, pd));
    }
    out.insert(0, (pdpt_addr, pdpt));
    out.insert(0, (PML4_ADDR, pml4));
    out
}

/// Walks `tables` like the MMU for `vaddr`; returns the physical address, if mapped.
pub fn translate(tables: &[(u64, Vec<u64>)], vaddr: u64) -> Option<u64> {
    let table = |addr: u64| tables.iter().find(|(a, _)| *a == addr).map(|(_, t)| t);
    let mut t = table(PML4_ADDR)?;
    for (level, shift) in [(4, 39), (3, 30), (2, 21)] {
        let e = t[((vaddr >> shift) & 511) as usize];
        if e & PRESENT == 0 || e & USER == 0 {
            return None;
        }
        if level == 2 {
            assert_ne!(e & HUGE, 0);
            return Some((e & 0x000f_ffff_ffe0_0000) | (vaddr & 0x1f_ffff));
        }
        t = table(e & 0x000f_ffff_ffff_f000)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_identity_with_user_pages() {
        let tables = identity_tables(5 * GIB);
        assert_eq!(tables.len(), 2 + 5);
        for addr in [
            0,
            0x1234,
            0x20_0000,
            GIB - 1,
            0xC000_0000,
            4 * GIB + 0x1_2345,
            5 * GIB - 8,
        ] {
            assert_eq!(translate(&tables, addr), Some(addr), "{addr:#x}");
        }
        assert_eq!(translate(&tables, 5 * GIB), None);
        assert_eq!(translate(&tables, 512 * GIB), None);
    }

    #[test]
    fn tables_fit_their_area_and_preset_accessed_dirty() {
        let tables = identity_tables(MAX_MAPPED);
        let last = tables.iter().map(|(a, _)| *a).max().unwrap();
        assert!(last + 0x1000 <= TABLES_END);
        for (_, t) in &tables[2..] {
            assert!(t.iter().all(|e| e & LEAF_FLAGS == LEAF_FLAGS));
        }
        assert_eq!(tables[0].1[0] & TABLE_FLAGS, TABLE_FLAGS);
        assert!(
            tables[0].1[1..].iter().all(|&e| e == 0),
            "only one PML4 entry"
        );
    }

    #[test]
    fn small_memory_still_gets_one_directory() {
        assert_eq!(identity_tables(16 << 20).len(), 3);
    }
}
