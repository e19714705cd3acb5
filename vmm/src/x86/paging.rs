//! Identity-mapped page tables with 2 MiB user pages, and 4 KiB pages where some must be
//! read-only.
//!
//! Every entry is present, user-accessible, and has its accessed (and, for writable leaves,
//! dirty) bit preset, so the CPU never writes the tables and they never appear as dirty pages.
//! Pages the guest must not write (its code, read-only data, the boot structures) are mapped
//! read-only: besides catching stray writes, this keeps them out of the dirty log — KVM maps a
//! page whose guest entry is writable and dirty as writable on any access, and marks it dirty
//! then even if the guest only reads it.

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
/// Flags of a writable 4 KiB leaf entry.
pub const PAGE_FLAGS: u64 = PRESENT | WRITABLE | USER | ACCESSED | DIRTY;
/// Flags of a read-only 4 KiB leaf entry.
pub const RO_PAGE_FLAGS: u64 = PRESENT | USER | ACCESSED;
const TWO_MIB: u64 = 1 << 21;

/// Most 4 KiB page tables (each covers 2 MiB) the read-only ranges may need.
pub const MAX_SMALL_TABLES: u64 = 16;
/// Most guest-physical address space the tables can map.
pub const MAX_MAPPED: u64 = ((TABLES_END - PML4_ADDR) / 0x1000 - 2 - MAX_SMALL_TABLES) * GIB;

/// Page tables mapping `[0, top)` one to one, as (guest-physical address, 4 KiB page) pairs.
/// Pages that intersect a range of `read_only` are mapped read-only (at 4 KiB granularity,
/// within at most [`MAX_SMALL_TABLES`] 2 MiB regions).
///
/// `top` is rounded up to a whole GiB and must not exceed [`MAX_MAPPED`].
pub fn identity_tables(top: u64, read_only: &[(u64, u64)]) -> Vec<(u64, Vec<u64>)> {
    assert!(top <= MAX_MAPPED, "page tables cannot map {top:#x} bytes");
    let dirs = top.div_ceil(GIB).max(1);
    let pdpt_addr = PML4_ADDR + 0x1000;
    let mut next_table = pdpt_addr + 0x1000 * (dirs + 1);
    let is_ro = |page: u64| {
        read_only
            .iter()
            .any(|&(s, e)| page < e && page + 0x1000 > s)
    };
    let mut pml4 = vec![0u64; 512];
    pml4[0] = pdpt_addr | TABLE_FLAGS;
    let mut pdpt = vec![0u64; 512];
    let mut out = Vec::new();
    let mut small = Vec::new();
    for d in 0..dirs {
        let pd_addr = pdpt_addr + 0x1000 * (d + 1);
        pdpt[d as usize] = pd_addr | TABLE_FLAGS;
        let mut pd = Vec::with_capacity(512);
        for i in 0..512u64 {
            let base = d * GIB + i * TWO_MIB;
            if read_only
                .iter()
                .any(|&(s, e)| s < base + TWO_MIB && e > base)
            {
                assert!(
                    (small.len() as u64) < MAX_SMALL_TABLES,
                    "too many read-only regions"
                );
                let pt = (0..512u64)
                    .map(|j| {
                        let page = base + j * 0x1000;
                        page | if is_ro(page) {
                            RO_PAGE_FLAGS
                        } else {
                            PAGE_FLAGS
                        }
                    })
                    .collect();
                pd.push(next_table | TABLE_FLAGS);
                small.push((next_table, pt));
                next_table += 0x1000;
            } else {
                pd.push(base | LEAF_FLAGS);
            }
        }
        out.push((pd_addr, pd));
    }
    out.insert(0, (pdpt_addr, pdpt));
    out.insert(0, (PML4_ADDR, pml4));
    out.extend(small);
    out
}

/// Walks `tables` like the MMU for `vaddr`; returns the physical address and whether it is
/// writable, if mapped.
pub fn translate(tables: &[(u64, Vec<u64>)], vaddr: u64) -> Option<(u64, bool)> {
    let table = |addr: u64| tables.iter().find(|(a, _)| *a == addr).map(|(_, t)| t);
    let mut t = table(PML4_ADDR)?;
    let mut writable = true;
    for (level, shift) in [(4, 39), (3, 30), (2, 21), (1, 12)] {
        let e = t[((vaddr >> shift) & 511) as usize];
        if e & PRESENT == 0 || e & USER == 0 {
            return None;
        }
        writable &= e & WRITABLE != 0;
        if level == 2 && e & HUGE != 0 {
            return Some(((e & 0x000f_ffff_ffe0_0000) | (vaddr & 0x1f_ffff), writable));
        }
        if level == 1 {
            return Some(((e & 0x000f_ffff_ffff_f000) | (vaddr & 0xfff), writable));
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
        let tables = identity_tables(5 * GIB, &[]);
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
            assert_eq!(translate(&tables, addr), Some((addr, true)), "{addr:#x}");
        }
        assert_eq!(translate(&tables, 5 * GIB), None);
        assert_eq!(translate(&tables, 512 * GIB), None);
    }

    #[test]
    fn read_only_ranges_get_read_only_4k_pages() {
        let ro = [
            (0, 0x10_0000),
            (0x10_0000, 0x11_2345),
            (0x4_0000_1000, 0x4_0000_2000),
        ];
        let tables = identity_tables(GIB * 17, &ro);
        assert_eq!(
            tables.len(),
            2 + 17 + 2,
            "one 4 KiB table per 2 MiB region touched"
        );
        assert_eq!(translate(&tables, 0x8000), Some((0x8000, false)));
        assert_eq!(
            translate(&tables, 0x11_2fff),
            Some((0x11_2fff, false)),
            "partial page"
        );
        assert_eq!(translate(&tables, 0x11_3000), Some((0x11_3000, true)));
        assert_eq!(translate(&tables, 0x1f_f000), Some((0x1f_f000, true)));
        assert_eq!(
            translate(&tables, 0x20_0000),
            Some((0x20_0000, true)),
            "2 MiB page"
        );
        assert_eq!(
            translate(&tables, 0x4_0000_1800),
            Some((0x4_0000_1800, false))
        );
        assert_eq!(
            translate(&tables, 0x4_0000_2000),
            Some((0x4_0000_2000, true))
        );
    }

    #[test]
    fn tables_fit_their_area_and_preset_accessed_dirty() {
        let ro: Vec<(u64, u64)> = (0..MAX_SMALL_TABLES)
            .map(|i| (i << 21, (i << 21) + 1))
            .collect();
        let tables = identity_tables(MAX_MAPPED, &ro);
        let last = tables.iter().map(|(a, _)| *a).max().unwrap();
        assert!(last + 0x1000 <= TABLES_END);
        for (_, t) in &tables {
            for e in t.iter().filter(|e| *e & HUGE != 0) {
                assert_eq!(e & LEAF_FLAGS, LEAF_FLAGS);
            }
            for e in t.iter().filter(|e| *e & HUGE == 0 && *e & PRESENT != 0) {
                assert_ne!(e & ACCESSED, 0, "accessed preset");
            }
        }
        assert_eq!(tables[0].1[0] & TABLE_FLAGS, TABLE_FLAGS);
        assert!(
            tables[0].1[1..].iter().all(|&e| e == 0),
            "only one PML4 entry"
        );
    }

    #[test]
    fn small_memory_still_gets_one_directory() {
        assert_eq!(identity_tables(16 << 20, &[]).len(), 3);
    }
}
