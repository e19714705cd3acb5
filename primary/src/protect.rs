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
//! - Output commit: from the pause that ends the initial sync on, the VM's output gate
//!   (`vmm::output`) holds what the guest sends; each capture seals the output produced
//!   before its pause, and the acknowledgement of that checkpoint releases it. Unprotected
//!   (no replica, or a lost one), output goes out at once.
//! - A new connection starts with an initial sync (see [`crate::precopy`]): pre-copy rounds
//!   send all of memory, then what was dirtied meanwhile, while the guest runs; then one short
//!   pause captures the full checkpoint that ends the sync (the pages dirtied since the last
//!   round, and the machine state). The replica commits it, the primary logs "protected". A
//!   lost or silent replica leaves the guest running unprotected (logged, and visible in
//!   `status`); when one answers again, a new sync re-protects it.
//! - Accounting: each acknowledged checkpoint's counters are handed to
//!   [`ProtectConfig::on_commit`] and become what `/metrics` serves while protected (see
//!   [`Protector::metrics_view`]): the values a takeover continues from, so that no scraper
//!   ever sees a counter the replica's copy of the guest would go below.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use checkpoint::transport::{self, Fingerprint, Identity, PeerAddr};
use checkpoint::wire::{self, Encoder, EncoderOptions, FrameKind, Hello};
use serde_json::{Value, json};
use vmm::RunningVm;
use vmm::event::{self, Reporter, ThreadError};
use vmm::output::OutputGate;
use vmm::vm::MachineState;

use crate::capture::{self, CaptureError, CaptureStats, Scope, Staging};
use crate::precopy::{self, HarvestRequest, Link, SyncProgress, explain};

/// Default epoch length.
pub const DEFAULT_EPOCH: Duration = Duration::from_millis(25);
/// How long the replication thread lets its connection's close go out when the VM ends.
const CLOSE_GRACE: Duration = Duration::from_millis(50);
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
    /// Most pre-copy rounds of an initial sync; 0 copies all of memory in one pause.
    pub precopy_rounds: u32,
    /// When checkpoints are taken.
    pub policy: Policy,
    /// Told the counters and epoch of each checkpoint the replica acknowledged (on the
    /// replication thread, in epoch order; keep it short).
    pub on_commit: Option<OnCommit>,
    /// The first checkpoint's epoch: 0 for a new guest; a guest taken over from epoch N goes
    /// on from N + 1, so that the epochs of its history keep rising.
    pub first_epoch: u64,
}

/// See [`ProtectConfig::on_commit`].
pub type OnCommit = Arc<dyn Fn(&vmm::state::CountersState, u64) + Send + Sync>;

/// What `/metrics` takes from protection, read at each scrape.
pub struct ProtectionMetrics {
    /// Protected or not, epochs, and the acknowledged checkpoints' figures.
    pub replication: metrics::ReplicationSample,
    /// While protected: the counters of the last acknowledged checkpoint (the first one of a
    /// sync from its capture on), to be served instead of the live ones. None: serve live.
    pub committed: Option<(vmm::state::CountersState, u64)>,
}

/// When checkpoints are taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Every epoch, whatever the guest does.
    Fixed,
    /// Every epoch, and also as soon as output waits and no checkpoint is in flight (at most
    /// one per [`MIN_EARLY`]), so that a quiet guest's replies are not held for an epoch.
    Early,
}

/// The shortest time between two checkpoints started early for waiting output.
pub const MIN_EARLY: Duration = Duration::from_millis(2);

/// One captured checkpoint on its way to the replica.
struct Job {
    epoch: u64,
    /// The output generation this checkpoint covers: released when it is acknowledged.
    generation: u64,
    kind: FrameKind,
    staging: Staging,
    state: MachineState,
    /// Per disk, the blocks the guest wrote since the last checkpoint and their contents.
    disks: Vec<(Vec<u64>, Vec<u8>)>,
    /// The last checkpoint of a planned switch-over: told the outcome (the epoch).
    handover: Option<Handover>,
    /// How long the guest was paused for it.
    pause: Duration,
    /// Pages in it.
    pages: usize,
}

/// Where a planned switch-over's outcome goes.
type Handover = tokio::sync::oneshot::Sender<Result<u64, String>>;

