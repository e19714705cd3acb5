//! Capturing an epoch: its dirty set (KVM's log OR-ed with the VMM's own writes) copied out of
//! guest memory, with the machine state, in one of two ways ([`Mode`]):
//!
//! - **stop-and-copy** ([`capture`]): pause, harvest the dirty log, copy every dirty page, save
//!   the state, resume;
//! - **dirty ring with background pre-copy** ([`Capturer`] with [`Mode::Ring`], for a VM built
//!   with [`vmm::dirty_ring::DirtyLog::Ring`]): while the guest runs, a `precopy` thread
//!   harvests the rings, resets them and copies the pages it found — in that order, so a page
//!   written after its copy is logged again —, and the pause copies only what was written since
//!   the last harvest. The epoch's pages are put in order for the staging buffer after the
//!   guest has resumed. A full capture ([`Scope::All`]) copies all of memory while the guest
//!   runs, after a harvest, and the pause patches in the pages written since.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::RunningVm;
use vmm::event::{self, ThreadError};
use vmm::memory::{DirtyPages, GuestMemoryMmap, LiveDirty, PAGE_SIZE};
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
    /// The blocks the guest wrote to a disk cannot be read back from its image.
    #[error("Cannot read the written blocks of disk {disk}")]
    Disk {
        /// The disk's index.
        disk: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Ring capture asked of a VM that tracks dirty pages with the bitmap.
    #[error(
        "Capture with the dirty ring needs a VM built with it (vmm::dirty_ring::DirtyLog::Ring)"
    )]
    NoRing,
    /// The background pre-copy failed: the pages it had harvested are lost to this epoch.
    #[error("Background pre-copy failed: {0}")]
    Precopy(String),
    /// The pre-copy thread ended.
    #[error(transparent)]
    Thread(#[from] ThreadError),
    /// An earlier ring capture failed after harvesting: an incremental capture could miss
    /// pages, so only a full one ([`Scope::All`]) is taken until then.
    #[error("An earlier capture failed ({0}): only a full capture is complete now")]
    Incomplete(String),
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
    /// Pages in the checkpoint.
    pub pages: usize,
    /// Pages copied during the pause (all of them with stop-and-copy).
    pub copied_paused: usize,
    /// Pages copied while the guest ran, since the previous capture (ring mode; a page written
    /// again after its copy counts each time).
    pub copied_running: usize,
    /// Ring mode: the copying just before the pause, guest running (the last pre-copy round;
    /// for [`Scope::All`], all of memory and a round).
    pub last_round: Duration,
    /// Ring mode: putting the epoch's pages in order into the staging buffer, after the resume.
    pub assemble: Duration,
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
    stats.copied_paused = stats.pages;
    Ok((state, stats))
}

/// How a [`Capturer`] captures epochs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Everything in the pause ([`capture`]).
    StopAndCopy,
    /// Dirty ring with background pre-copy every `interval`; the VM must be built with
    /// [`vmm::dirty_ring::DirtyLog::Ring`].
    Ring {
        /// How often the `precopy` thread harvests and copies while the guest runs.
        interval: Duration,
    },
}

/// A good pre-copy interval for 25 ms epochs: a harvest and reset cost tens of µs, and the
/// pause is left with about this long's writes.
pub const DEFAULT_PRECOPY_INTERVAL: Duration = Duration::from_millis(2);

/// Captures epochs of one VM in a [`Mode`]. In ring mode it owns the `precopy` thread (started
/// with the VM's [`vmm::Reporter`], so its failure ends the VM like any VMM thread's); stop it
/// with [`Capturer::stop`] to see how it ended (dropping it stops it and logs a failure).
pub struct Capturer {
    mode: Mode,
    precopy: Option<Precopier>,
}

impl std::fmt::Debug for Capturer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capturer")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

