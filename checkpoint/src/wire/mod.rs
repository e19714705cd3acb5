//! The checkpoint wire encoding: the handshake that makes sure both ends run the same machine,
//! and one self-delimiting frame per epoch. Pure functions over byte buffers; the transport
//! (QUIC) and the epoch loop live elsewhere.
//!
//! ```text
//! hello    magic "FTVMHELO" | protocol u32 | shape_len u32 | shape (codec) | crc32 u32
//!
//! frame    header (56 bytes, little endian), then body_len bytes of body
//!   0      magic "FTVMEPCH"
//!   8      protocol u32
//!  12      flags u32            bit 0: full (starts a new chain), bit 1: XOR-delta pages,
//!                               bit 2: pre-copy round (no state; never with bit 0 or 1)
//!  16      epoch u64
//!  24      page_count u32       pages the frame describes, zero pages included
//!  28      data_pages u32       pages carried as data (page_count - zero pages)
//!  32      run_count u32
//!  36      state_len u32        bytes of encoded machine state
//!  40      body_len u64         bytes of compressed body after the header
//!  48      body_crc32 u32       CRC-32 of the compressed body
//!  52      header_crc32 u32     CRC-32 of header bytes 0..52
//! body     one zstd frame of:
//!          runs      run_count x (first gfn u64, count u32), sorted, non-overlapping
//!          zeros     ceil(page_count / 8) bytes, bit i (LSB first) set: page i is zero
//!                    and carries no data; the padding bits are clear
//!          state     state_len bytes (crate::codec of vmm::vm::MachineState); none (and
//!                    only then none) in a pre-copy frame
//!          pages     data_pages x 4096 bytes, in gfn order; with the delta flag each page
//!                    is XOR-ed with the page's content at the previous epoch
//! ```
//!
//! The decoder checks the header (magic, checksum, version, flags, every length against the
//! machine's shape) before it allocates anything, bounds the decompressed size by what the
//! header announces, and stages the result in memory: decoding never writes guest memory;
//! [`apply`] does, and only with a frame that decoded completely.
//!
//! XOR-delta is off by default. Measured with `examples/wire_bench.rs` (2 busy cores): pages
//! with one word changed shrink from 100 % to 0.4 % of their raw size with it, but whole-page
//! random rewrites stay at 100 % and zero-heavy pages at 0.3 % either way, while the encoder
//! runs 20-50 % slower on them and keeps a shadow copy of every page it has sent (after a
//! full frame, the guest's whole non-zero memory). Turn it on where the link, not memory, is
//! the limit. zstd level 1 gives the same sizes as 3 on these workloads, faster.

mod decode;
mod digest;
mod disk;
mod encode;
mod frame;
mod shape;
#[cfg(test)]
mod tests;

pub use decode::{DecodedEpoch, Decoder, Pages, apply, check_order};
pub use digest::{DIGEST_ENV, digests_enabled, image_digest, memory_digest};
pub use disk::{
    DISK_HEADER_LEN, DISK_MAGIC, DiskFrameHeader, MAX_DISK_BYTES, MAX_DISK_FRAME_BLOCKS,
    decode_disk_frame, disk_encoder, disk_shape, encode_disk_frame,
};
pub use encode::{Encoder, EncoderOptions, FrameStats};
pub use frame::{FrameHeader, FrameKind, HEADER_LEN};
pub use shape::{DeviceKind, Hello, MachineShape, check_hello, decode_hello, encode_hello};

use crate::codec::CodecError;

/// Version of the checkpoint protocol (hello and frames); peers of another version are refused.
/// 2: the machine state carries each vCPU's CPU time and each card's TCP connections.
pub const PROTOCOL: u32 = 2;
/// Size of a guest page as the wire counts them.
pub const PAGE_SIZE: usize = 4096;

