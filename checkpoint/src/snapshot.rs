//! Snapshot files: a header (magic, format version, lengths, CRC-32), the encoded machine state,
//! and guest memory compressed with zstd, zero pages elided.
//!
//! ```text
//! header   magic "FTVMSNAP" | major u16 | minor u16 | 0 u32 | state_len u64 | memory_len u64
//!          | crc32 u32 | 0 u32                          (40 bytes, little endian)
//! state    state_len bytes (see codec)
//! memory   memory_len bytes: one zstd stream of, per RAM range,
//!          start u64 | pages u64 | per group of 64 pages: mask u64, then each page whose bit
//!          is set (4096 bytes); pages whose bit is clear are zero
//! ```
//! The CRC covers the header's first 32 bytes and everything after the header. A file is
//! written to a temporary name and renamed, so a crash never leaves half a snapshot under the
//! final name.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::memory::GuestMemoryMmap;

use crate::codec::{self, CodecError};

/// First bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"FTVMSNAP";
/// Format major version: files of another major version are refused.
pub const FORMAT_MAJOR: u16 = 1;
/// Format minor version (compatible additions).
pub const FORMAT_MINOR: u16 = 0;
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
    /// The checksum does not match.
    #[error("{0} is corrupt (checksum mismatch)")]
    Checksum(PathBuf),
    /// The state cannot be encoded or decoded.
    #[error("Snapshot state")]
    Codec(#[from] CodecError),
    /// The memory section is malformed or does not fit the machine.
    #[error("Snapshot memory section is invalid: {0}")]
    Memory(String),
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

fn header(state_len: u64, memory_len: u64, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&FORMAT_MAJOR.to_le_bytes());
    h[10..12].copy_from_slice(&FORMAT_MINOR.to_le_bytes());
    h[16..24].copy_from_slice(&state_len.to_le_bytes());
    h[24..32].copy_from_slice(&memory_len.to_le_bytes());
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes `state` and `memory` to `path` (through a temporary file and a rename).
pub fn write<T: Serialize>(
    path: &Path,
    state: &T,
    memory: &GuestMemoryMmap,
) -> Result<SnapshotStats, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let state_bytes = codec::encode(state)?;
    let tmp = path.with_extension("partial");
    let file = File::create(&tmp).map_err(io)?;
    let mut out = BufWriter::new(file);
    out.write_all(&[0u8; HEADER_LEN]).map_err(io)?;
    out.write_all(&state_bytes).map_err(io)?;
    let mut crc_out = CrcWriter {
        inner: out,
        crc: crc32fast::Hasher::new(),
        len: 0,
    };
    let mut stats = SnapshotStats {
        state_bytes: state_bytes.len() as u64,
        ..Default::default()
    };
    {
        let mut z = zstd::Encoder::new(&mut crc_out, 1).map_err(io)?;
        write_memory(&mut z, memory, &mut stats).map_err(io)?;
        z.finish().map_err(io)?;
    }
    stats.memory_bytes = crc_out.len;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header(stats.state_bytes, stats.memory_bytes, 0)[..32]);
    crc.update(&state_bytes);
    crc.combine(&crc_out.crc);
    let mut out = crc_out.inner.into_inner().map_err(|e| io(e.into_error()))?;
    use std::io::{Seek, SeekFrom};
    out.seek(SeekFrom::Start(0)).map_err(io)?;
    out.write_all(&header(
        stats.state_bytes,
        stats.memory_bytes,
        crc.finalize(),
    ))
    .map_err(io)?;
    out.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(stats)
}

