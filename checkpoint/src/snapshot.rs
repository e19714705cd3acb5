//! Snapshot files: a header (magic, format version, flags, lengths, CRC-32), the encoded
//! machine state, and guest memory in one of two encodings.
//!
//! ```text
//! header   magic "FTVMSNAP" | major u16 | minor u16 | flags u32 | state_len u64
//!          | memory_len u64 | crc32 u32 | header_crc32 u32     (40 bytes, little endian)
//! state    state_len bytes (see codec)
//! memory   compressed (flags bit 0 clear): memory_len bytes, one zstd stream of, per RAM range,
//!            start u64 | pages u64 | per group of 64 pages: mask u64, then each page whose bit
//!            is set (4096 bytes); pages whose bit is clear are zero
//!          raw (flags bit 0 set): zero padding to a 4 KiB boundary, then each RAM range's
//!            bytes in order; zero pages are holes (a sparse file), memory_len covers them all
//! ```
//! `crc32` covers the header's first 32 bytes and everything after the header — except raw
//! memory, which a restore maps copy-on-write instead of reading (reading it to check it would
//! undo the point of mapping it). `header_crc32` covers the header's first 36
//! bytes, so that every header byte is checked. Files are written through a temporary and renamed, and replace
//! only a regular file nobody holds locked (see [`crate::files`]); a crash never leaves half a
//! snapshot under the final name. A raw snapshot is shared-locked for as long as it is mapped.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
};
use vmm::memory::GuestMemoryMmap;

use crate::codec::{self, CodecError};
use crate::files::{self, FileError, NewFile};

/// First bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"FTVMSNAP";
/// Format major version: files of another major version are refused. 2: the device state
/// carries each virtio device's identity (capacity, MAC) and the block counters gained
/// `host_errors`; the header checks itself. 3: a network card's state carries the guest's TCP
/// connections (for the probes a takeover sends).
pub const FORMAT_MAJOR: u16 = 3;
/// Format minor version (compatible additions within a major version). 1: each vCPU's saved
/// counters end with its thread's CPU nanoseconds (files without it load with that count
/// from 0).
pub const FORMAT_MINOR: u16 = 1;
/// Header flag: memory is raw and page-aligned (mappable), not compressed.
pub const FLAG_RAW_MEMORY: u32 = 1;
const HEADER_LEN: usize = 40;
const PAGE: usize = 4096;

/// Errors of writing and reading snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file cannot be read or written.
    #[error("Cannot access snapshot file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a snapshot file.
    #[error("{0} is not an ftvm snapshot (bad magic)")]
    BadMagic(PathBuf),
    /// Another major version.
    #[error("{path} is snapshot format {found}.x; this ftvm reads format {FORMAT_MAJOR}.x")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its major version.
        found: u16,
    },
    /// Shorter than its header says.
    #[error("{path} is truncated: {want} bytes expected, {have} found")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header announces.
        want: u64,
        /// Bytes present.
        have: u64,
    },
    /// Longer than its header says.
    #[error("{path} has {extra} bytes after the snapshot its header describes")]
    Trailing {
        /// The file.
        path: PathBuf,
        /// Bytes beyond the end.
        extra: u64,
    },
    /// The header announces more state than any snapshot may have.
    #[error("{path} announces {len} bytes of state, more than the limit of {limit}")]
    StateTooLong {
        /// The file.
        path: PathBuf,
        /// The announced length.
        len: u64,
        /// The most accepted.
        limit: u64,
    },
    /// Flags this ftvm does not know.
    #[error("{path} uses features this ftvm does not know (flags {flags:#x})")]
    Flags {
        /// The file.
        path: PathBuf,
        /// The header's flags.
        flags: u32,
    },
    /// The checksum does not match.
    #[error("{0} is corrupt (checksum mismatch)")]
    Checksum(PathBuf),
    /// The file cannot be opened, replaced or locked as a snapshot file must be.
    #[error(transparent)]
    File(FileError),
    /// The state cannot be encoded or decoded.
    #[error("Snapshot state")]
    Codec(#[from] CodecError),
    /// The memory section is malformed or does not fit the machine.
    #[error("Snapshot memory section is invalid: {0}")]
    Memory(String),
}

impl From<FileError> for SnapshotError {
    /// A plain I/O failure reads as any other on a snapshot file.
    fn from(e: FileError) -> Self {
        match e {
            FileError::Io { path, source } => SnapshotError::Io { path, source },
            e => SnapshotError::File(e),
        }
    }
}

