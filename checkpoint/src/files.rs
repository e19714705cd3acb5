//! Files the operator names. Outputs are written as a database writes them: an exclusive,
//! uniquely named temporary in the destination's directory, fsync, a rename over a regular
//! file nobody holds a lock on (or over nothing), fsync of the directory; a failure removes
//! the temporary and leaves the old file as it was. Inputs are opened without blocking and
//! refused unless they are regular files, and carry a shared lock while open, so that a writer
//! never replaces a file a VM reads or maps.
//!
//! Locks are open-file-description locks (`F_OFD_SETLK`) over the whole file, as disk images
//! in use are locked: a writer needs an exclusive one on the file it replaces.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a lock held by another writer (only ever for a rename) is waited for.
const LOCK_WAIT: Duration = Duration::from_millis(500);
/// Temporary names tried before giving up (each is random; a clash means an attacker or a bug).
const TEMP_TRIES: usize = 16;

/// Errors of opening, replacing and locking files.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A system call failed.
    #[error("Cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not a regular file: a directory, a device, a FIFO or a socket.
    #[error("{path} is {kind}, not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is, with an article ("a FIFO").
        kind: &'static str,
    },
    /// A destination that is a symbolic link: neither replaced nor written through.
    #[error("{path} is a symbolic link; name the file itself")]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// Another open file holds a lock on it (a disk image or raw snapshot in use by a VM).
    #[error("{path} is in use: another open file holds a lock on it")]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// The path names a directory's entry no file can have ("/", "..").
    #[error("{path} does not name a file")]
    NoFileName {
        /// The path.
        path: PathBuf,
    },
    /// An input that cannot be used (missing, not a regular file).
    #[error(transparent)]
    Input(#[from] vmm::hostfile::HostFileError),
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a file of mode `mode` is, or `None` for a regular file.
fn kind(mode: libc::mode_t) -> Option<&'static str> {
    match mode & libc::S_IFMT {
        libc::S_IFREG => None,
        libc::S_IFDIR => Some("a directory"),
        libc::S_IFLNK => Some("a symbolic link"),
        libc::S_IFIFO => Some("a FIFO"),
        libc::S_IFCHR => Some("a character device"),
        libc::S_IFBLK => Some("a block device"),
        libc::S_IFSOCK => Some("a socket"),
        _ => Some("of an unknown type"),
    }
}

fn fstat(file: &File) -> io::Result<libc::stat> {
    // SAFETY: all-zero is a valid `stat`; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a valid out pointer.
    if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// `name` in `dir`, not following a symlink there; `None` when nothing has that name.
fn lstat_at(dir: &File, name: &CStr) -> io::Result<Option<libc::stat>> {
    // SAFETY: all-zero is a valid `stat`; fstatat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid directory fd, a NUL-terminated name and a valid out pointer.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    match r {
        0 => Ok(Some(st)),
        _ => match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::NotFound => Ok(None),
            e => Err(e),
        },
    }
}