struct Precopier {
    shared: Arc<PrecopyShared>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

struct PrecopyShared {
    live: LiveDirty,
    buffer: Mutex<Precopy>,
    stop: Mutex<bool>,
    wake: Condvar,
    interval: Duration,
    /// Set when the thread's body ends, however (before its failure is reported).
    ended: AtomicBool,
}

/// Marks the `precopy` thread ended, unwinding included.
struct Ended<'a>(&'a AtomicBool);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Capturer {
    /// A capturer of `vm`'s epochs. Ring mode starts the `precopy` thread at once: what the
    /// guest writes from now on is pre-copied for the next [`Scope::Dirty`] capture.
    pub fn new(vm: &RunningVm, mode: Mode) -> Result<Self, CaptureError> {
        let precopy = match mode {
            Mode::StopAndCopy => None,
            Mode::Ring { interval } => {
                let live = vm.live_dirty().ok_or(CaptureError::NoRing)?;
                let buffer = Precopy::new(live.memory());
                let shared = Arc::new(PrecopyShared {
                    live,
                    buffer: Mutex::new(buffer),
                    stop: Mutex::new(false),
                    wake: Condvar::new(),
                    interval,
                    ended: AtomicBool::new(false),
                });
                let s = shared.clone();
                let thread = vm
                    .reporter()
                    .spawn("precopy", move || precopy_loop(&s))
                    .map_err(|e| CaptureError::Precopy(format!("cannot start the thread: {e}")))?;
                Some(Precopier {
                    shared,
                    thread: Some(thread),
                })
            }
        };
        Ok(Self { mode, precopy })
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Captures an epoch of `vm` (the VM this capturer was made for) into `staging`, as
    /// [`capture`] does, in this capturer's mode. `inspect` runs while the VM is paused.
    pub fn capture(
        &mut self,
        vm: &RunningVm,
        scope: Scope,
        staging: &mut Staging,
        inspect: Option<&mut dyn FnMut(&GuestMemoryMmap)>,
    ) -> Result<(MachineState, CaptureStats), CaptureError> {
        let Some(pre) = &mut self.precopy else {
            return capture(vm, scope, staging, inspect);
        };
        if pre.shared.ended.load(Ordering::SeqCst) {
            // Its failure, once, then that it is gone.
            if let Some(t) = pre.thread.take() {
                event::join("precopy", t)?;
            }
            return Err(CaptureError::Precopy("the thread has stopped".into()));
        }
        let shared = pre.shared.clone();
        let mut buffer = shared
            .buffer
            .lock()
            .map_err(|_| CaptureError::Precopy("the thread panicked while copying".into()))?;
        if let Some(cause) = &buffer.failed {
            return Err(CaptureError::Precopy(cause.clone()));
        }
        if scope == Scope::Dirty
            && let Some(cause) = &buffer.lost
        {
            return Err(CaptureError::Incomplete(cause.clone()));
        }
        let result = ring_capture(vm, &shared.live, &mut buffer, scope, staging, inspect);
        match &result {
            // Pages it had harvested may be gone from the ring: only a full capture is
            // complete from now on.
            Err(e) => buffer.lost = Some(event::error_chain(e)),
            Ok(_) if scope == Scope::All => buffer.lost = None,
            Ok(_) => {}
        }
        result
    }

    /// Stops the `precopy` thread (if any) and says how it ended.
    pub fn stop(mut self) -> Result<(), ThreadError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), ThreadError> {
        let Some(pre) = &mut self.precopy else {
            return Ok(());
        };
        *pre.shared.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        pre.shared.wake.notify_all();
        match pre.thread.take() {
            Some(t) => event::join("precopy", t),
            None => Ok(()),
        }
    }
}

impl Drop for Capturer {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            // Already reported as a VmEvent when it happened; this is the last trace of it.
            tracing::error!("{e}");
        }
    }
}

fn precopy_loop(shared: &PrecopyShared) -> Result<(), String> {
    let _ended = Ended(&shared.ended);
    event::check_fault("precopy")?;
    loop {
        {
            let stop = shared.stop.lock().unwrap_or_else(|p| p.into_inner());
            let (stop, _) = shared
                .wake
                .wait_timeout_while(stop, shared.interval, |stop| !*stop)
                .unwrap_or_else(|p| p.into_inner());
            if *stop {
                return Ok(());
            }
        }
        let mut buffer = shared.buffer.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = buffer.round(&shared.live) {
            let cause = event::error_chain(&e);
            buffer.failed = Some(cause.clone());
            return Err(cause);
        }
    }
}