/// What a written snapshot holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Bytes of encoded state.
    pub state_bytes: u64,
    /// Bytes of compressed memory.
    pub memory_bytes: u64,
    /// Guest pages.
    pub pages: u64,
    /// Of which zero (elided).
    pub zero_pages: u64,
}

struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// How guest memory is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryEncoding {
    /// zstd, zero pages elided: small files, memory copied in on restore.
    #[default]
    Compressed,
    /// Raw pages at 4 KiB-aligned offsets, zero pages as holes: larger (sparse) files that a
    /// restore maps copy-on-write, so memory is read lazily as the guest touches it.
    Raw,
}

/// A header; its own checksum (bytes 36..40) is set by [`seal_header`].
fn header(flags: u32, state_len: u64, memory_len: u64, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&FORMAT_MAJOR.to_le_bytes());
    h[10..12].copy_from_slice(&FORMAT_MINOR.to_le_bytes());
    h[12..16].copy_from_slice(&flags.to_le_bytes());
    h[16..24].copy_from_slice(&state_len.to_le_bytes());
    h[24..32].copy_from_slice(&memory_len.to_le_bytes());
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    seal_header(&mut h);
    h
}

/// The checksum of a header's first 36 bytes.
fn header_crc(h: &[u8]) -> u32 {
    crc32fast::hash(&h[..36])
}

/// Sets bytes 36..40 of a header to the checksum of the rest.
fn seal_header(h: &mut [u8]) {
    let crc = header_crc(h);
    h[36..40].copy_from_slice(&crc.to_le_bytes());
}

/// Lets tests forge a header that passes the header check.
#[cfg(test)]
pub(crate) fn seal_header_for_tests(h: &mut [u8]) {
    seal_header(h)
}

/// Writes `state` and `memory` to `path`, memory compressed.
pub fn write<T: Serialize>(
    path: &Path,
    state: &T,
    memory: &GuestMemoryMmap,
) -> Result<SnapshotStats, SnapshotError> {
    write_with(path, state, memory, MemoryEncoding::Compressed)
}

/// Offset of raw memory in a file whose state is `state_len` bytes long.
fn raw_memory_offset(state_len: u64) -> u64 {
    (HEADER_LEN as u64 + state_len).next_multiple_of(PAGE as u64)
}

/// Writes `state` and `memory` to `path` through a new temporary file and a rename: `path`
/// must be absent or a regular file that no other open file holds a lock on (a disk image or
/// a raw snapshot in use); on failure it is left as it was, and no temporary remains.
pub fn write_with<T: Serialize>(
    path: &Path,
    state: &T,
    memory: &GuestMemoryMmap,
    encoding: MemoryEncoding,
) -> Result<SnapshotStats, SnapshotError> {
    write_limited(path, state, memory, encoding, None)
}

/// The temporary file being written; with `left`, writes fail once that many bytes are
/// written, as on a full disk (how tests make a write fail halfway).
struct Out<'a> {
    file: &'a File,
    left: Option<u64>,
}

