//! The replica's copies of the primary's disks, in `--disk-dir`: `disk<N>.img` is disk N as of
//! the committed epoch. An initial sync builds `disk<N>.img.sync` from its rounds, and the
//! full checkpoint that ends the sync renames it over `disk<N>.img` (after an fsync), so a
//! sync that never ends leaves the committed copy as it was. An epoch's writes are verified
//! and staged when they arrive and written to `disk<N>.img` only when that epoch's memory
//! checkpoint has been verified, just before its memory is applied.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use checkpoint::wire::{self, DiskFrameHeader, Pages};

const BLOCK: u64 = wire::PAGE_SIZE as u64;

struct Slot {
    /// The image's size, as the primary's frames state it.
    bytes: Option<u64>,
    /// The sync image being built.
    sync: Option<File>,
    /// The committed copy, opened at the first epoch that writes it (a sync's rename
    /// replaces the file, and this handle with it).
    committed: Option<File>,
    /// Writes of epochs not yet committed: (epoch, blocks).
    staged: Vec<(u64, Pages)>,
}

/// The disks of one primary's machine (one per session: a new greeting starts over).
pub struct DiskStore {
    dir: PathBuf,
    slots: Vec<Slot>,
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> String {
    let (what, path) = (what.to_string(), path.display().to_string());
    move |e| format!("cannot {what} {path}: {e}")
}

/// The committed copy of disk `n` in `dir`.
pub fn committed_path(dir: &std::path::Path, n: usize) -> PathBuf {
    dir.join(format!("disk{n}.img"))
}

impl DiskStore {
    /// The store for a machine with `disks` disks, in `dir` (which must exist).
    pub fn new(dir: &Path, disks: usize) -> Result<Self, String> {
        if !dir.is_dir() {
            return Err(format!("--disk-dir {} is not a directory", dir.display()));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            slots: (0..disks)
                .map(|_| Slot {
                    bytes: None,
                    sync: None,
                    committed: None,
                    staged: Vec::new(),
                })
                .collect(),
        })
    }

    /// Where the committed copy of disk `n` is.
    pub fn path(&self, n: usize) -> PathBuf {
        committed_path(&self.dir, n)
    }

    fn sync_path(&self, n: usize) -> PathBuf {
        self.dir.join(format!("disk{n}.img.sync"))
    }

