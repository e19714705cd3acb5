//! Protection: every epoch the VM's owner captures a checkpoint (stop-and-copy, see
//! [`crate::capture`]) and hands it to the `replication` thread, which encodes it
//! (`checkpoint::wire`), sends it to the replica over QUIC with mutual TLS
//! (`checkpoint::transport`) and waits for its acknowledgement.
//!
//! - The pause holds only the capture: encoding, compression and the network happen while the
//!   guest runs.
//! - One checkpoint is in flight at a time. When the next epoch is due before the replica has
//!   acknowledged the last one, no capture is made: the dirty log keeps accumulating, so the
//!   next capture carries both epochs' pages (merged, never queued).
//! - The first checkpoint of a connection is full (all of memory); the replica commits it, the
//!   primary logs "protected". A lost or silent replica leaves the guest running unprotected
//!   (logged, and visible in `status`); when one answers again, a new full checkpoint
//!   re-protects it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use checkpoint::transport::{self, Fingerprint, Identity, PeerAddr};
use checkpoint::wire::{self, Encoder, EncoderOptions, FrameKind, Hello, MachineShape};
use serde_json::{Value, json};
use vmm::RunningVm;
use vmm::event::{self, Reporter, ThreadError};
use vmm::vm::MachineState;

use crate::capture::{self, CaptureError, CaptureStats, Scope, Staging};

/// Default epoch length.
pub const DEFAULT_EPOCH: Duration = Duration::from_millis(25);
/// Longest acknowledgement frame.
const ACK_LEN: usize = 8;
/// How long to wait before calling a lost replica again.
const RECONNECT: Duration = Duration::from_millis(500);

/// Where and how to replicate.
pub struct ProtectConfig {
    /// The replica.
    pub replica: PeerAddr,
    /// This host's key and certificate.
    pub identity: Identity,
    /// The replica's certificate fingerprint.
    pub peer: Fingerprint,
    /// Epoch length.
    pub epoch: Duration,
}

/// One captured checkpoint on its way to the replica.
struct Job {
    epoch: u64,
    kind: FrameKind,
    staging: Staging,
    state: MachineState,
}

/// What `status` reports about protection.
#[derive(Debug, Default)]
struct Status {
    state: &'static str,
    replica: String,
    committed: Option<u64>,
    epochs_committed: u64,
    last_pause: Duration,
    last_ack: Duration,
    last_pages: usize,
    last_wire_bytes: u64,
}

struct Shared {
    status: Mutex<Status>,
    /// A connection is up and ready for checkpoints.
    connected: AtomicBool,
    /// The next checkpoint must be full (a new connection).
    need_full: AtomicBool,
    /// A checkpoint is on its way and not yet acknowledged.
    in_flight: AtomicBool,
}