impl Write for Out<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = match self.left {
            Some(0) => return Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
            Some(left) => buf.len().min(left.try_into().unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        let n = self.file.write(&buf[..n])?;
        if let Some(left) = &mut self.left {
            *left -= n as u64;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Seek for Out<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

/// [`write_with`], failing after `limit` bytes when given one.
pub(crate) fn write_limited<T: Serialize>(
    path: &Path,
    state: &T,
    memory: &GuestMemoryMmap,
    encoding: MemoryEncoding,
    limit: Option<u64>,
) -> Result<SnapshotStats, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let state_bytes = codec::encode(state)?;
    // Dropped on any error below, which removes the temporary.
    let new = NewFile::create(path)?;
    let mut out = BufWriter::new(Out {
        file: new.file(),
        left: limit,
    });
    out.write_all(&[0u8; HEADER_LEN]).map_err(io)?;
    out.write_all(&state_bytes).map_err(io)?;
    let mut stats = SnapshotStats {
        state_bytes: state_bytes.len() as u64,
        ..Default::default()
    };
    let mut crc = crc32fast::Hasher::new();
    let flags = match encoding {
        MemoryEncoding::Compressed => 0,
        MemoryEncoding::Raw => FLAG_RAW_MEMORY,
    };
    let mut out = match encoding {
        MemoryEncoding::Compressed => {
            let mut crc_out = CrcWriter {
                inner: out,
                crc: crc32fast::Hasher::new(),
                len: 0,
            };
            {
                let mut z = zstd::Encoder::new(&mut crc_out, 1).map_err(io)?;
                write_memory(&mut z, memory, &mut stats).map_err(io)?;
                z.finish().map_err(io)?;
            }
            stats.memory_bytes = crc_out.len;
            crc.update(&header(flags, stats.state_bytes, stats.memory_bytes, 0)[..32]);
            crc.update(&state_bytes);
            crc.combine(&crc_out.crc);
            crc_out.inner.into_inner().map_err(|e| io(e.into_error()))?
        }
        MemoryEncoding::Raw => {
            let pad = raw_memory_offset(stats.state_bytes) - HEADER_LEN as u64 - stats.state_bytes;
            out.write_all(&vec![0u8; pad as usize]).map_err(io)?;
            let mut file = out.into_inner().map_err(|e| io(e.into_error()))?;
            stats.memory_bytes = write_raw_memory(&mut file, memory, &mut stats).map_err(io)?;
            crc.update(&header(flags, stats.state_bytes, stats.memory_bytes, 0)[..32]);
            crc.update(&state_bytes);
            crc.update(&vec![0u8; pad as usize]);
            file
        }
    };
    out.seek(SeekFrom::Start(0)).map_err(io)?;
    let h = header(flags, stats.state_bytes, stats.memory_bytes, crc.finalize());
    out.write_all(&h).map_err(io)?;
    new.commit()?;
    Ok(stats)
}

/// Writes each RAM range's pages at consecutive offsets from the file's current position,
/// skipping zero pages (holes); returns the bytes the memory section spans.
fn write_raw_memory(
    file: &mut Out<'_>,
    memory: &GuestMemoryMmap,
    stats: &mut SnapshotStats,
) -> std::io::Result<u64> {
    let start = file.stream_position()?;
    let mut chunk = vec![0u8; 64 * PAGE];
    let mut offset = start;
    for region in memory.iter() {
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            let addr = GuestAddress(region.start_addr().0 + done);
            memory
                .read_slice(&mut chunk[..n], addr)
                .map_err(std::io::Error::other)?;
            // Runs of non-zero pages are written in one call each; zero pages stay holes.
            let pages: Vec<bool> = chunk[..n].chunks(PAGE).map(|p| !is_zero(p)).collect();
            stats.pages += pages.len() as u64;
            let mut i = 0;
            while i < pages.len() {
                if !pages[i] {
                    stats.zero_pages += 1;
                    i += 1;
                    continue;
                }
                let run = pages[i..].iter().take_while(|&&nz| nz).count();
                file.seek(SeekFrom::Start(offset + done + (i * PAGE) as u64))?;
                file.write_all(&chunk[i * PAGE..(i + run) * PAGE])?;
                i += run;
            }
            done += n as u64;
        }
        offset += len;
    }
    // The file ends where memory ends, even when its last pages are holes.
    file.file.set_len(offset)?;
    Ok(offset - start)
}

/// Whether a page is all zeros (compared a word at a time).
fn is_zero(page: &[u8]) -> bool {
    // Folding with OR has no early exit, so the compiler vectorises it.
    page.iter().fold(0u8, |acc, &b| acc | b) == 0
}

fn write_memory(
    z: &mut impl Write,
    memory: &GuestMemoryMmap,
    stats: &mut SnapshotStats,
) -> std::io::Result<()> {
    let mut chunk = vec![0u8; 64 * PAGE];
    let mut group = Vec::with_capacity(64 * PAGE);
    for region in memory.iter() {
        let start = region.start_addr().0;
        let pages = region.len() / PAGE as u64;
        z.write_all(&start.to_le_bytes())?;
        z.write_all(&pages.to_le_bytes())?;
        for first in (0..pages).step_by(64) {
            // One copy of 64 pages, then a look at each.
            let n = (pages - first).min(64) as usize;
            let addr = GuestAddress(start + first * PAGE as u64);
            memory
                .read_slice(&mut chunk[..n * PAGE], addr)
                .map_err(std::io::Error::other)?;
            let mut mask = 0u64;
            group.clear();
            for (i, page) in chunk[..n * PAGE].chunks(PAGE).enumerate() {
                if is_zero(page) {
                    stats.zero_pages += 1;
                } else {
                    mask |= 1 << i;
                    group.extend_from_slice(page);
                }
                stats.pages += 1;
            }
            z.write_all(&mask.to_le_bytes())?;
            z.write_all(&group)?;
        }
    }
    Ok(())
}

/// Where a read snapshot's memory is.
enum MemoryImage {
    /// The compressed section, checked and in memory.
    Compressed(Vec<u8>),
    /// Raw pages in the file from this offset.
    Raw {
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
}

/// A snapshot read from a file and checked: its state, and its memory (not yet loaded).
pub struct Snapshot<T> {
    /// The machine state.
    pub state: T,
    memory: MemoryImage,
}

/// Reads and checks the snapshot at `path` (untrusted input). Raw memory is not read; the file
/// stays shared-locked while the snapshot or a mapping of it lives, so that no snapshot written
/// here replaces it meanwhile.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Snapshot<T>, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = files::open_input(path)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut head = Vec::with_capacity(HEADER_LEN);
    (&mut file)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut head)
        .map_err(io)?;
    let truncated = |want: u64| SnapshotError::Truncated {
        path: path.to_path_buf(),
        want,
        have: file_len,
    };
    if head.len() < MAGIC.len() || head[..8] != MAGIC {
        return Err(SnapshotError::BadMagic(path.to_path_buf()));
    }
    if head.len() < HEADER_LEN {
        return Err(truncated(HEADER_LEN as u64));
    }
    let major = u16::from_le_bytes([head[8], head[9]]);
    if major != FORMAT_MAJOR {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: major,
        });
    }
    let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().expect("8 bytes"));
    let corrupt = || SnapshotError::Checksum(path.to_path_buf());
    // The header checks itself (bytes 36..40: CRC-32 of bytes 0..36).
    if u32_at(36) != header_crc(&head) {
        return Err(corrupt());
    }
    let (flags, state_len, memory_len, crc) = (u32_at(12), u64_at(16), u64_at(24), u32_at(32));
    if flags & !FLAG_RAW_MEMORY != 0 {
        return Err(SnapshotError::Flags {
            path: path.to_path_buf(),
            flags,
        });
    }
    if state_len > codec::MAX_STATE_LEN as u64 {
        return Err(SnapshotError::StateTooLong {
            path: path.to_path_buf(),
            len: state_len,
            limit: codec::MAX_STATE_LEN as u64,
        });
    }
    let raw = flags & FLAG_RAW_MEMORY != 0;
    let memory_start = if raw {
        raw_memory_offset(state_len)
    } else {
        HEADER_LEN as u64 + state_len
    };
    let want = memory_start.saturating_add(memory_len);
    if file_len < want {
        return Err(truncated(want));
    }
    if file_len > want {
        return Err(SnapshotError::Trailing {
            path: path.to_path_buf(),
            extra: file_len - want,
        });
    }
    // What the CRC covers: everything after the header up to the memory, and compressed memory.
    let checked_len = if raw { memory_start } else { want } - HEADER_LEN as u64;
    let mut body = Vec::new();
    (&mut file)
        .take(checked_len)
        .read_to_end(&mut body)
        .map_err(io)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&head[..32]);
    h.update(&body);
    if h.finalize() != crc {
        return Err(corrupt());
    }
    let state = codec::decode(&body[..state_len as usize])?;
    let memory = if raw {
        MemoryImage::Raw {
            file: Arc::new(file),
            offset: memory_start,
            len: memory_len,
        }
    } else {
        MemoryImage::Compressed(body.split_off(state_len as usize))
    };
    Ok(Snapshot { state, memory })
}

