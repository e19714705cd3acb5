//! The replica: listens for a primary (QUIC, mutual TLS, pinned certificate), and for each
//! checkpoint receives the whole frame, verifies it completely (`checkpoint::wire`), applies it
//! to its committed image and only then acknowledges it. A half-received, truncated, corrupted
//! or out-of-order checkpoint is never applied: the committed image stays exactly the last
//! acknowledged checkpoint.
#![warn(missing_docs)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use checkpoint::transport::{self, Fingerprint, Identity};
use checkpoint::wire::{self, Decoder, FrameKind, MachineShape};
use vm_memory::GuestAddress;
use vmm::memory::GuestMemoryMmap;
use vmm::vm::MachineState;

/// Where and whom to listen for.
pub struct ReplicaConfig {
    /// The address to listen on (UDP).
    pub listen: SocketAddr,
    /// This host's key and certificate.
    pub identity: Identity,
    /// The primary's certificate fingerprint.
    pub peer: Fingerprint,
}

/// Errors of the replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The runtime could not start.
    #[error("Cannot start the replica's runtime")]
    Runtime(#[source] std::io::Error),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] transport::Error),
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
}

/// What the replica holds, shared with whoever looks at it (tests, later failover).
pub type Shared = Arc<Mutex<Option<Committed>>>;

/// Serves primaries one connection at a time until the process ends; `committed` holds the
/// last acknowledged checkpoint. `ready` is told the bound address once it listens.
pub fn run(
    config: ReplicaConfig,
    committed: Shared,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ReplicaError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ReplicaError::Runtime)?;
    rt.block_on(async {
        let server = transport::listen(config.listen, &config.identity, config.peer).await?;
        ready(server.local_addr()?);
        loop {
            let conn = match server.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("refused a connection: {}", vmm::event::error_chain(&e));
                    continue;
                }
            };
            tracing::info!(primary = %conn.remote_address(), "primary connected");
            match serve(&conn, &committed).await {
                Ok(()) => {
                    tracing::info!("primary disconnected");
                    conn.close("replica done");
                }
                Err(e) => {
                    tracing::warn!("primary lost: {e}; the committed checkpoint stays as it was");
                    // The primary learns why (QUIC carries a short close reason).
                    let reason: String = e.chars().take(400).collect();
                    conn.close(&format!("replica refused: {reason}"));
                }
            }
        }
    })
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

async fn serve(conn: &transport::Connection, committed: &Shared) -> Result<(), String> {
    let (mut send, mut recv) = conn.accept_stream().await.map_err(|e| chain(&e))?;
    let mut decoder: Option<Decoder> = None;
    // The image an initial sync's pre-copy rounds are building, until its full frame.
    let mut sync: Option<GuestMemoryMmap> = None;
    let digests = wire::digests_enabled();
    loop {
        let limit = decoder.as_ref().map_or(64 << 10, |d| max_frame(d.shape()));
        let bytes = match transport::recv_frame(&mut recv, limit).await {
            Ok(b) => b,
            Err(e) => return Err(chain(&e)),
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
            decoder = Some(Decoder::new(hello.shape).map_err(|e| chain(&e))?);
            sync = None;
            continue;
        }
        let mut dec = decoder.take().ok_or("a checkpoint before the greeting")?;
        let precopy = wire::FrameHeader::parse(&bytes, dec.shape())
            .is_ok_and(|h| h.kind == FrameKind::Precopy);
        // Verifying and applying a large checkpoint takes seconds: off the runtime's thread, so
        // that the connection keeps answering keep-alives meanwhile.
        let shared = committed.clone();
        let mut image = sync.take();
        let (dec, image, result) = tokio::task::spawn_blocking(move || {
            let result = commit(&mut dec, &mut image, &bytes, &shared);
            (dec, image, result)
        })
        .await
        .map_err(|e| format!("the checkpoint worker failed: {e}"))?;
        decoder = Some(dec);
        sync = image;
        let epoch = result?;
        if digests && !precopy {
            log_digest(committed);
        }
        transport::send_frame(&mut send, &epoch.to_le_bytes())
            .await
            .map_err(|e| chain(&e))?;
        tracing::debug!(epoch, "committed");
    }
}

/// The test mode of `checkpoint::wire::digests_enabled`: logs what was committed.
fn log_digest(committed: &Shared) {
    let guard = committed.lock().unwrap_or_else(|p| p.into_inner());
    let Some(c) = guard.as_ref() else { return };
    match wire::memory_digest(&c.memory).and_then(|crc| wire::image_digest(crc, &c.state)) {
        Ok(d) => tracing::info!(epoch = c.epoch, digest = %d, "committed image"),
        Err(e) => tracing::warn!("no digest: {}", chain(&e)),
    }
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
    let mut guard = committed.lock().unwrap_or_else(|p| p.into_inner());
    let shape = dec.shape().clone();
    let base = guard
        .as_ref()
        .filter(|c| c.shape == shape)
        .map(|c| &c.memory);
    let mut decoded = dec.decode(frame, base).map_err(|e| chain(&e))?;
    let current = guard.as_ref().filter(|c| c.shape == shape).map(|c| c.epoch);
    wire::check_order(current, decoded.epoch, decoded.kind).map_err(|e| chain(&e))?;
    let epoch = decoded.epoch;
    match (decoded.kind, decoded.state.take()) {
        (FrameKind::Precopy, _) => {
            drop(guard);
            if sync.is_none() {
                *sync = Some(fresh_memory(&shape)?);
            }
            let image = sync.as_ref().ok_or("no sync image")?;
            wire::apply(&decoded, image).map_err(|e| chain(&e))?;
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
            });
        }
        (FrameKind::Incremental, Some(state)) => {
            let c = guard
                .as_mut()
                .ok_or("an incremental checkpoint before a full one")?;
            wire::apply(&decoded, &c.memory).map_err(|e| chain(&e))?;
            c.state = state;
            c.epoch = epoch;
        }
        (_, None) => return Err("a checkpoint frame without machine state".into()),
    }
    Ok(epoch)
}