impl Shared {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The owner's side of protection.
pub struct Protector {
    shared: Arc<Shared>,
    jobs: tokio::sync::mpsc::Sender<Job>,
    /// Staging buffers back from the replication thread, reused so that a pause does not
    /// fault in fresh memory.
    spare: std::sync::mpsc::Receiver<Staging>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
    epoch: Duration,
    next_due: Instant,
    next_epoch: u64,
}

impl Protector {
    /// Starts the `replication` thread, which connects to the replica (and reconnects).
    pub fn start(config: ProtectConfig, reporter: &Reporter) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            status: Mutex::new(Status {
                state: "connecting",
                replica: config.replica.to_string(),
                ..Status::default()
            }),
            connected: AtomicBool::new(false),
            need_full: AtomicBool::new(true),
            in_flight: AtomicBool::new(false),
        });
        let (jobs, rx) = tokio::sync::mpsc::channel(1);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (give_back, spare) = std::sync::mpsc::channel();
        let epoch = config.epoch;
        let s = shared.clone();
        let thread = reporter.spawn("replication", move || {
            replicate(config, s, rx, give_back, stopped)
        })?;
        Ok(Self {
            shared,
            jobs,
            spare,
            stop: Some(stop),
            thread: Some(thread),
            epoch,
            next_due: Instant::now() + epoch,
            next_epoch: 0,
        })
    }

    /// When the next epoch is due.
    pub fn next_due(&self) -> Instant {
        self.next_due
    }

    /// Captures a checkpoint if one is due and the replica is ready for it.
    pub fn tick(&mut self, vm: &RunningVm) -> Result<Option<CaptureStats>, CaptureError> {
        let now = Instant::now();
        if now < self.next_due {
            return Ok(None);
        }
        // The next epoch starts a whole epoch from now, not from a missed deadline.
        self.next_due = now + self.epoch;
        if !self.shared.connected.load(Ordering::SeqCst)
            || self.shared.in_flight.load(Ordering::SeqCst)
        {
            return Ok(None);
        }
        let full = self.shared.need_full.swap(false, Ordering::SeqCst);
        let (scope, kind) = if full {
            (Scope::All, FrameKind::Full)
        } else {
            (Scope::Dirty, FrameKind::Incremental)
        };
        let mut staging = self.spare.try_recv().unwrap_or_default();
        let (state, stats) = capture::capture(vm, scope, &mut staging, None)?;
        {
            let mut st = self.shared.status();
            st.last_pause = stats.pause;
            st.last_pages = stats.pages;
        }
        let job = Job {
            epoch: self.next_epoch,
            kind,
            staging,
            state,
        };
        self.next_epoch += 1;
        self.shared.in_flight.store(true, Ordering::SeqCst);
        if self.jobs.try_send(job).is_err() {
            // The thread is gone (its failure is reported) or busy: start over with a full one.
            self.shared.in_flight.store(false, Ordering::SeqCst);
            self.shared.need_full.store(true, Ordering::SeqCst);
        }
        Ok(Some(stats))
    }

    /// Protection's part of `status`.
    pub fn status_json(&self) -> Value {
        status_json(&self.shared.status())
    }

    /// A shared handle on the status, for the API thread.
    pub fn status_source(&self) -> Arc<dyn Fn() -> Value + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move || status_json(&shared.status()))
    }

    /// Stops the `replication` thread and waits for it.
    pub fn stop(mut self) -> Result<(), ThreadError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), ThreadError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => event::join("replication", t),
            None => Ok(()),
        }
    }
}

impl Drop for Protector {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::error!("{e}");
        }
    }
}

fn status_json(st: &Status) -> Value {
    json!({
        "state": st.state,
        "replica": st.replica,
        "committed_epoch": st.committed,
        "epochs_committed": st.epochs_committed,
        "last_pause_us": st.last_pause.as_micros() as u64,
        "last_ack_ms": st.last_ack.as_secs_f64() * 1000.0,
        "last_pages": st.last_pages,
        "last_wire_bytes": st.last_wire_bytes,
    })
}

fn replicate(
    config: ProtectConfig,
    shared: Arc<Shared>,
    mut jobs: tokio::sync::mpsc::Receiver<Job>,
    give_back: std::sync::mpsc::Sender<Staging>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), String> {
    event::check_fault("replication")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the replication runtime: {e}"))?;
    rt.block_on(async {
        let mut warned = false;
        loop {
            let session = session(&config, &shared, &mut jobs, &give_back, &mut warned);
            let outcome = tokio::select! {
                _ = &mut stop => return Ok(()),
                outcome = session => outcome,
            };
            shared.connected.store(false, Ordering::SeqCst);
            shared.in_flight.store(false, Ordering::SeqCst);
            shared.need_full.store(true, Ordering::SeqCst);
            let was = std::mem::replace(&mut shared.status().state, "unprotected");
            if let Err(e) = outcome
                && (!warned || was == "protected")
            {
                tracing::warn!(replica = %config.replica, "the guest runs unprotected: {e}");
                warned = true;
            }
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(RECONNECT) => {}
            }
        }
    })
}