/// How long a planned switch-over may wait for the checkpoint in flight.
const HANDOVER_LIMIT: Duration = Duration::from_secs(10);

/// What `status` reports about protection.
#[derive(Debug, Default)]
pub(crate) struct Status {
    state: &'static str,
    replica: String,
    committed: Option<u64>,
    epochs_committed: u64,
    last_pause: Duration,
    last_ack: Duration,
    last_pages: usize,
    last_wire_bytes: u64,
    /// The initial sync in progress.
    pub(crate) sync: Option<SyncProgress>,
    /// The last initial sync: how long it took to protected, its final pause.
    last_sync: Option<(Duration, Duration)>,
    /// Figures of the acknowledged checkpoints.
    figures: Figures,
}

/// The histograms and byte counts of acknowledged checkpoints.
#[derive(Debug)]
struct Figures {
    pause: metrics::Histogram,
    pages: metrics::Histogram,
    ack: metrics::Histogram,
    raw_bytes: u64,
    wire_bytes: u64,
}

impl Default for Figures {
    fn default() -> Self {
        use metrics::histogram::{ACK_NS, PAGES, PAUSE_NS};
        Self {
            pause: metrics::Histogram::new(metrics::Unit::Nanoseconds, PAUSE_NS),
            pages: metrics::Histogram::new(metrics::Unit::Count, PAGES),
            ack: metrics::Histogram::new(metrics::Unit::Nanoseconds, ACK_NS),
            raw_bytes: 0,
            wire_bytes: 0,
        }
    }
}

impl Figures {
    fn sample(&self) -> metrics::CheckpointSample {
        metrics::CheckpointSample {
            pause: self.pause.sample(),
            dirty_pages: self.pages.sample(),
            ack: self.ack.sample(),
            raw_bytes: self.raw_bytes,
            wire_bytes: self.wire_bytes,
        }
    }
}

/// The counters `/metrics` serves while protected.
#[derive(Default)]
struct Published {
    /// Serve `counters` rather than live values (from the capture that ends a sync until the
    /// chain of checkpoints ends).
    serving: bool,
    counters: Option<(vmm::state::CountersState, u64)>,
}

/// No replica is connected.
const IDLE: u8 = 0;
/// An initial sync's pre-copy rounds are running: the owner only answers harvests.
const SYNCING: u8 = 1;
/// The owner captures the full checkpoint that ends the sync at its next epoch.
const FINAL_DUE: u8 = 2;
/// A chain of checkpoints is under way: the owner captures incremental epochs.
const CHAIN: u8 = 3;

pub(crate) struct Shared {
    status: Mutex<Status>,
    /// The VM's output gate.
    gate: Arc<OutputGate>,
    /// IDLE, SYNCING, FINAL_DUE or CHAIN.
    phase: AtomicU8,
    /// The full checkpoint covers all of memory (no pre-copy rounds ran).
    final_all: AtomicBool,
    /// A checkpoint is on its way and not yet acknowledged.
    in_flight: AtomicBool,
    /// What `/metrics` serves while protected.
    published: Mutex<Published>,
}

impl Shared {
    pub(crate) fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn published(&self) -> std::sync::MutexGuard<'_, Published> {
        self.published.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serve the counters of `epoch` from now on (`start`: the capture that ends a sync).
    fn publish(&self, counters: &vmm::state::CountersState, epoch: u64, start: bool) {
        let mut p = self.published();
        if start {
            p.serving = true;
        }
        p.counters = Some((counters.clone(), epoch));
    }

    /// The chain of checkpoints ended (or a new one starts): serve live values.
    fn unpublish(&self) {
        *self.published() = Published::default();
    }

    fn metrics(&self) -> ProtectionMetrics {
        let committed = {
            let p = self.published();
            // A capture that raced the end of its session (phase IDLE) publishes nothing.
            (p.serving && self.phase.load(Ordering::SeqCst) != IDLE)
                .then(|| p.counters.clone())
                .flatten()
        };
        let st = self.status();
        ProtectionMetrics {
            replication: metrics::ReplicationSample {
                protected: st.state == "protected",
                epochs: st.epochs_committed,
                committed_epoch: st.committed,
                failovers: 0,
                checkpoints: Some(st.figures.sample()),
            },
            committed,
        }
    }
}

