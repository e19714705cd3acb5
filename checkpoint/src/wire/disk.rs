//! Disk frames: the blocks of one disk image a primary sends its replica, either as a round
//! of an initial sync (the whole image, then what the guest wrote meanwhile) or as the writes
//! of one epoch, which the replica applies only when that epoch's checkpoint commits.
//!
//! ```text
//! disk frame   header (40 bytes, little endian), then one pre-copy kind checkpoint frame
//!              (see the module above) of a "machine" whose RAM is the image: page = block
//!   0   magic "FTVMDISK"
//!   8   protocol u32
//!  12   disk u32            index of the disk, in the machine's order
//!  16   kind u32            0: a sync round, 1: the writes of an epoch
//!  20   epoch u64           the epoch (or the sync's round)
//!  28   bytes u64           the image's size
//!  36   header_crc32 u32    CRC-32 of bytes 0..36
//! ```

use super::frame::{le_u32, le_u64};
use super::{
    Decoder, Encoder, FrameKind, FrameStats, MachineShape, PAGE_SIZE, PROTOCOL, WireError,
};

/// Magic of a disk frame.
pub const DISK_MAGIC: [u8; 8] = *b"FTVMDISK";
/// Bytes of a disk frame's own header.
pub const DISK_HEADER_LEN: usize = 40;
/// The largest disk image accepted (64 TiB).
pub const MAX_DISK_BYTES: u64 = 64 << 40;
/// The most blocks one disk frame may carry (64 MiB): a sender splits larger sets, and a
/// receiver never stages more than this per frame whatever the image's size.
pub const MAX_DISK_FRAME_BLOCKS: u32 = 16_384;

/// What a disk frame is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskFrameHeader {
    /// The disk's index.
    pub disk: u32,
    /// A sync round (else an epoch's writes).
    pub sync: bool,
    /// The epoch, or the sync's round.
    pub epoch: u64,
    /// The image's size in bytes.
    pub bytes: u64,
}

/// The "machine" a disk's blocks are encoded as: one RAM range the size of the image,
/// rounded up to whole blocks.
pub fn disk_shape(bytes: u64) -> MachineShape {
    MachineShape {
        ram: vec![(0, bytes.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64)],
        vcpus: 0,
        devices: Vec::new(),
        linux: false,
    }
}

/// An encoder for the blocks of an image of `bytes` bytes.
pub fn disk_encoder(bytes: u64) -> Result<Encoder, WireError> {
    Encoder::new(disk_shape(bytes), super::EncoderOptions::default())
}