impl<T> Snapshot<T> {
    /// Whether memory is raw (restored by mapping) rather than compressed (restored by copying).
    pub fn is_raw(&self) -> bool {
        matches!(self.memory, MemoryImage::Raw { .. })
    }

    /// Maps raw memory copy-on-write for a guest with `ram` ranges: nothing is read until the
    /// guest touches it, and the guest's writes never reach the file.
    pub fn map(&self, ram: &[(GuestAddress, u64)]) -> Result<GuestMemoryMmap, SnapshotError> {
        let MemoryImage::Raw { file, offset, len } = &self.memory else {
            return Err(SnapshotError::Memory(
                "compressed memory cannot be mapped".into(),
            ));
        };
        let total: u64 = ram.iter().map(|r| r.1).sum();
        if total != *len {
            return Err(SnapshotError::Memory(
                "its RAM size differs from the machine's".into(),
            ));
        }
        let mut at = *offset;
        let mut regions = Vec::new();
        for &(start, size) in ram {
            let bitmap = <AtomicBitmap as vm_memory::bitmap::NewBitmap>::with_len(size as usize);
            let mapping = MmapRegionBuilder::new_with_bitmap(size as usize, bitmap)
                .with_file_offset(FileOffset::from_arc(file.clone(), at))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| SnapshotError::Memory(e.to_string()))?;
            let region = GuestRegionMmap::new(mapping, start)
                .ok_or_else(|| SnapshotError::Memory("a RAM range overflows".into()))?;
            regions.push(region);
            at += size;
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::Memory(e.to_string()))
    }

    /// Decompresses the memory into `memory`, whose RAM ranges must be exactly the saved ones
    /// (raw memory is copied in the same way).
    pub fn fill(&self, memory: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        let bytes = match &self.memory {
            MemoryImage::Compressed(bytes) => bytes,
            MemoryImage::Raw { .. } => {
                let mapped = self.map(
                    &memory
                        .iter()
                        .map(|r| (r.start_addr(), r.len()))
                        .collect::<Vec<_>>(),
                )?;
                for region in mapped.iter() {
                    let mut buf = vec![0u8; region.len() as usize];
                    mapped
                        .read_slice(&mut buf, region.start_addr())
                        .map_err(|e| SnapshotError::Memory(e.to_string()))?;
                    memory
                        .write_slice(&buf, region.start_addr())
                        .map_err(|e| SnapshotError::Memory(e.to_string()))?;
                }
                return Ok(());
            }
        };
        let bad = |what: &str| SnapshotError::Memory(what.to_string());
        let mut z =
            zstd::Decoder::new(&bytes[..]).map_err(|e| SnapshotError::Memory(e.to_string()))?;
        let mut word = [0u8; 8];
        let mut read_u64 = |z: &mut zstd::Decoder<'_, _>| -> Result<u64, SnapshotError> {
            z.read_exact(&mut word).map_err(|_| bad("ends early"))?;
            Ok(u64::from_le_bytes(word))
        };
        let mut page = vec![0u8; PAGE];
        for region in memory.iter() {
            let (start, pages) = (read_u64(&mut z)?, read_u64(&mut z)?);
            // `pages` comes from the file: a count near 2^64 must not wrap into a match.
            if start != region.start_addr().0
                || pages.checked_mul(PAGE as u64) != Some(region.len())
            {
                return Err(bad("its RAM ranges differ from the machine's"));
            }
            for first in (0..pages).step_by(64) {
                let mask = read_u64(&mut z)?;
                for i in 0..(pages - first).min(64) {
                    if mask & (1 << i) != 0 {
                        z.read_exact(&mut page).map_err(|_| bad("ends early"))?;
                        let addr = GuestAddress(start + (first + i) * PAGE as u64);
                        memory
                            .write_slice(&page, addr)
                            .map_err(|e| SnapshotError::Memory(e.to_string()))?;
                    }
                }
            }
        }
        if z.read(&mut word)
            .map_err(|e| SnapshotError::Memory(e.to_string()))?
            != 0
        {
            return Err(bad("has data beyond the machine's RAM"));
        }
        Ok(())
    }
}