    /// Checks and takes one disk frame: a sync round's blocks are written to the sync image,
    /// an epoch's are staged. Returns the frame's header.
    pub fn take(&mut self, frame: &[u8]) -> Result<DiskFrameHeader, String> {
        let (h, pages) = wire::decode_disk_frame(frame, self.slots.len())
            .map_err(|e| vmm::event::error_chain(&e))?;
        let n = h.disk as usize;
        let sync_path = self.sync_path(n);
        let slot = &mut self.slots[n];
        match slot.bytes {
            Some(b) if b != h.bytes => {
                return Err(format!("disk {n} was {b} bytes, a frame says {}", h.bytes));
            }
            _ => slot.bytes = Some(h.bytes),
        }
        if !h.sync {
            // An epoch writes each block at most once: more staged than the disk has blocks is
            // a peer filling this replica's memory.
            let staged: usize = slot.staged.iter().map(|(_, p)| p.gfns.len()).sum();
            let blocks = h.bytes.div_ceil(BLOCK);
            if (staged + pages.gfns.len()) as u64 > blocks {
                return Err(format!(
                    "disk {n}: more blocks staged before a commit than its {blocks}"
                ));
            }
            slot.staged.push((h.epoch, pages));
            return Ok(h);
        }
        if slot.sync.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&sync_path)
                .map_err(io("create", &sync_path))?;
            file.set_len(h.bytes).map_err(io("size", &sync_path))?;
            slot.sync = Some(file);
        }
        let file = slot.sync.as_ref().ok_or("no sync image")?;
        write_blocks(file, h.bytes, &pages).map_err(io("write", &sync_path))?;
        Ok(h)
    }

    /// Epoch `epoch`'s memory checkpoint has been verified and is about to be applied: a full
    /// one first makes each sync image the committed copy; then the epoch's staged writes go
    /// to the committed copies. Writes staged for another epoch are an error.
    pub fn commit(&mut self, epoch: u64, full: bool) -> Result<(), String> {
        // Everything is checked before any file changes: a refused commit leaves every
        // committed copy as it was, matching the committed memory.
        for (n, slot) in self.slots.iter().enumerate() {
            if let Some((other, _)) = slot.staged.iter().find(|(e, _)| *e != epoch) {
                return Err(format!(
                    "disk {n} writes of epoch {other} arrived with epoch {epoch}"
                ));
            }
            if !slot.staged.is_empty() && slot.bytes.is_none() {
                return Err(format!("disk {n}: no size"));
            }
        }
        for n in 0..self.slots.len() {
            let (path, sync_path) = (self.path(n), self.sync_path(n));
            let slot = &mut self.slots[n];
            if full && let Some(file) = slot.sync.take() {
                file.sync_all().map_err(io("flush", &sync_path))?;
                std::fs::rename(&sync_path, &path).map_err(io("rename", &sync_path))?;
                // The renamed sync image is the committed copy now.
                slot.committed = Some(file);
                File::open(&self.dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io("flush", &self.dir))?;
            }
            if slot.staged.is_empty() {
                continue;
            }
            let bytes = slot.bytes.ok_or("no disk size")?;
            if slot.committed.is_none() {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io("open", &path))?;
                slot.committed = Some(file);
            }
            let file = slot.committed.as_ref().ok_or("no committed copy")?;
            for (_, pages) in slot.staged.drain(..) {
                write_blocks(file, bytes, &pages).map_err(io("write", &path))?;
            }
        }
        Ok(())
    }

    /// CRC-32 of the committed copy of disk `n` (the digest test mode).
    pub fn digest(&self, n: usize) -> Result<u32, String> {
        let path = self.path(n);
        let data = std::fs::read(&path).map_err(io("read", &path))?;
        Ok(crc32fast::hash(&data))
    }

    /// The number of disks.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the machine has no disks.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// Writes each block (the last one of the image only up to its end).
