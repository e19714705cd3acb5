//! KVM's dirty ring: one ring per vCPU of the pages that vCPU wrote, shared with the kernel.
//!
//! Unlike the dirty bitmap, the rings can be harvested while the vCPUs run: collect the entries
//! KVM pushed, mark them harvested, then `KVM_RESET_DIRTY_RINGS`, which write-protects those
//! pages again. Between two resets KVM logs a page at most once (the first write makes it
//! writable), so whoever copies pages must do it *after* the reset: a write after the copy then
//! logs the page again. With the ring on, `KVM_GET_DIRTY_LOG` fails (ENXIO), so a VM uses one
//! mechanism or the other, chosen before its vCPUs exist ([`DirtyLog`]).
//!
//! A vCPU whose ring is full leaves KVM_RUN with `KVM_EXIT_DIRTY_RING_FULL`; its thread calls
//! [`DirtyRing::on_full`], which harvests every ring into a pending set (handed out by the next
//! [`DirtyRing::harvest`]) and resets them, so the vCPU continues and nothing is lost.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_DIRTY_LOG_PAGE_OFFSET,
    kvm_dirty_gfn, kvm_enable_cap,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;

use crate::memory::DirtyPages;

/// The exit reason of a vCPU whose dirty ring is full.
pub const EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
/// Smallest ring KVM takes: one host page of 16-byte entries.
pub const MIN_ENTRIES: u32 = 256;

mod nr {
    #![allow(missing_docs)]
    use vmm_sys_util::ioctl_io_nr;
    const KVMIO: u32 = 0xAE;
    // kvm-ioctls 0.25 has no call for it.
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}
use nr::KVM_RESET_DIRTY_RINGS;

/// KVM pushed the entry (`KVM_DIRTY_GFN_F_DIRTY`).
const F_DIRTY: u32 = 1 << 0;
/// Userspace harvested the entry; the next reset recycles it (`KVM_DIRTY_GFN_F_RESET`).
const F_RESET: u32 = 1 << 1;

/// How a VM tracks the pages its guest writes (the VMM's own writes are tracked apart, in
/// vm-memory's bitmap, either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyLog {
    /// KVM's dirty bitmap per memory slot (`KVM_GET_DIRTY_LOG`), read while the VM is paused.
    #[default]
    Bitmap,
    /// A dirty ring of `entries` (a power of two, at least [`MIN_ENTRIES`]) per vCPU,
    /// harvestable while the VM runs.
    Ring {
        /// Entries per vCPU ring.
        entries: u32,
    },
}

/// Errors of the dirty ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The size cannot be a ring.
    #[error(
        "A dirty ring of {0} entries is not possible: it must be a power of two of at least {MIN_ENTRIES}"
    )]
    Size(u32),
    /// This KVM has no dirty ring.
    #[error("This KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")]
    Unsupported,
    /// The ring is larger than KVM allows.
    #[error("A dirty ring of {entries} entries is larger than this KVM's {max}")]
    TooLarge {
        /// Entries asked for.
        entries: u32,
        /// KVM's largest ring, in entries.
        max: u64,
    },
    /// A KVM call on the ring failed.
    #[error("Cannot {what}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// What KVM said.
        #[source]
        source: std::io::Error,
    },
}

fn os_err(what: &'static str) -> impl FnOnce(std::io::Error) -> RingError {
    move |source| RingError::Kvm { what, source }
}

/// Turns the ring on for `vm`, which must not have vCPUs yet. Prefers the variant with
/// acquire/release ordering of the entries' flags (what a harvester running beside the vCPUs
/// relies on); x86 orders them anyway, so the plain variant works as well.
pub fn enable(vm: &VmFd, entries: u32) -> Result<(), RingError> {
    if entries < MIN_ENTRIES || !entries.is_power_of_two() {
        return Err(RingError::Size(entries));
    }
    let entry = std::mem::size_of::<kvm_dirty_gfn>() as u64;
    let bytes = u64::from(entries) * entry;
    let cap = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .find_map(|c| {
            let max = vm.check_extension_raw(c.into());
            (max > 0).then_some((c, max as u64))
        });
    let Some((cap, max)) = cap else {
        return Err(RingError::Unsupported);
    };
    if bytes > max {
        return Err(RingError::TooLarge {
            entries,
            max: max / entry,
        });
    }
    let mut enable = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    enable.args[0] = bytes;
    vm.enable_cap(&enable)
        .map_err(|e| os_err("enable the dirty ring")(e.into()))
}

