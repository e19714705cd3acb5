//! The replica: listens for a primary (QUIC, mutual TLS, pinned certificate), and for each
//! checkpoint receives the whole frame, verifies it completely (`checkpoint::wire`), applies it
//! to its committed image and only then acknowledges it. A half-received, truncated, corrupted
//! or out-of-order checkpoint is never applied: the committed image stays exactly the last
//! acknowledged checkpoint.
//!
//! One primary at a time: connections are accepted concurrently, and while one primary's
//! session is alive every other is closed at once with the reason ("another primary is
//! connected: ADDR"), which the refused primary logs. When the session ends (the primary
//! closed it, or went silent for the link's idle timeout) the next primary to call is served.
//! Only a session applies frames to the committed image, so no two ever do at once.
//!
//! [`Monitor`] tells what the replica is doing (`ftvm status --api` of `ftvm replica --api`);
//! [`ReplicaConfig::on_commit`] lets others observe each commit.
#![warn(missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use checkpoint::api::{ApiError, StatusSource};
use checkpoint::transport::{self, Fingerprint, Identity, Server};
use checkpoint::wire::{self, DecodedEpoch, Decoder, DeviceKind, FrameKind, MachineShape};
use serde_json::{Value, json};
use vm_memory::GuestAddress;
use vmm::event::{self, Reporter, ThreadError, VmEvent};
use vmm::memory::GuestMemoryMmap;
use vmm::vm::MachineState;

pub mod disks;
mod fence;
pub mod standby;
use disks::DiskStore;
pub use fence::fence;

/// Called after each commit of a checkpoint frame (full or incremental, not pre-copy), with
/// the committed image's lock held: keep it short.
pub type OnCommit = Arc<dyn Fn(&Committed) + Send + Sync>;

/// Where and whom to listen for.
pub struct ReplicaConfig {
    /// The address to listen on (UDP).
    pub listen: SocketAddr,
    /// This host's key and certificate.
    pub identity: Identity,
    /// The primary's certificate fingerprint.
    pub peer: Fingerprint,
    /// Observes each commit (later: accounting); the replica's own [`Monitor`] is told first.
    pub on_commit: Option<OnCommit>,
    /// Where the copies of a primary's disks are kept (see [`disks`]); a primary whose
    /// machine has disks is refused without it.
    pub disk_dir: Option<std::path::PathBuf>,
    /// Take over when a primary whose checkpoint is committed sends nothing for this long
    /// (None: never; the replica only keeps the image).
    pub failover_timeout: Option<Duration>,
    /// The `history` object of `GET /status` (the accounting history's recorder), if any.
    pub history_status: Option<StatusSource>,
}

/// How [`supervise`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaEnd {
    /// A termination signal (its number): stopped in order.
    Signal(i32),
    /// The primary fell silent after a commit: the committed image is the caller's to run.
    TakeOver {
        /// The lost primary's address.
        primary: SocketAddr,
        /// The last committed epoch.
        epoch: u64,
        /// How long it had been silent.
        silent: Duration,
        /// The primary asked (planned switch-over, `ftvm migrate`): no fencing is needed.
        planned: bool,
    },
}