/// Errors of starting a VM from a snapshot file.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The file is unusable.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The VM could not be built from it.
    #[error(transparent)]
    Vm(#[from] vmm::VmError),
}

/// Builds a VM from the snapshot at `path` (checked before anything is started).
pub fn restore(path: &Path, opts: vmm::vm::RestoreOptions) -> Result<vmm::Vm, RestoreError> {
    let t = std::time::Instant::now();
    let snap: Snapshot<vmm::vm::MachineState> = read(path)?;
    tracing::debug!(elapsed = ?t.elapsed(), "snapshot read and checked");
    let Snapshot { state, memory } = snap;
    let image = Snapshot { state: (), memory };
    let vm = if image.is_raw() {
        let ram = vmm::memory::ram_ranges(state.config.mem_size).map_err(vmm::VmError::from)?;
        let mapped = image.map(&ram)?;
        vmm::Vm::restore(state, opts, vmm::vm::RestoreMemory::Mapped(mapped))?
    } else {
        let mut fill =
            |m: &GuestMemoryMmap| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
                let start = std::time::Instant::now();
                let r = image.fill(m).map_err(Into::into);
                tracing::debug!(elapsed = ?start.elapsed(), "guest memory filled");
                r
            };
        vmm::Vm::restore(state, opts, vmm::vm::RestoreMemory::Fill(&mut fill))?
    };
    tracing::debug!(elapsed = ?t.elapsed(), "machine restored");
    Ok(vm)
}