/// The owner's side of protection.
pub struct Protector {
    shared: Arc<Shared>,
    jobs: tokio::sync::mpsc::Sender<Job>,
    /// Staging buffers back from the replication thread, reused so that a pause does not
    /// fault in fresh memory.
    spare: std::sync::mpsc::Receiver<Staging>,
    /// Dirty-log harvests asked for by an initial sync.
    harvests: std::sync::mpsc::Receiver<HarvestRequest>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
    epoch: Duration,
    next_due: Instant,
    next_epoch: u64,
    /// Log a digest of each epoch's image (a test mode).
    digests: bool,
    policy: Policy,
    /// Output waits for a checkpoint (the early policy's doorbell rang).
    waiting: bool,
    last_capture: Instant,
}

impl Protector {
    /// Starts the `replication` thread, which connects to the replica (and reconnects).
    /// `gate` is the VM's output gate: protection holds output until it is safe.
    pub fn start(
        config: ProtectConfig,
        reporter: &Reporter,
        gate: Arc<OutputGate>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            status: Mutex::new(Status {
                state: "connecting",
                replica: config.replica.to_string(),
                ..Status::default()
            }),
            gate,
            phase: AtomicU8::new(IDLE),
            final_all: AtomicBool::new(true),
            in_flight: AtomicBool::new(false),
            published: Mutex::default(),
        });
        let (jobs, rx) = tokio::sync::mpsc::channel(1);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (give_back, spare) = std::sync::mpsc::channel();
        let (ask, harvests) = std::sync::mpsc::channel();
        let (epoch, policy, first_epoch) = (config.epoch, config.policy, config.first_epoch);
        if policy == Policy::Early {
            let r = reporter.clone();
            shared
                .gate
                .set_doorbell(Box::new(move || r.send(vmm::event::VmEvent::OutputWaiting)));
        }
        let s = shared.clone();
        let thread = reporter.spawn("replication", move || {
            let channels = Channels {
                jobs: rx,
                give_back,
                harvests: ask,
            };
            replicate(config, s, channels, stopped)
        })?;
        Ok(Self {
            shared,
            jobs,
            spare,
            harvests,
            stop: Some(stop),
            thread: Some(thread),
            epoch,
            next_due: Instant::now() + epoch,
            next_epoch: first_epoch,
            digests: wire::digests_enabled(),
            policy,
            waiting: false,
            last_capture: Instant::now(),
        })
    }

    /// When the next checkpoint is due.
    pub fn next_due(&self) -> Instant {
        if self.waiting {
            self.next_due.min(self.last_capture + MIN_EARLY)
        } else {
            self.next_due
        }
    }

    /// Output waits for a checkpoint: with the early policy, the next tick may take one.
    pub fn output_waiting(&mut self) {
        self.waiting = self.policy == Policy::Early;
    }

    /// Answers an initial sync's harvests, and captures a checkpoint if one is due and the
    /// replica is ready for it.
    pub fn tick(&mut self, vm: &RunningVm) -> Result<Option<CaptureStats>, CaptureError> {
        // A harvest reads and clears the dirty log while the guest runs: no pause.
        while let Ok(request) = self.harvests.try_recv() {
            let _ = request.send(precopy::harvest(vm));
        }
        let now = Instant::now();
        let early = self.waiting && now >= self.last_capture + MIN_EARLY;
        if now < self.next_due && !early {
            return Ok(None);
        }
        // Output that waits while a checkpoint is in flight rings again when that one's
        // acknowledgement releases what it covers.
        self.waiting = false;
        // The next epoch starts a whole epoch from now, not from a missed deadline.
        self.next_due = now + self.epoch;
        if self.shared.in_flight.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let (scope, kind) = match self.shared.phase.load(Ordering::SeqCst) {
            CHAIN => (Scope::Dirty, FrameKind::Incremental),
            // The sync ends: what its last round left, or all of memory if there were none.
            FINAL_DUE if self.shared.final_all.load(Ordering::SeqCst) => {
                (Scope::All, FrameKind::Full)
            }
            FINAL_DUE => (Scope::Dirty, FrameKind::Full),
            _ => return Ok(None),
        };
        self.checkpoint(vm, scope, kind, None).map(Some)
    }

    /// Captures one checkpoint of `scope` and hands it to the replication thread (with
    /// `handover`, the one that ends a planned switch-over).
    fn checkpoint(
        &mut self,
        vm: &RunningVm,
        scope: Scope,
        kind: FrameKind,
        handover: Option<Handover>,
    ) -> Result<CaptureStats, CaptureError> {
        let mut staging = self.spare.try_recv().unwrap_or_default();
        // In the pause: the output so far belongs to this checkpoint (from the one that ends
        // a sync on, output is held); the digest test mode reads memory as the pause saw it.
        // The disks' written blocks are read in the pause too: the device thread is stopped.
        let (mut memory_crc, mut generation) = (None, 0);
        let (digests, gate, trackers) = (self.digests, &self.shared.gate, vm.disk_trackers());
        let mut disks: Vec<(Vec<u64>, Vec<u8>)> = Vec::new();
        let mut disk_crcs = Vec::new();
        let mut disk_error = None;
        let mut in_pause = |m: &vmm::memory::GuestMemoryMmap| {
            if kind == FrameKind::Full {
                gate.hold();
            }
            generation = gate.seal();
            for (n, t) in trackers.iter().enumerate() {
                let blocks = t.take();
                let mut data = Vec::new();
                if let Err(source) = t.read_blocks(&blocks, &mut data) {
                    disk_error.get_or_insert(CaptureError::Disk { disk: n, source });
                }
                disks.push((blocks, data));
                if digests {
                    disk_crcs.push(disk_digest(t));
                }
            }
            if digests {
                memory_crc = wire::memory_digest(m).ok();
            }
        };
        let (state, stats) = capture::capture(vm, scope, &mut staging, Some(&mut in_pause))?;
        if let Some(e) = disk_error {
            return Err(e);
        }
        self.last_capture = Instant::now();
        if let Some(crc) = memory_crc {
            let digest = wire::image_digest(crc, &state)
                .map_err(|e| event::error_chain(&e))
                .and_then(|mut d| {
                    for crc in &disk_crcs {
                        let crc = crc.as_ref().map_err(|e| e.to_string())?;
                        d.push_str(&format!("-d{crc:08x}"));
                    }
                    Ok(d)
                });
            match digest {
                Ok(d) => tracing::info!(epoch = self.next_epoch, digest = %d, "epoch image"),
                Err(e) => tracing::warn!("no digest: {e}"),
            }
        }
        {
            let mut st = self.shared.status();
            st.last_pause = stats.pause;
            st.last_pages = stats.pages;
        }
        if kind == FrameKind::Full {
            // Output is held from this pause on, and so are the counters /metrics shows: a
            // scraper never sees values newer than a takeover would go back to.
            self.shared.publish(&state.counters, self.next_epoch, true);
        }
        let job = Job {
            epoch: self.next_epoch,
            generation,
            kind,
            staging,
            state,
            disks,
            handover,
            pause: stats.pause,
            pages: stats.pages,
        };
        self.next_epoch += 1;
        self.shared.in_flight.store(true, Ordering::SeqCst);
        if kind == FrameKind::Full {
            self.shared.status().sync_pause(stats.pause);
            let _ = self.shared.phase.compare_exchange(
                FINAL_DUE,
                CHAIN,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
        if self.jobs.try_send(job).is_err() {
            // The thread is gone: its failure is reported; nothing more to send.
            self.shared.in_flight.store(false, Ordering::SeqCst);
            self.shared.phase.store(IDLE, Ordering::SeqCst);
        }
        Ok(stats)
    }

    /// Planned switch-over: pauses the guest, waits for the checkpoint in flight, captures a
    /// last one and, once the replica has committed it, releases the output it covers and
    /// asks the replica to take over. Ok: the guest runs there now (this VM stays paused and
    /// should end). Err: the guest was resumed here and is still protected or degraded.
    pub fn hand_over(&mut self, vm: &RunningVm) -> Result<Value, String> {
        if self.shared.phase.load(Ordering::SeqCst) != CHAIN
            || self.shared.status().state != "protected"
        {
            return Err("the VM is not protected: there is no replica to hand it over to".into());
        }
        // The checkpoint in flight is acknowledged while the guest still runs (only this thread
        // starts checkpoints, so none starts meanwhile): the pause lasts only for the last one.
        self.wait_in_flight()?;
        let started = Instant::now();
        let was_paused = vm.is_paused();
        vm.pause().map_err(|e| event::error_chain(&e))?;
        let outcome = self.hand_over_paused(vm, started);
        if outcome.is_err() && !was_paused {
            vm.resume();
        }
        outcome
    }

    /// Waits until no checkpoint is in flight (acknowledged, or the link lost).
    fn wait_in_flight(&self) -> Result<(), String> {
        let deadline = Instant::now() + HANDOVER_LIMIT;
        while self.shared.in_flight.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                return Err("the checkpoint in flight was not acknowledged in time".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn hand_over_paused(&mut self, vm: &RunningVm, started: Instant) -> Result<Value, String> {
        // No checkpoint started since `wait_in_flight`: only the link can have been lost.
        if self.shared.status().state != "protected" {
            return Err("the replica was lost during the handover".into());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stats = self
            .checkpoint(vm, Scope::Dirty, FrameKind::Incremental, Some(tx))
            .map_err(|e| event::error_chain(&e))?;
        let done = rx
            .blocking_recv()
            .map_err(|_| "the replication thread ended during the handover".to_string())?;
        let epoch = done?;
        tracing::info!(
            epoch,
            pause_us = stats.pause.as_micros() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "handed over: the replica runs the guest from this epoch"
        );
        Ok(json!({
            "handed_over": true,
            "epoch": epoch,
            "total_ms": started.elapsed().as_secs_f64() * 1000.0,
        }))
    }

    /// Protection's part of `status`.
    pub fn status_json(&self) -> Value {
        status_json(&self.shared.status(), &self.shared.gate)
    }

    /// What `/metrics` takes from protection, for the metrics thread.
    pub fn metrics_view(&self) -> Arc<dyn Fn() -> ProtectionMetrics + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move || shared.metrics())
    }

    /// A shared handle on the status, for the API thread.
    pub fn status_source(&self) -> Arc<dyn Fn() -> Value + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move || status_json(&shared.status(), &shared.gate))
    }

    /// Stops the `replication` thread and waits for it.
    pub fn stop(mut self) -> Result<(), ThreadError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), ThreadError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let joined = match self.thread.take() {
            Some(t) => event::join("replication", t),
            None => Ok(()),
        };
        // The VM is ending: what it said last goes out (there is nothing left to protect).
        self.shared.gate.open();
        joined
    }
}