fn write_blocks(file: &File, bytes: u64, pages: &Pages) -> std::io::Result<()> {
    for (i, &block) in pages.gfns.iter().enumerate() {
        let offset = block * BLOCK;
        let len = BLOCK.min(bytes.saturating_sub(offset)) as usize;
        let data = &pages.data[i * BLOCK as usize..][..len];
        file.write_all_at(data, offset)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(disk: u32, sync: bool, epoch: u64, bytes: u64, blocks: &[(u64, u8)]) -> Vec<u8> {
        let gfns: Vec<u64> = blocks.iter().map(|b| b.0).collect();
        let data: Vec<u8> = blocks.iter().flat_map(|b| vec![b.1; 4096]).collect();
        let mut enc = wire::disk_encoder(bytes).unwrap();
        let mut out = Vec::new();
        let h = DiskFrameHeader {
            disk,
            sync,
            epoch,
            bytes,
        };
        wire::encode_disk_frame(&mut enc, h, &gfns, &data, &mut out).unwrap();
        out
    }

    #[test]
    fn a_sync_becomes_the_committed_copy_and_epochs_apply_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = 3 * 4096 + 100;
        let mut store = DiskStore::new(dir.path(), 1).unwrap();
        store
            .take(&frame(0, true, 0, bytes, &[(0, 1), (3, 3)]))
            .unwrap();
        store.take(&frame(0, true, 1, bytes, &[(1, 2)])).unwrap();
        assert!(
            !store.path(0).exists(),
            "nothing committed before the full frame"
        );
        store.take(&frame(0, false, 5, bytes, &[(2, 9)])).unwrap();
        store.commit(5, true).unwrap();
        let img = std::fs::read(store.path(0)).unwrap();
        assert_eq!(img.len() as u64, bytes);
        assert!(img[..4096].iter().all(|&b| b == 1));
        assert!(img[4096..8192].iter().all(|&b| b == 2));
        assert!(
            img[8192..12288].iter().all(|&b| b == 9),
            "the epoch's writes"
        );
        assert!(
            img[12288..].iter().all(|&b| b == 3),
            "the partial last block"
        );
        // An epoch's writes stay staged until its commit.
        store.take(&frame(0, false, 6, bytes, &[(0, 7)])).unwrap();
        assert_eq!(std::fs::read(store.path(0)).unwrap()[0], 1);
        store.commit(6, false).unwrap();
        assert_eq!(std::fs::read(store.path(0)).unwrap()[0], 7);
        // Writes staged for another epoch, a size change, another disk: refused.
        store.take(&frame(0, false, 8, bytes, &[(0, 8)])).unwrap();
        assert!(store.commit(7, false).is_err());
        assert!(
            store
                .take(&frame(0, false, 9, bytes + 1, &[(0, 1)]))
                .is_err()
        );
        assert!(store.take(&frame(1, false, 9, bytes, &[(0, 1)])).is_err());
    }

    /// Staged blocks up to the disk's block count are taken, one more is refused.
    #[test]
    fn staged_blocks_are_bounded_by_the_disk_s_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = 3 * 4096;
        let mut store = DiskStore::new(dir.path(), 1).unwrap();
        store
            .take(&frame(0, false, 1, bytes, &[(0, 1), (1, 1)]))
            .unwrap();
        store.take(&frame(0, false, 1, bytes, &[(2, 1)])).unwrap();
        let e = store
            .take(&frame(0, false, 1, bytes, &[(0, 2)]))
            .unwrap_err();
        assert!(e.contains("more blocks staged"), "{e}");
    }

    /// A commit refused for one disk (writes staged for another epoch) changes no disk: the
    /// other disk's sync image is not renamed over its committed copy.
    #[test]
    fn a_refused_commit_changes_no_disk() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = 2 * 4096;
        let mut store = DiskStore::new(dir.path(), 2).unwrap();
        store.take(&frame(0, true, 0, bytes, &[(0, 4)])).unwrap();
        store.take(&frame(1, true, 0, bytes, &[(0, 4)])).unwrap();
        store.commit(0, true).unwrap();
        let before = std::fs::read(store.path(0)).unwrap();
        // A new sync of disk 0, and disk 1 with writes of epoch 6 at epoch 5's full frame.
        store
            .take(&frame(0, true, 3, bytes, &[(0, 5), (1, 5)]))
            .unwrap();
        store.take(&frame(1, false, 6, bytes, &[(1, 6)])).unwrap();
        assert!(store.commit(5, true).is_err());
        assert_eq!(
            std::fs::read(store.path(0)).unwrap(),
            before,
            "disk 0 unchanged"
        );
        assert!(store.sync_path(0).exists(), "its sync image not renamed");
    }

    #[test]
    fn a_sync_that_never_ends_leaves_the_committed_copy() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = 2 * 4096;
        let mut store = DiskStore::new(dir.path(), 1).unwrap();
        store.take(&frame(0, true, 0, bytes, &[(0, 4)])).unwrap();
        store.commit(0, true).unwrap();
        let before = std::fs::read(store.path(0)).unwrap();
        let mut again = DiskStore::new(dir.path(), 1).unwrap();
        again
            .take(&frame(0, true, 0, bytes, &[(0, 5), (1, 5)]))
            .unwrap();
        drop(again);
        assert_eq!(
            std::fs::read(DiskStore::new(dir.path(), 1).unwrap().path(0)).unwrap(),
            before
        );
        assert!(DiskStore::new(&dir.path().join("missing"), 1).is_err());
    }
}
