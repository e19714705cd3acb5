//! The replica's hot standby: a machine built ahead of a takeover on the committed image.
//!
//! Building a machine (KVM VM, memory slots, vCPUs, devices, the host's TAPs and disk copies)
//! takes 5–9 ms here; loading a saved state into a built one takes about half a millisecond.
//! So each time the replica commits a new image (a sync's full checkpoint: new memory, new disk
//! copies), a `standby` thread builds a [`Standby`] on it — on the very mapping the replica keeps
//! applying epochs to, so nothing is copied at activation and later epochs need no work. A
//! takeover then only loads the last committed state into it ([`HotStandby::activate`]). When
//! the standby is missing or was built on another image (a sync just ended, its build failed),
//! the takeover builds the machine cold, as a restore does, and says so.
//!
//! Activation also moves the guest's clocks on by the time since the commit
//! ([`vmm::vm::MachineState::advance_clocks`]): the guest's time keeps pace with real time
//! across the outage, and timers that fell due during it (TCP retransmissions) fire at once
//! instead of waiting the outage out again.
//!
//! The standby holds the replica's TAPs open (a TAP without multi-queue has one owner), so an
//! old standby is dropped before a new one, or a cold build, opens them again. Frames queued on
//! a standby's TAP before the takeover reach the guest afterwards, like frames a switch
//! delivers late.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryBackend;
use vmm::devices::virtio::net::NetConfig;
use vmm::memory::GuestMemoryMmap;
use vmm::vm::{RestoreMemory, RestoreOptions, SavedConfig, Standby};
use vmm::{Vm, event};

use crate::Committed;

/// The devices of this host that a taken-over guest uses instead of the primary's.
#[derive(Clone, Debug, Default)]
pub struct HostDevices {
    /// `--net` cards (none: the saved ones).
    pub nets: Vec<NetConfig>,
    /// Where the committed disk copies are (`disk<N>.img`).
    pub disk_dir: Option<PathBuf>,
}

impl HostDevices {
    fn options(&self, config: &SavedConfig) -> Result<RestoreOptions, String> {
        let disks = match (&self.disk_dir, config.disks.len()) {
            (_, 0) => None,
            (Some(dir), n) => Some(
                (0..n)
                    .map(|i| crate::disks::committed_path(dir, i))
                    .collect(),
            ),
            (None, _) => return Err("the guest has disks and the replica no --disk-dir".into()),
        };
        Ok(RestoreOptions {
            console: Box::new(std::io::stdout()),
            nets: (!self.nets.is_empty()).then(|| self.nets.clone()),
            disks,
        })
    }
}

/// A standby and the image it was built on.
struct Built {
    image: usize,
    standby: Standby,
}

/// Asks for a standby on a newly committed image.
struct Request {
    image: usize,
    config: SavedConfig,
    vcpus: usize,
    memory: GuestMemoryMmap,
}

/// How a takeover's machine was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// The standby, built before it was needed.
    Hot,
    /// Built at the takeover (no standby on this image).
    Cold,
}

impl Activation {
    /// `hot` or `cold`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Activation::Hot => "hot",
            Activation::Cold => "cold",
        }
    }
}

/// Keeps a standby on the committed image (see the module's documentation).
pub struct HotStandby {
    host: HostDevices,
    requests: Mutex<Option<Sender<Request>>>,
    thread: Mutex<Option<JoinHandle<Result<(), String>>>>,
    ready: Arc<Mutex<Option<Built>>>,
    /// The image last asked for (0: none).
    asked: AtomicUsize,
}