fn open_at(dir: &File, name: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
    // SAFETY: a valid directory fd and a NUL-terminated name; mode is read only with O_CREAT.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Locks `file`, waiting out a writer that holds it for a rename; `InUse` when it stays held.
fn lock(file: &File, exclusive: bool, path: &Path) -> Result<(), FileError> {
    let deadline = Instant::now() + LOCK_WAIT;
    while !vmm::hostfile::try_lock(file, exclusive).map_err(io_err(path))? {
        if Instant::now() >= deadline {
            return Err(FileError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Opens a user-named input for reading: without blocking (a FIFO with no writer would wait
/// forever), refused unless a regular file, then shared-locked for as long as the returned
/// file (and anything sharing its open file description, such as a mapping's `Arc<File>`)
/// lives, so that no writer here replaces it meanwhile.
pub(crate) fn open_input(path: &Path) -> Result<File, FileError> {
    let file = vmm::hostfile::open_input(path, "snapshot", vmm::hostfile::InputKind::Image)?;
    lock(&file, false, path)?;
    Ok(file)
}

/// A new file being written for `dest`: a temporary that becomes `dest` on [`commit`] and is
/// removed if dropped before.
///
/// [`commit`]: NewFile::commit
pub(crate) struct NewFile {
    file: File,
    dir: File,
    /// The destination's name in `dir`.
    name: CString,
    /// The temporary's name in `dir`, until it is renamed or removed.
    temp: Option<CString>,
    dest: PathBuf,
}

/// Random-looking, process-unique temporary names next to `name`, hidden with a dot.
fn temp_names(name: &OsStr) -> impl Iterator<Item = CString> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // A long destination name is cut so that the temporary's name stays under NAME_MAX.
    let stem: Vec<u8> = name.as_bytes().iter().copied().take(160).collect();
    std::iter::repeat_with(move || {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // RandomState is seeded from the OS's randomness.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        let mut s = b".".to_vec();
        s.extend_from_slice(&stem);
        s.extend_from_slice(
            format!(".{}-{n}-{:016x}.ftvm-tmp", std::process::id(), h.finish()).as_bytes(),
        );
        CString::new(s).expect("a file name has no NUL")
    })
}

impl NewFile {
    /// Checks that `dest` may be replaced (see [`NewFile::commit`]) and creates the temporary.
    pub(crate) fn create(dest: &Path) -> Result<Self, FileError> {
        let name = dest.file_name().ok_or_else(|| FileError::NoFileName {
            path: dest.to_path_buf(),
        })?;
        Self::create_with(dest, temp_names(name))
    }

    /// As [`NewFile::create`], trying the temporary names `temps`.
    pub(crate) fn create_with(
        dest: &Path,
        temps: impl Iterator<Item = CString>,
    ) -> Result<Self, FileError> {
        let io = io_err(dest);
        let file_name = dest.file_name().ok_or_else(|| FileError::NoFileName {
            path: dest.to_path_buf(),
        })?;
        let name = CString::new(file_name.as_bytes()).map_err(|e| io(e.into()))?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(parent)
            .map_err(&io)?;
        // Refuse before writing anything; checked again, and locked, when renaming.
        drop(Self::replaceable(&dir, &name, dest)?);
        for temp in temps.take(TEMP_TRIES) {
            // Never an existing file, never through a symlink; readable by the owner only
            // (guest memory is as secret as the guest).
            let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
            match open_at(&dir, &temp, flags | libc::O_CLOEXEC, 0o600) {
                Ok(file) => {
                    return Ok(NewFile {
                        file,
                        dir,
                        name,
                        temp: Some(temp),
                        dest: dest.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(e)),
            }
        }
        Err(io(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "No free temporary name",
        )))
    }

    /// The temporary file, to write.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Whether `name` in `dir` may be replaced: it is absent (`None`), or a regular file that
    /// no other open file holds a lock on, returned exclusively locked.
    fn replaceable(dir: &File, name: &CStr, path: &Path) -> Result<Option<File>, FileError> {
        let io = io_err(path);
        let Some(st) = lstat_at(dir, name).map_err(&io)? else {
            return Ok(None);
        };
        let refuse = |mode: libc::mode_t| match kind(mode) {
            _ if mode & libc::S_IFMT == libc::S_IFLNK => Err(FileError::Symlink {
                path: path.to_path_buf(),
            }),
            Some(kind) => Err(FileError::NotRegular {
                path: path.to_path_buf(),
                kind,
            }),
            None => Ok(()),
        };
        refuse(st.st_mode)?;
        // Opened for writing (never truncated or written) only to hold an exclusive lock;
        // a file even root cannot open so is only tested for locks.
        let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
        let old = match open_at(dir, name, flags | libc::O_RDWR, 0) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
                open_at(dir, name, flags | libc::O_RDONLY, 0)
            }
            r => r,
        };
        let old = match old {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(FileError::Symlink {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => return Err(io(e)),
        };
        // What was opened is what was looked at, or something that took its place since.
        refuse(fstat(&old).map_err(&io)?.st_mode)?;
        lock(&old, true, path)?;
        Ok(Some(old))
    }

    /// Makes the temporary `dest`: fsync, then a rename over nothing or over a regular file
    /// held exclusively locked meanwhile (refused if another open file holds a lock on it, as
    /// a VM does on its disks and on a mapped raw snapshot), then fsync of the directory.
    pub(crate) fn commit(mut self) -> Result<(), FileError> {
        let io = io_err(&self.dest);
        self.file.sync_all().map_err(&io)?;
        let temp = self.temp.as_ref().expect("not yet renamed");
        // A file that appears after the check is checked in turn; a few rounds at most.
        let mut tries = 0;
        loop {
            tries += 1;
            let old = Self::replaceable(&self.dir, &self.name, &self.dest)?;
            let replace = old.is_some();
            let r = rename_at(&self.dir, temp, &self.name, !replace);
            drop(old);
            match r {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 3 => continue,
                Err(e) => return Err(io(e)),
            }
        }
        self.temp = None;
        self.dir.sync_all().map_err(&io)?;
        Ok(())
    }
}

/// Renames `from` to `to` in `dir`; with `no_replace`, fails with `AlreadyExists` rather than
/// replace a file that appeared (where the filesystem supports it).
fn rename_at(dir: &File, from: &CStr, to: &CStr, no_replace: bool) -> io::Result<()> {
    let fd = dir.as_raw_fd();
    if no_replace {
        // SAFETY: a valid directory fd and NUL-terminated names.
        let r =
            unsafe { libc::renameat2(fd, from.as_ptr(), fd, to.as_ptr(), libc::RENAME_NOREPLACE) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
            return Err(e);
        }
    }
    // SAFETY: as above.
    if unsafe { libc::renameat(fd, from.as_ptr(), fd, to.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            // SAFETY: a valid directory fd and a NUL-terminated name we created.
            if unsafe { libc::unlinkat(self.dir.as_raw_fd(), temp.as_ptr(), 0) } != 0 {
                tracing::warn!(
                    dest = %self.dest.display(),
                    error = %io::Error::last_os_error(),
                    "cannot remove a temporary snapshot file"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    /// A symlink or a file at a temporary name is never followed nor replaced: the temporary
    /// is created with O_EXCL|O_NOFOLLOW, and the next name is tried.
    #[test]
    fn planted_temporary_names_are_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("victim"), b"precious").unwrap();
        std::os::unix::fs::symlink(d.join("victim"), d.join("t1")).unwrap();
        std::os::unix::fs::symlink(d.join("nothing-here"), d.join("t2")).unwrap();
        std::fs::write(d.join("t3"), b"someone's file").unwrap();
        let names = ["t1", "t2", "t3", "t4"].map(c).into_iter();
        let new = NewFile::create_with(&d.join("out"), names).unwrap();
        new.file().write_all(b"new").unwrap();
        new.commit().unwrap();
        assert_eq!(std::fs::read(d.join("victim")).unwrap(), b"precious");
        assert!(
            !d.join("nothing-here").exists(),
            "a dangling link is not created through"
        );
        assert_eq!(std::fs::read(d.join("t3")).unwrap(), b"someone's file");
        assert!(d.join("t1").symlink_metadata().unwrap().is_symlink());
        assert_eq!(std::fs::read(d.join("out")).unwrap(), b"new");
        assert!(!d.join("t4").exists(), "the temporary became out");

        // With every name taken, nothing is created or replaced.
        let names = ["t1", "t2", "t3"].map(c).into_iter();
        assert!(NewFile::create_with(&d.join("out2"), names).is_err());
        assert!(!d.join("out2").exists());
    }

    #[test]
    fn temporary_names_are_hidden_unique_and_short_enough() {
        let long = "n".repeat(255);
        let a: Vec<CString> = temp_names(OsStr::new(&long)).take(100).collect();
        let set: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(set.len(), 100);
        assert!(
            a.iter()
                .all(|n| n.as_bytes()[0] == b'.' && n.as_bytes().len() <= 255)
        );
    }

    #[test]
    fn a_dropped_new_file_removes_its_temporary() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("out"), b"old").unwrap();
        let new = NewFile::create(&dir.path().join("out")).unwrap();
        new.file().write_all(b"half").unwrap();
        drop(new);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
        assert_eq!(std::fs::read(dir.path().join("out")).unwrap(), b"old");
    }

    /// A lock that stays is reported as use; a writer's own, held only while it renames, is
    /// waited out.
    #[test]
    fn a_held_lock_is_use_and_a_brief_one_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, b"old").unwrap();
        let holder = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(vmm::hostfile::try_lock(&holder, true).unwrap());
        let e = NewFile::create(&path).err().expect("refused");
        assert!(matches!(e, FileError::InUse { .. }), "{e}");
        let writer = std::thread::spawn(move || NewFile::create(&path)?.commit());
        drop(holder);
        writer.join().unwrap().unwrap();
    }
}
