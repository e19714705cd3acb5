//! The replica's side: a frame checked completely and staged in memory, then applied.

use std::io::Read;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::memory::GuestMemoryMmap;
use vmm::vm::MachineState;
use zstd::zstd_safe::{DCtx, DParameter};

use super::frame::{FrameHeader, FrameKind, HEADER_LEN, RUN_LEN, le_u32, le_u64};
use super::{MachineShape, PAGE_SIZE, WireError};
use crate::codec;

/// Largest zstd window accepted (the encoder's levels use at most 2 MiB): bounds the memory
/// zstd itself allocates for a hostile frame.
const WINDOW_LOG_MAX: u32 = 23;

/// Pages of an epoch: ascending frame numbers and their contents, 4096 bytes each.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Pages {
    /// Guest page frame numbers, strictly ascending.
    pub gfns: Vec<u64>,
    /// Their contents, in the same order.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Pages {
    /// Counts, not megabytes of contents.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pages")
            .field("pages", &self.gfns.len())
            .field("first", &self.gfns.first())
            .field("last", &self.gfns.last())
            .field("data_bytes", &self.data.len())
            .finish()
    }
}

/// A frame decoded and checked completely, not yet applied.
#[derive(Debug)]
pub struct DecodedEpoch {
    /// The epoch.
    pub epoch: u64,
    /// Full or incremental.
    pub kind: FrameKind,
    /// The pages, their final contents (deltas already resolved).
    pub pages: Pages,
    /// The machine state (None in a pre-copy frame, which carries none).
    pub state: Option<MachineState>,
}

/// Decodes frames of one machine, keeping the zstd context between frames.
pub struct Decoder {
    shape: MachineShape,
    ctx: DCtx<'static>,
}

fn malformed(what: impl Into<String>) -> WireError {
    WireError::Malformed(what.into())
}

impl Decoder {
    /// A decoder for frames of a machine of `shape`.
    pub fn new(shape: MachineShape) -> Result<Self, WireError> {
        let mut ctx = DCtx::try_create()
            .ok_or_else(|| WireError::Decompress(std::io::Error::other("no zstd context")))?;
        ctx.set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX))
            .map_err(|code| {
                WireError::Decompress(std::io::Error::other(zstd::zstd_safe::get_error_name(code)))
            })?;
        Ok(Self { shape, ctx })
    }

    /// The shape frames are checked against.
    pub fn shape(&self) -> &MachineShape {
        &self.shape
    }

    /// Decodes exactly one frame. `base` is the memory as of the previous epoch (the
    /// replica's committed memory), read only, and needed only by delta frames. Nothing is
    /// written anywhere: the result is staged for [`apply`].
    pub fn decode(
        &mut self,
        frame: &[u8],
        base: Option<&GuestMemoryMmap>,
    ) -> Result<DecodedEpoch, WireError> {
        let header = FrameHeader::parse(frame, &self.shape)?;
        let have = frame.len() as u64;
        if have < header.frame_len() {
            return Err(WireError::Truncated {
                want: header.frame_len(),
                have,
            });
        }
        if have > header.frame_len() {
            return Err(WireError::Trailing(have - header.frame_len()));
        }
        let body = &frame[HEADER_LEN..];
        if crc32fast::hash(body) != header.body_crc {
            return Err(WireError::BodyChecksum);
        }
        if header.delta && base.is_none() {
            return Err(WireError::NoBase);
        }
        // Every read below is bounded by the header's counts, themselves bounded by the
        // shape; the stream must end exactly where they say.
        let mut z = zstd::stream::read::Decoder::with_context(body, &mut self.ctx).single_frame();
        let mut read = |buf: &mut [u8]| z.read_exact(buf).map_err(WireError::Decompress);

        let mut run_bytes = vec![0u8; header.run_count as usize * RUN_LEN];
        read(&mut run_bytes)?;
        let gfns = expand_runs(&self.shape, &header, &run_bytes)?;

        let mut zeros = vec![0u8; (header.page_count as usize).div_ceil(8)];
        read(&mut zeros)?;
        let page_count = header.page_count as usize;
        if !page_count.is_multiple_of(8) && zeros[page_count / 8] >> (page_count % 8) != 0 {
            return Err(malformed(
                "the zero-page bitmap has bits past its last page",
            ));
        }
        let zero_pages: u32 = zeros.iter().map(|b| b.count_ones()).sum();
        if header.page_count - header.data_pages != zero_pages {
            return Err(malformed(format!(
                "{zero_pages} zero pages, the header says {}",
                header.page_count - header.data_pages
            )));
        }

        let mut state = vec![0u8; header.state_len as usize];
        read(&mut state)?;
        // The header check made sure that exactly the frames that are not pre-copy have state.
        let state = if header.kind == FrameKind::Precopy {
            None
        } else {
            let state: MachineState = codec::decode(&state).map_err(WireError::Codec)?;
            if MachineShape::of(&state).ok().as_ref() != Some(&self.shape) {
                return Err(malformed("its machine state describes another machine"));
            }
            Some(state)
        };

        // Zero-filled by the allocator: pages left zero cost nothing until written.
        let mut data = vec![0u8; page_count * PAGE_SIZE];
        let bit = |i: usize| zeros[i / 8] & (1 << (i % 8)) != 0;
        let mut i = 0;
        while i < page_count {
            if bit(i) {
                i += 1;
                continue;
            }
            let end = (i..page_count).find(|&j| bit(j)).unwrap_or(page_count);
            read(&mut data[i * PAGE_SIZE..end * PAGE_SIZE])?;
            i = end;
        }
        // Nothing may follow: not more decompressed bytes, not more compressed ones.
        let mut extra = [0u8; 1];
        match z.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => return Err(malformed("the body decompresses to more than announced")),
            Err(e) => return Err(WireError::Decompress(e)),
        }
        if !z.finish().is_empty() {
            return Err(malformed("bytes follow the compressed body"));
        }

        if header.delta {
            let base = base.ok_or(WireError::NoBase)?;
            let mut old = [0u8; PAGE_SIZE];
            for (i, &gfn) in gfns.iter().enumerate() {
                if bit(i) {
                    continue;
                }
                let addr = gfn * PAGE_SIZE as u64;
                base.read_slice(&mut old, GuestAddress(addr))
                    .map_err(|source| WireError::Memory { addr, source })?;
                for (n, o) in data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].iter_mut().zip(old) {
                    *n ^= o;
                }
            }
        }
        Ok(DecodedEpoch {
            epoch: header.epoch,
            kind: header.kind,
            pages: Pages { gfns, data },
            state,
        })
    }
}