/// Errors of the handshake, encoding, decoding and applying checkpoint frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer runs another protocol version.
    #[error("Peer speaks checkpoint protocol {theirs}, this ftvm speaks {ours}")]
    Protocol {
        /// The peer's version.
        theirs: u32,
        /// Ours.
        ours: u32,
    },
    /// The peer runs another machine.
    #[error("Peer's machine differs from this one: {0}")]
    Shape(String),
    /// The machine's configuration has no valid memory layout.
    #[error("The machine has no valid memory layout")]
    Layout(#[source] vmm::memory::MemoryError),
    /// A hello message is malformed.
    #[error("Malformed hello: {0}")]
    Hello(&'static str),
    /// What the caller asked to encode is inconsistent.
    #[error("Cannot encode epoch: {0}")]
    Input(String),
    /// The machine state cannot be encoded or decoded.
    #[error("Machine state in a checkpoint frame")]
    Codec(#[source] CodecError),
    /// zstd failed while compressing.
    #[error("Cannot compress a checkpoint frame")]
    Compress(#[source] std::io::Error),
    /// Not a checkpoint frame.
    #[error("Not a checkpoint frame (bad magic)")]
    BadMagic,
    /// The header's checksum does not match.
    #[error("Checkpoint frame header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    /// The body's checksum does not match.
    #[error("Checkpoint frame body is corrupt (checksum mismatch)")]
    BodyChecksum,
    /// Flags this ftvm does not know, or a combination that makes no sense.
    #[error("Checkpoint frame uses flags this ftvm does not know or allow ({0:#x})")]
    Flags(u32),
    /// A length beyond what this machine can need.
    #[error("Checkpoint frame announces {len} {what}, more than the limit of {limit}")]
    TooLong {
        /// What is counted.
        what: &'static str,
        /// The announced value.
        len: u64,
        /// The most accepted.
        limit: u64,
    },
    /// Fewer bytes than the header announces.
    #[error("Checkpoint frame is truncated: {want} bytes expected, {have} found")]
    Truncated {
        /// Bytes announced.
        want: u64,
        /// Bytes present.
        have: u64,
    },
    /// More bytes than the header announces.
    #[error("Checkpoint frame has {0} bytes after its end")]
    Trailing(u64),
    /// The body does not describe valid pages of this machine.
    #[error("Checkpoint frame is malformed: {0}")]
    Malformed(String),
    /// The compressed body is not a valid zstd frame of the announced size.
    #[error("Checkpoint frame body does not decompress to its announced size")]
    Decompress(#[source] std::io::Error),
    /// A delta frame needs the previous epoch's memory.
    #[error("Checkpoint frame is a delta against memory the decoder was not given")]
    NoBase,
    /// Reading or writing guest memory failed.
    #[error("Cannot access guest memory at {addr:#x}")]
    Memory {
        /// The guest address.
        addr: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// An incremental epoch that is not the one after the committed epoch.
    #[error("Epoch {epoch} does not follow the committed epoch {committed}")]
    OutOfOrder {
        /// The frame's epoch.
        epoch: u64,
        /// The last committed epoch.
        committed: u64,
    },
    /// An incremental epoch before any full one.
    #[error("Incremental epoch {0} arrived before any full checkpoint")]
    NoFullCheckpoint(u64),
}

/// Magic of the handover message: a primary that has paused its guest and had its last
/// checkpoint committed asks the replica to take over (planned switch-over).
pub const HANDOVER_MAGIC: [u8; 8] = *b"FTVMHAND";

/// The handover message for committed epoch `epoch`: magic, epoch, CRC-32 of both.
pub fn encode_handover(epoch: u64) -> Vec<u8> {
    let mut m = HANDOVER_MAGIC.to_vec();
    m.extend_from_slice(&epoch.to_le_bytes());
    let crc = crc32fast::hash(&m);
    m.extend_from_slice(&crc.to_le_bytes());
    m
}

/// The epoch a handover message names.
pub fn decode_handover(m: &[u8]) -> Result<u64, WireError> {
    if m.len() != 20 {
        return Err(WireError::Malformed(format!(
            "a handover message of {} bytes",
            m.len()
        )));
    }
    if m[..8] != HANDOVER_MAGIC {
        return Err(WireError::BadMagic);
    }
    if crc32fast::hash(&m[..16]).to_le_bytes() != m[16..20] {
        return Err(WireError::HeaderChecksum);
    }
    let mut e = [0u8; 8];
    e.copy_from_slice(&m[8..16]);
    Ok(u64::from_le_bytes(e))
}

#[cfg(test)]
mod handover_tests {
    use super::*;

    #[test]
    fn handover_messages_round_trip_and_bad_ones_are_refused() {
        let m = encode_handover(77);
        assert_eq!(decode_handover(&m).unwrap(), 77);
        // The length is exact: 19 and 21 bytes are refused.
        assert!(decode_handover(&m[..19]).is_err());
        let mut longer = m.clone();
        longer.push(0);
        assert!(decode_handover(&longer).is_err());
        for at in 0..20 {
            let mut bad = m.clone();
            bad[at] ^= 1;
            assert!(decode_handover(&bad).is_err(), "byte {at}");
        }
    }
}