/// Errors of the replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The runtime could not start.
    #[error("Cannot start the replica's runtime")]
    Runtime(#[source] std::io::Error),
    /// The replica's thread could not start.
    #[error("Cannot start the replica's thread")]
    Spawn(#[source] std::io::Error),
    /// Termination signals cannot be watched.
    #[error("Cannot watch termination signals")]
    Signals(#[source] std::io::Error),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] transport::Error),
    /// The API socket failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A thread of the replica failed.
    #[error(transparent)]
    Thread(#[from] ThreadError),
}

/// The last acknowledged checkpoint: memory, machine state and epoch.
pub struct Committed {
    /// Its shape.
    pub shape: MachineShape,
    /// Guest memory as of the checkpoint.
    pub memory: GuestMemoryMmap,
    /// The machine state.
    pub state: MachineState,
    /// The epoch.
    pub epoch: u64,
    /// When it was committed here (a takeover moves the guest's clocks on by the time since).
    pub at: Instant,
}

/// What the replica holds, shared with whoever looks at it (tests, later failover).
pub type Shared = Arc<Mutex<Option<Committed>>>;

/// How many handshakes may be under way at once (a handshake holds its acceptor until it
/// completes or fails).
const ACCEPTORS: usize = 4;

/// How long a stopping replica waits for its close to reach the primary.
const CLOSE_GRACE: Duration = Duration::from_millis(50);

/// What a replica's API answers to the VM's commands.
pub const NOT_A_VM: &str = "This is a replica: it runs no VM to pause, resume or snapshot \
(it holds the primary's committed checkpoints); send that to the primary's --api socket";

/// The initial sync under way: what its pre-copy rounds brought so far.
struct SyncProgress {
    started: Instant,
    frames: u64,
    pages: u64,
    bytes: u64,
}

/// What [`Monitor`] reports.
#[derive(Default)]
struct Progress {
    listen: Option<SocketAddr>,
    /// The primary being served: the one session.
    primary: Option<SocketAddr>,
    /// That primary's sync has ended in a committed checkpoint.
    synced: bool,
    sync: Option<SyncProgress>,
    /// The last initial sync: what its pre-copy rounds brought, and how long it took from the
    /// greeting to its commit.
    last_sync: Option<(SyncProgress, Duration)>,
    /// Memory and vCPUs of the machine held or being synced.
    shape: Option<(u64, u32)>,
    committed_epoch: Option<u64>,
    epochs_committed: u64,
    last_commit: Option<Instant>,
    sessions: u64,
    refused: u64,
    /// A refusal was logged as a warning during the current session (the rest go to debug:
    /// a refused primary calls again every half second).
    refusal_logged: bool,
    /// The `history` object of the status.
    history: Option<StatusSource>,
}

/// What the replica is doing and holds, for `GET /status`: cheap to read (it never waits for
/// the committed image's lock, which a large commit holds for seconds).
#[derive(Clone, Default)]
pub struct Monitor(Arc<Mutex<Progress>>);

impl Monitor {
    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The status as JSON: `role` ("replica"), `state` ("waiting" for a primary, "syncing" a
    /// connected primary's initial sync, "committed": holding the connected primary's
    /// checkpoints), `listen`, `primary` (its address or null), `committed_epoch`,
    /// `epochs_committed`, `last_commit_ms_ago`, `memory_mib`, `vcpus`, `sync` (the sync in
    /// progress: `precopy_frames`, `precopy_pages`, `precopy_bytes`, `elapsed_ms`; or null),
    /// `last_sync` (the same figures for the last sync that ended in a commit, and its `ms` from
    /// the greeting to that commit; or null), `sessions` (primaries served) and
    /// `primaries_refused`; `history` (the accounting history's recorder, or null).
    pub fn json(&self) -> Value {
        let history = self.lock().history.clone().map(|f| f());
        let p = self.lock();
        let state = match (p.primary, p.synced) {
            (None, _) => "waiting",
            (Some(_), false) => "syncing",
            (Some(_), true) => "committed",
        };
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        json!({
            "role": "replica",
            "state": state,
            "listen": p.listen.map(|a| a.to_string()),
            "primary": p.primary.map(|a| a.to_string()),
            "committed_epoch": p.committed_epoch,
            "epochs_committed": p.epochs_committed,
            "last_commit_ms_ago": p.last_commit.map(|t| ms(t.elapsed())),
            "memory_mib": p.shape.map(|s| s.0),
            "vcpus": p.shape.map(|s| s.1),
            "sync": p.sync.as_ref().map(|s| json!({
                "precopy_frames": s.frames,
                "precopy_pages": s.pages,
                "precopy_bytes": s.bytes,
                "elapsed_ms": ms(s.started.elapsed()),
            })),
            "last_sync": p.last_sync.as_ref().map(|(s, took)| json!({
                "precopy_frames": s.frames,
                "precopy_pages": s.pages,
                "precopy_bytes": s.bytes,
                "ms": ms(*took),
            })),
            "sessions": p.sessions,
            "primaries_refused": p.refused,
            "history": history,
        })
    }

    /// [`Monitor::json`] for the API.
    pub fn status_source(&self) -> StatusSource {
        let m = self.clone();
        Arc::new(move || m.json())
    }

    /// Takes the one session for `primary`, or says whose it is (and whether this refusal is
    /// the session's first).
    fn claim(&self, primary: SocketAddr) -> Result<Session, (SocketAddr, bool)> {
        let mut p = self.lock();
        if let Some(current) = p.primary {
            p.refused += 1;
            let first = !std::mem::replace(&mut p.refusal_logged, true);
            return Err((current, first));
        }
        p.primary = Some(primary);
        p.refusal_logged = false;
        p.synced = false;
        p.sync = None;
        p.sessions += 1;
        Ok(Session(self.clone()))
    }

    /// A greeting: an initial sync of a machine of `shape` starts.
    fn hello(&self, shape: &MachineShape) {
        let mut p = self.lock();
        p.shape = Some((shape.mem_size() >> 20, shape.vcpus));
        p.synced = false;
        p.sync = Some(SyncProgress {
            started: Instant::now(),
            frames: 0,
            pages: 0,
            bytes: 0,
        });
    }

    /// A pre-copy frame of `pages` pages in `bytes` was applied to the sync's image.
    fn precopy(&self, pages: usize, bytes: usize) {
        if let Some(s) = &mut self.lock().sync {
            s.frames += 1;
            s.pages += pages as u64;
            s.bytes += bytes as u64;
        }
    }

    /// Checkpoint `epoch` of a machine of `shape` was committed (called under the committed
    /// image's lock).
    fn committed(&self, epoch: u64, shape: &MachineShape) {
        let mut p = self.lock();
        p.committed_epoch = Some(epoch);
        p.epochs_committed += 1;
        p.last_commit = Some(Instant::now());
        p.shape = Some((shape.mem_size() >> 20, shape.vcpus));
        if let Some(s) = p.sync.take() {
            let took = s.started.elapsed();
            p.last_sync = Some((s, took));
        }
        p.synced = true;
    }
}

/// The one session, held while a primary is served; dropping it lets the next one in.
struct Session(Monitor);

impl Drop for Session {
    fn drop(&mut self) {
        let mut p = self.0.lock();
        p.primary = None;
        p.synced = false;
        p.sync = None;
    }
}

/// What every session shares.
struct Context {
    committed: Shared,
    monitor: Monitor,
    on_commit: Option<OnCommit>,
    disk_dir: Option<std::path::PathBuf>,
    failover_timeout: Option<Duration>,
    /// Set once a session decided to take over.
    takeover: Mutex<Option<ReplicaEnd>>,
}

impl Context {
    /// Tells the monitor, then the configured observer, of a commit.
    fn observe(&self, c: &Committed) {
        self.monitor.committed(c.epoch, &c.shape);
        if let Some(f) = &self.on_commit {
            f(c);
        }
    }
}

/// A running replica: its `replica` thread serves primaries until [`Replica::stop`].
pub struct Replica {
    addr: SocketAddr,
    monitor: Monitor,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
    context: Arc<Context>,
}

impl Replica {
    /// Listens as `config` says and serves primaries in a thread named `replica` (its failure
    /// is reported through `reporter`); `committed` holds the last acknowledged checkpoint.
    /// Returns once it listens, or with the reason it cannot.
    pub fn start(
        config: ReplicaConfig,
        committed: Shared,
        reporter: &Reporter,
    ) -> Result<Self, ReplicaError> {
        let monitor = Monitor::default();
        monitor.lock().history = config.history_status.clone();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (stop_tx, stop) = tokio::sync::oneshot::channel();
        let context = Context {
            committed,
            monitor: monitor.clone(),
            on_commit: config.on_commit.clone(),
            disk_dir: config.disk_dir.clone(),
            failover_timeout: config.failover_timeout,
            takeover: Mutex::new(None),
        };
        let context = Arc::new(context);
        let decided = context.clone();
        let thread = reporter
            .spawn("replica", move || {
                serve_all(config, context, ready_tx, stop)
            })
            .map_err(ReplicaError::Spawn)?;
        match ready.recv() {
            Ok(Ok(addr)) => Ok(Replica {
                addr,
                monitor,
                stop: Some(stop_tx),
                thread: Some(thread),
                context: decided,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            // The thread ended before it listened: it failed.
            Err(_) => Err(match event::join("replica", thread) {
                Err(e) => e.into(),
                Ok(()) => ThreadError {
                    thread: "replica".into(),
                    cause: "ended before it listened".into(),
                }
                .into(),
            }),
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it is doing.
    pub fn monitor(&self) -> &Monitor {
        &self.monitor
    }

    /// Whether a session decided to take over (the primary fell silent after a commit).
    pub fn takeover(&self) -> Option<ReplicaEnd> {
        self.context
            .takeover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops listening (closing the primary's connection) and waits for the thread.
    pub fn stop(mut self) -> Result<(), ThreadError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), ThreadError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => event::join("replica", t),
            None => Ok(()),
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::error!("{e}");
        }
    }
}

/// `ftvm replica`: keeps a replica (and, with `api`, its status-only API on that Unix socket)
/// until a termination signal, then stops in order and returns the signal's number; a failed
/// thread ends it with that failure. `ready` is told the bound address once it listens.
/// Termination signals must be blocked (`vmm::signals::block_termination`) before any thread
/// starts.
pub fn supervise(
    config: ReplicaConfig,
    committed: Shared,
    api: Option<&Path>,
    ready: impl FnOnce(SocketAddr),
) -> Result<ReplicaEnd, ReplicaError> {
    let (tx, events) = std::sync::mpsc::channel();
    let reporter = Reporter::new(tx);
    vmm::signals::watch(&reporter).map_err(ReplicaError::Signals)?;
    // The socket first: a bad path ends ftvm before it listens for a primary.
    let bound = api.map(checkpoint::api::bind).transpose()?;
    let replica = Replica::start(config, committed, &reporter)?;
    ready(replica.local_addr());
    let server = bound
        .map(|b| b.serve_status_only(replica.monitor().status_source(), NOT_A_VM, &reporter))
        .transpose()?;
    let outcome = loop {
        if let Some(end) = replica.takeover() {
            break Ok(end);
        }
        match events.recv_timeout(TAKEOVER_POLL) {
            Ok(VmEvent::Signal(sig)) => break Ok(ReplicaEnd::Signal(sig)),
            Ok(VmEvent::ThreadFailed { thread, cause }) => {
                break Err(ThreadError { thread, cause }.into());
            }
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // Cannot happen: `reporter` is alive.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Ok(ReplicaEnd::Signal(0));
            }
        }
    };
    let stopped = [server.map_or(Ok(()), |s| s.stop()), replica.stop()];
    match outcome {
        Ok(sig) => {
            for r in stopped {
                r?;
            }
            Ok(sig)
        }
        Err(e) => Err(e),
    }
}

/// How often [`supervise`] looks whether a session decided to take over.
const TAKEOVER_POLL: Duration = Duration::from_millis(2);

/// The `replica` thread: listens, tells `ready`, serves until `stop`.
fn serve_all(
    config: ReplicaConfig,
    context: Arc<Context>,
    ready: std::sync::mpsc::Sender<Result<SocketAddr, ReplicaError>>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), String> {
    event::check_fault("replica")?;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(ReplicaError::Runtime(e)));
            return Ok(());
        }
    };
    rt.block_on(async move {
        let listening = transport::listen(config.listen, &config.identity, config.peer)
            .await
            .and_then(|s| s.local_addr().map(|a| (s, a)));
        let (server, addr) = match listening {
            Ok(l) => l,
            Err(e) => {
                // Told to the starter, which returns it: not a thread failure.
                let _ = ready.send(Err(e.into()));
                return Ok(());
            }
        };
        context.monitor.lock().listen = Some(addr);
        let _ = ready.send(Ok(addr));
        let server = Arc::new(server);
        let mut acceptors = tokio::task::JoinSet::new();
        for _ in 0..ACCEPTORS {
            acceptors.spawn(accept(server.clone(), context.clone()));
        }
        tokio::select! {
            _ = stop => {}
            // An acceptor ends only when the endpoint is closed, or by a panic: the thread's
            // failure then, reported with its cause.
            ended = acceptors.join_next() => {
                if let Some(Err(e)) = ended {
                    server.close();
                    return Err(format!("an acceptor failed: {e}"));
                }
            }
        }
        server.close();
        // The close is sent by quinn's driver task: give it a moment to go out, so that the
        // primary learns "replica closing" at once rather than from 1.5 s of silence — unless
        // this replica takes over: its primary is lost, or handed over and gone already, and
        // the guest waits.
        let taking_over = context
            .takeover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if !taking_over {
            tokio::time::sleep(CLOSE_GRACE).await;
        }
        Ok(())
    })
}

/// Accepts primaries (one handshake at a time) and starts a task for each.
async fn accept(server: Arc<Server>, context: Arc<Context>) {
    loop {
        match server.accept().await {
            Ok(conn) => {
                let session = tokio::spawn(session(conn, context.clone()));
                // A session that panics is reported with its cause; the replica serves on.
                tokio::spawn(async move {
                    if let Err(e) = session.await {
                        tracing::error!("the session with a primary failed: {e}");
                    }
                });
            }
            Err(transport::Error::EndpointClosed) => return,
            Err(e) => tracing::warn!("refused a connection: {}", chain(&e)),
        }
    }
}

/// Serves `conn` if no other primary is being served; refuses it at once otherwise.
async fn session(conn: transport::Connection, context: Arc<Context>) {
    if let Err(cause) = event::check_fault("session") {
        tracing::error!("the session with a primary failed: {cause}");
        return;
    }
    let addr = conn.remote_address();
    let _session = match context.monitor.claim(addr) {
        Ok(s) => s,
        Err((current, first)) => {
            let reason = format!("another primary is connected: {current}");
            if first {
                tracing::warn!(primary = %addr, "refused a primary: {reason}");
            } else {
                tracing::debug!(primary = %addr, "refused a primary: {reason}");
            }
            conn.close(&reason);
            return;
        }
    };
    tracing::info!(primary = %addr, "serving the primary");
    match serve(&conn, &context).await {
        Ok(()) => {
            tracing::info!(primary = %addr, "primary disconnected");
            conn.close("replica done");
        }
        Err(e) => {
            tracing::warn!(
                primary = %addr,
                "primary lost: {e}; the committed checkpoint stays as it was"
            );
            // The primary learns why (QUIC carries a short close reason).
            let reason: String = e.chars().take(400).collect();
            conn.close(&format!("replica refused: {reason}"));
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    vmm::event::error_chain(e)
}

/// Largest frame a primary of `shape` can send: all of memory, incompressible, plus state.
fn max_frame(shape: &MachineShape) -> usize {
    let pages = shape.pages() as usize;
    wire::HEADER_LEN + pages * (wire::PAGE_SIZE + 16) + (64 << 20)
}

fn fresh_memory(shape: &MachineShape) -> Result<GuestMemoryMmap, String> {
    let ranges: Vec<(GuestAddress, usize)> = shape
        .ram
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| format!("cannot allocate memory: {e}"))
}

async fn serve(conn: &transport::Connection, context: &Arc<Context>) -> Result<(), String> {
    let (mut send, mut recv) = conn.accept_stream().await.map_err(|e| chain(&e))?;
    let committed = &context.committed;
    let mut decoder: Option<Decoder> = None;
    // The image an initial sync's pre-copy rounds are building, until its full frame.
    let mut sync: Option<GuestMemoryMmap> = None;
    // The copies of the primary's disks (a machine with disks).
    let mut disks: Option<DiskStore> = None;
    let digests = wire::digests_enabled();
    // This session's primary has a committed checkpoint here: its silence means a takeover.
    let mut ours = false;
    loop {
        let limit = decoder.as_ref().map_or(64 << 10, |d| max_frame(d.shape()));
        let waited = Instant::now();
        // Silence, not a frame's length, is what the failover timeout measures.
        let received = match context.failover_timeout.filter(|_| ours) {
            Some(t) => transport::recv_frame_unless_silent(&mut recv, limit, t)
                .await
                .transpose()
                .ok_or(()),
            None => Ok(transport::recv_frame(&mut recv, limit).await),
        };
        let outcome = match received {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) => {
                let e = conn.explain(e);
                if !ours || context.failover_timeout.is_none() {
                    // Silence or the primary's close, rather than a stream error.
                    return Err(chain(&e));
                }
                // A primary that closes the link on purpose (its guest ended, or it was
                // stopped) is not lost: taking over would bring back a guest meant to end.
                if e.is_closed_by_peer() {
                    tracing::info!(
                        primary = %conn.remote_address(),
                        "the primary closed the link on purpose: not taking over"
                    );
                    return Ok(());
                }
                Err(chain(&e))
            }
            Err(_) => Err("silent".to_string()),
        };
        let bytes = match outcome {
            Ok(b) => b,
            // The primary is gone after a commit (silent, or its connection lost).
            Err(why) => {
                let epoch = committed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map(|c| c.epoch)
                    .unwrap_or_default();
                let silent = waited.elapsed();
                tracing::warn!(
                    primary = %conn.remote_address(),
                    epoch,
                    silent_ms = silent.as_millis() as u64,
                    "the primary is lost ({why}): taking over from the committed epoch"
                );
                *context.takeover.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(ReplicaEnd::TakeOver {
                        primary: conn.remote_address(),
                        epoch,
                        silent,
                        planned: false,
                    });
                return Err(format!(
                    "the primary is lost ({why}): this replica takes over"
                ));
            }
        };
        if bytes.starts_with(b"FTVMHELO") {
            let hello = wire::decode_hello(&bytes).map_err(|e| chain(&e))?;
            // A replica that holds a committed image refuses another machine.
            if let Some(c) = committed.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                let ours = wire::Hello {
                    protocol: wire::PROTOCOL,
                    shape: c.shape.clone(),
                };
                wire::check_hello(&ours, &hello).map_err(|e| chain(&e))?;
            }
            let answer = wire::Hello {
                protocol: wire::PROTOCOL,
                shape: hello.shape.clone(),
            };
            let answer = wire::encode_hello(&answer).map_err(|e| chain(&e))?;
            transport::send_frame(&mut send, &answer)
                .await
                .map_err(|e| chain(&e))?;
            let count = hello
                .shape
                .devices
                .iter()
                .filter(|d| **d == DeviceKind::Block)
                .count();
            disks = match (&context.disk_dir, count) {
                (_, 0) => None,
                (Some(dir), n) => Some(DiskStore::new(dir, n)?),
                (None, n) => {
                    return Err(format!(
                        "the primary's machine has {n} disk(s): start the replica with \
                         --disk-dir DIR to keep their copies"
                    ));
                }
            };
            context.monitor.hello(&hello.shape);
            decoder = Some(Decoder::new(hello.shape).map_err(|e| chain(&e))?);
            sync = None;
            continue;
        }
        if bytes.starts_with(&wire::HANDOVER_MAGIC) {
            let epoch = wire::decode_handover(&bytes).map_err(|e| chain(&e))?;
            if context.failover_timeout.is_none() {
                return Err(
                    "this replica was not started with --failover: it cannot take \
                            over"
                        .into(),
                );
            }
            let current = committed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|c| c.epoch);
            if current != Some(epoch) || !ours {
                return Err(format!(
                    "asked to take over from epoch {epoch}, the committed one is {current:?}"
                ));
            }
            tracing::info!(primary = %conn.remote_address(), epoch, "the primary hands the guest over");
            *context.takeover.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(ReplicaEnd::TakeOver {
                    primary: conn.remote_address(),
                    epoch,
                    silent: Duration::ZERO,
                    planned: true,
                });
            transport::send_frame(&mut send, &epoch.to_le_bytes())
                .await
                .map_err(|e| chain(&e))?;
            // The primary ends; this session is over. Wait for its close so the answer goes.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            return Ok(());
        }
        if bytes.starts_with(&wire::DISK_MAGIC) {
            let mut store = disks
                .take()
                .ok_or("a disk frame for a machine without disks")?;
            let (store, taken) = tokio::task::spawn_blocking(move || {
                let taken = store.take(&bytes);
                (store, taken)
            })
            .await
            .map_err(|e| format!("the disk worker failed: {e}"))?;
            disks = Some(store);
            let header = taken?;
            // A sync round is acknowledged; an epoch's writes wait for its checkpoint.
            if header.sync {
                transport::send_frame(&mut send, &header.epoch.to_le_bytes())
                    .await
                    .map_err(|e| chain(&e))?;
            }
            continue;
        }
        let mut dec = decoder.take().ok_or("a checkpoint before the greeting")?;
        // Verifying and applying a large checkpoint takes seconds: off the runtime's thread, so
        // that the connection keeps answering keep-alives meanwhile.
        let ctx = context.clone();
        let mut image = sync.take();
        let mut store = disks.take();
        let (dec, image, store, bytes, result) = tokio::task::spawn_blocking(move || {
            let observe = |c: &Committed| ctx.observe(c);
            // The disks take the epoch's writes once its memory checkpoint has been verified.
            let mut disks_first = |d: &DecodedEpoch| match store.as_mut() {
                Some(s) => s.commit(d.epoch, d.kind == FrameKind::Full),
                None => Ok(()),
            };
            let result = commit_with(
                &mut dec,
                &mut image,
                &bytes,
                &ctx.committed,
                &observe,
                &mut disks_first,
            );
            (dec, image, store, bytes, result)
        })
        .await
        .map_err(|e| format!("the checkpoint worker failed: {e}"))?;
        decoder = Some(dec);
        sync = image;
        disks = store;
        let applied = result?;
        ours |= applied.kind != FrameKind::Precopy;
        if applied.kind == FrameKind::Precopy {
            context.monitor.precopy(applied.pages, bytes.len());
        } else if digests {
            log_digest(committed, disks.as_ref());
        }
        transport::send_frame(&mut send, &applied.epoch.to_le_bytes())
            .await
            .map_err(|e| chain(&e))?;
        tracing::debug!(epoch = applied.epoch, "committed");
    }
}

/// The test mode of `checkpoint::wire::digests_enabled`: logs what was committed.
fn log_digest(committed: &Shared, disks: Option<&DiskStore>) {
    let guard = committed.lock().unwrap_or_else(|p| p.into_inner());
    let Some(c) = guard.as_ref() else { return };
    let digest = wire::memory_digest(&c.memory)
        .and_then(|crc| wire::image_digest(crc, &c.state))
        .map_err(|e| chain(&e))
        .and_then(|mut d| {
            for n in 0..disks.map_or(0, DiskStore::len) {
                let crc = disks.ok_or("no disks")?.digest(n)?;
                d.push_str(&format!("-d{crc:08x}"));
            }
            Ok(d)
        });
    match digest {
        Ok(d) => tracing::info!(epoch = c.epoch, digest = %d, "committed image"),
        Err(e) => tracing::warn!("no digest: {e}"),
    }
}

/// What [`commit_observed`] applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The frame's epoch (a pre-copy frame's round).
    pub epoch: u64,
    /// Its kind.
    pub kind: FrameKind,
    /// How many pages it carried.
    pub pages: usize,
}

