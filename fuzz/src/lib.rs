//! Helpers shared by the fuzz targets and the seed generator: a guest memory whose writes can
//! be checked byte for byte, a driver's view of a split virtqueue, and an independent walk of a
//! descriptor chain (virtio-queue's own, on a second queue handle) that tells which bytes a
//! device may write.
//!
//! Nothing here depends on libFuzzer, so `cargo run --example gen_seeds` builds without it.

pub mod layout;
pub mod seeds;

use std::ops::Range;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm::memory::GuestMemoryMmap;

/// Page size of vm-memory's dirty bitmap.
pub const PAGE: usize = 4096;

/// One guest memory region at 0 of `size` bytes, with a shadow copy of what it should hold.
///
/// The shadow changes only through [`CheckedMemory::set`] (driver writes, made by the target)
/// and [`CheckedMemory::accept_writes`] (device writes, checked against what the device may
/// write). Anything else that changes guest memory is caught by [`CheckedMemory::assert_same`].
pub struct CheckedMemory {
    /// The guest memory handed to devices.
    pub mem: GuestMemoryMmap,
    base: Vec<u8>,
    shadow: Vec<u8>,
    touched: Vec<bool>,
}

impl CheckedMemory {
    /// Memory of `size` bytes (a multiple of 4 KiB) whose contents start as `base`.
    pub fn new(base: Vec<u8>) -> Self {
        assert!(base.len().is_multiple_of(PAGE));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), base.len())])
            .expect("small guest memory");
        let mut m = Self {
            mem,
            shadow: base.clone(),
            touched: vec![true; base.len() / PAGE],
            base,
        };
        m.reset();
        m
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.base.len()
    }

    /// Whether the memory has no bytes (never: kept for clippy's sake).
    pub fn is_empty(&self) -> bool {
        self.base.is_empty()
    }

    /// The guest's bytes as they are now.
    pub fn bytes(&self) -> &[u8] {
        let ptr = self
            .mem
            .get_host_address(GuestAddress(0))
            .expect("address 0 is mapped");
        // SAFETY: the region at 0 is one mapping of `len()` bytes that lives as long as
        // `self.mem`; targets are single-threaded and call devices (the only other writers) only
        // while no slice returned here is alive (the borrow of `self` ends before they run).
        unsafe { std::slice::from_raw_parts(ptr, self.len()) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let ptr = self
            .mem
            .get_host_address(GuestAddress(0))
            .expect("address 0 is mapped");
        // SAFETY: as in `bytes`; `&mut self` guarantees no other slice of ours is alive.
        unsafe { std::slice::from_raw_parts_mut(ptr, self.len()) }
    }

    /// What the memory should hold.
    pub fn shadow(&self) -> &[u8] {
        &self.shadow
    }

    /// Puts back the base contents of every page touched since the last reset, and clears the
    /// dirty bitmap.
    pub fn reset(&mut self) {
        let touched = std::mem::take(&mut self.touched);
        for (page, _) in touched.iter().enumerate().filter(|(_, t)| **t) {
            let r = page * PAGE..(page + 1) * PAGE;
            let base = self.base[r.clone()].to_vec();
            self.bytes_mut()[r.clone()].copy_from_slice(&base);
            self.shadow[r].copy_from_slice(&base);
        }
        self.touched = vec![false; touched.len()];
        self.clear_dirty();
    }

    /// A driver write: memory and shadow both change.
    pub fn set(&mut self, addr: usize, data: &[u8]) {
        let end = (addr + data.len()).min(self.len());
        let data = &data[..end.saturating_sub(addr)];
        if data.is_empty() {
            return;
        }
        self.bytes_mut()[addr..end].copy_from_slice(data);
        self.shadow[addr..end].copy_from_slice(data);
        for p in addr / PAGE..end.div_ceil(PAGE) {
            self.touched[p] = true;
        }
    }

    fn clear_dirty(&self) {
        for region in self.mem.iter() {
            std::ops::Deref::deref(region).bitmap().reset();
        }
    }

    fn dirty_pages(&self) -> Vec<usize> {
        let region = self.mem.iter().next().expect("one region");
        let bits = std::ops::Deref::deref(region).bitmap();
        (0..self.len() / PAGE)
            .filter(|p| bits.is_addr_set(p * PAGE))
            .collect()
    }

    /// Checks every byte the device changed since the last call: each must lie in `allowed`.
    /// Accepts the changes into the shadow, clears the dirty bitmap, and returns the changed
    /// bytes' ranges (merged) for further checks.
    pub fn accept_writes(&mut self, allowed: &Ranges, what: &str) -> Vec<Range<usize>> {
        let mut changed = Vec::new();
        for page in self.dirty_pages() {
            self.touched[page] = true;
            let r = page * PAGE..(page + 1) * PAGE;
            let now = self.bytes()[r.clone()].to_vec();
            let old = &self.shadow[r.clone()];
            // Whole-page and 64-byte comparisons first (memcmp, not instrumented by the
            // fuzzer), byte by byte only where something changed.
            if now == old {
                continue;
            }
            let chunks = now.chunks(64).zip(old.chunks(64)).enumerate();
            for (c, (a, b)) in chunks.filter(|(_, (a, b))| a != b) {
                for (i, (a, b)) in a.iter().zip(b).enumerate().filter(|(_, (a, b))| a != b) {
                    let addr = r.start + c * 64 + i;
                    assert!(
                        allowed.contains(addr as u64),
                        "{what}: device wrote guest byte {addr:#x} ({b:#04x} -> {a:#04x}), \
                         outside every buffer it may write: {allowed:x?}"
                    );
                    match changed.last_mut() {
                        Some(Range { end, .. }) if *end == addr => *end += 1,
                        _ => changed.push(addr..addr + 1),
                    }
                }
            }
            self.shadow[r].copy_from_slice(&now);
        }
        self.clear_dirty();
        changed
    }

    /// Takes whatever the device wrote since the last call into the shadow without checking it
    /// (for steps whose effects the target cannot predict).
    pub fn accept_unchecked(&mut self) {
        for page in self.dirty_pages() {
            self.touched[page] = true;
            let r = page * PAGE..(page + 1) * PAGE;
            let now = self.bytes()[r.clone()].to_vec();
            self.shadow[r].copy_from_slice(&now);
        }
        self.clear_dirty();
    }

    /// Asserts that memory equals the shadow everywhere (catches writes that bypass vm-memory's
    /// dirty bitmap).
    pub fn assert_same(&self, what: &str) {
        if self.bytes() != self.shadow.as_slice() {
            let at = self
                .bytes()
                .iter()
                .zip(&self.shadow)
                .position(|(a, b)| a != b)
                .expect("differs somewhere");
            panic!("{what}: guest byte {at:#x} changed without a dirty-bitmap entry");
        }
    }
}