/// One vCPU's ring as mapped from its fd, and how far it has been harvested.
struct Ring {
    base: *mut kvm_dirty_gfn,
    /// Index (free-running, modulo the size) of the next entry to look at.
    next: u32,
}

struct Inner {
    rings: Vec<Ring>,
    /// Pages harvested on a full ring that no [`DirtyRing::harvest`] has handed out yet, per
    /// memory slot, one bit a page.
    pending: Vec<Vec<u64>>,
    pending_any: bool,
}

// SAFETY: the ring pointers are mappings owned by `DirtyRing` (unmapped in its Drop), used only
// under its mutex; the kernel writes them concurrently, which the flag protocol orders.
unsafe impl Send for Inner {}

/// Every vCPU's dirty ring of a VM, shared by the vCPU threads (full rings) and whoever
/// harvests (the capture, while the VM runs or paused).
pub struct DirtyRing {
    /// A duplicate of the VM fd, for `KVM_RESET_DIRTY_RINGS` from any thread.
    vm: File,
    entries: u32,
    /// Pages per memory slot (slot i is guest RAM range i).
    slot_pages: Vec<u64>,
    inner: Mutex<Inner>,
    full_exits: AtomicU64,
    harvested: AtomicU64,
    bogus: AtomicU64,
}

impl std::fmt::Debug for DirtyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyRing")
            .field("entries", &self.entries)
            .field("full_exits", &self.full_exits())
            .finish_non_exhaustive()
    }
}