/// One epoch in ring mode, with the pre-copy buffer held (the `precopy` thread waits).
fn ring_capture(
    vm: &RunningVm,
    live: &LiveDirty,
    buffer: &mut Precopy,
    scope: Scope,
    staging: &mut Staging,
    inspect: Option<&mut dyn FnMut(&GuestMemoryMmap)>,
) -> Result<(MachineState, CaptureStats), CaptureError> {
    staging.clear();
    let mut stats = CaptureStats::default();
    let t = Instant::now();
    match scope {
        Scope::Dirty => {
            // A last round while the guest runs: the pause is left with a few µs' writes.
            buffer.round(live)?;
            stats.copied_running = std::mem::take(&mut buffer.copied);
        }
        Scope::All => {
            // Everything, copied while the guest runs after a harvest (which re-arms the
            // ring), then what was written meanwhile; the pause patches in the rest.
            buffer.discard();
            buffer.harvest(live)?;
            copy_all_running(live.memory(), staging)?;
            buffer.harvest(live)?;
            stats.copied_running = staging.gfns.len() + buffer.patch(live.memory(), staging)?;
        }
    }
    stats.last_round = t.elapsed();
    let start = Instant::now();
    let state = vm.with_paused(|vm| -> Result<_, CaptureError> {
        let t0 = Instant::now();
        stats.stop = t0 - start;
        buffer.harvest(live)?;
        let t1 = Instant::now();
        stats.copied_paused = match scope {
            Scope::All => buffer.patch(vm.memory(), staging)?,
            Scope::Dirty => {
                buffer.copy_dirty(vm.memory())?;
                std::mem::take(&mut buffer.copied)
            }
        };
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
    if scope == Scope::Dirty {
        let t = Instant::now();
        buffer.drain_into(staging);
        stats.assemble = t.elapsed();
    }
    stats.pages = staging.gfns.len();
    Ok((state, stats))
}

/// Copies all of guest memory into `staging` while the guest may run (a page it writes
/// meanwhile must be harvested and patched in afterwards).
fn copy_all_running(memory: &GuestMemoryMmap, staging: &mut Staging) -> Result<(), CaptureError> {
    for region in memory.iter() {
        let start = region.start_addr();
        let len = region.len() as usize;
        let base = memory
            .get_host_address(start)
            .map_err(|_| CaptureError::Page(start.0))?;
        staging
            .gfns
            .extend((0..region.len() / PAGE_SIZE).map(|p| start.0 / PAGE_SIZE + p));
        staging.data.reserve(len);
        let at = staging.data.len();
        // SAFETY: the source is the whole mapped region, alive as long as `memory`; the
        // destination is the `len` bytes reserved past the end of `data`, then made part of it.
        // The guest may write the source concurrently (see above).
        unsafe {
            std::ptr::copy_nonoverlapping(base, staging.data.as_mut_ptr().add(at), len);
            staging.data.set_len(at + len);
        }
    }
    Ok(())
}

/// The pages of the current epoch copied so far, each once (a page copied again replaces its
/// earlier copy), in the order they were first copied.
struct Precopy {
    /// Scratch for harvests, shaped like guest memory.
    dirty: DirtyPages,
    /// Per RAM range: first frame number, pages, index of its first page in `slot_of`.
    ranges: Vec<(u64, u64, usize)>,
    /// Per guest page: where its copy is in `gfns`/`data`, or `NONE`.
    slot_of: Vec<u32>,
    /// Frame numbers of the copies, and for each its index in `slot_of`.
    gfns: Vec<(u64, u32)>,
    /// The copies, 4 KiB each, in `gfns` order.
    data: Vec<u8>,
    /// Pages copied since this was last read.
    copied: usize,
    /// Why the `precopy` thread failed (pages it had harvested were lost).
    failed: Option<String>,
    /// Why a capture failed (pages it had harvested may be lost) until a full capture.
    lost: Option<String>,
}

const NONE: u32 = u32::MAX;
const PAGE: usize = PAGE_SIZE as usize;

impl Precopy {
    fn new(memory: &GuestMemoryMmap) -> Self {
        let mut ranges = Vec::new();
        let mut total = 0usize;
        for r in memory.iter() {
            let pages = r.len() / PAGE_SIZE;
            ranges.push((r.start_addr().0 / PAGE_SIZE, pages, total));
            total += pages as usize;
        }
        Self {
            dirty: DirtyPages::clean(memory),
            ranges,
            slot_of: vec![NONE; total],
            gfns: Vec::new(),
            data: Vec::new(),
            copied: 0,
            failed: None,
            lost: None,
        }
    }

    /// Harvest (the ring is reset as part of it), then copy what it found.
    fn round(&mut self, live: &LiveDirty) -> Result<(), CaptureError> {
        self.harvest(live)?;
        self.copy_dirty(live.memory())
    }

    /// The pages written since the last harvest, into `self.dirty`; from now on a write to
    /// one of them is logged again.
    fn harvest(&mut self, live: &LiveDirty) -> Result<(), CaptureError> {
        self.dirty.clear();
        live.take_into(&mut self.dirty)
            .map_err(vmm::VmError::from)?;
        Ok(())
    }

    /// Copies the pages of `self.dirty` over their place in `staging`, which holds all of
    /// guest memory in order (see [`copy_all_running`]). Returns the pages copied.
    fn patch(
        &mut self,
        memory: &GuestMemoryMmap,
        staging: &mut Staging,
    ) -> Result<usize, CaptureError> {
        let mut n = 0;
        for (r, (start, bits)) in self.dirty.ranges.iter().enumerate() {
            let &(_, pages, first_index) = &self.ranges[r];
            let base = memory
                .get_host_address(*start)
                .map_err(|_| CaptureError::Page(start.0))?;
            for page in set_bits(bits) {
                let index = first_index + page as usize;
                if page >= pages || (index + 1) * PAGE > staging.data.len() {
                    return Err(CaptureError::Page(start.0 + page * PAGE_SIZE));
                }
                // SAFETY: the source is page `page` of a mapped region of `pages` pages, the
                // destination a page inside `staging.data` (both checked above).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        base.add(page as usize * PAGE),
                        staging.data.as_mut_ptr().add(index * PAGE),
                        PAGE,
                    );
                }
                n += 1;
            }
        }
        Ok(n)
    }

    /// Copies the pages of `self.dirty` into the buffer. The guest may be running: a page it
    /// writes meanwhile was re-armed by the harvest before, so it is logged again.
    fn copy_dirty(&mut self, memory: &GuestMemoryMmap) -> Result<(), CaptureError> {
        for (r, (start, bits)) in self.dirty.ranges.iter().enumerate() {
            let &(first_gfn, pages, first_index) = &self.ranges[r];
            let base = memory
                .get_host_address(*start)
                .map_err(|_| CaptureError::Page(start.0))?;
            for page in set_bits(bits) {
                if page >= pages {
                    return Err(CaptureError::Page(start.0 + page * PAGE_SIZE));
                }
                let index = first_index + page as usize;
                let slot = match self.slot_of[index] {
                    NONE => {
                        let slot = self.gfns.len();
                        self.gfns.push((first_gfn + page, index as u32));
                        self.data.reserve(PAGE);
                        self.slot_of[index] = slot as u32;
                        slot
                    }
                    s => s as usize,
                };
                // SAFETY: the source is page `page` of a mapped region of `pages` pages
                // (checked above), alive as long as `memory`; the destination lies within
                // `data`'s allocation (one page reserved per slot). The guest may write
                // the source concurrently: such a page is logged again and recopied.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        base.add(page as usize * PAGE),
                        self.data.as_mut_ptr().add(slot * PAGE),
                        PAGE,
                    );
                    if slot * PAGE == self.data.len() {
                        self.data.set_len((slot + 1) * PAGE);
                    }
                }
                self.copied += 1;
            }
        }
        Ok(())
    }

    /// Moves the epoch's pages into `staging` in frame order and empties the buffer.
    fn drain_into(&mut self, staging: &mut Staging) {
        let mut order: Vec<u32> = (0..self.gfns.len() as u32).collect();
        order.sort_unstable_by_key(|&s| self.gfns[s as usize].0);
        staging.gfns.reserve(order.len());
        staging.data.reserve(order.len() * PAGE);
        for s in order {
            let s = s as usize;
            staging.gfns.push(self.gfns[s].0);
            staging
                .data
                .extend_from_slice(&self.data[s * PAGE..(s + 1) * PAGE]);
        }
        self.discard();
    }

    /// Forgets the epoch's pages.
    fn discard(&mut self) {
        for &(_, index) in &self.gfns {
            self.slot_of[index as usize] = NONE;
        }
        self.gfns.clear();
        self.data.clear();
    }
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

/// The indices of the set bits of a bitmap, ascending.
fn set_bits(words: &[u64]) -> impl Iterator<Item = u64> + '_ {
    words.iter().enumerate().flat_map(|(w, &word)| {
        let mut word = word;
        std::iter::from_fn(move || {
            (word != 0).then(|| {
                let bit = word.trailing_zeros();
                word &= word - 1;
                w as u64 * 64 + u64::from(bit)
            })
        })
    })
}