impl Drop for Protector {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::error!("{e}");
        }
    }
}

/// One acknowledged checkpoint, as `/metrics` and the status count it.
struct Acknowledged {
    epoch: u64,
    pause: Duration,
    pages: usize,
    ack: Duration,
    raw_bytes: u64,
    wire_bytes: u64,
}

impl Status {
    /// Counts checkpoint `a` as acknowledged: the epoch, and its figures, once each.
    fn acknowledged(&mut self, a: &Acknowledged) {
        self.committed = Some(a.epoch);
        self.epochs_committed += 1;
        self.last_ack = a.ack;
        self.figures.pause.observe(a.pause.as_nanos() as u64);
        self.figures.pages.observe(a.pages as u64);
        self.figures.ack.observe(a.ack.as_nanos() as u64);
        self.figures.raw_bytes += a.raw_bytes;
        self.figures.wire_bytes += a.wire_bytes;
    }

    /// The pause that ended the sync in progress.
    fn sync_pause(&mut self, pause: Duration) {
        if let Some(s) = &mut self.sync {
            s.final_pause = Some(pause);
        }
    }
}

fn output_json(o: &vmm::output::OutputStats) -> Value {
    let us = |q| o.hold_quantile(q).map(|d: Duration| d.as_micros() as u64);
    json!({
        "held": o.holding,
        "held_items": o.held_items,
        "held_bytes": o.held_bytes,
        "high_water_bytes": o.high_water_bytes,
        "released_items": o.released_items,
        "released_bytes": o.released_bytes,
        "passed_items": o.passed_items,
        "full": o.full,
        "write_errors": o.write_errors,
        "hold_p50_us_at_most": us(0.5),
        "hold_p99_us_at_most": us(0.99),
    })
}

