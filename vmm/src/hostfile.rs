//! Files the operator names: disk images, kernels, initrds.
//!
//! They are opened without blocking (a FIFO or a terminal would otherwise hang the VMM before
//! it could say anything) and their type is checked on the open descriptor before anything is
//! read: only regular files, and block devices where a disk may be one. Disks are locked with
//! open-file-description locks (`F_OFD_SETLK`, as QEMU does) so that two VMMs never write one
//! image: read-write takes an exclusive lock, read-only a shared one. Kernels and initrds are
//! mapped read-only after their size is checked against a limit.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

/// `BLKGETSIZE64`, `_IOR(0x12, 114, u64)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// What an input may be and how it is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// A regular file, read only (a kernel, an initrd).
    Image,
    /// A disk: a regular file or a block device, opened read-write when `writable`.
    Disk {
        /// Open for writing as well.
        writable: bool,
    },
}

impl InputKind {
    fn expected(self) -> &'static str {
        match self {
            Self::Image => "a regular file",
            Self::Disk { .. } => "a regular file or a block device",
        }
    }
}

/// Errors of opening, sizing, locking and mapping an operator's file.
#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    /// The file cannot be opened.
    #[error("Cannot open {what} {path}")]
    Open {
        /// What the file is for ("disk image", "kernel").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The path names something other than what may be used.
    #[error("{} {path} is a {found}, not {expected}", capital(what))]
    NotAFile {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What it is: "directory", "FIFO", "socket", ...
        found: &'static str,
        /// What it should have been.
        expected: &'static str,
    },
    /// The file's type or size cannot be read.
    #[error("Cannot read the size of {what} {path}")]
    Size {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another open file description holds a conflicting lock.
    #[error("{} {path} is in use by another process", capital(what))]
    InUse {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// Locking failed for another reason (a file system without locks, say).
    #[error("Cannot lock {what} {path}")]
    Lock {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is larger than its use allows.
    #[error(
        "{} {path} is {size} bytes, more than the {max} allowed",
        capital(what)
    )]
    TooLarge {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The file cannot be mapped.
    #[error("Cannot map {what} {path}")]
    Map {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

fn type_name(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_file() {
        "regular file"
    } else {
        "special file"
    }
}

/// Opens `path` (an operator's input, used as `what`) for `kind` without blocking, and refuses
/// it unless it is a regular file, or a block device where `kind` is a disk. The returned file
/// is in blocking mode and closed on exec.
pub fn open_input(path: &Path, what: &'static str, kind: InputKind) -> Result<File, HostFileError> {
    let writable = matches!(kind, InputKind::Disk { writable: true });
    let not_a_file = |found| HostFileError::NotAFile {
        what,
        path: path.to_path_buf(),
        found,
        expected: kind.expected(),
    };
    let file = match OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        // Directories cannot be opened for writing; say what it is rather than "Is a directory".
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => return Err(not_a_file("directory")),
        // A socket cannot be opened at all: ENXIO, the same as a device with no driver.
        Err(e)
            if e.raw_os_error() == Some(libc::ENXIO)
                && std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket()) =>
        {
            return Err(not_a_file("socket"));
        }
        Err(source) => {
            return Err(HostFileError::Open {
                what,
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let file_type = file
        .metadata()
        .map_err(|source| HostFileError::Size {
            what,
            path: path.to_path_buf(),
            source,
        })?
        .file_type();
    let allowed = file_type.is_file()
        || (file_type.is_block_device() && matches!(kind, InputKind::Disk { .. }));
    if !allowed {
        return Err(not_a_file(type_name(file_type)));
    }
    let open_err = |source| HostFileError::Open {
        what,
        path: path.to_path_buf(),
        source,
    };
    // SAFETY: F_GETFL on a descriptor this function owns; no memory is passed.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(open_err(io::Error::last_os_error()));
    }
    // SAFETY: F_SETFL with an integer argument on a descriptor this function owns.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(open_err(io::Error::last_os_error()));
    }
    Ok(file)
}

/// The size in bytes of an input opened by [`open_input`]: a regular file's length, a block
/// device's capacity.
pub fn input_size(file: &File, path: &Path, what: &'static str) -> Result<u64, HostFileError> {
    let size_err = |source| HostFileError::Size {
        what,
        path: path.to_path_buf(),
        source,
    };
    let meta = file.metadata().map_err(size_err)?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`, alive
    // and writable for the call; the descriptor is owned by `file`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if ret < 0 {
        return Err(size_err(io::Error::last_os_error()));
    }
    Ok(size)
}

/// One attempt at a whole-file open-file-description lock (the lock lives as long as the open
/// file description, is not shared with other opens even in the same process, and covers the
/// file however it grows): exclusive for a writer, shared for readers. `Ok(false)` when
/// another open file holds a conflicting lock. An exclusive lock on a file opened read-only
/// cannot be taken: it is only tested (is anyone holding a lock?).
pub fn try_lock(file: &File, exclusive: bool) -> io::Result<bool> {
    // SAFETY: flock is plain data; all zeros is a valid value (offset 0, length 0: the whole
    // file), and l_pid must be 0 for OFD locks.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if exclusive {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK reads one struct flock through the pointer, which points to `fl`;
    // the descriptor is owned by `file`.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Ok(false),
        Some(libc::EBADF) if exclusive => {
            // SAFETY: as above; F_OFD_GETLK rewrites l_type to F_UNLCK when nothing conflicts.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(fl.l_type == libc::F_UNLCK as libc::c_short)
        }
        _ => Err(e),
    }
}

/// Locks the whole of `file` (see [`try_lock`]) for as long as its open file description
/// lives: exclusive for a writer (`file` must be open for writing), shared for readers. Any
/// other holder of a conflicting lock makes it fail with [`HostFileError::InUse`].
pub fn lock(
    file: &File,
    exclusive: bool,
    path: &Path,
    what: &'static str,
) -> Result<(), HostFileError> {
    match try_lock(file, exclusive) {
        Ok(true) => Ok(()),
        Ok(false) => Err(HostFileError::InUse {
            what,
            path: path.to_path_buf(),
        }),
        Err(source) => Err(HostFileError::Lock {
            what,
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A whole file mapped read-only and private, seen as bytes.
///
/// The mapping shares pages with the file: if another process truncates the file while it is
/// mapped, touching the lost pages raises SIGBUS, and writes by others may show through. Use it
/// for inputs the operator does not change while the VMM reads them (kernels, initrds).
pub struct MappedFile {
    /// Start of the mapping; dangling (and never dereferenced) when `len` is 0.
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by the MappedFile alone; sharing `&[u8]` into it
// across threads is as safe as sharing any immutable byte slice.
unsafe impl Send for MappedFile {}
// SAFETY: as above, nothing mutates the mapping through a shared reference.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    fn map(file: &File, len: usize) -> io::Result<Self> {
        if len == 0 {
            // mmap refuses an empty mapping; an empty file is an empty slice.
            return Ok(Self {
                ptr: NonNull::dangling(),
                len: 0,
            });
        }
        // SAFETY: a new private read-only mapping chosen by the kernel (no address given), of
        // `len` bytes of a descriptor owned by `file`; nothing else refers to that memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("null mapping"))?;
        Ok(Self { ptr, len })
    }
}

impl std::ops::Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is the start of a live read-only mapping of `len` bytes that lasts as
        // long as `self`, to which the returned slice's lifetime is tied.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping made in `map`; no slice into it outlives
            // `self`.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("len", &self.len)
            .finish()
    }
}

/// Opens `path` (a regular file, used as `what`) and maps it read-only, refusing it by its
/// size, before mapping or reading anything, when it is larger than `max_len` bytes.
pub fn map_input(
    path: &Path,
    what: &'static str,
    max_len: u64,
) -> Result<MappedFile, HostFileError> {
    let file = open_input(path, what, InputKind::Image)?;
    let size = input_size(&file, path, what)?;
    let too_large = || HostFileError::TooLarge {
        what,
        path: path.to_path_buf(),
        size,
        max: max_len,
    };
    if size > max_len {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    MappedFile::map(&file, len).map_err(|source| HostFileError::Map {
        what,
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::time::{Duration, Instant};

    use super::*;

    const WRITABLE: InputKind = InputKind::Disk { writable: true };
    const READ_ONLY: InputKind = InputKind::Disk { writable: false };

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that lives for the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    fn flags(f: &File) -> i32 {
        // SAFETY: F_GETFL on a descriptor owned by `f`.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) }
    }

    #[test]
    fn regular_files_open_blocking_with_the_access_asked_for() {
        let img = file_with(b"0123456789");
        for kind in [InputKind::Image, READ_ONLY, WRITABLE] {
            let f = open_input(img.path(), "disk image", kind).unwrap();
            assert_eq!(
                flags(&f) & libc::O_NONBLOCK,
                0,
                "{kind:?}: O_NONBLOCK cleared"
            );
            assert_eq!(input_size(&f, img.path(), "disk image").unwrap(), 10);
            let access = flags(&f) & libc::O_ACCMODE;
            let want = if kind == WRITABLE {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            assert_eq!(access, want, "{kind:?}");
            // SAFETY: F_GETFD on a descriptor owned by `f`.
            let fd_flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) };
            assert_ne!(fd_flags & libc::FD_CLOEXEC, 0, "{kind:?}: close on exec");
        }
    }

    #[test]
    fn what_is_not_a_file_is_refused_by_name_and_type() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let cases = [
            (dir.path(), "directory"),
            (fifo.as_path(), "FIFO"),
            (sock.as_path(), "socket"),
            (Path::new("/dev/null"), "character device"),
        ];
        for (path, found) in cases {
            for kind in [InputKind::Image, READ_ONLY, WRITABLE] {
                let start = Instant::now();
                let e = open_input(path, "disk image", kind).unwrap_err();
                assert!(
                    start.elapsed() < Duration::from_secs(1),
                    "{path:?} {kind:?}: refused at once"
                );
                let msg = e.to_string();
                assert!(
                    matches!(e, HostFileError::NotAFile { found: f, .. } if f == found),
                    "{path:?} {kind:?}: {msg}"
                );
                assert!(msg.starts_with("Disk image "), "{msg}");
                assert!(msg.contains(path.to_str().unwrap()), "{msg}");
                assert!(
                    msg.contains(&format!("is a {found}, not a regular file")),
                    "{msg}"
                );
            }
        }
    }

    #[test]
    fn a_missing_file_names_path_and_cause_once() {
        let e = open_input(Path::new("/nonexistent/k"), "kernel", InputKind::Image).unwrap_err();
        assert_eq!(e.to_string(), "Cannot open kernel /nonexistent/k");
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(cause.contains("No such file"), "{cause}");
    }

    #[test]
    fn a_writer_excludes_everyone_and_readers_share() {
        let img = file_with(&[0; 512]);
        let p = img.path();
        let open = |w: bool| open_input(p, "disk image", InputKind::Disk { writable: w }).unwrap();
        let in_use = |r: Result<(), HostFileError>| matches!(r, Err(HostFileError::InUse { .. }));

        let (r1, r2) = (open(false), open(false));
        lock(&r1, false, p, "disk image").unwrap();
        lock(&r2, false, p, "disk image").unwrap();
        let w = open(true);
        assert!(
            in_use(lock(&w, true, p, "disk image")),
            "writer after readers"
        );
        drop((r1, r2));
        lock(&w, true, p, "disk image").unwrap();
        assert!(
            in_use(lock(&open(false), false, p, "disk image")),
            "reader after writer"
        );
        let e = lock(&open(true), true, p, "disk image").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Disk image {} is in use by another process", p.display())
        );
        drop(w);
        lock(&open(true), true, p, "disk image").unwrap();
    }

    #[test]
    fn mapped_files_read_back_and_empty_files_map_empty() {
        let img = file_with(b"kernel bytes");
        let m = map_input(img.path(), "kernel", 1 << 20).unwrap();
        assert_eq!(&m[..], b"kernel bytes");
        let empty = file_with(b"");
        let m = map_input(empty.path(), "initrd", 0).unwrap();
        assert!(m.is_empty());
        let dir = tempfile::tempdir().unwrap();
        let e = map_input(dir.path(), "kernel", 1 << 20).unwrap_err();
        assert!(
            matches!(
                e,
                HostFileError::NotAFile {
                    found: "directory",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn the_size_limit_is_checked_before_mapping() {
        let img = file_with(&[7; 4096]);
        assert_eq!(map_input(img.path(), "initrd", 4097).unwrap().len(), 4096);
        assert_eq!(map_input(img.path(), "initrd", 4096).unwrap().len(), 4096);
        let e = map_input(img.path(), "initrd", 4095).unwrap_err();
        assert!(
            matches!(
                e,
                HostFileError::TooLarge {
                    size: 4096,
                    max: 4095,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "Initrd {} is 4096 bytes, more than the 4095 allowed",
                img.path().display()
            )
        );
        // A sparse file far larger than memory is refused by its size alone, at once.
        let huge = tempfile::NamedTempFile::new().unwrap();
        huge.as_file().set_len(1 << 42).unwrap();
        let start = Instant::now();
        let e = map_input(huge.path(), "initrd", 1 << 30).unwrap_err();
        assert!(
            matches!(e, HostFileError::TooLarge { size, .. } if size == 1 << 42),
            "{e}"
        );
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