impl DirtyRing {
    /// Maps the ring of each vCPU in `vcpus` (created after [`enable`] with `entries`);
    /// `slot_pages` is the size in pages of each memory slot, in slot order.
    pub fn new(
        vm: &VmFd,
        vcpus: &[VcpuFd],
        entries: u32,
        slot_pages: Vec<u64>,
    ) -> Result<Self, RingError> {
        // SAFETY: dup of a live fd; the new fd is owned by the File alone.
        let dup = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(os_err("duplicate the VM fd")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `dup` is a fresh fd that nothing else owns.
        let vm = unsafe { File::from_raw_fd(dup) };
        let pending = slot_pages
            .iter()
            .map(|&p| vec![0; p.div_ceil(64) as usize])
            .collect();
        let ring = Self {
            vm,
            entries,
            slot_pages,
            inner: Mutex::new(Inner {
                rings: Vec::with_capacity(vcpus.len()),
                pending,
                pending_any: false,
            }),
            full_exits: AtomicU64::new(0),
            harvested: AtomicU64::new(0),
            bogus: AtomicU64::new(0),
        };
        let len = ring.len();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
        for vcpu in vcpus {
            // SAFETY: a new shared mapping of the vCPU fd's ring area, of the size the ring was
            // enabled with; nothing else is at the returned address.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    vcpu.as_raw_fd(),
                    i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
                )
            };
            if base == libc::MAP_FAILED {
                // The rings mapped so far are unmapped by Drop.
                return Err(os_err("map a vCPU's dirty ring")(
                    std::io::Error::last_os_error(),
                ));
            }
            ring.lock().rings.push(Ring {
                base: base.cast(),
                next: 0,
            });
        }
        Ok(ring)
    }

    fn len(&self) -> usize {
        self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries per vCPU ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// How many times a vCPU found its ring full.
    pub fn full_exits(&self) -> u64 {
        self.full_exits.load(Ordering::Relaxed)
    }

    /// Entries harvested so far, all rings together.
    pub fn harvested(&self) -> u64 {
        self.harvested.load(Ordering::Relaxed)
    }

    /// Collects every entry KVM has pushed into `out` (shaped like guest memory: one bitmap per
    /// slot), together with what full rings left pending, and resets the rings, so that from
    /// now on a write to one of those pages is logged again. Returns the entries harvested
    /// (pending pages not counted). Safe while the vCPUs run; copy the pages only after it
    /// returns.
    pub fn harvest(&self, out: &mut DirtyPages) -> Result<usize, RingError> {
        let mut inner = self.lock();
        if inner.pending_any {
            for ((_, bits), pending) in out.ranges.iter_mut().zip(&mut inner.pending) {
                for (w, p) in bits.iter_mut().zip(pending.iter_mut()) {
                    *w |= std::mem::take(p);
                }
            }
            inner.pending_any = false;
        }
        self.collect_and_reset(&mut inner, |slot, page| set(&mut out.ranges, slot, page))
    }

    /// A vCPU found its ring full: harvests every ring into the pending set and resets them.
    pub fn on_full(&self) -> Result<(), RingError> {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let mut pending = std::mem::take(&mut inner.pending);
        let n = self.collect_and_reset(&mut inner, |slot, page| {
            if let Some(words) = pending.get_mut(slot) {
                words[page / 64] |= 1 << (page % 64);
            }
        });
        inner.pending = pending;
        inner.pending_any = true;
        n.map(|_| ())
    }

    fn collect_and_reset(
        &self,
        inner: &mut Inner,
        mut mark: impl FnMut(usize, usize),
    ) -> Result<usize, RingError> {
        let mask = self.entries - 1;
        let mut total = 0;
        for ring in &mut inner.rings {
            for _ in 0..self.entries {
                // SAFETY: the index is masked into the mapped ring.
                let e = unsafe { ring.base.add((ring.next & mask) as usize) };
                // SAFETY: `flags` is a u32 in the live mapping, aligned (the entry is 8-aligned);
                // the kernel accesses it atomically too.
                let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
                if flags.load(Ordering::Acquire) & F_DIRTY == 0 {
                    break;
                }
                // SAFETY: plain fields of a live entry, published by the acquire above.
                let (slot, offset) = unsafe {
                    (
                        std::ptr::addr_of!((*e).slot).read_volatile(),
                        std::ptr::addr_of!((*e).offset).read_volatile(),
                    )
                };
                flags.store(F_RESET, Ordering::Release);
                ring.next = ring.next.wrapping_add(1);
                total += 1;
                // Address space 0 only (the high 16 bits); anything else is not guest RAM.
                let slot = slot as usize;
                match self.slot_pages.get(slot) {
                    Some(&pages) if offset < pages => mark(slot, offset as usize),
                    _ => {
                        if self.bogus.fetch_add(1, Ordering::Relaxed) == 0 {
                            tracing::warn!(slot, offset, "dirty ring entry outside guest RAM");
                        }
                    }
                }
            }
        }
        if total > 0 {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; the fd is a live VM fd.
            let r = unsafe { ioctl(&self.vm, KVM_RESET_DIRTY_RINGS()) };
            if r < 0 {
                return Err(os_err("reset the dirty rings")(
                    std::io::Error::last_os_error(),
                ));
            }
            self.harvested.fetch_add(total as u64, Ordering::Relaxed);
        }
        Ok(total)
    }
}

fn set(ranges: &mut [(vm_memory::GuestAddress, Vec<u64>)], slot: usize, page: usize) {
    if let Some(w) = ranges
        .get_mut(slot)
        .and_then(|(_, bits)| bits.get_mut(page / 64))
    {
        *w |= 1 << (page % 64);
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.len();
        for ring in &self.lock().rings {
            // SAFETY: each base is a mapping of `len` bytes made in `new` and used by no one
            // else now (we are being dropped).
            unsafe { libc::munmap(ring.base.cast(), len) };
        }
    }
}