fn status_json(st: &Status, gate: &OutputGate) -> Value {
    let mut v = json!({
        "state": st.state,
        "replica": st.replica,
        "committed_epoch": st.committed,
        "epochs_committed": st.epochs_committed,
        "last_pause_us": st.last_pause.as_micros() as u64,
        "last_ack_ms": st.last_ack.as_secs_f64() * 1000.0,
        "last_pages": st.last_pages,
        "last_wire_bytes": st.last_wire_bytes,
    });
    if let Some(sync) = &st.sync {
        v["sync"] = sync.json();
    }
    v["output"] = output_json(&gate.stats());
    if let Some((took, pause)) = st.last_sync {
        v["last_sync_ms"] = json!(took.as_secs_f64() * 1000.0);
        v["last_sync_pause_us"] = json!(pause.as_micros() as u64);
    }
    v
}

/// CRC-32 of a disk image's bytes (the digest test mode), read while the VM is paused.
fn disk_digest(t: &vmm::disk_track::DiskTracker) -> std::io::Result<u32> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = Vec::new();
    let mut block = 0;
    while block < t.blocks() {
        let n = (t.blocks() - block).min(4096);
        let blocks: Vec<u64> = (block..block + n).collect();
        buf.clear();
        t.read_blocks(&blocks, &mut buf)?;
        let end = (t.bytes() - block * 4096).min(buf.len() as u64) as usize;
        crc.update(&buf[..end]);
        block += n;
    }
    Ok(crc.finalize())
}

