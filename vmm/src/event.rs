//! What happens to a VM as a whole, and the VMM threads that must never die quietly.
//!
//! Every thread the VMM starts for a VM (vCPUs, the device loop, the API server, later the
//! epoch loop and replication tasks) is started with [`Reporter::spawn`]: if it panics or
//! returns an error, the VM's owner receives [`VmEvent::ThreadFailed`] with the thread's name
//! and the cause, and ends the VM. That is also the failure a replica takes over from.

use std::any::Any;
use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

/// Something that happened to the VM as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered off with this status (0 = success).
    PowerOff(u32),
    /// KVM reported a system event (shutdown or reset) of this type.
    SystemEvent(u32),
    /// The guest asked for a reset (reboot); ftvm treats it as the end of the VM.
    Reset,
    /// A vCPU hit something it cannot continue from.
    Crashed {
        /// The vCPU.
        vcpu: u8,
        /// What happened, with the guest's instruction pointer.
        reason: String,
    },
    /// A VMM thread panicked or failed: the VM cannot go on safely.
    ThreadFailed {
        /// The thread's name (`vcpu0`, `devices`, `api`, ...).
        thread: String,
        /// What happened.
        cause: String,
    },
    /// The VMM received a termination signal (SIGTERM, SIGINT): stop in order.
    Signal(i32),
    /// The output gate holds output waiting for a checkpoint (see
    /// [`crate::output::OutputGate::set_doorbell`]): whoever checkpoints may start one early.
    /// Not an end of the VM.
    OutputWaiting,
    /// The guest was handed over to another host (planned switch-over): it runs there now;
    /// this VM, paused, ends here.
    HandedOver,
}

/// Sends VM events from any thread, and starts threads whose end is reported.
#[derive(Clone, Debug)]
pub struct Reporter(Sender<VmEvent>);

impl Reporter {
    /// A reporter sending to `tx`.
    pub fn new(tx: Sender<VmEvent>) -> Self {
        Self(tx)
    }

    /// Sends `event` to the VM's owner (ignored once the owner is gone: the VM has ended).
    pub fn send(&self, event: VmEvent) {
        let _ = self.0.send(event);
    }

    /// Starts a thread named `name` running `body`. A panic or an `Err` is reported as
    /// [`VmEvent::ThreadFailed`]; the returned handle's `join` gives the same outcome.
    pub fn spawn<F>(&self, name: &str, body: F) -> std::io::Result<JoinHandle<Result<(), String>>>
    where
        F: FnOnce() -> Result<(), String> + Send + 'static,
    {
        let reporter = self.clone();
        let thread = name.to_string();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let outcome = match std::panic::catch_unwind(AssertUnwindSafe(body)) {
                    Ok(result) => result,
                    Err(payload) => Err(panic_cause(payload.as_ref())),
                };
                if let Err(cause) = &outcome {
                    tracing::debug!(thread = %thread, "VMM thread failed: {cause}");
                    reporter.send(VmEvent::ThreadFailed {
                        thread,
                        cause: cause.clone(),
                    });
                }
                outcome
            })
    }
}

/// Joins `handle` and turns every way it can end badly into one message naming `name`.
pub fn join(name: &str, handle: JoinHandle<Result<(), String>>) -> Result<(), ThreadError> {
    match handle.join() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(cause)) => Err(ThreadError {
            thread: name.to_string(),
            cause,
        }),
        Err(payload) => Err(ThreadError {
            thread: name.to_string(),
            cause: panic_cause(payload.as_ref()),
        }),
    }
}

/// A VMM thread that ended with a panic or an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VMM thread {thread} failed: {cause}")]
pub struct ThreadError {
    /// The thread's name.
    pub thread: String,
    /// What happened.
    pub cause: String,
}

