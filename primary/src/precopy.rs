//! The initial sync: all of guest memory reaches the replica while the guest runs, so that
//! protecting a large guest costs one short pause instead of one as long as copying its memory.
//!
//! Round 0 sends every page; each later round sends the pages dirtied while the one before was
//! being sent. A round starts with a harvest of the dirty log (read and cleared by the VM's
//! owner, without pausing), then copies those pages out of the running guest: a page written
//! after its harvest is dirty again and goes in a later round or the final pause, so a torn
//! copy is always replaced. Rounds stop when one is small ([`FINAL_PAGES`]) or after the most
//! rounds configured; the full checkpoint captured in the final pause then carries what the
//! last round left, with the machine state, and the replica commits the image the rounds built.
//! Pre-copy frames are never committed on their own (`checkpoint::wire::FrameKind::Precopy`).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoint::transport::{self, Connection, RecvStream, SendStream};
use checkpoint::wire::{self, DiskFrameHeader, Encoder, MachineShape};
use serde_json::{Value, json};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::RunningVm;
use vmm::disk_track::DiskTracker;
use vmm::event::error_chain;
use vmm::memory::{DirtyPages, GuestMemoryMmap, PAGE_SIZE};

use crate::capture::Staging;
use crate::protect::Shared;

/// Pages per pre-copy frame (16 MiB): bounds the buffers and paces progress.
const CHUNK: usize = 4096;
/// A round of at most this many pages (8 MiB) is the last: the final pause copies what is
/// dirtied while it is sent, about an epoch's worth.
pub const FINAL_PAGES: usize = 2048;
/// How often the terminal's progress line is redrawn.
const DRAW_EVERY: Duration = Duration::from_millis(100);

/// What the owner hands back for a harvest: the dirty pages since the last one (the log is
/// cleared), and what reading the running guest needs.
pub(crate) struct Harvest {
    /// The machine's shape (for the greeting).
    pub shape: MachineShape,
    /// Guest memory (a handle on the same mapping).
    pub memory: GuestMemoryMmap,
    /// The pages written since the previous harvest or capture.
    pub dirty: DirtyPages,
    /// The disks' write trackers, in the machine's order.
    pub disks: Vec<Arc<DiskTracker>>,
}

/// A request for a harvest, answered by the owner's next tick.
pub(crate) type HarvestRequest = tokio::sync::oneshot::Sender<Result<Harvest, String>>;

/// Harvests the dirty log of the running `vm` (on the owner's thread).
pub(crate) fn harvest(vm: &RunningVm) -> Result<Harvest, String> {
    let vcpus = u32::try_from(vm.run_state().vcpus()).map_err(|_| "too many vCPUs")?;
    let shape = MachineShape::from_config(vm.saved_config(), vcpus).map_err(|e| error_chain(&e))?;
    let dirty = vm.take_dirty_pages().map_err(|e| error_chain(&e))?;
    Ok(Harvest {
        shape,
        memory: vm.memory().clone(),
        dirty,
        disks: vm.disk_trackers().to_vec(),
    })
}

/// Asks the owner for a harvest and waits for it.
pub(crate) async fn ask(
    owner: &std::sync::mpsc::Sender<HarvestRequest>,
) -> Result<Harvest, String> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let gone = || "the VM's owner is gone".to_string();
    owner.send(reply).map_err(|_| gone())?;
    answer.await.map_err(|_| gone())?
}

/// Progress of an initial sync, for `status`.
#[derive(Clone, Debug, Default)]
pub(crate) struct SyncProgress {
    /// The round being sent (0: all of memory).
    pub round: u32,
    /// Pages in this round.
    pub round_pages: u64,
    /// Of those, pages sent and acknowledged.
    pub round_done: u64,
    /// Pages sent in all rounds so far.
    pub pages_sent: u64,
    /// Bytes on the wire so far.
    pub wire_bytes: u64,
    /// The final pause, once captured.
    pub final_pause: Option<Duration>,
}

impl SyncProgress {
    pub(crate) fn json(&self) -> Value {
        json!({
            "round": self.round,
            "round_pages": self.round_pages,
            "round_done_pages": self.round_done,
            "round_percent": percent(self.round_done, self.round_pages),
            "pages_sent": self.pages_sent,
            "wire_bytes": self.wire_bytes,
        })
    }
}

fn percent(done: u64, of: u64) -> u64 {
    (done * 100).checked_div(of).unwrap_or(100)
}

/// The connection to the replica, with the stream checkpoints travel on.
pub(crate) struct Link<'a> {
    /// The connection (for the replica's reason when it closes).
    pub conn: &'a Connection,
    /// Frames out.
    pub send: &'a mut SendStream,
    /// Acknowledgements in.
    pub recv: &'a mut RecvStream,
}

