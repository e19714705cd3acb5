//! vCPU threads as explicit state machines.
//!
//! Each vCPU runs on its own thread in `Running`, `Paused` or `Exited`. Another thread asks for a
//! change through [`VcpuHandle`]: a pause sets `immediate_exit` in the shared `kvm_run` page and
//! sends the thread a signal, so the vCPU leaves KVM_RUN whether it is inside the guest or about
//! to enter it. A vCPU that stops after an I/O exit re-enters KVM_RUN once with
//! `immediate_exit` set, so the access is complete before anyone looks at its state.
//! While paused, a vCPU runs jobs (closures over its `VcpuFd`) for the controller: this is how
//! state is read from a thread that does not own the fd.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::bus::{Bus, MmioAddress, PioAddress, VcpuAction};
use crate::dirty_ring::{DirtyRing, EXIT_DIRTY_RING_FULL};
use crate::event::{self, Reporter, ThreadError, VmEvent};

/// Why a vCPU left KVM_RUN; the label of `ftvm_vcpu_exits_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// `in` from a port.
    IoIn,
    /// `out` to a port.
    IoOut,
    /// Read from an MMIO address.
    MmioRead,
    /// Write to an MMIO address.
    MmioWrite,
    /// Kicked out by the VMM (signal or `immediate_exit`).
    Interrupted,
    /// `hlt` with no in-kernel irqchip to handle it.
    Hlt,
    /// Triple fault.
    Shutdown,
    /// A system event (reset, shutdown) from KVM.
    SystemEvent,
    /// Anything else.
    Other,
}

impl ExitReason {
    /// Every reason, in counter order.
    pub const ALL: [ExitReason; 9] = [
        Self::IoIn,
        Self::IoOut,
        Self::MmioRead,
        Self::MmioWrite,
        Self::Interrupted,
        Self::Hlt,
        Self::Shutdown,
        Self::SystemEvent,
        Self::Other,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::IoIn => "io_in",
            Self::IoOut => "io_out",
            Self::MmioRead => "mmio_read",
            Self::MmioWrite => "mmio_write",
            Self::Interrupted => "interrupted",
            Self::Hlt => "hlt",
            Self::Shutdown => "shutdown",
            Self::SystemEvent => "system_event",
            Self::Other => "other",
        }
    }

    fn of(exit: &VcpuExit) -> Self {
        match exit {
            VcpuExit::IoIn(..) => Self::IoIn,
            VcpuExit::IoOut(..) => Self::IoOut,
            VcpuExit::MmioRead(..) => Self::MmioRead,
            VcpuExit::MmioWrite(..) => Self::MmioWrite,
            VcpuExit::Intr => Self::Interrupted,
            VcpuExit::Hlt => Self::Hlt,
            VcpuExit::Shutdown => Self::Shutdown,
            VcpuExit::SystemEvent(..) => Self::SystemEvent,
            _ => Self::Other,
        }
    }
}

/// Per-vCPU counters: monotonic, never reset on read.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    /// Wall-clock nanoseconds inside KVM_RUN, added when it returns. Not CPU time: a vCPU
    /// parked in KVM on the guest's behalf counts, and a long KVM_RUN counts only once it ends.
    pub kvm_run_ns: AtomicU64,
    exits: [AtomicU64; ExitReason::ALL.len()],
    /// Port or MMIO accesses that no device decodes.
    pub unhandled_io: AtomicU64,
    cpu: Mutex<CpuTime>,
}

/// The vCPU thread's CPU time (`CLOCK_THREAD_CPUTIME_ID` of its thread): guest code, KVM on
/// its behalf and the VMM's handling of its exits, all on that thread; not the time it waits.
#[derive(Debug, Default)]
struct CpuTime {
    /// Nanoseconds counted up to `clock`'s reading `at` (or in all, with no clock).
    base: u64,
    /// While a vCPU thread counts: its CPU clock and that clock's reading when `base` was set.
    clock: Option<(libc::clockid_t, u64)>,
}

