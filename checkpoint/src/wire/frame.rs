//! The fixed frame header: what it holds, and the checks that run before anything is
//! allocated or decompressed.

use super::{MachineShape, PAGE_SIZE, PROTOCOL, WireError};
use crate::codec::MAX_STATE_LEN;

const MAGIC: [u8; 8] = *b"FTVMEPCH";
/// Bytes of the fixed header at the start of every frame.
pub const HEADER_LEN: usize = 56;
/// Flag: a full checkpoint, starting a new chain of epochs.
pub(super) const FLAG_FULL: u32 = 1;
/// Flag: pages are XOR-ed with their previous epoch's content.
pub(super) const FLAG_DELTA: u32 = 2;
/// Flag: a pre-copy round: pages read while the guest ran, no machine state.
pub(super) const FLAG_PRECOPY: u32 = 4;
/// Bytes of one encoded run.
pub(super) const RUN_LEN: usize = 12;

/// Whether a frame continues the chain, starts a new one, or prepares one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A consistent checkpoint that starts a new chain (initial sync, re-protection): the
    /// receiver applies its pages over the image the pre-copy rounds since the greeting built
    /// (or over zeroed memory if there were none) and commits the result.
    Full,
    /// The pages changed since the previous epoch.
    Incremental,
    /// A pre-copy round of an initial sync: pages read while the guest ran, so not a
    /// consistent machine and never committed on its own; it carries no machine state. The
    /// full frame that ends the sync makes the image consistent.
    Precopy,
}

/// A frame's header, checked against a machine's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The epoch.
    pub epoch: u64,
    /// Full or incremental.
    pub kind: FrameKind,
    /// Pages are XOR-deltas against the previous epoch.
    pub delta: bool,
    /// Pages described, zero pages included.
    pub page_count: u32,
    /// Pages carried as data.
    pub data_pages: u32,
    /// Runs of consecutive pages.
    pub run_count: u32,
    /// Bytes of encoded machine state.
    pub state_len: u32,
    /// Bytes of compressed body.
    pub body_len: u64,
    /// CRC-32 of the compressed body.
    pub body_crc: u32,
}

pub(super) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(super) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn limit(what: &'static str, len: u64, limit: u64) -> Result<(), WireError> {
    if len > limit {
        return Err(WireError::TooLong { what, len, limit });
    }
    Ok(())
}

impl FrameHeader {
    /// Bytes of the decompressed body this header announces.
    pub fn raw_len(&self) -> u64 {
        self.run_count as u64 * RUN_LEN as u64
            + (self.page_count as u64).div_ceil(8)
            + self.state_len as u64
            + self.data_pages as u64 * PAGE_SIZE as u64
    }

    /// Bytes of the whole frame, header included.
    pub fn frame_len(&self) -> u64 {
        HEADER_LEN as u64 + self.body_len
    }

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        let flags = match self.kind {
            FrameKind::Full => FLAG_FULL,
            FrameKind::Incremental => 0,
            FrameKind::Precopy => FLAG_PRECOPY,
        } | if self.delta { FLAG_DELTA } else { 0 };
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&PROTOCOL.to_le_bytes());
        h[12..16].copy_from_slice(&flags.to_le_bytes());
        h[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        h[24..28].copy_from_slice(&self.page_count.to_le_bytes());
        h[28..32].copy_from_slice(&self.data_pages.to_le_bytes());
        h[32..36].copy_from_slice(&self.run_count.to_le_bytes());
        h[36..40].copy_from_slice(&self.state_len.to_le_bytes());
        h[40..48].copy_from_slice(&self.body_len.to_le_bytes());
        h[48..52].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..52]);
        h[52..56].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Reads and checks the first [`HEADER_LEN`] bytes of `bytes` as a frame header of a
    /// machine of `shape`: magic, checksum, version, flags, and every length against what
    /// that machine can need. A transport reads this much, then [`Self::frame_len`] bytes.
    pub fn parse(bytes: &[u8], shape: &MachineShape) -> Result<Self, WireError> {
        if bytes.len() < HEADER_LEN {
            return Err(WireError::Truncated {
                want: HEADER_LEN as u64,
                have: bytes.len() as u64,
            });
        }
        let h = &bytes[..HEADER_LEN];
        if h[0..8] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if crc32fast::hash(&h[..52]) != le_u32(h, 52) {
            return Err(WireError::HeaderChecksum);
        }
        let protocol = le_u32(h, 8);
        if protocol != PROTOCOL {
            return Err(WireError::Protocol {
                theirs: protocol,
                ours: PROTOCOL,
            });
        }
        let flags = le_u32(h, 12);
        let full = flags & FLAG_FULL != 0;
        let delta = flags & FLAG_DELTA != 0;
        let precopy = flags & FLAG_PRECOPY != 0;
        // Full and pre-copy frames have no previous version to be a delta against; a frame is
        // one kind only.
        if flags & !(FLAG_FULL | FLAG_DELTA | FLAG_PRECOPY) != 0
            || (full && delta)
            || (precopy && (full || delta))
        {
            return Err(WireError::Flags(flags));
        }
        let header = FrameHeader {
            epoch: le_u64(h, 16),
            kind: if full {
                FrameKind::Full
            } else if precopy {
                FrameKind::Precopy
            } else {
                FrameKind::Incremental
            },
            delta,
            page_count: le_u32(h, 24),
            data_pages: le_u32(h, 28),
            run_count: le_u32(h, 32),
            state_len: le_u32(h, 36),
            body_len: le_u64(h, 40),
            body_crc: le_u32(h, 48),
        };
        limit("pages", header.page_count.into(), shape.pages())?;
        limit(
            "data pages",
            header.data_pages.into(),
            header.page_count.into(),
        )?;
        limit("runs", header.run_count.into(), header.page_count.into())?;
        if (header.run_count == 0) != (header.page_count == 0) {
            return Err(WireError::Malformed(format!(
                "{} runs for {} pages",
                header.run_count, header.page_count
            )));
        }
        limit(
            "bytes of state",
            header.state_len.into(),
            MAX_STATE_LEN as u64,
        )?;
        if (header.kind == FrameKind::Precopy) != (header.state_len == 0) {
            return Err(WireError::Malformed(format!(
                "a {} frame with {} bytes of machine state",
                if header.kind == FrameKind::Precopy {
                    "pre-copy"
                } else {
                    "checkpoint"
                },
                header.state_len
            )));
        }
        // zstd never grows its input by more than its bound: a body beyond it is not ours.
        let bound = zstd::zstd_safe::compress_bound(header.raw_len() as usize) as u64;
        limit("bytes of body", header.body_len, bound)?;
        Ok(header)
    }
}