/// Verifies `frame` completely (with `dec`, made for the primary's shape) and applies it;
/// returns its epoch (a pre-copy frame's round). A checkpoint frame lands in `committed`; a
/// pre-copy frame in `sync`, the image an initial sync is building (made on its first
/// frame), which the sync's full frame completes and commits. On any error the committed
/// image is unchanged.
pub fn commit(
    dec: &mut Decoder,
    sync: &mut Option<GuestMemoryMmap>,
    frame: &[u8],
    committed: &Shared,
) -> Result<u64, String> {
    commit_observed(dec, sync, frame, committed, &|_| {}).map(|a| a.epoch)
}

/// [`commit`], calling `observe` with the committed image (its lock held) after a checkpoint
/// frame is committed; not for a pre-copy frame, nor for a frame that fails.
pub fn commit_observed(
    dec: &mut Decoder,
    sync: &mut Option<GuestMemoryMmap>,
    frame: &[u8],
    committed: &Shared,
    observe: &dyn Fn(&Committed),
) -> Result<Applied, String> {
    commit_with(dec, sync, frame, committed, observe, &mut |_| Ok(()))
}

/// [`commit_observed`], calling `before_apply` with a checkpoint frame (not a pre-copy one)
/// once it is verified and in order, before anything of it is applied; its error stops the
/// commit.
fn commit_with(
    dec: &mut Decoder,
    sync: &mut Option<GuestMemoryMmap>,
    frame: &[u8],
    committed: &Shared,
    observe: &dyn Fn(&Committed),
    before_apply: &mut dyn FnMut(&DecodedEpoch) -> Result<(), String>,
) -> Result<Applied, String> {
    let mut guard = committed.lock().unwrap_or_else(|p| p.into_inner());
    let shape = dec.shape().clone();
    let base = guard
        .as_ref()
        .filter(|c| c.shape == shape)
        .map(|c| &c.memory);
    let mut decoded = dec.decode(frame, base).map_err(|e| chain(&e))?;
    let current = guard.as_ref().filter(|c| c.shape == shape).map(|c| c.epoch);
    wire::check_order(current, decoded.epoch, decoded.kind).map_err(|e| chain(&e))?;
    let applied = Applied {
        epoch: decoded.epoch,
        kind: decoded.kind,
        pages: decoded.pages.gfns.len(),
    };
    let epoch = decoded.epoch;
    if decoded.kind != FrameKind::Precopy {
        before_apply(&decoded)?;
    }
    match (decoded.kind, decoded.state.take()) {
        (FrameKind::Precopy, _) => {
            drop(guard);
            if sync.is_none() {
                *sync = Some(fresh_memory(&shape)?);
            }
            let image = sync.as_ref().ok_or("no sync image")?;
            wire::apply(&decoded, image).map_err(|e| chain(&e))?;
            return Ok(applied);
        }
        (FrameKind::Full, Some(state)) => {
            // A full checkpoint lands on the image its sync built, or on fresh memory: the old
            // committed image stays until the new one is whole.
            let memory = match sync.take() {
                Some(m) => m,
                None => fresh_memory(&shape)?,
            };
            wire::apply(&decoded, &memory).map_err(|e| chain(&e))?;
            *guard = Some(Committed {
                shape,
                memory,
                state,
                epoch,
                at: Instant::now(),
            });
        }
        (FrameKind::Incremental, Some(state)) => {
            let c = guard
                .as_mut()
                .ok_or("an incremental checkpoint before a full one")?;
            wire::apply(&decoded, &c.memory).map_err(|e| chain(&e))?;
            c.state = state;
            c.epoch = epoch;
            c.at = Instant::now();
        }
        (_, None) => return Err("a checkpoint frame without machine state".into()),
    }
    if let Some(c) = guard.as_ref() {
        observe(c);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> MachineShape {
        MachineShape {
            ram: vec![(0, 64 << 20)],
            vcpus: 2,
            devices: Vec::new(),
            linux: false,
        }
    }

    #[test]
    fn the_status_follows_a_session_from_waiting_to_committed_and_back() {
        let m = Monitor::default();
        let st = m.json();
        assert_eq!(st["role"], "replica");
        assert_eq!(st["state"], "waiting");
        assert!(
            st["primary"].is_null() && st["committed_epoch"].is_null(),
            "{st}"
        );

        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let session = m.claim(a).map_err(|_| ()).unwrap();
        m.hello(&shape());
        m.precopy(16384, 5000);
        m.precopy(10, 200);
        let st = m.json();
        assert_eq!(st["state"], "syncing");
        assert_eq!(st["primary"], "127.0.0.1:1000");
        assert_eq!(
            (st["memory_mib"].as_u64(), st["vcpus"].as_u64()),
            (Some(64), Some(2))
        );
        assert_eq!(st["sync"]["precopy_frames"], 2);
        assert_eq!(st["sync"]["precopy_pages"], 16394);
        assert_eq!(st["sync"]["precopy_bytes"], 5200);

        m.committed(0, &shape());
        m.committed(1, &shape());
        let st = m.json();
        assert_eq!(st["state"], "committed");
        assert_eq!(st["committed_epoch"], 1);
        assert_eq!(st["epochs_committed"], 2);
        assert!(st["sync"].is_null(), "{st}");
        assert_eq!(st["last_sync"]["precopy_frames"], 2);
        assert!(st["last_commit_ms_ago"].as_f64().is_some(), "{st}");

        // A second primary is refused while the first is served; counted once each time.
        let b: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        assert_eq!(m.claim(b).err(), Some((a, true)));
        assert_eq!(
            m.claim(b).err(),
            Some((a, false)),
            "only the first is a warning"
        );
        assert_eq!(m.json()["primaries_refused"], 2);

        // The first goes away: the committed image stays, the next primary is served.
        drop(session);
        let st = m.json();
        assert_eq!(st["state"], "waiting");
        assert!(st["primary"].is_null(), "{st}");
        assert_eq!(st["committed_epoch"], 1);
        let _next = m.claim(b).map_err(|_| ()).unwrap();
        let st = m.json();
        assert_eq!(
            (st["state"].as_str(), st["sessions"].as_u64()),
            (Some("syncing"), Some(2))
        );
        assert!(st["sync"].is_null(), "no greeting yet: {st}");
    }
}
