//! Guest memory: anonymous mappings registered with KVM with dirty logging on, plus vm-memory's
//! own dirty bitmap for the writes the VMM makes. [`DirtyPages`] is the union of both; KVM's
//! part comes from its dirty bitmap or, for a VM built with the dirty ring, from the rings
//! ([`crate::dirty_ring`]), which [`LiveDirty`] can also harvest while the VM runs.

use std::sync::Arc;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::dirty_ring::{DirtyRing, RingError};

/// Guest memory with vm-memory's dirty bitmap (one bit per 4 KiB page).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Page size of dirty tracking.
pub const PAGE_SIZE: u64 = 4096;
/// Start of the 32-bit MMIO hole: RAM above this moves to 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// Smallest guest the VMM builds.
pub const MIN_MEM: u64 = 16 << 20;
/// Largest guest the VMM builds (bounded by the page tables of the test guest).
pub const MAX_MEM: u64 = 64 << 30;

/// Errors of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is outside what the VMM supports.
    #[error("Guest memory size {0} MiB is out of range: it must be between 16 MiB and 64 GiB")]
    Size(u64),
    /// The size is not a whole number of 2 MiB pages.
    #[error("Guest memory size {0} bytes is not a multiple of 2 MiB")]
    Alignment(u64),
    /// Mapping the memory failed.
    #[error("Cannot allocate guest memory")]
    Allocate(#[source] vm_memory::mmap::FromRangesError),
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {slot}")]
    Slot {
        /// The slot number.
        slot: u32,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Reading KVM's dirty log failed.
    #[error("Cannot read KVM's dirty log of slot {slot}")]
    DirtyLog {
        /// The slot number.
        slot: u32,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The dirty ring failed.
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// The RAM ranges of a guest of `size` bytes: below the MMIO hole, then from 4 GiB.
pub fn ram_ranges(size: u64) -> Result<Vec<(GuestAddress, u64)>, MemoryError> {
    if !(MIN_MEM..=MAX_MEM).contains(&size) {
        return Err(MemoryError::Size(size >> 20));
    }
    if !size.is_multiple_of(2 << 20) {
        return Err(MemoryError::Alignment(size));
    }
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), size - low));
    }
    Ok(ranges)
}

/// Allocates guest memory for `ranges` and registers each range with KVM as one slot, with
/// dirty logging enabled.
pub fn create(vm: &VmFd, ranges: &[(GuestAddress, u64)]) -> Result<GuestMemoryMmap, MemoryError> {
    let sized: Vec<(GuestAddress, usize)> = ranges.iter().map(|&(a, l)| (a, l as usize)).collect();
    let memory = GuestMemoryMmap::from_ranges(&sized).map_err(MemoryError::Allocate)?;
    register(vm, memory)
}

/// Registers memory mapped elsewhere (e.g. from a snapshot file) with KVM, one slot per region,
/// dirty logging enabled. Its regions must be exactly the guest's RAM ranges.
pub fn register(vm: &VmFd, memory: GuestMemoryMmap) -> Result<GuestMemoryMmap, MemoryError> {
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let host = region.as_ptr() as u64;
        // Transparent huge pages for the host side: far fewer page faults when memory is
        // first touched (a restore writes it all). KVM still tracks dirty pages at 4 KiB.
        // SAFETY: advice on a live mapping owned by `memory`; it does not change its contents.
        let r = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if r != 0 {
            tracing::debug!(
                "no transparent huge pages for guest memory: {}",
                std::io::Error::last_os_error()
            );
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host,
        };
        // SAFETY: the host range is a live mapping owned by `memory`, which the caller keeps
        // for as long as the VM exists (the Vm struct drops the VM fd before the memory).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|source| MemoryError::Slot { slot, source })?;
    }
    Ok(memory)
}

/// The pages written since the last call, from KVM's log and the VMM's own bitmap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// Per RAM range: its start and one bit per page, 64 pages a word.
    pub ranges: Vec<(GuestAddress, Vec<u64>)>,
}

impl DirtyPages {
    /// No page dirty, shaped like `memory` (one bitmap per RAM range).
    pub fn clean(memory: &GuestMemoryMmap) -> Self {
        Self {
            ranges: memory
                .iter()
                .map(|r| {
                    let words = (r.len() / PAGE_SIZE).div_ceil(64) as usize;
                    (r.start_addr(), vec![0; words])
                })
                .collect(),
        }
    }

    /// Marks every page clean, keeping the shape (and the allocation).
    pub fn clear(&mut self) {
        for (_, bits) in &mut self.ranges {
            bits.fill(0);
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.ranges
            .iter()
            .map(|(_, bits)| bits.iter().map(|w| w.count_ones() as usize).sum::<usize>())
            .sum()
    }

    /// Guest-physical addresses of the dirty pages, ascending.
    pub fn addresses(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|(start, bits)| {
            bits.iter().enumerate().flat_map(move |(w, &word)| {
                (0..64)
                    .filter(move |b| word & (1 << b) != 0)
                    .map(move |b| start.raw_value() + ((w as u64) * 64 + b) * PAGE_SIZE)
            })
        })
    }