/// Reads a CPU-time clock in nanoseconds.
fn read_clock(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

impl CpuTime {
    fn now(&self) -> u64 {
        match self.clock {
            // A clock that cannot be read (its thread is ending) adds nothing.
            Some((clock, at)) => {
                self.base + read_clock(clock).map_or(0, |now| now.saturating_sub(at))
            }
            None => self.base,
        }
    }
}

/// Counts the calling thread's CPU time into `counters` until dropped (unwinding included).
struct CpuCounting<'a>(&'a VcpuCounters);

impl<'a> CpuCounting<'a> {
    fn start(counters: &'a VcpuCounters) -> Self {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self is always valid; the call only writes `clock`.
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        let mut cpu = counters.cpu_lock();
        if rc == 0
            && let Some(at) = read_clock(clock)
        {
            cpu.clock = Some((clock, at));
        } else {
            tracing::warn!(
                "the vCPU thread's CPU clock cannot be read: its CPU time is not counted"
            );
        }
        Self(counters)
    }
}

impl Drop for CpuCounting<'_> {
    fn drop(&mut self) {
        // Freeze the count before the thread (and its clock) goes away.
        let mut cpu = self.0.cpu_lock();
        cpu.base = cpu.now();
        cpu.clock = None;
    }
}

impl VcpuCounters {
    /// Exits for `reason` so far.
    pub fn exits(&self, reason: ExitReason) -> u64 {
        self.exits[reason as usize].load(Ordering::Relaxed)
    }

    fn cpu_lock(&self) -> MutexGuard<'_, CpuTime> {
        self.cpu.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// CPU time of the vCPU's thread in nanoseconds, read now (also while the guest runs
    /// without exits), continued from the value loaded at restore.
    pub fn cpu_ns(&self) -> u64 {
        self.cpu_lock().now()
    }

    /// The number of values of [`VcpuCounters::values`].
    pub const VALUES: usize = ExitReason::ALL.len() + 3;

    /// kvm_run_ns, exits by reason (in [`ExitReason::ALL`] order), unhandled_io, cpu_ns.
    pub fn values(&self) -> Vec<u64> {
        let mut v = vec![self.kvm_run_ns.load(Ordering::Relaxed)];
        v.extend(self.exits.iter().map(|e| e.load(Ordering::Relaxed)));
        v.push(self.unhandled_io.load(Ordering::Relaxed));
        v.push(self.cpu_ns());
        v
    }

    /// Sets the counters from [`VcpuCounters::values`] (untrusted: the length must match).
    /// Values saved before cpu_ns existed (one fewer) are accepted, with cpu_ns from 0.
    pub fn load_values(&self, v: &[u64]) -> Result<(), crate::state::StateError> {
        if v.len() != Self::VALUES && v.len() != Self::VALUES - 1 {
            return Err(crate::state::StateError::Invalid(
                "wrong number of vCPU counters",
            ));
        }
        self.kvm_run_ns.store(v[0], Ordering::Relaxed);
        for (e, &x) in self.exits.iter().zip(&v[1..]) {
            e.store(x, Ordering::Relaxed);
        }
        let n = self.exits.len();
        self.unhandled_io.store(v[n + 1], Ordering::Relaxed);
        let mut cpu = self.cpu_lock();
        cpu.base = v.get(n + 2).copied().unwrap_or(0);
        // A thread already counting counts on from here.
        if let Some((clock, at)) = &mut cpu.clock {
            *at = read_clock(*clock).unwrap_or(*at);
        }
        Ok(())
    }