/// Which image `memory` is: the host address of guest address 0. Two live images never share
/// it, and a standby keeps the image it was built on alive, so a new image cannot reuse the
/// address of the one a standby holds.
fn image_of(memory: &GuestMemoryMmap) -> usize {
    memory.iter().next().map_or(0, |r| r.as_ptr() as usize)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl HotStandby {
    /// Starts the `standby` thread, which builds a standby for each image [`Self::observe`]
    /// reports.
    pub fn start(host: HostDevices) -> std::io::Result<Self> {
        let (tx, rx) = channel::<Request>();
        let ready: Arc<Mutex<Option<Built>>> = Arc::default();
        let slot = ready.clone();
        let devices = host.clone();
        let thread = std::thread::Builder::new()
            .name("standby".into())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    while let Ok(mut req) = rx.recv() {
                        // Only the newest image is worth building on.
                        while let Ok(newer) = rx.try_recv() {
                            req = newer;
                        }
                        // The old standby lets go of the TAPs (and its image) first.
                        drop(lock(&slot).take());
                        event::check_fault("standby")?;
                        let started = Instant::now();
                        let built = devices.options(&req.config).and_then(|opts| {
                            Standby::build(&req.config, req.vcpus, opts, req.memory)
                                .map_err(|e| event::error_chain(&e))
                        });
                        match built {
                            Ok(standby) => {
                                tracing::info!(
                                    build_us = started.elapsed().as_micros() as u64,
                                    "hot standby ready on the committed image"
                                );
                                *lock(&slot) = Some(Built {
                                    image: req.image,
                                    standby,
                                });
                            }
                            Err(e) => tracing::warn!(
                                "no hot standby ({e}); a takeover would build the machine cold"
                            ),
                        }
                    }
                    Ok(())
                }))
                .unwrap_or_else(|p| Err(event::panic_cause(p.as_ref())));
                if let Err(cause) = &outcome {
                    tracing::error!(
                        "VMM thread standby failed: {cause}; a takeover would build the machine cold"
                    );
                }
                outcome
            })?;
        Ok(Self {
            host,
            requests: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            ready,
            asked: AtomicUsize::new(0),
        })
    }

    /// Sees a commit (called under the committed image's lock; only a new image costs more
    /// than a comparison: a clone of its mapping's handle and of the configuration).
    pub fn observe(&self, c: &Committed) {
        let image = image_of(&c.memory);
        if self.asked.swap(image, Ordering::Relaxed) == image {
            return;
        }
        if let Some(tx) = lock(&self.requests).as_ref() {
            let _ = tx.send(Request {
                image,
                config: c.state.config.clone(),
                vcpus: c.state.vcpus.len(),
                memory: c.memory.clone(),
            });
        }
    }

    /// Stops the `standby` thread (waiting for a build under way) and reports how it ended.
    fn stop(&self) {
        drop(lock(&self.requests).take());
        if let Some(handle) = lock(&self.thread).take()
            && let Err(e) = event::join("standby", handle)
        {
            tracing::debug!("{e} (reported when it happened)");
        }
    }

    /// The machine of `c`, ready to start: its state loaded into the standby if one was built
    /// on `c`'s image, else built cold on that image. Ends the `standby` thread; also `how
    /// long` the activation took.
    pub fn activate(&self, mut c: Committed) -> Result<(Vm, Activation, Duration), String> {
        let started = Instant::now();
        // The guest's time goes on from when its state was committed, not from its capture
        // (a few milliseconds earlier): it may fall that much behind, never ahead.
        let behind = c.at.elapsed();
        let tscs = c.state.advance_clocks(behind);
        tracing::debug!(
            behind_us = behind.as_micros() as u64,
            tscs,
            "the guest's clocks moved on by the time since the commit"
        );
        self.stop();
        let built = lock(&self.ready).take();
        let image = image_of(&c.memory);
        match built {
            Some(b) if b.image == image => {
                drop(c.memory);
                let vm = b
                    .standby
                    .activate(c.state)
                    .map_err(|e| event::error_chain(&e))?;
                Ok((vm, Activation::Hot, started.elapsed()))
            }
            stale => {
                // A stale standby holds the TAPs a cold build needs.
                drop(stale);
                let opts = self.host.options(&c.state.config)?;
                let vm = Vm::restore(c.state, opts, RestoreMemory::Mapped(c.memory))
                    .map_err(|e| event::error_chain(&e))?;
                Ok((vm, Activation::Cold, started.elapsed()))
            }
        }
    }
}

impl Drop for HotStandby {
    fn drop(&mut self) {
        self.stop();
    }
}
