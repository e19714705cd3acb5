//! Which blocks of a disk image the guest wrote: a bitmap of 4 KiB blocks, marked by the
//! block device after each write reaches the image, read and cleared by whoever copies the
//! disk elsewhere (protection mirrors each epoch's writes to its replica). Off until started;
//! the VMM knows nothing of why.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bytes per tracked block.
pub const BLOCK: u64 = 4096;

/// One disk's written blocks, and a read handle on its image.
pub struct DiskTracker {
    file: File,
    bytes: u64,
    tracking: AtomicBool,
    /// Some block was marked since the last take: an epoch without writes skips the scan of
    /// the whole bitmap (its words number the image's size / 256 KiB), which runs in a pause.
    any: AtomicBool,
    dirty: Vec<AtomicU64>,
}

impl DiskTracker {
    /// A tracker for an image of `bytes` bytes, read through `file` (a descriptor of its own).
    pub fn new(file: File, bytes: u64) -> Self {
        let words = bytes.div_ceil(BLOCK).div_ceil(64) as usize;
        Self {
            file,
            bytes,
            tracking: AtomicBool::new(false),
            any: AtomicBool::new(false),
            dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The image's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of blocks (the last one may be partial).
    pub fn blocks(&self) -> u64 {
        self.bytes.div_ceil(BLOCK)
    }

    /// Starts (or restarts) tracking with nothing marked.
    pub fn start(&self) {
        self.tracking.store(true, Ordering::SeqCst);
        for w in &self.dirty {
            w.store(0, Ordering::SeqCst);
        }
    }

    /// Stops tracking.
    pub fn stop(&self) {
        self.tracking.store(false, Ordering::SeqCst);
    }

    /// Marks the blocks `len` bytes from `offset` touch (after the write reached the image).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.tracking.load(Ordering::SeqCst) {
            return;
        }
        let first = offset / BLOCK;
        let last = (offset.saturating_add(len) - 1).min(self.bytes.saturating_sub(1)) / BLOCK;
        for b in first..=last {
            if let Some(w) = self.dirty.get((b / 64) as usize) {
                w.fetch_or(1 << (b % 64), Ordering::SeqCst);
            }
        }
        // After the bits: a take that misses this flag finds the bits the next time.
        self.any.store(true, Ordering::SeqCst);
    }

    /// The blocks written since the last call (or the start), ascending; clears them.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        if !self.any.swap(false, Ordering::SeqCst) {
            return out;
        }
        for (i, w) in self.dirty.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::SeqCst);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push(i as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Appends the contents of `blocks` to `out`, [`BLOCK`] bytes each (past the end of the
    /// image, zeros).
    pub fn read_blocks(&self, blocks: &[u64], out: &mut Vec<u8>) -> std::io::Result<()> {
        let start = out.len();
        out.resize(start + blocks.len() * BLOCK as usize, 0);
        let mut i = 0;
        while i < blocks.len() {
            // A run of consecutive blocks is one read.
            let mut end = i + 1;
            while end < blocks.len() && blocks[end] == blocks[end - 1] + 1 {
                end += 1;
            }
            let offset = blocks[i] * BLOCK;
            let want = ((end - i) as u64 * BLOCK).min(self.bytes.saturating_sub(offset)) as usize;
            let at = start + i * BLOCK as usize;
            self.file.read_exact_at(&mut out[at..at + want], offset)?;
            i = end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(bytes: u64) -> (DiskTracker, tempfile::NamedTempFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        std::fs::write(f.path(), &data).unwrap();
        (DiskTracker::new(File::open(f.path()).unwrap(), bytes), f)
    }

    #[test]
    fn writes_mark_the_blocks_they_touch_once_started() {
        let (t, _f) = tracker(10 * BLOCK + 100);
        assert_eq!(t.blocks(), 11);
        t.mark(0, 1);
        assert!(t.take().is_empty(), "not tracking yet");
        t.start();
        t.mark(BLOCK - 1, 2); // blocks 0 and 1
        t.mark(5 * BLOCK, BLOCK); // block 5 exactly
        t.mark(10 * BLOCK + 99, 1); // the partial last block
        t.mark(3 * BLOCK, 0); // nothing
        assert_eq!(t.take(), [0, 1, 5, 10]);
        assert!(t.take().is_empty(), "taken blocks are cleared");
        t.stop();
        t.mark(0, BLOCK);
        assert!(t.take().is_empty());
    }

    #[test]
    fn blocks_read_back_with_the_tail_zero_filled() {
        let (t, _f) = tracker(2 * BLOCK + 10);
        let mut out = vec![7u8; 3];
        t.read_blocks(&[1, 2], &mut out).unwrap();
        assert_eq!(out.len(), 3 + 2 * BLOCK as usize);
        assert_eq!(&out[..3], &[7, 7, 7]);
        let byte = |i: u64| (i % 251) as u8;
        assert_eq!(out[3], byte(BLOCK));
        assert_eq!(out[3 + BLOCK as usize + 9], byte(2 * BLOCK + 9));
        assert!(out[3 + BLOCK as usize + 10..].iter().all(|&b| b == 0));
    }
}