    fn count(&self, reason: ExitReason) {
        self.exits[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a vCPU thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuRunState {
    /// Running guest code (or waiting on the guest's behalf).
    Running,
    /// Stopped at an instruction boundary with no I/O pending; state may be read.
    Paused,
    /// The thread has finished.
    Exited,
}

const WANT_RUN: u8 = 0;
const WANT_PAUSE: u8 = 1;
const WANT_EXIT: u8 = 2;

type Job = Box<dyn FnOnce(&mut VcpuFd) + Send>;

struct Ctl {
    state: VcpuRunState,
    job: Option<Job>,
    /// The vCPU's `kvm_run` page while the thread owns a live fd; null otherwise.
    kvm_run: *mut kvm_run,
    /// A device has something for the guest: end a wait early.
    wake: bool,
}

// SAFETY: the raw kvm_run pointer is only dereferenced under the mutex, while the vCPU thread
// keeps the fd (and so the mapping) alive; the thread clears it before dropping the fd.
unsafe impl Send for Ctl {}

struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// What the controller wants; read lock-free by the run loop after every exit.
    want: AtomicU8,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Errors of controlling a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The vCPU did not stop in time.
    #[error("vCPU {0} did not pause within {1:?}")]
    PauseTimeout(u8, Duration),
    /// The operation needs a paused vCPU.
    #[error("vCPU {0} is not paused")]
    NotPaused(u8),
    /// The vCPU thread is gone.
    #[error("vCPU {0} has exited")]
    Exited(u8),
    /// The thread could not be started.
    #[error("Cannot start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    /// The kick signal could not be installed.
    #[error("Cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), on_kick));
    result.map_err(VcpuError::Signal)
}

/// Ends a vCPU's wait early; cheap to clone and to call from any thread.
#[derive(Clone)]
pub struct VcpuWaker(Arc<Shared>);

impl VcpuWaker {
    /// Wakes the vCPU if it is parked in the guest's wait.
    pub fn wake(&self) {
        self.0.lock().wake = true;
        self.0.cv.notify_all();
    }
}

/// The controller's side of a vCPU.
pub struct VcpuHandle {
    index: u8,
    shared: Arc<Shared>,
    counters: Arc<VcpuCounters>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

/// What the vCPU thread needs besides its fd.
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio: Arc<Bus<PioAddress>>,
    /// MMIO bus.
    pub mmio: Arc<Bus<MmioAddress>>,
    /// Where VM-level events go; also reports the thread's failure.
    pub events: Reporter,
    /// The VM's dirty rings, if it has them: a full ring is harvested here.
    pub dirty_ring: Option<Arc<DirtyRing>>,
}

impl VcpuHandle {
    /// Starts vCPU `index` on its own thread, running (or paused, if `paused`), counting into
    /// `counters`. A panic of the thread reaches the VM's owner as [`VmEvent::ThreadFailed`].
    pub fn spawn(
        index: u8,
        fd: VcpuFd,
        ctx: VcpuContext,
        counters: Arc<VcpuCounters>,
        paused: bool,
    ) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                state: VcpuRunState::Running,
                job: None,
                kvm_run: std::ptr::null_mut(),
                wake: false,
            }),
            cv: Condvar::new(),
            want: AtomicU8::new(if paused { WANT_PAUSE } else { WANT_RUN }),
        });
        let runner = Runner {
            index,
            fd,
            ctx,
            shared: shared.clone(),
            counters: counters.clone(),
            pending_io: false,
            halted: false,
        };
        let reporter = runner.ctx.events.clone();
        let thread = reporter
            .spawn(&format!("vcpu{index}"), move || runner.run())
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(Self {
            index,
            shared,
            counters,
            thread: Some(thread),
        })
    }

    /// The vCPU's counters.
    pub fn counters(&self) -> &Arc<VcpuCounters> {
        &self.counters
    }

    /// Where the vCPU is now.
    pub fn state(&self) -> VcpuRunState {
        self.shared.lock().state
    }

    fn set_want(&self, want: u8) {
        let mut ctl = self.shared.lock();
        self.shared.want.store(want, Ordering::SeqCst);
        let running = ctl.state == VcpuRunState::Running;
        if running && !ctl.kvm_run.is_null() {
            // SAFETY: the pointer is live while set (see Ctl); immediate_exit is a plain byte
            // the kernel reads on entry to KVM_RUN.
            unsafe { std::ptr::addr_of_mut!((*ctl.kvm_run).immediate_exit).write_volatile(1) };
        }
        drop(ctl);
        self.shared.cv.notify_all();
        if running && let Some(thread) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the handle is not joined (join takes &mut self), so the pthread_t is valid;
            // the signal's handler does nothing.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
        }
    }

    /// Asks the vCPU to pause; returns at once. See [`VcpuHandle::wait_paused`].
    pub fn request_pause(&self) {
        self.set_want(WANT_PAUSE);
    }

    /// Waits until the vCPU has paused (or exited), for at most `timeout`.
    pub fn wait_paused(&self, timeout: Duration) -> Result<(), VcpuError> {
        let ctl = self.shared.lock();
        let (ctl, _) = self
            .shared
            .cv
            .wait_timeout_while(ctl, timeout, |c| c.state == VcpuRunState::Running)
            .unwrap_or_else(|p| p.into_inner());
        match ctl.state {
            VcpuRunState::Running => Err(VcpuError::PauseTimeout(self.index, timeout)),
            _ => Ok(()),
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        self.set_want(WANT_RUN);
    }

    /// Something that ends this vCPU's wait early (a device has work for the guest).
    pub fn waker(&self) -> VcpuWaker {
        VcpuWaker(self.shared.clone())
    }

    /// Runs `job` on the paused vCPU's thread with its fd and returns the result.
    pub fn with_fd<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Result<R, VcpuError> {
        let (tx, rx) = sync_channel(1);
        {
            let mut ctl = self.shared.lock();
            match ctl.state {
                VcpuRunState::Paused => {}
                VcpuRunState::Exited => return Err(VcpuError::Exited(self.index)),
                VcpuRunState::Running => return Err(VcpuError::NotPaused(self.index)),
            }
            ctl.job = Some(Box::new(move |fd| {
                let _ = tx.send(job(fd));
            }));
        }
        self.shared.cv.notify_all();
        rx.recv().map_err(|_| VcpuError::Exited(self.index))
    }

    /// Stops the thread and waits for it; a thread that panicked or failed says so (once).
    pub fn exit(&mut self) -> Result<(), ThreadError> {
        self.set_want(WANT_EXIT);
        match self.thread.take() {
            Some(thread) => event::join(&format!("vcpu{}", self.index), thread),
            None => Ok(()),
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if let Err(e) = self.exit() {
            // Already reported as a VmEvent when it happened; this is the last trace of it.
            tracing::error!("{e}");
        }
    }
}

/// Marks the vCPU exited however its thread ends, unwinding included, so nobody waits for a
/// dead vCPU to pause.
struct ExitGuard<'a>(&'a Shared);

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        let mut ctl = self.0.lock();
        ctl.kvm_run = std::ptr::null_mut();
        ctl.state = VcpuRunState::Exited;
        // A job waiting for this vCPU gets its channel closed (Exited) instead of waiting.
        ctl.job = None;
        drop(ctl);
        self.0.cv.notify_all();
    }
}