/// Turns a transport error into a message, in the words of what the replica did.
pub(crate) fn explain(
    conn: &Connection,
    what: &'static str,
) -> impl Fn(transport::Error) -> String {
    move |e| format!("{what}: {}", error_chain(&conn.explain(e)))
}

impl Link<'_> {
    /// Sends one frame and waits for its acknowledgement, which must name `epoch`.
    pub(crate) async fn exchange(&mut self, frame: &[u8], epoch: u64) -> Result<(), String> {
        transport::send_frame(self.send, frame)
            .await
            .map_err(explain(self.conn, "cannot send a checkpoint"))?;
        let ack = transport::recv_frame(self.recv, 8)
            .await
            .map_err(explain(self.conn, "no acknowledgement"))?;
        let acked = <[u8; 8]>::try_from(ack.as_slice())
            .map(u64::from_le_bytes)
            .map_err(|_| "a malformed acknowledgement".to_string())?;
        if acked != epoch {
            return Err(format!(
                "the replica acknowledged epoch {acked} for epoch {epoch}"
            ));
        }
        Ok(())
    }
}

/// A progress line on the terminal (only when stderr is one), redrawn at most every
/// [`DRAW_EVERY`]; the log gets one line per round either way.
struct Bar {
    tty: bool,
    drawn: Option<Instant>,
}

impl Bar {
    fn draw(&mut self, p: &SyncProgress) {
        if !self.tty || self.drawn.is_some_and(|t| t.elapsed() < DRAW_EVERY) {
            return;
        }
        self.drawn = Some(Instant::now());
        let pct = percent(p.round_done, p.round_pages);
        let filled = (pct / 4) as usize;
        eprint!(
            "\r\x1b[Ksyncing to the replica, round {}: [{}{}] {:>3}% of {} MiB",
            p.round,
            "#".repeat(filled),
            " ".repeat(25 - filled.min(25)),
            pct,
            (p.round_pages * PAGE_SIZE) >> 20,
        );
    }

    fn clear(&mut self) {
        if self.tty && self.drawn.take().is_some() {
            eprint!("\r\x1b[K");
        }
    }
}

/// Every page of `memory`'s regions, as frame numbers.
fn all_pages(memory: &GuestMemoryMmap) -> Vec<u64> {
    memory
        .iter()
        .flat_map(|r| {
            let first = r.start_addr().0 / PAGE_SIZE;
            first..first + r.len() / PAGE_SIZE
        })
        .collect()
}

/// Copies the pages `gfns` (ascending) out of the running guest into `staging`, a run of
/// contiguous pages at a time.
fn copy_live(memory: &GuestMemoryMmap, gfns: &[u64], staging: &mut Staging) -> Result<(), String> {
    staging.gfns.clear();
    staging.gfns.extend_from_slice(gfns);
    staging.data.resize(gfns.len() * PAGE_SIZE as usize, 0);
    let mut i = 0;
    while i < gfns.len() {
        let mut end = i + 1;
        while end < gfns.len() && gfns[end] == gfns[end - 1] + 1 {
            end += 1;
        }
        let addr = gfns[i] * PAGE_SIZE;
        let bytes = &mut staging.data[i * PAGE_SIZE as usize..end * PAGE_SIZE as usize];
        memory
            .read_slice(bytes, GuestAddress(addr))
            .map_err(|e| format!("cannot read guest memory at {addr:#x}: {e}"))?;
        i = end;
    }
    Ok(())
}

