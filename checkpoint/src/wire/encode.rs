//! The primary's side: one frame per epoch from pages already copied during the pause.

use std::io::Write;

use vmm::vm::MachineState;
use zstd::zstd_safe::{CCtx, CParameter};

use super::frame::{FrameHeader, FrameKind, HEADER_LEN};
use super::{MachineShape, PAGE_SIZE, WireError};
use crate::codec;

/// How the encoder compresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncoderOptions {
    /// zstd level (1 to 3 are the useful ones here).
    pub level: i32,
    /// Send each page as an XOR against its previous version. Costs a shadow copy of every
    /// page ever sent (up to the guest's memory size) and pays only when pages change a
    /// little between epochs; see the module documentation for measurements. A frame that
    /// is encoded but never applied (connection lost) breaks the chain: send a full one next.
    pub delta: bool,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        Self {
            level: 1,
            delta: false,
        }
    }
}

/// What one frame holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Pages described.
    pub pages: u64,
    /// Of those, zero pages (sent as one bit each).
    pub zero_pages: u64,
    /// Bytes before encoding: pages and encoded state.
    pub raw_bytes: u64,
    /// Bytes of the frame.
    pub wire_bytes: u64,
}

/// Encodes epochs of one machine. Keeps the zstd context and, with delta, the content of
/// every page as last sent.
pub struct Encoder {
    shape: MachineShape,
    ctx: CCtx<'static>,
    /// Per RAM range, the content as last sent (zero-filled lazily by the allocator).
    shadow: Option<Vec<Vec<u8>>>,
    /// Pre-copy frames have been encoded since the last full one: the receiver's image is
    /// being built, the full frame that ends the sync lands on it (so the shadow stays).
    syncing: bool,
    scratch: Vec<u8>,
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

impl Encoder {
    /// An encoder for a machine of `shape`.
    pub fn new(shape: MachineShape, opts: EncoderOptions) -> Result<Self, WireError> {
        let mut ctx = CCtx::try_create()
            .ok_or_else(|| WireError::Compress(std::io::Error::other("no zstd context")))?;
        ctx.set_parameter(CParameter::CompressionLevel(opts.level))
            .map_err(|code| WireError::Compress(zstd_error(code)))?;
        let shadow = opts.delta.then(|| fresh_shadow(&shape));
        Ok(Self {
            shape,
            ctx,
            shadow,
            syncing: false,
            scratch: vec![0; PAGE_SIZE],
        })
    }

    /// Encodes one epoch into a new frame.
    pub fn encode(
        &mut self,
        epoch: u64,
        kind: FrameKind,
        gfns: &[u64],
        data: &[u8],
        state: &MachineState,
    ) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.encode_into(epoch, kind, gfns, data, state, &mut out)?;
        Ok(out)
    }

    /// Encodes one epoch into `out` (cleared first): `gfns` strictly ascending, `data` their
    /// contents, 4096 bytes each. With delta, a full frame that follows no pre-copy frames
    /// restarts the shadow (the receiver applies it to fresh memory) and is sent without
    /// delta; an incremental frame is a delta against the previous one, which the receiver
    /// must have applied. Pre-copy frames carry no state: see [`Self::encode_precopy_into`].
    pub fn encode_into(
        &mut self,
        epoch: u64,
        kind: FrameKind,
        gfns: &[u64],
        data: &[u8],
        state: &MachineState,
        out: &mut Vec<u8>,
    ) -> Result<FrameStats, WireError> {
        if kind == FrameKind::Precopy {
            return Err(WireError::Input(
                "a pre-copy frame carries no machine state".into(),
            ));
        }
        if MachineShape::of(state).ok().as_ref() != Some(&self.shape) {
            return Err(WireError::Input(
                "the machine state describes another machine".into(),
            ));
        }
        let state = codec::encode(state).map_err(WireError::Codec)?;
        self.encode_frame(epoch, kind, gfns, data, &state, out)
    }