fn write_memory(
    z: &mut impl Write,
    memory: &GuestMemoryMmap,
    stats: &mut SnapshotStats,
) -> std::io::Result<()> {
    let mut page = vec![0u8; PAGE];
    let mut group = Vec::with_capacity(64 * PAGE);
    for region in memory.iter() {
        let start = region.start_addr().0;
        let pages = region.len() / PAGE as u64;
        z.write_all(&start.to_le_bytes())?;
        z.write_all(&pages.to_le_bytes())?;
        for first in (0..pages).step_by(64) {
            let mut mask = 0u64;
            group.clear();
            for i in 0..(pages - first).min(64) {
                let addr = GuestAddress(start + (first + i) * PAGE as u64);
                memory
                    .read_slice(&mut page, addr)
                    .map_err(std::io::Error::other)?;
                if page.iter().any(|&b| b != 0) {
                    mask |= 1 << i;
                    group.extend_from_slice(&page);
                } else {
                    stats.zero_pages += 1;
                }
                stats.pages += 1;
            }
            z.write_all(&mask.to_le_bytes())?;
            z.write_all(&group)?;
        }
    }
    Ok(())
}

/// A snapshot read from a file and checked: its state, and its memory still compressed.
pub struct Snapshot<T> {
    /// The machine state.
    pub state: T,
    memory: Vec<u8>,
}

/// Reads and checks the snapshot at `path` (untrusted input).
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Snapshot<T>, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io)?;
    let truncated = |want: u64| SnapshotError::Truncated {
        path: path.to_path_buf(),
        want,
        have: bytes.len() as u64,
    };
    if bytes.len() < MAGIC.len() || bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic(path.to_path_buf()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(truncated(HEADER_LEN as u64));
    }
    let major = u16::from_le_bytes([bytes[8], bytes[9]]);
    if major != FORMAT_MAJOR {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: major,
        });
    }
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let (state_len, memory_len) = (u64_at(16), u64_at(24));
    let crc = u32::from_le_bytes(bytes[32..36].try_into().expect("4 bytes"));
    let want = (HEADER_LEN as u64)
        .checked_add(state_len)
        .and_then(|n| n.checked_add(memory_len))
        .ok_or(SnapshotError::Checksum(path.to_path_buf()))?;
    if (bytes.len() as u64) < want {
        return Err(truncated(want));
    }
    if (bytes.len() as u64) > want {
        return Err(SnapshotError::Checksum(path.to_path_buf()));
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..32]);
    h.update(&bytes[HEADER_LEN..]);
    if h.finalize() != crc {
        return Err(SnapshotError::Checksum(path.to_path_buf()));
    }
    let state_end = HEADER_LEN + state_len as usize;
    let state = codec::decode(&bytes[HEADER_LEN..state_end])?;
    let memory = bytes.split_off(state_end);
    Ok(Snapshot { state, memory })
}

impl<T> Snapshot<T> {
    /// Decompresses the memory into `memory`, whose RAM ranges must be exactly the saved ones.
    pub fn fill(&self, memory: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        let bad = |what: &str| SnapshotError::Memory(what.to_string());
        let mut z = zstd::Decoder::new(&self.memory[..])
            .map_err(|e| SnapshotError::Memory(e.to_string()))?;
        let mut word = [0u8; 8];
        let mut read_u64 = |z: &mut zstd::Decoder<'_, _>| -> Result<u64, SnapshotError> {
            z.read_exact(&mut word).map_err(|_| bad("ends early"))?;
            Ok(u64::from_le_bytes(word))
        };
        let mut page = vec![0u8; PAGE];
        for region in memory.iter() {
            let (start, pages) = (read_u64(&mut z)?, read_u64(&mut z)?);
            if start != region.start_addr().0 || pages * PAGE as u64 != region.len() {
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
    let mut fill = |m: &GuestMemoryMmap| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let start = std::time::Instant::now();
        let r = image.fill(m).map_err(Into::into);
        tracing::debug!(elapsed = ?start.elapsed(), "guest memory filled");
        r
    };
    let vm = vmm::Vm::restore(state, opts, &mut fill)?;
    tracing::debug!(elapsed = ?t.elapsed(), "machine restored");
    Ok(vm)
}