/// One connection to the replica, until it fails.
async fn session(
    config: &ProtectConfig,
    shared: &Shared,
    jobs: &mut tokio::sync::mpsc::Receiver<Job>,
    give_back: &std::sync::mpsc::Sender<Staging>,
    warned: &mut bool,
) -> Result<(), String> {
    let addr: SocketAddr = config
        .replica
        .resolve()
        .await
        .map_err(|e| event::error_chain(&e))?;
    let conn = transport::connect(addr, &config.identity, config.peer)
        .await
        .map_err(|e| event::error_chain(&e))?;
    let (mut send, mut recv) = conn
        .open_stream()
        .await
        .map_err(|e| event::error_chain(&conn.explain(e)))?;
    shared.status().state = "syncing";
    // A stale checkpoint from before this connection is dropped; a full one is made next.
    while jobs.try_recv().is_ok() {}
    shared.in_flight.store(false, Ordering::SeqCst);
    shared.need_full.store(true, Ordering::SeqCst);
    shared.connected.store(true, Ordering::SeqCst);
    let mut encoder: Option<Encoder> = None;
    let mut frame = Vec::new();
    // Errors on the connection, in the words of what the replica did (e.g. refused our pin).
    let limit = |what: &'static str| {
        let conn = &conn;
        move |e: transport::Error| format!("{what}: {}", event::error_chain(&conn.explain(e)))
    };
    loop {
        let job = jobs
            .recv()
            .await
            .ok_or_else(|| "the VM's owner is gone".to_string())?;
        let shape = MachineShape::of(&job.state).map_err(|e| event::error_chain(&e))?;
        if job.kind == FrameKind::Full {
            let hello = Hello {
                protocol: wire::PROTOCOL,
                shape: shape.clone(),
            };
            let bytes = wire::encode_hello(&hello).map_err(|e| event::error_chain(&e))?;
            transport::send_frame(&mut send, &bytes)
                .await
                .map_err(limit("cannot greet the replica"))?;
            let answer = transport::recv_frame(&mut recv, 64 << 10)
                .await
                .map_err(limit("no greeting from the replica"))?;
            let theirs = wire::decode_hello(&answer).map_err(|e| event::error_chain(&e))?;
            wire::check_hello(&hello, &theirs).map_err(|e| event::error_chain(&e))?;
            encoder = Some(
                Encoder::new(shape, EncoderOptions::default())
                    .map_err(|e| event::error_chain(&e))?,
            );
        }
        let mut enc = encoder
            .take()
            .ok_or_else(|| "an incremental checkpoint before a full one".to_string())?;
        // Encoding all of memory takes seconds: off the runtime's thread, so that the
        // connection keeps its keep-alives going meanwhile.
        let mut out = std::mem::take(&mut frame);
        let (enc, job, out, stats) = tokio::task::spawn_blocking(move || {
            out.clear();
            let stats = enc.encode_into(
                job.epoch,
                job.kind,
                &job.staging.gfns,
                &job.staging.data,
                &job.state,
                &mut out,
            );
            (enc, job, out, stats)
        })
        .await
        .map_err(|e| format!("the checkpoint encoder failed: {e}"))?;
        encoder = Some(enc);
        frame = out;
        let stats = stats.map_err(|e| event::error_chain(&e))?;
        // The pages are in the frame: the buffer can take the next epoch's (a full
        // checkpoint's buffer is let go, it is the size of all of memory).
        if job.kind == FrameKind::Incremental {
            let _ = give_back.send(job.staging);
        }
        let sent = Instant::now();
        transport::send_frame(&mut send, &frame)
            .await
            .map_err(limit("cannot send a checkpoint"))?;
        let ack = transport::recv_frame(&mut recv, ACK_LEN)
            .await
            .map_err(limit("no acknowledgement"))?;
        let acked = <[u8; 8]>::try_from(ack.as_slice())
            .map(u64::from_le_bytes)
            .map_err(|_| "a malformed acknowledgement".to_string())?;
        if acked != job.epoch {
            return Err(format!(
                "the replica acknowledged epoch {acked} for epoch {}",
                job.epoch
            ));
        }
        let mut st = shared.status();
        st.committed = Some(acked);
        st.epochs_committed += 1;
        st.last_ack = sent.elapsed();
        st.last_wire_bytes = stats.wire_bytes;
        if job.kind == FrameKind::Full {
            st.state = "protected";
            drop(st);
            *warned = false;
            tracing::info!(replica = %config.replica, epoch = acked, "protected");
        }
        shared.in_flight.store(false, Ordering::SeqCst);
    }
}