/// A set of guest-physical byte ranges.
#[derive(Clone, Debug, Default)]
pub struct Ranges(pub Vec<Range<u64>>);

impl Ranges {
    /// Adds `len` bytes at `addr` (saturating at the end of the address space).
    pub fn add(&mut self, addr: u64, len: u64) {
        self.0.push(addr..addr.saturating_add(len));
    }

    /// Whether `addr` lies in one of the ranges.
    pub fn contains(&self, addr: u64) -> bool {
        self.0.iter().any(|r| r.contains(&addr))
    }
}

/// Where a split virtqueue lives in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct QueueLayout {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Number of entries.
    pub size: u16,
}

impl QueueLayout {
    /// The device's queue over this layout, ready, positioned at `next_avail`/`next_used`.
    pub fn queue(&self, next_avail: u16, next_used: u16) -> Queue {
        let state = QueueState {
            max_size: 256,
            next_avail,
            next_used,
            event_idx_enabled: false,
            size: self.size,
            ready: true,
            desc_table: self.desc,
            avail_ring: self.avail,
            used_ring: self.used,
        };
        Queue::try_from(state).expect("valid queue layout")
    }

    /// Bytes of the used ring (flags, idx, entries, avail_event).
    pub fn used_len(&self) -> u64 {
        4 + 8 * u64::from(self.size) + 2
    }

    /// Address of the available ring's `idx`.
    pub fn avail_idx_addr(&self) -> u64 {
        self.avail + 2
    }

    /// The used ring's `idx` and entry `n` (id, len).
    pub fn used_entry(&self, mem: &[u8], n: u16) -> (u16, (u32, u32)) {
        let le16 = |a: u64| u16::from_le_bytes([mem[a as usize], mem[a as usize + 1]]);
        let le32 = |a: u64| u32::from_le_bytes(mem[a as usize..a as usize + 4].try_into().unwrap());
        let e = self.used + 4 + 8 * u64::from(n % self.size);
        (le16(self.used + 2), (le32(e), le32(e + 4)))
    }
}

/// The chain the device will see next: its head and descriptors, as virtio-queue walks it
/// (indirect tables followed), or None if nothing is available.
pub fn next_chain(
    mem: &GuestMemoryMmap,
    layout: &QueueLayout,
    next_avail: u16,
) -> Option<(u16, Vec<Descriptor>)> {
    let mut q = layout.queue(next_avail, 0);
    let chain = q.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    Some((head, chain.collect()))
}

/// Whether the buffers of `descs` that the device may write cover any of `len` bytes at `addr`
/// (e.g. the available ring's index: writing it publishes more chains mid-step).
pub fn writes_over(descs: &[Descriptor], addr: u64, len: u64) -> bool {
    writable(descs)
        .0
        .iter()
        .any(|r| r.start < addr + len && addr < r.end)
}

/// The buffers of `descs` that the device may write.
pub fn writable(descs: &[Descriptor]) -> Ranges {
    let mut r = Ranges::default();
    for d in descs.iter().filter(|d| d.is_write_only()) {
        r.add(d.addr().0, u64::from(d.len()));
    }
    r
}

/// Reads `d`'s bytes from `mem` (a byte slice of guest memory at 0); None if outside.
pub fn desc_bytes<'a>(mem: &'a [u8], d: &Descriptor) -> Option<&'a [u8]> {
    let start = usize::try_from(d.addr().0).ok()?;
    mem.get(start..start.checked_add(d.len() as usize)?)
}

/// A temporary directory on tmpfs where there is one (/dev/shm): the targets' files are
/// rewritten and fsynced on every input, which a disk makes thousands of times slower.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().expect("temporary directory")
}

/// A deterministic byte pattern, so that a write of the wrong bytes is visible.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect()
}