/// Encodes `blocks` (ascending block numbers) and their `data` (4096 bytes each) into `out`
/// (cleared first), with `enc` made by [`disk_encoder`] for this disk.
pub fn encode_disk_frame(
    enc: &mut Encoder,
    header: DiskFrameHeader,
    blocks: &[u64],
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<FrameStats, WireError> {
    let mut body = Vec::new();
    let stats = enc.encode_precopy_into(header.epoch, blocks, data, &mut body)?;
    out.clear();
    out.extend_from_slice(&DISK_MAGIC);
    out.extend_from_slice(&PROTOCOL.to_le_bytes());
    out.extend_from_slice(&header.disk.to_le_bytes());
    out.extend_from_slice(&u32::from(!header.sync).to_le_bytes());
    out.extend_from_slice(&header.epoch.to_le_bytes());
    out.extend_from_slice(&header.bytes.to_le_bytes());
    let crc = crc32fast::hash(&out[..36]);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(FrameStats {
        wire_bytes: out.len() as u64,
        ..stats
    })
}

/// Checks and decodes a disk frame of a machine with `disks` disks: returns its header and
/// the blocks with their contents. Nothing is written anywhere.
pub fn decode_disk_frame(
    frame: &[u8],
    disks: usize,
) -> Result<(DiskFrameHeader, super::Pages), WireError> {
    if frame.len() < DISK_HEADER_LEN {
        return Err(WireError::Truncated {
            want: DISK_HEADER_LEN as u64,
            have: frame.len() as u64,
        });
    }
    if frame[..8] != DISK_MAGIC {
        return Err(WireError::BadMagic);
    }
    if crc32fast::hash(&frame[..36]) != le_u32(frame, 36) {
        return Err(WireError::HeaderChecksum);
    }
    let protocol = le_u32(frame, 8);
    if protocol != PROTOCOL {
        return Err(WireError::Protocol {
            theirs: protocol,
            ours: PROTOCOL,
        });
    }
    let disk = le_u32(frame, 12);
    if disk as usize >= disks {
        return Err(WireError::Malformed(format!(
            "disk {disk} of a machine with {disks} disks"
        )));
    }
    let sync = match le_u32(frame, 16) {
        0 => true,
        1 => false,
        k => return Err(WireError::Malformed(format!("disk frame kind {k}"))),
    };
    let bytes = le_u64(frame, 28);
    if bytes == 0 || bytes > MAX_DISK_BYTES {
        return Err(WireError::TooLong {
            what: "bytes of disk image",
            len: bytes,
            limit: MAX_DISK_BYTES,
        });
    }
    let header = DiskFrameHeader {
        disk,
        sync,
        epoch: le_u64(frame, 20),
        bytes,
    };
    let shape = disk_shape(bytes);
    let inner = super::FrameHeader::parse(&frame[DISK_HEADER_LEN..], &shape)?;
    if inner.page_count > MAX_DISK_FRAME_BLOCKS {
        return Err(WireError::TooLong {
            what: "blocks in a disk frame",
            len: inner.page_count.into(),
            limit: MAX_DISK_FRAME_BLOCKS.into(),
        });
    }
    let decoded = Decoder::new(shape)?.decode(&frame[DISK_HEADER_LEN..], None)?;
    if decoded.kind != FrameKind::Precopy || decoded.epoch != header.epoch {
        return Err(WireError::Malformed(
            "a disk frame's blocks are not a pre-copy frame of its epoch".into(),
        ));
    }
    Ok((header, decoded.pages))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(header: DiskFrameHeader, blocks: &[u64]) -> (Vec<u8>, Vec<u8>) {
        let data: Vec<u8> = blocks
            .iter()
            .flat_map(|&b| vec![b as u8 + 1; PAGE_SIZE])
            .collect();
        let mut enc = disk_encoder(header.bytes).unwrap();
        let mut out = Vec::new();
        encode_disk_frame(&mut enc, header, blocks, &data, &mut out).unwrap();
        (out, data)
    }

    const H: DiskFrameHeader = DiskFrameHeader {
        disk: 1,
        sync: false,
        epoch: 9,
        bytes: 10 * 4096 + 512,
    };

    #[test]
    fn disk_frames_round_trip() {
        for sync in [true, false] {
            let h = DiskFrameHeader { sync, ..H };
            let (f, data) = frame(h, &[0, 3, 4, 10]);
            let (got, pages) = decode_disk_frame(&f, 2).unwrap();
            assert_eq!(got, h);
            assert_eq!(
                pages.gfns,
                [0, 3, 4, 10],
                "the partial last block is a block"
            );
            assert!(pages.data == data);
        }
    }

    #[test]
    fn disk_frames_carry_at_most_the_block_limit() {
        let bytes = 1 << 30;
        for (n, ok) in [
            (MAX_DISK_FRAME_BLOCKS - 1, true),
            (MAX_DISK_FRAME_BLOCKS, true),
            (MAX_DISK_FRAME_BLOCKS + 1, false),
        ] {
            let blocks: Vec<u64> = (0..u64::from(n)).collect();
            let data = vec![0u8; blocks.len() * PAGE_SIZE];
            let mut enc = disk_encoder(bytes).unwrap();
            let mut f = Vec::new();
            let h = DiskFrameHeader { bytes, ..H };
            encode_disk_frame(&mut enc, h, &blocks, &data, &mut f).unwrap();
            assert_eq!(decode_disk_frame(&f, 2).is_ok(), ok, "{n} blocks");
        }
    }

    #[test]
    fn bad_disk_frames_are_refused() {
        let (f, _) = frame(H, &[2]);
        assert!(decode_disk_frame(&f, 1).is_err(), "disk 1 of 1");
        assert!(decode_disk_frame(&f[..39], 2).is_err(), "truncated header");
        assert!(
            decode_disk_frame(&f[..40], 2).is_err(),
            "a header and no blocks"
        );
        assert!(
            decode_disk_frame(&f[..f.len() - 1], 2).is_err(),
            "truncated body"
        );
        for at in [0, 9, 13, 17, 21, 29, 37, 40, f.len() - 1] {
            let mut bad = f.clone();
            bad[at] ^= 0x10;
            assert!(decode_disk_frame(&bad, 2).is_err(), "byte {at} flipped");
        }
        // Blocks past the image (11 blocks: 0..=10).
        let (f, _) = frame(H, &[10]);
        assert!(decode_disk_frame(&f, 2).is_ok());
        let mut enc = disk_encoder(20 * 4096).unwrap();
        let mut big = Vec::new();
        encode_disk_frame(
            &mut enc,
            DiskFrameHeader {
                bytes: 20 * 4096,
                ..H
            },
            &[15],
            &[1u8; 4096],
            &mut big,
        )
        .unwrap();
        // Claim a smaller image than the blocks need: the header's checksum is redone.
        big[28..36].copy_from_slice(&H.bytes.to_le_bytes());
        let crc = crc32fast::hash(&big[..36]);
        big[36..40].copy_from_slice(&crc.to_le_bytes());
        let e = decode_disk_frame(&big, 2).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        // Sizes at the limit.
        for (bytes, ok) in [
            (0, false),
            (MAX_DISK_BYTES, true),
            (MAX_DISK_BYTES + 1, false),
        ] {
            let mut f = frame(H, &[0]).0;
            f[28..36].copy_from_slice(&bytes.to_le_bytes());
            let crc = crc32fast::hash(&f[..36]);
            f[36..40].copy_from_slice(&crc.to_le_bytes());
            let r = decode_disk_frame(&f, 2);
            assert_eq!(
                !matches!(r, Err(WireError::TooLong { .. })),
                ok,
                "{bytes}: {r:?}"
            );
        }
    }
}