/// What the run loop does next.
enum Step {
    Continue,
    Wait(Option<Duration>),
    Stop(VmEvent),
    /// The VMM itself failed: the thread ends with this error.
    Fail(String),
}

/// The vCPU thread's side.
struct Runner {
    index: u8,
    fd: VcpuFd,
    ctx: VcpuContext,
    shared: Arc<Shared>,
    counters: Arc<VcpuCounters>,
    /// The last exit was an access whose completion KVM applies on the next KVM_RUN.
    pending_io: bool,
    /// The vCPU stopped for good (power-off, crash): never enter the guest again.
    halted: bool,
}

impl Runner {
    fn run(mut self) -> Result<(), String> {
        let shared = self.shared.clone();
        let _exited = ExitGuard(&shared);
        let counters = self.counters.clone();
        let _cpu = CpuCounting::start(&counters);
        self.shared.lock().kvm_run = self.fd.get_kvm_run();
        event::check_fault(&format!("vcpu{}", self.index))?;
        loop {
            if self.shared.want.load(Ordering::SeqCst) != WANT_RUN {
                if !self.serve() {
                    break;
                }
                continue;
            }
            if self.halted {
                self.park(None);
                continue;
            }
            match self.run_once() {
                Step::Continue => {}
                Step::Wait(limit) => self.park(limit),
                Step::Stop(event) => {
                    self.halted = true;
                    self.ctx.events.send(event);
                }
                Step::Fail(cause) => return Err(cause),
            }
        }
        Ok(())
    }

