//! Stop-and-copy capture: the dirty set of an epoch (KVM's log OR-ed with the VMM's own writes)
//! copied out of guest memory while the VM is paused, with the machine state.

use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::RunningVm;
use vmm::memory::{DirtyPages, GuestMemoryMmap, PAGE_SIZE};
use vmm::vm::MachineState;

/// Errors of a capture.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Pausing, reading the dirty log or saving state failed.
    #[error("Cannot capture the epoch")]
    Vm(#[from] vmm::VmError),
    /// A dirty page lies outside guest memory (a bug: KVM and the VMM disagree on the layout).
    #[error("Dirty page at {0:#x} is not in guest memory")]
    Page(u64),
}

/// Pages captured in a pause: their frame numbers, ascending, and their contents, 4 KiB each in
/// the same order. Reused from epoch to epoch, so its buffers stop growing once warm.
#[derive(Debug, Default)]
pub struct Staging {
    /// Guest page frame numbers (address / 4096), ascending.
    pub gfns: Vec<u64>,
    /// `gfns.len()` pages of 4 KiB.
    pub data: Vec<u8>,
}

impl Staging {
    fn clear(&mut self) {
        self.gfns.clear();
        self.data.clear();
    }
}

/// What one capture took, step by step.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaptureStats {
    /// From the pause request to the resume.
    pub pause: Duration,
    /// From the pause request until every vCPU and the device thread had stopped.
    pub stop: Duration,
    /// Reading (and clearing) the dirty log and the VMM's bitmap.
    pub harvest: Duration,
    /// Copying the pages to the staging buffer.
    pub copy: Duration,
    /// Saving vCPU, device and KVM state and the counters.
    pub save: Duration,
    /// Pages copied.
    pub pages: usize,
}

/// Which pages to capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every page of guest memory (the first checkpoint); the dirty log is cleared as well.
    All,
    /// The pages written since the previous capture.
    Dirty,
}

/// Pauses `vm` (unless it is paused already), copies the pages of `scope` into `staging` and
/// saves the machine state, then lets the VM run as it was. `inspect`, if given, runs while
/// the VM is still paused (tests use it to look at the memory the capture saw).
pub fn capture(
    vm: &RunningVm,
    scope: Scope,
    staging: &mut Staging,
    inspect: Option<&mut dyn FnMut(&GuestMemoryMmap)>,
) -> Result<(MachineState, CaptureStats), CaptureError> {
    staging.clear();
    let start = Instant::now();
    let mut stats = CaptureStats::default();
    let state = vm.with_paused(|vm| -> Result<_, CaptureError> {
        let t0 = Instant::now();
        stats.stop = t0 - start;
        let dirty = vm.take_dirty_pages()?;
        let t1 = Instant::now();
        match scope {
            Scope::All => copy_all(vm.memory(), staging)?,
            Scope::Dirty => copy_dirty(vm.memory(), &dirty, staging)?,
        }
        let t2 = Instant::now();
        let state = vm.save_state()?;
        let t3 = Instant::now();
        (stats.harvest, stats.copy, stats.save) = (t1 - t0, t2 - t1, t3 - t2);
        if let Some(f) = inspect {
            f(vm.memory());
        }
        Ok(state)
    })??;
    stats.pause = start.elapsed();
    stats.pages = staging.gfns.len();
    Ok((state, stats))
}

/// The host mapping of `len` bytes of guest memory at `addr`, which must lie in one region.
fn host_slice(memory: &GuestMemoryMmap, addr: u64, len: usize) -> Result<&[u8], CaptureError> {
    let region = memory
        .find_region(GuestAddress(addr))
        .ok_or(CaptureError::Page(addr))?;
    let offset = addr - region.start_addr().0;
    if offset + len as u64 > region.len() {
        return Err(CaptureError::Page(addr + region.len() - offset));
    }
    let base = memory
        .get_host_address(GuestAddress(addr))
        .map_err(|_| CaptureError::Page(addr))?;
    // SAFETY: the range lies inside one mapped region of `memory`, which outlives the
    // returned borrow; the VM is paused (vCPUs and device thread), so nothing writes it while
    // it is read.
    Ok(unsafe { std::slice::from_raw_parts(base, len) })
}

fn copy_all(memory: &GuestMemoryMmap, staging: &mut Staging) -> Result<(), CaptureError> {
    for region in memory.iter() {
        let start = region.start_addr().0;
        let pages = region.len() / PAGE_SIZE;
        staging
            .gfns
            .extend((0..pages).map(|p| start / PAGE_SIZE + p));
        staging
            .data
            .extend_from_slice(host_slice(memory, start, region.len() as usize)?);
    }
    Ok(())
}

fn copy_dirty(
    memory: &GuestMemoryMmap,
    dirty: &DirtyPages,
    staging: &mut Staging,
) -> Result<(), CaptureError> {
    staging.gfns.reserve(dirty.count());
    staging.data.reserve(dirty.count() * PAGE_SIZE as usize);
    // Contiguous dirty pages are copied with one memcpy.
    let mut run: Option<(u64, u64)> = None; // (first address, pages)
    let flush = |run: (u64, u64), staging: &mut Staging| -> Result<(), CaptureError> {
        let (first, n) = run;
        staging.gfns.extend((0..n).map(|i| first / PAGE_SIZE + i));
        staging
            .data
            .extend_from_slice(host_slice(memory, first, (n * PAGE_SIZE) as usize)?);
        Ok(())
    };
    for addr in dirty.addresses() {
        run = match run {
            Some((first, n)) if first + n * PAGE_SIZE == addr => Some((first, n + 1)),
            Some(r) => {
                flush(r, staging)?;
                Some((addr, 1))
            }
            None => Some((addr, 1)),
        };
    }
    if let Some(r) = run {
        flush(r, staging)?;
    }
    Ok(())
}
