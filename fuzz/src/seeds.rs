//! Building inputs by hand: guest memory images with descriptor chains, snapshot files, kernel
//! images. Used by the seed generator (`examples/gen_seeds.rs`) and by the snapshot target's
//! header fix-ups.

use crate::QueueLayout;

/// Descriptor flags.
pub const NEXT: u16 = 1;
/// The device writes this buffer.
pub const WRITE: u16 = 2;
/// The buffer is an indirect descriptor table.
pub const INDIRECT: u16 = 4;

/// A guest memory image starting at address 0, grown as bytes are put in it.
#[derive(Clone, Debug, Default)]
pub struct Image(pub Vec<u8>);

impl Image {
    /// Puts `data` at `addr`.
    pub fn put(&mut self, addr: u64, data: &[u8]) -> &mut Self {
        let (a, end) = (addr as usize, addr as usize + data.len());
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        self.0[a..end].copy_from_slice(data);
        self
    }

    /// Writes descriptor `index` of the table at `table`.
    pub fn desc(&mut self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend(addr.to_le_bytes());
        d.extend(len.to_le_bytes());
        d.extend(flags.to_le_bytes());
        d.extend(next.to_le_bytes());
        self.put(table + 16 * u64::from(index), &d);
    }

    /// Publishes `heads` on queue `q`'s available ring (idx = number of heads).
    pub fn publish(&mut self, q: &QueueLayout, heads: &[u16]) {
        self.put(q.avail, &0u16.to_le_bytes());
        self.put(q.avail + 2, &(heads.len() as u16).to_le_bytes());
        for (i, h) in heads.iter().enumerate() {
            self.put(q.avail + 4 + 2 * i as u64, &h.to_le_bytes());
        }
    }

    /// Lays out chains (each a list of (addr, len, flags) buffers) in `q`'s descriptor table
    /// from index 0, chaining them with NEXT, and publishes them.
    pub fn chains(&mut self, q: &QueueLayout, chains: &[&[(u64, u32, u16)]]) {
        let mut index = 0u16;
        let mut heads = Vec::new();
        for chain in chains {
            heads.push(index);
            for (i, &(addr, len, flags)) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                let flags = if last { flags } else { flags | NEXT };
                self.desc(
                    q.desc,
                    index,
                    addr,
                    len,
                    flags,
                    if last { 0 } else { index + 1 },
                );
                index += 1;
            }
        }
        self.publish(q, &heads);
    }
}

/// A virtio-blk request header.
pub fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend(kind.to_le_bytes());
    h.extend(0u32.to_le_bytes());
    h.extend(sector.to_le_bytes());
    h
}

/// Snapshot header layout (see checkpoint/src/snapshot.rs).
pub mod snapshot_header {
    /// Header bytes.
    pub const LEN: usize = 40;
    /// Offset of state_len.
    pub const STATE_LEN: usize = 16;
    /// Offset of memory_len.
    pub const MEMORY_LEN: usize = 24;
    /// Offset of the CRC.
    pub const CRC: usize = 32;
    /// Flag: raw memory.
    pub const RAW: u32 = 1;
}

/// Makes a mutated snapshot file consistent again where `ctrl` asks: memory_len set to what
/// follows the state, and the CRC recomputed as the writer computes it. Files too short for a
/// header are left alone.
pub fn fix_snapshot(file: &mut [u8], ctrl: u8) {
    use snapshot_header::*;
    if file.len() < LEN {
        return;
    }
    let u64_at = |f: &[u8], o: usize| u64::from_le_bytes(f[o..o + 8].try_into().unwrap());
    let flags = u32::from_le_bytes(file[12..16].try_into().unwrap());
    let raw = flags & RAW != 0;
    let state_len = u64_at(file, STATE_LEN);
    if state_len > checkpoint::codec::MAX_STATE_LEN as u64 {
        return; // Refused before anything else is looked at.
    }
    let memory_start = if raw {
        (LEN as u64 + state_len).next_multiple_of(4096)
    } else {
        LEN as u64 + state_len
    };
    if ctrl & crate::layout::snapshot::FIX_MEMORY_LEN != 0 {
        let memory_len = (file.len() as u64).saturating_sub(memory_start);
        file[MEMORY_LEN..MEMORY_LEN + 8].copy_from_slice(&memory_len.to_le_bytes());
    }
    if ctrl & crate::layout::snapshot::FIX_CRC != 0 {
        let memory_len = u64_at(file, MEMORY_LEN);
        let checked_end = if raw {
            memory_start
        } else {
            memory_start.saturating_add(memory_len)
        };
        let end = usize::try_from(checked_end)
            .unwrap_or(usize::MAX)
            .min(file.len());
        let mut h = crc32fast::Hasher::new();
        h.update(&file[..32]);
        h.update(&file[LEN..end.max(LEN)]);
        let crc = h.finalize();
        file[CRC..CRC + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

/// One zstd frame holding `data` in uncompressed ("raw") blocks, so that a fuzzer's mutations
/// of the data survive decompression.
pub fn zstd_raw_frame(data: &[u8]) -> Vec<u8> {
    const MAX_BLOCK: usize = 128 << 10;
    let mut out = vec![0x28, 0xb5, 0x2f, 0xfd];
    // Frame header: no content size, no checksum, no dictionary; window 2^(10+7) = 128 KiB.
    out.push(0x00);
    out.push(7 << 3);
    let mut chunks: Vec<&[u8]> = data.chunks(MAX_BLOCK).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        let last = u32::from(i + 1 == n);
        // Bit 0: last block; bits 1-2: block type, 0 = raw; then the size.
        let header = last | ((c.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(c);
    }
    out
}