    /// Blocks while the controller wants the vCPU paused, running its jobs. Returns false when
    /// the thread should exit.
    fn serve(&mut self) -> bool {
        if self.pending_io {
            // Complete the access (e.g. the data of an `in`) without running guest code.
            self.fd.set_kvm_immediate_exit(1);
            let _ = self.fd.run();
            self.pending_io = false;
        }
        let mut ctl = self.shared.lock();
        // Under the lock: the controller writes immediate_exit only while holding it.
        self.fd.set_kvm_immediate_exit(0);
        loop {
            match self.shared.want.load(Ordering::SeqCst) {
                WANT_EXIT => return false,
                WANT_RUN => {
                    ctl.state = VcpuRunState::Running;
                    return true;
                }
                _ => {}
            }
            if ctl.state != VcpuRunState::Paused {
                ctl.state = VcpuRunState::Paused;
                self.shared.cv.notify_all();
            }
            if let Some(job) = ctl.job.take() {
                drop(ctl);
                job(&mut self.fd);
                ctl = self.shared.lock();
                continue;
            }
            ctl = self.shared.cv.wait(ctl).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Gives up the host CPU until `limit` passes, a device wakes the vCPU, or the controller
    /// wants something.
    fn park(&self, limit: Option<Duration>) {
        let ctl = self.shared.lock();
        let waiting = |c: &mut Ctl| !c.wake && self.shared.want.load(Ordering::SeqCst) == WANT_RUN;
        let mut ctl = match limit {
            Some(d) => {
                self.shared
                    .cv
                    .wait_timeout_while(ctl, d, waiting)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => self
                .shared
                .cv
                .wait_while(ctl, waiting)
                .unwrap_or_else(|p| p.into_inner()),
        };
        ctl.wake = false;
    }

    fn run_once(&mut self) -> Step {
        let Runner {
            fd, ctx, counters, ..
        } = self;
        let start = Instant::now();
        let result = fd.run();
        counters
            .kvm_run_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let exit = match result {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                counters.count(ExitReason::Interrupted);
                self.pending_io = false;
                return Step::Continue;
            }
            Err(e) => return self.crash(format!("KVM_RUN failed: {e}")),
        };
        let reason = ExitReason::of(&exit);
        counters.count(reason);
        let mut pending = true;
        let action = match exit {
            VcpuExit::IoOut(port, data) => ctx.pio.write(PioAddress(port), data),
            VcpuExit::IoIn(port, data) => ctx
                .pio
                .read(PioAddress(port), data)
                .map(|()| VcpuAction::Continue)
                .inspect_err(|_| data.fill(0xff)),
            VcpuExit::MmioWrite(addr, data) => ctx.mmio.write(MmioAddress(addr), data),
            VcpuExit::MmioRead(addr, data) => ctx
                .mmio
                .read(MmioAddress(addr), data)
                .map(|()| VcpuAction::Continue)
                .inspect_err(|_| data.fill(0xff)),
            VcpuExit::Intr => {
                pending = false;
                Ok(VcpuAction::Continue)
            }
            VcpuExit::Shutdown => return self.crash("triple fault (KVM_EXIT_SHUTDOWN)".into()),
            VcpuExit::Hlt => return self.crash("halted with interrupts unavailable".into()),
            VcpuExit::SystemEvent(kind, _) => {
                return Step::Stop(VmEvent::SystemEvent(kind));
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return self.crash(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x} on host CPU {cpu})"
                ));
            }
            VcpuExit::InternalError => return self.crash("KVM internal error".into()),
            VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL) => {
                // Harvest and reset the rings (the pages go to the next harvest's caller),
                // then enter the guest again: nothing was pending.
                self.pending_io = false;
                return match &ctx.dirty_ring {
                    Some(ring) => match ring.on_full() {
                        Ok(()) => Step::Continue,
                        Err(e) => Step::Fail(event::error_chain(&e)),
                    },
                    None => self.crash("dirty ring full, but the VM has no dirty ring".into()),
                };
            }
            other => {
                let what = format!("unexpected exit {other:?}");
                return self.crash(what);
            }
        };
        self.pending_io = pending;
        match action {
            Ok(VcpuAction::Continue) => Step::Continue,
            Ok(VcpuAction::Wait(d)) => Step::Wait(Some(d)),
            Ok(VcpuAction::Halt) => Step::Wait(None),
            Err(e) => {
                self.counters.unhandled_io.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(vcpu = self.index, "{e}");
                Step::Continue
            }
        }
    }

    fn crash(&mut self, what: String) -> Step {
        let regs = self.fd.get_regs().unwrap_or_default();
        let rip = regs.rip;
        tracing::debug!(
            vcpu = self.index,
            rflags = regs.rflags,
            rsp = regs.rsp,
            "crash registers"
        );
        Step::Stop(VmEvent::Crashed {
            vcpu: self.index,
            reason: format!("{what} at rip {rip:#x}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_cpu_ns() -> u64 {
        read_clock(libc::CLOCK_THREAD_CPUTIME_ID).unwrap()
    }

    fn burn(ns: u64) {
        let start = own_cpu_ns();
        let mut x = 0u64;
        while own_cpu_ns() - start < ns {
            for i in 0..1000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
    }

    #[test]
    fn cpu_time_follows_the_counting_thread_live_and_freezes_when_it_ends() {
        let c = Arc::new(VcpuCounters::default());
        c.load_values(&[7; VcpuCounters::VALUES]).unwrap();
        assert_eq!(c.cpu_ns(), 7, "loaded before the thread starts");
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let worker = {
            let c = c.clone();
            std::thread::spawn(move || {
                let _counting = CpuCounting::start(&c);
                let t0 = own_cpu_ns();
                burn(30_000_000);
                tx.send(own_cpu_ns() - t0).unwrap();
                // Read from another thread while this one still counts (and waits).
                go_rx.recv().unwrap();
                own_cpu_ns() - t0
            })
        };
        let burnt = rx.recv().unwrap();
        let live = c.cpu_ns();
        assert!(live >= 7 + burnt, "{live} < 7 + {burnt}");
        assert!(live <= 7 + burnt + 5_000_000, "{live} vs 7 + {burnt}");
        go_tx.send(()).unwrap();
        let total = worker.join().unwrap();
        let frozen = c.cpu_ns();
        assert!(
            frozen >= live && frozen >= 7 + total,
            "{frozen} {live} {total}"
        );
        assert!(frozen <= 7 + total + 5_000_000, "{frozen} vs 7 + {total}");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            c.cpu_ns(),
            frozen,
            "nothing counts once the thread has ended"
        );
        assert_eq!(c.values()[VcpuCounters::VALUES - 1], frozen);
    }

    #[test]
    fn counters_load_their_own_values_and_the_older_layout_but_no_other_length() {
        let a = VcpuCounters::default();
        let want: Vec<u64> = (1..=VcpuCounters::VALUES as u64).collect();
        a.load_values(&want).unwrap();
        assert_eq!(a.values(), want);
        assert_eq!(a.exits(ExitReason::IoIn), 2);
        // Saved before cpu_ns existed: it starts from 0.
        let b = VcpuCounters::default();
        b.load_values(&want[..VcpuCounters::VALUES - 1]).unwrap();
        assert_eq!(b.cpu_ns(), 0);
        assert_eq!(
            b.values()[..VcpuCounters::VALUES - 1],
            want[..VcpuCounters::VALUES - 1]
        );
        for len in [0, VcpuCounters::VALUES - 2, VcpuCounters::VALUES + 1] {
            let c = VcpuCounters::default();
            assert!(c.load_values(&vec![9; len]).is_err(), "{len} values");
            assert_eq!(
                c.values(),
                vec![0; VcpuCounters::VALUES],
                "a refused load changes nothing"
            );
        }
    }
}