/// Asks the replica to take over from committed epoch `epoch`; Ok once it has agreed.
async fn hand_over(link: &mut Link<'_>, epoch: u64) -> Result<(), String> {
    transport::send_frame(link.send, &wire::encode_handover(epoch))
        .await
        .map_err(explain(link.conn, "cannot ask the replica to take over"))?;
    let answer = transport::recv_frame(link.recv, 8)
        .await
        .map_err(explain(link.conn, "the replica did not take over"))?;
    if answer != epoch.to_le_bytes() {
        return Err("the replica answered the handover with another epoch".into());
    }
    Ok(())
}

/// Now, in nanoseconds since the Unix epoch (the release log's clock, the one packet
/// captures use).
fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The replication thread's ends of the channels to the owner.
struct Channels {
    jobs: tokio::sync::mpsc::Receiver<Job>,
    give_back: std::sync::mpsc::Sender<Staging>,
    harvests: std::sync::mpsc::Sender<HarvestRequest>,
}

fn replicate(
    config: ProtectConfig,
    shared: Arc<Shared>,
    mut channels: Channels,
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
            let session = session(&config, &shared, &mut channels, &mut warned);
            let outcome = tokio::select! {
                _ = &mut stop => None,
                outcome = session => Some(outcome),
            };
            let Some(outcome) = outcome else {
                // The VM ends: the dropped connection closes on purpose, which tells a
                // replica with --failover not to take over; give the close time to go out.
                tokio::time::sleep(CLOSE_GRACE).await;
                return Ok(());
            };
            shared.phase.store(IDLE, Ordering::SeqCst);
            shared.in_flight.store(false, Ordering::SeqCst);
            // Unprotected, /metrics serves live counters (never below what it served).
            shared.unpublish();
            // Unprotected, output goes out at once: what was held too.
            if shared.gate.stats().holding {
                let at = unix_ns();
                let r = shared.gate.open();
                tracing::info!(
                    frames = r.frames,
                    console_bytes = r.console_bytes,
                    at_unix_ns = at,
                    "output released: the guest is unprotected, its output goes out at once"
                );
            }
            let was = {
                let mut st = shared.status();
                st.sync = None;
                std::mem::replace(&mut st.state, "unprotected")
            };
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
    channels: &mut Channels,
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
    let started = Instant::now();
    {
        let mut st = shared.status();
        st.state = "syncing";
        st.sync = Some(SyncProgress::default());
    }
    // A stale checkpoint from before this connection is dropped.
    while channels.jobs.try_recv().is_ok() {}
    shared.unpublish();
    shared.in_flight.store(false, Ordering::SeqCst);
    shared.phase.store(SYNCING, Ordering::SeqCst);
    // The first harvest starts dirty tracking afresh and tells the machine's shape.
    let first = precopy::ask(&channels.harvests).await?;
    let hello = Hello {
        protocol: wire::PROTOCOL,
        shape: first.shape.clone(),
    };
    let bytes = wire::encode_hello(&hello).map_err(|e| event::error_chain(&e))?;
    transport::send_frame(&mut send, &bytes)
        .await
        .map_err(explain(&conn, "cannot greet the replica"))?;
    let answer = transport::recv_frame(&mut recv, 64 << 10)
        .await
        .map_err(explain(&conn, "no greeting from the replica"))?;
    let theirs = wire::decode_hello(&answer).map_err(|e| event::error_chain(&e))?;
    wire::check_hello(&hello, &theirs).map_err(|e| event::error_chain(&e))?;
    let mut encoder = Encoder::new(first.shape.clone(), EncoderOptions::default())
        .map_err(|e| event::error_chain(&e))?;

    let mut link = Link {
        conn: &conn,
        send: &mut send,
        recv: &mut recv,
    };
    let all = config.precopy_rounds == 0;
    let disk_sizes: Vec<u64> = first.disks.iter().map(|t| t.bytes()).collect();
    let mut disks = precopy::DiskSync::start(&first.disks)?;
    if all {
        // Memory goes in one pause; the disks still go while the guest runs.
        disks.round(&mut link, 0).await?;
    } else {
        encoder = precopy::sync(
            &mut link,
            encoder,
            first,
            config.precopy_rounds,
            &channels.harvests,
            shared,
            &mut disks,
        )
        .await?;
    }
    let mut disk_encoders = disks.into_encoders();
    shared.final_all.store(all, Ordering::SeqCst);
    shared.phase.store(FINAL_DUE, Ordering::SeqCst);

    let mut encoder = Some(encoder);
    let mut frame = Vec::new();
    loop {
        let job = channels
            .jobs
            .recv()
            .await
            .ok_or_else(|| "the VM's owner is gone".to_string())?;
        let enc = encoder
            .take()
            .ok_or_else(|| "the checkpoint encoder was lost".to_string())?;
        // Encoding all of memory takes seconds: off the runtime's thread, so that the
        // connection keeps its keep-alives going meanwhile.
        let mut out = std::mem::take(&mut frame);
        let (enc, job, out, stats) = tokio::task::spawn_blocking(move || {
            let mut enc = enc;
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
        // The pages are in the frame: the buffer can take the next epoch's (a buffer the size
        // of all of memory is let go).
        if !(all && job.kind == FrameKind::Full) {
            let _ = channels.give_back.send(job.staging);
        }
        let sent = Instant::now();
        let (mut raw_bytes, mut wire_bytes) = (stats.raw_bytes, stats.wire_bytes);
        // The epoch's disk writes first: the replica stages them for this epoch's commit.
        for (n, (blocks, data)) in job.disks.iter().enumerate() {
            let enc = disk_encoders
                .get_mut(n)
                .ok_or("a disk the sync did not know")?;
            let header = wire::DiskFrameHeader {
                disk: n as u32,
                sync: false,
                epoch: job.epoch,
                bytes: disk_sizes.get(n).copied().unwrap_or_default(),
            };
            for (i, chunk) in blocks.chunks(4096).enumerate() {
                let bytes = &data[i * 4096 * 4096..][..chunk.len() * 4096];
                let mut out = Vec::new();
                let disk_stats = wire::encode_disk_frame(enc, header, chunk, bytes, &mut out)
                    .map_err(|e| event::error_chain(&e))?;
                raw_bytes += disk_stats.raw_bytes;
                wire_bytes += out.len() as u64;
                transport::send_frame(link.send, &out)
                    .await
                    .map_err(explain(link.conn, "cannot send disk writes"))?;
            }
        }
        link.exchange(&frame, job.epoch).await?;
        let acked = job.epoch;
        let ack = sent.elapsed();
        // Committed on the replica: its counters are what a takeover continues from.
        shared.publish(&job.state.counters, acked, false);
        if let Some(tell) = &config.on_commit {
            tell(&job.state.counters, acked);
        }
        if let Some(done) = job.handover {
            // Committed: the output it covers may go (the guest is paused, nothing follows),
            // then the replica takes over.
            shared.gate.open();
            let outcome = hand_over(&mut link, job.epoch).await;
            let failed = outcome.as_ref().err().cloned();
            let _ = done.send(outcome.map(|()| job.epoch));
            if let Some(e) = failed {
                return Err(e);
            }
            shared.status().state = "handed over";
            // The owner ends the VM; nothing more goes on this link.
            std::future::pending::<()>().await;
        }
        let at = unix_ns();
        let r = shared.gate.release(job.generation);
        tracing::debug!(
            epoch = acked,
            frames = r.frames,
            frame_bytes = r.frame_bytes,
            console_bytes = r.console_bytes,
            at_unix_ns = at,
            "acknowledged: output released"
        );
        let mut st = shared.status();
        st.acknowledged(&Acknowledged {
            epoch: acked,
            pause: job.pause,
            pages: job.pages,
            ack,
            raw_bytes,
            wire_bytes,
        });
        st.last_wire_bytes = stats.wire_bytes;
        if job.kind == FrameKind::Full {
            st.state = "protected";
            let pause = st
                .sync
                .take()
                .and_then(|s| s.final_pause)
                .unwrap_or_default();
            st.last_sync = Some((started.elapsed(), pause));
            drop(st);
            *warned = false;
            tracing::info!(
                replica = %config.replica,
                epoch = acked,
                sync_ms = started.elapsed().as_millis() as u64,
                final_pause_us = pause.as_micros() as u64,
                "protected"
            );
        }
        shared.in_flight.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            status: Mutex::default(),
            gate: Arc::new(OutputGate::new(1 << 20)),
            phase: AtomicU8::new(IDLE),
            final_all: AtomicBool::new(true),
            in_flight: AtomicBool::new(false),
            published: Mutex::default(),
        }
    }

    fn counters(x: u64) -> vmm::state::CountersState {
        vmm::state::CountersState {
            serial: vec![x, 0],
            ..Default::default()
        }
    }

    #[test]
    fn metrics_serve_acknowledged_counters_only_while_a_chain_runs() {
        let s = shared();
        assert!(s.metrics().committed.is_none(), "nothing published: live");
        s.phase.store(SYNCING, Ordering::SeqCst);
        // An acknowledgement without the capture that ends a sync does not switch.
        s.publish(&counters(1), 0, false);
        assert!(s.metrics().committed.is_none());
        // The capture that ends the sync: its counters from now on, then each ack's.
        s.phase.store(CHAIN, Ordering::SeqCst);
        s.publish(&counters(2), 1, true);
        assert_eq!(s.metrics().committed, Some((counters(2), 1)));
        s.publish(&counters(3), 2, false);
        assert_eq!(s.metrics().committed, Some((counters(3), 2)));
        // A capture that raced the end of its session (phase IDLE) is not served.
        s.phase.store(IDLE, Ordering::SeqCst);
        assert!(s.metrics().committed.is_none());
        s.phase.store(CHAIN, Ordering::SeqCst);
        s.unpublish();
        assert!(s.metrics().committed.is_none(), "the chain ended: live");
    }

    #[test]
    fn checkpoint_figures_count_each_acknowledged_checkpoint_once() {
        let s = shared();
        {
            let mut st = s.status();
            st.state = "protected";
            for (epoch, pause_us, pages) in [(0, 300, 10), (1, 2_000, 0)] {
                st.acknowledged(&Acknowledged {
                    epoch,
                    pause: Duration::from_micros(pause_us),
                    pages,
                    ack: Duration::from_millis(1),
                    raw_bytes: 20480,
                    wire_bytes: 50,
                });
            }
        }
        let r = s.metrics().replication;
        assert!(r.protected);
        let c = r.checkpoints.unwrap();
        assert_eq!(r.epochs, 2);
        assert_eq!(
            [c.pause.count, c.dirty_pages.count, c.ack.count],
            [r.epochs; 3]
        );
        assert_eq!(c.pause.sum, 2_300_000);
        assert_eq!(c.dirty_pages.sum, 10);
        assert_eq!(c.dirty_pages.buckets[0], (0, 1), "an empty checkpoint");
        assert_eq!((c.raw_bytes, c.wire_bytes), (40960, 100));
    }
}
