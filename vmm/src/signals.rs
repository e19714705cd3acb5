//! Termination signals as VM events: SIGTERM and SIGINT stop a VM in order (vCPUs and devices
//! paused, disks flushed, the API socket removed) instead of killing the process mid-request.
//!
//! The signals are blocked in every thread ([`block_termination`], called by the binary before
//! it starts any thread) and taken by one `signals` thread with `sigwait`, which forwards each
//! one to the VM that is running.

use std::sync::{Mutex, Once};

use crate::event::{self, Reporter, VmEvent};

/// The signals that stop a VM in order.
pub const TERMINATION: [i32; 2] = [libc::SIGTERM, libc::SIGINT];

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in TERMINATION {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks the termination signals in the calling thread and every thread it starts later.
pub fn block_termination() -> std::io::Result<()> {
    let set = termination_set();
    // SAFETY: a valid set, no old mask wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Who receives the next termination signal.
static CURRENT: Mutex<Option<Reporter>> = Mutex::new(None);

/// Sends the termination signals this process receives from now on to `reporter` as
/// [`VmEvent::Signal`]. The first call starts the `signals` thread, which lives as long as the
/// process; its failure is reported like any VMM thread's.
pub fn watch(reporter: &Reporter) -> std::io::Result<()> {
    block_termination()?;
    *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = Some(reporter.clone());
    static START: Once = Once::new();
    let mut result = Ok(());
    START.call_once(|| {
        result = reporter
            .spawn("signals", || {
                event::check_fault("signals")?;
                let set = termination_set();
                loop {
                    let mut sig = 0;
                    // SAFETY: a valid set and a valid out pointer.
                    let rc = unsafe { libc::sigwait(&set, &mut sig) };
                    if rc != 0 {
                        return Err(format!(
                            "sigwait failed: {}",
                            std::io::Error::from_raw_os_error(rc)
                        ));
                    }
                    tracing::info!(signal = sig, "termination signal received");
                    if let Some(r) = CURRENT.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                        r.send(VmEvent::Signal(sig));
                    }
                }
            })
            .map(drop);
    });
    result
}