    /// Whether the page holding `addr` is dirty.
    pub fn contains(&self, addr: u64) -> bool {
        self.ranges.iter().any(|(start, bits)| {
            let Some(off) = addr.checked_sub(start.raw_value()) else {
                return false;
            };
            let page = (off / PAGE_SIZE) as usize;
            bits.get(page / 64)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
        })
    }
}

/// Collects and clears the dirty pages of every slot: KVM's log OR-ed with vm-memory's bitmap.
pub fn take_dirty(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<DirtyPages, MemoryError> {
    let mut out = DirtyPages::default();
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let mut bits = vm
            .get_dirty_log(slot, region.len() as usize)
            .map_err(|source| MemoryError::DirtyLog { slot, source })?;
        let own = region.bitmap_ref().get_and_reset();
        for (word, extra) in bits.iter_mut().zip(own) {
            *word |= extra;
        }
        out.ranges.push((region.start_addr(), bits));
    }
    Ok(out)
}

/// ORs the pages the VMM itself wrote since the last call (vm-memory's bitmap) into `out`, and
/// clears that bitmap. vm-memory marks a page after writing it, so a page copied after this
/// call holds at least what the VMM wrote before it; a write still under way is marked again.
pub fn take_vmm_writes(memory: &GuestMemoryMmap, out: &mut DirtyPages) {
    for (region, (_, bits)) in memory.iter().zip(&mut out.ranges) {
        let own = region.bitmap_ref().get_and_reset();
        for (word, extra) in bits.iter_mut().zip(own) {
            *word |= extra;
        }
    }
}

/// The dirty pages of a VM built with the dirty ring, harvestable while it runs (from any
/// thread; cheap to clone): the rings, then the VMM's own writes.
#[derive(Clone, Debug)]
pub struct LiveDirty {
    ring: Arc<DirtyRing>,
    memory: GuestMemoryMmap,
}

impl LiveDirty {
    /// Harvesting `ring` and the VMM-write bitmap of `memory`.
    pub fn new(ring: Arc<DirtyRing>, memory: GuestMemoryMmap) -> Self {
        Self { ring, memory }
    }

    /// ORs into `out` (shaped by [`DirtyPages::clean`]) the pages written since the last
    /// harvest, and re-arms tracking for them: a page written after this returns is reported
    /// by the next call. Copy the pages only after this returns. Returns the ring entries
    /// harvested.
    pub fn take_into(&self, out: &mut DirtyPages) -> Result<usize, MemoryError> {
        let n = self.ring.harvest(out)?;
        take_vmm_writes(&self.memory, out);
        Ok(n)
    }

    /// The pages written since the last harvest.
    pub fn take(&self) -> Result<DirtyPages, MemoryError> {
        let mut out = DirtyPages::clean(&self.memory);
        self.take_into(&mut out)?;
        Ok(out)
    }

    /// Guest memory (the same mapping the VM uses).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The rings.
    pub fn ring(&self) -> &Arc<DirtyRing> {
        &self.ring
    }
}

/// Access to a region's whole bitmap (vm-memory hands out slices of it by default).
trait RegionBitmap {
    fn bitmap_ref(&self) -> &AtomicBitmap;
}

impl RegionBitmap for vm_memory::GuestRegionMmap<AtomicBitmap> {
    fn bitmap_ref(&self) -> &AtomicBitmap {
        // GuestRegionMmap dereferences to its MmapRegion, which owns the bitmap.
        std::ops::Deref::deref(self).bitmap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_split_around_the_mmio_hole() {
        assert_eq!(
            ram_ranges(512 << 20).unwrap(),
            vec![(GuestAddress(0), 512 << 20)]
        );
        assert_eq!(
            ram_ranges(4 << 30).unwrap(),
            vec![
                (GuestAddress(0), MMIO_HOLE_START),
                (GuestAddress(1 << 32), 1 << 30)
            ]
        );
        assert!(matches!(ram_ranges(0), Err(MemoryError::Size(0))));
        assert!(matches!(
            ram_ranges(MAX_MEM + (2 << 20)),
            Err(MemoryError::Size(_))
        ));
        assert!(matches!(
            ram_ranges((16 << 20) + 4096),
            Err(MemoryError::Alignment(_))
        ));
    }

    #[test]
    fn vmm_writes_mark_the_bitmap() {
        let memory = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        memory.write_obj(0xabu8, GuestAddress(0x3000)).unwrap();
        memory
            .write_slice(&[1; 0x1001], GuestAddress((1 << 32) + 0x1fff))
            .unwrap();
        let regions: Vec<_> = memory.iter().collect();
        let low = regions[0].bitmap_ref().get_and_reset();
        let high = regions[1].bitmap_ref().get_and_reset();
        let pages = DirtyPages {
            ranges: vec![(GuestAddress(0), low), (GuestAddress(1 << 32), high)],
        };
        let addrs: Vec<u64> = pages.addresses().collect();
        assert_eq!(addrs, vec![0x3000, (1 << 32) + 0x1000, (1 << 32) + 0x2000]);
        assert_eq!(pages.count(), 3);
        assert!(pages.contains(0x3fff) && !pages.contains(0x4000));
        assert!(
            regions[0]
                .bitmap_ref()
                .get_and_reset()
                .iter()
                .all(|&w| w == 0),
            "reset"
        );
    }
}