/// The runs, checked (non-empty, ascending, non-overlapping, each in one RAM range,
/// `page_count` pages in all) and expanded to page frame numbers.
fn expand_runs(
    shape: &MachineShape,
    header: &FrameHeader,
    runs: &[u8],
) -> Result<Vec<u64>, WireError> {
    let mut gfns = Vec::with_capacity(header.page_count as usize);
    let mut next = 0u64;
    for (k, run) in runs.chunks_exact(RUN_LEN).enumerate() {
        let first = le_u64(run, 0);
        let count = u64::from(le_u32(run, 8));
        if count == 0 {
            return Err(malformed(format!("run {k} is empty")));
        }
        if k > 0 && first < next {
            return Err(malformed(format!(
                "run {k} at page {first:#x} overlaps or precedes the one before"
            )));
        }
        if shape.range_of(first, count).is_none() {
            return Err(malformed(format!(
                "run {k} ({count} pages from {first:#x}) is outside guest RAM"
            )));
        }
        if gfns.len() as u64 + count > u64::from(header.page_count) {
            return Err(malformed("the runs hold more pages than the header says"));
        }
        gfns.extend(first..first + count);
        next = first + count;
    }
    if gfns.len() != header.page_count as usize {
        return Err(malformed("the runs hold fewer pages than the header says"));
    }
    Ok(gfns)
}

/// Writes a decoded epoch's pages into `memory`. Every page is checked to be in `memory`
/// before the first is written, so a mismatched memory is refused untouched.
pub fn apply(epoch: &DecodedEpoch, memory: &GuestMemoryMmap) -> Result<(), WireError> {
    let Pages { gfns, data } = &epoch.pages;
    let mut stretches = Vec::new();
    let mut i = 0;
    while i < gfns.len() {
        let mut end = i + 1;
        while end < gfns.len() && gfns[end] == gfns[end - 1] + 1 {
            end += 1;
        }
        let addr = gfns[i] * PAGE_SIZE as u64;
        let len = (end - i) * PAGE_SIZE;
        if !memory.check_range(GuestAddress(addr), len) {
            return Err(WireError::Memory {
                addr,
                source: vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(addr)),
            });
        }
        stretches.push((addr, i, end));
        i = end;
    }
    for (addr, i, end) in stretches {
        memory
            .write_slice(&data[i * PAGE_SIZE..end * PAGE_SIZE], GuestAddress(addr))
            .map_err(|source| WireError::Memory { addr, source })?;
    }
    Ok(())
}

/// Refuses an epoch that cannot follow `committed` (the last committed epoch, None before
/// the first): an incremental epoch must be exactly the next one; a full one starts a new
/// chain at any epoch; a pre-copy round is not part of the chain (its number is the sync's
/// round).
pub fn check_order(committed: Option<u64>, epoch: u64, kind: FrameKind) -> Result<(), WireError> {
    match (kind, committed) {
        (FrameKind::Full | FrameKind::Precopy, _) => Ok(()),
        (FrameKind::Incremental, None) => Err(WireError::NoFullCheckpoint(epoch)),
        (FrameKind::Incremental, Some(c)) if c.checked_add(1) == Some(epoch) => Ok(()),
        (FrameKind::Incremental, Some(committed)) => {
            Err(WireError::OutOfOrder { epoch, committed })
        }
    }
}