/// Runs the pre-copy rounds of an initial sync over `link` (greeting done, `encoder` made for
/// this connection), at most `max_rounds` (≥ 1). Returns the encoder for the chain that the
/// final full checkpoint starts.
pub(crate) async fn sync(
    link: &mut Link<'_>,
    mut encoder: Encoder,
    first: Harvest,
    max_rounds: u32,
    owner: &std::sync::mpsc::Sender<HarvestRequest>,
    shared: &Shared,
    disks: &mut DiskSync,
) -> Result<Encoder, String> {
    let memory = first.memory;
    let mut gfns = all_pages(&memory);
    let mut bar = Bar {
        tty: std::io::stderr().is_terminal(),
        drawn: None,
    };
    let mut staging = Staging::default();
    let mut frame = Vec::new();
    let mut round = 0u32;
    loop {
        let started = Instant::now();
        let (mut wire, mut zero) = (0u64, 0u64);
        let progress = {
            let mut st = shared.status();
            let p = st.sync.get_or_insert_with(SyncProgress::default);
            p.round = round;
            p.round_pages = gfns.len() as u64;
            p.round_done = 0;
            p.clone()
        };
        bar.draw(&progress);
        for chunk in gfns.chunks(CHUNK) {
            // Copying and compressing 16 MiB takes milliseconds: off the runtime's thread.
            let (chunk, mem) = (chunk.to_vec(), memory.clone());
            let (mut st, mut out, mut enc) = (staging, frame, encoder);
            let (st, out, enc, stats) = tokio::task::spawn_blocking(move || {
                let stats = copy_live(&mem, &chunk, &mut st).and_then(|()| {
                    enc.encode_precopy_into(round.into(), &st.gfns, &st.data, &mut out)
                        .map_err(|e| error_chain(&e))
                });
                (st, out, enc, stats)
            })
            .await
            .map_err(|e| format!("the pre-copy worker failed: {e}"))?;
            (staging, frame, encoder) = (st, out, enc);
            let stats = stats?;
            link.exchange(&frame, round.into()).await?;
            wire += stats.wire_bytes;
            zero += stats.zero_pages;
            let progress = {
                let mut st = shared.status();
                let p = st.sync.get_or_insert_with(SyncProgress::default);
                p.round_done += stats.pages;
                p.pages_sent += stats.pages;
                p.wire_bytes += stats.wire_bytes;
                p.clone()
            };
            bar.draw(&progress);
        }
        bar.clear();
        // The disks' blocks of this round: all of them first, then what the guest wrote.
        disks.round(link, round).await?;
        let last = round + 1 >= max_rounds || (round > 0 && gfns.len() <= FINAL_PAGES);
        let dirty = if last {
            None
        } else {
            Some(ask(owner).await?.dirty)
        };
        tracing::info!(
            round,
            pages = gfns.len(),
            zero_pages = zero,
            wire_mib = wire as f64 / (1 << 20) as f64,
            ms = started.elapsed().as_millis() as u64,
            dirtied_meanwhile = dirty.as_ref().map(DirtyPages::count),
            "sync round sent"
        );
        let Some(dirty) = dirty else {
            return Ok(encoder);
        };
        // Harvested pages must be sent: the log no longer holds them.
        gfns = dirty.addresses().map(|a| a / PAGE_SIZE).collect();
        round += 1;
    }
}

/// The disks' side of an initial sync: each disk's write tracker and its encoder.
pub(crate) struct DiskSync {
    disks: Vec<(Arc<DiskTracker>, Encoder)>,
    /// The next round is the first (all blocks).
    first: bool,
}

impl DiskSync {
    /// Starts tracking writes to `disks` (from now on every write is in a later round or the
    /// final pause).
    pub(crate) fn start(disks: &[Arc<DiskTracker>]) -> Result<Self, String> {
        let mut out = Vec::new();
        for t in disks {
            t.start();
            let enc = wire::disk_encoder(t.bytes()).map_err(|e| error_chain(&e))?;
            out.push((t.clone(), enc));
        }
        Ok(Self {
            disks: out,
            first: true,
        })
    }

    /// Sends one sync round of every disk: all blocks the first time, then the blocks
    /// written since the round before; each frame is acknowledged.
    pub(crate) async fn round(&mut self, link: &mut Link<'_>, round: u32) -> Result<(), String> {
        let first = std::mem::replace(&mut self.first, false);
        for (n, (t, enc)) in self.disks.iter_mut().enumerate() {
            let blocks: Vec<u64> = if first {
                (0..t.blocks()).collect()
            } else {
                t.take()
            };
            let header = DiskFrameHeader {
                disk: n as u32,
                sync: true,
                epoch: round.into(),
                bytes: t.bytes(),
            };
            let started = Instant::now();
            let (mut sent, mut zero) = (0, 0);
            let mut frame = Vec::new();
            let mut data = Vec::new();
            for chunk in blocks.chunks(CHUNK) {
                data.clear();
                t.read_blocks(chunk, &mut data)
                    .map_err(|e| format!("cannot read disk {n}: {e}"))?;
                let stats = wire::encode_disk_frame(enc, header, chunk, &data, &mut frame)
                    .map_err(|e| error_chain(&e))?;
                link.exchange(&frame, round.into()).await?;
                sent += stats.wire_bytes;
                zero += stats.zero_pages;
            }
            tracing::info!(
                disk = n,
                round,
                blocks = blocks.len(),
                zero_blocks = zero,
                wire_mib = sent as f64 / (1 << 20) as f64,
                ms = started.elapsed().as_millis() as u64,
                "disk sync round sent"
            );
        }
        Ok(())
    }

    /// The encoders, for the epochs' writes.
    pub(crate) fn into_encoders(self) -> Vec<Encoder> {
        self.disks.into_iter().map(|(_, e)| e).collect()
    }
}
