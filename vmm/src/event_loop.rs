//! The device event loop: one thread, one epoll, every device's file descriptors.
//!
//! Devices do their work here (queue notifications arrive as ioeventfds, TAP frames as readable
//! fds), so pausing this thread between two handler calls — always at a request boundary —
//! together with pausing the vCPUs quiesces the whole machine.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::event::{self, Reporter, ThreadError};

/// A file descriptor a handler wants to hear about.
#[derive(Clone, Copy, Debug)]
pub struct Interest {
    /// The descriptor.
    pub fd: RawFd,
    /// Handed back to [`EventHandler::handle`].
    pub tag: u32,
    /// Edge-triggered (for fds the handler may leave unread, like a TAP with no rx buffers).
    pub edge: bool,
}

/// A device's glue to the event loop.
pub trait EventHandler: Send {
    /// The descriptors to watch.
    fn interests(&self) -> Vec<Interest>;
    /// One of them is ready.
    fn handle(&mut self, tag: u32);
}

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// Setting up epoll or an eventfd failed.
    #[error("Cannot set up the device event loop")]
    Setup(#[source] std::io::Error),
    /// The thread did not stop in time.
    #[error("The device event loop did not pause within {0:?}")]
    PauseTimeout(Duration),
}

const WANT_RUN: u8 = 0;
const WANT_PAUSE: u8 = 1;
const WANT_EXIT: u8 = 2;
const CONTROL_TOKEN: u64 = u64::MAX;

struct Shared {
    want: AtomicU8,
    /// The thread has ended (normally or not): nothing to wait for.
    finished: AtomicBool,
    paused: Mutex<bool>,
    cv: Condvar,
    control: EventFd,
}

/// The running event loop.
pub struct EventLoop {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl EventLoop {
    /// Starts the loop over `handlers`. If the thread panics or fails, `reporter` tells the
    /// VM's owner.
    pub fn start(
        handlers: Vec<Box<dyn EventHandler>>,
        reporter: &Reporter,
    ) -> Result<Self, EventLoopError> {
        let epoll = Epoll::new().map_err(EventLoopError::Setup)?;
        let control = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::Setup)?;
        epoll
            .ctl(
                ControlOperation::Add,
                control.as_raw_fd(),
                EpollEvent::new(EventSet::IN, CONTROL_TOKEN),
            )
            .map_err(EventLoopError::Setup)?;
        for (i, h) in handlers.iter().enumerate() {
            for interest in h.interests() {
                let mut set = EventSet::IN;
                if interest.edge {
                    set |= EventSet::EDGE_TRIGGERED;
                }
                let token = ((i as u64) << 32) | u64::from(interest.tag);
                epoll
                    .ctl(
                        ControlOperation::Add,
                        interest.fd,
                        EpollEvent::new(set, token),
                    )
                    .map_err(EventLoopError::Setup)?;
            }
        }
        let shared = Arc::new(Shared {
            want: AtomicU8::new(WANT_RUN),
            finished: AtomicBool::new(false),
            paused: Mutex::new(false),
            cv: Condvar::new(),
            control,
        });
        let s = shared.clone();
        let thread = reporter
            .spawn("devices", move || run(epoll, handlers, s))
            .map_err(EventLoopError::Setup)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    fn set_want(&self, want: u8) {
        let _guard = self.shared.paused.lock().unwrap_or_else(|p| p.into_inner());
        self.shared.want.store(want, Ordering::SeqCst);
        let _ = self.shared.control.write(1);
        self.shared.cv.notify_all();
    }

    /// Asks the loop to stop dispatching after the handler now running; returns at once (see
    /// [`EventLoop::wait_paused`]).
    pub fn request_pause(&self) {
        self.set_want(WANT_PAUSE);
    }

    /// Waits until the loop has stopped dispatching, for at most `timeout`.
    pub fn wait_paused(&self, timeout: Duration) -> Result<(), EventLoopError> {
        let paused = self.shared.paused.lock().unwrap_or_else(|p| p.into_inner());
        let (paused, _) = self
            .shared
            .cv
            .wait_timeout_while(paused, timeout, |p| {
                !*p && !self.shared.finished.load(Ordering::SeqCst)
            })
            .unwrap_or_else(|p| p.into_inner());
        if *paused || self.shared.finished.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(EventLoopError::PauseTimeout(timeout))
        }
    }

    /// Dispatches events again.
    pub fn resume(&self) {
        self.set_want(WANT_RUN);
    }

    /// Ends the thread; a thread that panicked or failed says so (once).
    pub fn stop(&mut self) -> Result<(), ThreadError> {
        self.set_want(WANT_EXIT);
        match self.thread.take() {
            Some(t) => event::join("devices", t),
            None => Ok(()),
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!("{e}");
        }
    }
}

fn run(
    epoll: Epoll,
    mut handlers: Vec<Box<dyn EventHandler>>,
    shared: Arc<Shared>,
) -> Result<(), String> {
    // However the thread ends, a waiter for its pause is released.
    struct Released<'a>(&'a Shared);
    impl Drop for Released<'_> {
        fn drop(&mut self) {
            let _p = self.0.paused.lock().unwrap_or_else(|p| p.into_inner());
            self.0.finished.store(true, Ordering::SeqCst);
            self.0.cv.notify_all();
        }
    }
    let _released = Released(&shared);
    event::check_fault("devices")?;
    let mut events = vec![EpollEvent::default(); 64];
    // Events that arrived but were not dispatched because of a pause: dispatched first after
    // it (an edge-triggered event would otherwise be lost).
    let mut deferred: Vec<u64> = Vec::new();
    loop {
        match shared.want.load(Ordering::SeqCst) {
            WANT_EXIT => return Ok(()),
            WANT_PAUSE => {
                let mut paused = shared.paused.lock().unwrap_or_else(|p| p.into_inner());
                *paused = true;
                shared.cv.notify_all();
                while shared.want.load(Ordering::SeqCst) == WANT_PAUSE {
                    paused = shared.cv.wait(paused).unwrap_or_else(|p| p.into_inner());
                }
                *paused = false;
                continue;
            }
            _ => {}
        }
        for token in std::mem::take(&mut deferred) {
            dispatch(&mut handlers, token);
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("epoll_wait failed: {e}")),
        };
        for ev in &events[..n] {
            if ev.data() == CONTROL_TOKEN {
                let _ = shared.control.read();
            } else if shared.want.load(Ordering::SeqCst) != WANT_RUN {
                // A pause stops dispatching between two handler calls.
                deferred.push(ev.data());
            } else {
                dispatch(&mut handlers, ev.data());
            }
        }
    }
}

fn dispatch(handlers: &mut [Box<dyn EventHandler>], token: u64) {
    let (index, tag) = ((token >> 32) as usize, token as u32);
    if let Some(h) = handlers.get_mut(index) {
        h.handle(tag);
    }
}