    /// Encodes a pre-copy round of an initial sync into `out`: pages read while the guest
    /// ran (`round` numbers them), no machine state. The full frame that follows the rounds
    /// ends the sync.
    pub fn encode_precopy_into(
        &mut self,
        round: u64,
        gfns: &[u64],
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<FrameStats, WireError> {
        self.encode_frame(round, FrameKind::Precopy, gfns, data, &[], out)
    }

    fn encode_frame(
        &mut self,
        epoch: u64,
        kind: FrameKind,
        gfns: &[u64],
        data: &[u8],
        state: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<FrameStats, WireError> {
        let runs = self.runs(gfns, data)?;
        let state_len = u32::try_from(state.len())
            .map_err(|_| WireError::Input("the machine state is too large".into()))?;
        // The receiver builds a new image from zero at the first pre-copy frame, or at a
        // full frame no pre-copy frame came before; the shadow follows it.
        let restart = match kind {
            FrameKind::Precopy => !std::mem::replace(&mut self.syncing, true),
            FrameKind::Full => !std::mem::replace(&mut self.syncing, false),
            FrameKind::Incremental => false,
        };
        if restart && self.shadow.is_some() {
            self.shadow = Some(fresh_shadow(&self.shape));
        }
        let delta = kind == FrameKind::Incremental && self.shadow.is_some();

        let mut zeros = vec![0u8; gfns.len().div_ceil(8)];
        let mut zero_pages = 0;
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            if is_zero(page) {
                zeros[i / 8] |= 1 << (i % 8);
                zero_pages += 1;
            }
        }
        let mut run_bytes = Vec::with_capacity(runs.len() * 12);
        for &(first, count) in &runs {
            run_bytes.extend_from_slice(&first.to_le_bytes());
            run_bytes.extend_from_slice(&count.to_le_bytes());
        }

        out.clear();
        out.resize(HEADER_LEN, 0);
        let mut z = zstd::stream::write::Encoder::with_context(&mut *out, &mut self.ctx);
        let compress = WireError::Compress;
        z.write_all(&run_bytes).map_err(compress)?;
        z.write_all(&zeros).map_err(compress)?;
        z.write_all(state).map_err(compress)?;
        let bit = |i: usize| zeros[i / 8] & (1 << (i % 8)) != 0;
        let mut i = 0;
        while i < gfns.len() {
            if bit(i) {
                if let Some(shadow) = &mut self.shadow {
                    let (r, off) = locate(&self.shape, gfns[i]);
                    shadow[r][off..off + PAGE_SIZE].fill(0);
                }
                i += 1;
                continue;
            }
            // The longest stretch of non-zero pages from i, written in one call.
            let end = (i..gfns.len()).find(|&j| bit(j)).unwrap_or(gfns.len());
            let stretch = &data[i * PAGE_SIZE..end * PAGE_SIZE];
            match &mut self.shadow {
                None => z.write_all(stretch).map_err(compress)?,
                Some(shadow) => {
                    for (k, page) in stretch.chunks_exact(PAGE_SIZE).enumerate() {
                        let (r, off) = locate(&self.shape, gfns[i + k]);
                        let old = &mut shadow[r][off..off + PAGE_SIZE];
                        if delta {
                            for ((s, &n), &o) in self.scratch.iter_mut().zip(page).zip(&*old) {
                                *s = n ^ o;
                            }
                            z.write_all(&self.scratch).map_err(compress)?;
                        } else {
                            z.write_all(page).map_err(compress)?;
                        }
                        old.copy_from_slice(page);
                    }
                }
            }
            i = end;
        }
        z.finish().map_err(compress)?;

        let body_len = (out.len() - HEADER_LEN) as u64;
        let header = FrameHeader {
            epoch,
            kind,
            delta,
            page_count: gfns.len() as u32,
            data_pages: (gfns.len() - zero_pages) as u32,
            run_count: runs.len() as u32,
            state_len,
            body_len,
            body_crc: crc32fast::hash(&out[HEADER_LEN..]),
        };
        out[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        Ok(FrameStats {
            pages: gfns.len() as u64,
            zero_pages: zero_pages as u64,
            raw_bytes: data.len() as u64 + state.len() as u64,
            wire_bytes: out.len() as u64,
        })
    }

    /// Checks the pages against the shape and groups them into runs.
    fn runs(&self, gfns: &[u64], data: &[u8]) -> Result<Vec<(u64, u32)>, WireError> {
        if data.len() != gfns.len() * PAGE_SIZE {
            return Err(WireError::Input(format!(
                "{} bytes of data for {} pages",
                data.len(),
                gfns.len()
            )));
        }
        if gfns.len() as u64 > self.shape.pages() {
            return Err(WireError::Input(format!(
                "{} pages, more than the machine's {}",
                gfns.len(),
                self.shape.pages()
            )));
        }
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for (i, &gfn) in gfns.iter().enumerate() {
            if i > 0 && gfn <= gfns[i - 1] {
                return Err(WireError::Input(
                    "page frame numbers are not strictly ascending".into(),
                ));
            }
            if self.shape.range_of(gfn, 1).is_none() {
                return Err(WireError::Input(format!(
                    "page {gfn:#x} is outside guest RAM"
                )));
            }
            match runs.last_mut() {
                // A run never crosses from one RAM range into another.
                Some((first, count))
                    if *first + u64::from(*count) == gfn
                        && self.shape.range_of(*first, u64::from(*count) + 1).is_some() =>
                {
                    *count += 1
                }
                _ => runs.push((gfn, 1)),
            }
        }
        Ok(runs)
    }
}

/// A zero-filled shadow of the machine's RAM; the allocator maps its pages lazily, so only
/// pages ever sent cost memory.
fn fresh_shadow(shape: &MachineShape) -> Vec<Vec<u8>> {
    shape
        .ram
        .iter()
        .map(|&(_, len)| vec![0; len as usize])
        .collect()
}

/// The RAM range and offset in it of a page already checked to be in RAM.
fn locate(shape: &MachineShape, gfn: u64) -> (usize, usize) {
    let r = shape.range_of(gfn, 1).unwrap_or(0);
    (r, (gfn * PAGE_SIZE as u64 - shape.ram[r].0) as usize)
}

fn zstd_error(code: usize) -> std::io::Error {
    std::io::Error::other(zstd::zstd_safe::get_error_name(code))
}