thread_local! {
    /// Where the last panic on this thread happened (set by the hook of [`install_panic_hook`]).
    static PANIC_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Replaces the default panic message (several lines on stderr) with a debug log line and
/// remembers the location, so that a VMM thread's panic reaches the VM's owner as one line:
/// the message and where it happened. The binary installs it once at start.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let name = std::thread::current().name().unwrap_or("?").to_string();
        tracing::debug!(thread = %name, at = %at, "panic: {}", payload_text(info.payload()));
        PANIC_AT.with(|p| *p.borrow_mut() = Some(at));
    }));
}

fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// "panicked: MESSAGE (at FILE:LINE)" for a caught panic on this thread.
pub fn panic_cause(payload: &(dyn Any + Send)) -> String {
    let text = payload_text(payload);
    match PANIC_AT.with(|p| p.borrow_mut().take()) {
        Some(at) if !at.is_empty() => format!("panicked: {text} (at {at})"),
        _ => format!("panicked: {text}"),
    }
}

/// An error and its causes on one line, `outer: inner: innermost` — the one format for the
/// command line and the API alike (anyhow's `{:#}` gives the same).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// How a forced failure fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The thread panics.
    Panic,
    /// The thread returns an error.
    Error,
}

/// The environment variable that forces a VMM thread to fail, for tests of failure reporting:
/// `FTVM_INJECT_FAULT=THREAD` makes that thread panic where it checks, `THREAD:error` makes it
/// return an error. Threads: `vcpuN`, `devices`, `api`, `control`, `signals`; the replica's
/// `session` task (one per primary) too.
pub const FAULT_ENV: &str = "FTVM_INJECT_FAULT";

/// The fault asked for `point`, if any (the variable is read once per process).
pub fn injected_fault(point: &str) -> Option<Fault> {
    static SPEC: OnceLock<Option<String>> = OnceLock::new();
    let spec = SPEC
        .get_or_init(|| std::env::var(FAULT_ENV).ok())
        .as_deref()?;
    match spec.split_once(':') {
        Some((p, "error")) if p == point => Some(Fault::Error),
        None if spec == point => Some(Fault::Panic),
        _ => None,
    }
}

/// Panics, or returns an error, if a fault is injected at `point`.
pub fn check_fault(point: &str) -> Result<(), String> {
    match injected_fault(point) {
        Some(Fault::Panic) => panic!("fault injected at {point} ({FAULT_ENV})"),
        Some(Fault::Error) => Err(format!("fault injected at {point} ({FAULT_ENV})")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn a_panicking_thread_is_reported_with_its_name_and_cause() {
        let (tx, rx) = channel();
        let h = Reporter::new(tx)
            .spawn("worker", || panic!("boom {}", 7))
            .unwrap();
        let err = join("worker", h).unwrap_err();
        assert_eq!(err.thread, "worker");
        assert!(err.cause.contains("boom 7"), "{}", err.cause);
        match rx.recv().unwrap() {
            VmEvent::ThreadFailed { thread, cause } => {
                assert_eq!(thread, "worker");
                assert!(cause.starts_with("panicked: boom 7"), "{cause}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_failing_thread_is_reported_and_a_good_one_is_not() {
        let (tx, rx) = channel();
        let r = Reporter::new(tx);
        let bad = r.spawn("bad", || Err("disk on fire".into())).unwrap();
        let good = r.spawn("good", || Ok(())).unwrap();
        assert_eq!(join("good", good), Ok(()));
        assert_eq!(
            join("bad", bad).unwrap_err().to_string(),
            "VMM thread bad failed: disk on fire"
        );
        assert_eq!(
            rx.recv().unwrap(),
            VmEvent::ThreadFailed {
                thread: "bad".into(),
                cause: "disk on fire".into()
            }
        );
        assert!(rx.try_recv().is_err(), "a good thread is not reported");
    }

    #[test]
    fn error_chains_are_one_line() {
        let inner = std::io::Error::other("no space left");
        #[derive(Debug, thiserror::Error)]
        #[error("Cannot write the snapshot")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(
            error_chain(&Outer(inner)),
            "Cannot write the snapshot: no space left"
        );
    }
}
