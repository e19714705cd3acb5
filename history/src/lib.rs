//! ftvm's accounting history: the committed counters of each VM at a fixed time resolution
//! (default 1 s), kept in RocksDB and keyed by (vm, time), each sample carrying the epoch it
//! was committed in; and the billing export computed from them ([`export`]).
//!
//! This crate depends on nothing else of ftvm. A replica records what it commits:
//!
//! ```no_run
//! # use std::collections::BTreeMap;
//! let history = history::History::create("/var/lib/ftvm/history", history::Options::default())?;
//! let mut counters = BTreeMap::new();
//! counters.insert(history::names::vcpu_run_ns(0), 1_250_000_000);
//! history.record(&history::Sample { vm: "vm1".into(), time_ms: 1_700_000_000_000, epoch: 42, counters })?;
//! # Ok::<(), history::HistoryError>(())
//! ```
//!
//! Recording is idempotent: the same (vm, epoch) twice changes nothing. Of the epochs committed
//! within one resolution step the last (in time) is kept; an epoch lower than the one it
//! replaces in the same step (a failover rolled work back) keeps the replaced one as a rolled
//! back "peak" of that step, so the export can report the rolled-back work apart.
//! A store that cannot write (full or read-only disk) returns an error from
//! [`History::record`]; the caller keeps its VM running and retries later.

mod codec;
pub mod export;
pub mod names;
pub mod recorder;

pub use recorder::{Recorder, RecorderStatus, Timer};

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use rocksdb::{DB, Direction, IteratorMode, WriteBatch, WriteOptions};

/// The file that marks a directory as an ftvm history (RocksDB's own files sit beside it).
pub const MARKER: &str = "FTVM-HISTORY";
const FORMAT: u32 = 1;
/// The longest VM id, in bytes.
pub const MAX_VM_ID: usize = 128;
/// The longest counter name, in bytes.
pub const MAX_COUNTER_NAME: usize = 200;
/// The most counters one sample may carry.
pub const MAX_COUNTERS: usize = 4096;
/// The most rolled-back peaks kept within one resolution step.
pub const MAX_PEAKS: usize = 64;

const SAMPLE_TAG: u8 = b'S';
const PRUNED_TAG: u8 = b'P';
const NAME_TAG: u8 = b'N';
const PACKED_TAG: u8 = b'K';
const PACK_VERSION: u8 = 3;
/// Packed minutes of deltas (see `codec`), what [`History::pack`] writes.
const PACK_DELTA_VERSION: u8 = 4;
/// [`History::pack`] puts the steps of each closed minute into one entry.
pub const PACK_MS: u64 = 60_000;
const VALUE_VERSION: u8 = 2;
/// The most distinct counter names one store holds.
pub const MAX_NAMES: usize = 1 << 20;

/// The committed counters of one VM at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The VM's id (1 to 128 bytes of `A-Z a-z 0-9 . _ - :`).
    pub vm: String,
    /// When the epoch was committed, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The committed epoch these counters belong to.
    pub epoch: u64,
    /// Monotonic counters by name (see [`names`] for the names the export bills).
    pub counters: BTreeMap<String, u64>,
}

/// One committed point: an epoch, when, and its counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point {
    /// Commit time, ms since the Unix epoch.
    pub time_ms: u64,
    /// The committed epoch.
    pub epoch: u64,
    /// Counters by name.
    pub counters: BTreeMap<String, u64>,
}

/// What the store holds for one (vm, time step).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The start of the step, ms since the Unix epoch.
    pub step_ms: u64,
    /// Points of the step that a failover rolled back (higher epochs replaced by a lower one),
    /// oldest first.
    pub peaks: Vec<Point>,
    /// The last committed point of the step.
    pub last: Point,
}

/// What [`History::record`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The sample is now the step's last point.
    Written,
    /// The step already holds this epoch, or a later commit: nothing changed.
    Unchanged,
    /// The step lies before the VM's retention cut: nothing changed.
    Expired,
}

/// A VM in the store and the range of its samples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmRange {
    /// The VM's id.
    pub vm: String,
    /// Steps stored.
    pub samples: u64,
    /// Time of the first and the last stored point, ms.
    pub first_ms: u64,
    /// See `first_ms`.
    pub last_ms: u64,
    /// Epoch of the first and the last stored point.
    pub first_epoch: u64,
    /// See `first_epoch`.
    pub last_epoch: u64,
    /// Samples before this time were deleted by retention.
    pub pruned_before_ms: Option<u64>,
}

/// How a new store is made.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The time step, ms (default 1000). Fixed when the store is created.
    pub resolution_ms: u64,
    /// fsync each write (default false: RocksDB's write-ahead log, synced by the OS).
    pub sync: bool,
    /// Refuse to write when the file system has less free space than this (default 64 MiB):
    /// Debian's librocksdb 7.8.3 is built with assertions on, and a write that fails for want
    /// of space aborts the whole process inside RocksDB, so the store must not get that far.
    pub min_free_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            resolution_ms: 1000,
            sync: false,
            min_free_bytes: 64 << 20,
        }
    }
}

/// Errors of the history store; each one a clear line, its cause in `source()`.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The directory does not exist.
    #[error("no history at {0}: the directory does not exist")]
    Missing(PathBuf),
    /// The directory is not a history store.
    #[error("{0} is not an ftvm history: {1}")]
    NotAHistory(PathBuf, String),
    /// The store's files are damaged.
    #[error("the history at {0} is corrupted: {1}")]
    Corrupted(PathBuf, String),
    /// RocksDB failed.
    #[error("history {0}")]
    Db(String, #[source] rocksdb::Error),
    /// A file operation failed.
    #[error("history {0}")]
    Io(String, #[source] std::io::Error),
    /// A sample or query was refused.
    #[error("{0}")]
    Invalid(String),
    /// Too little free space to write safely; nothing was written.
    #[error(
        "history {dir}: only {free} bytes free on its file system, it keeps {min} free: not written"
    )]
    Full {
        /// The store.
        dir: String,
        /// Free bytes.
        free: u64,
        /// The reserve.
        min: u64,
    },
    /// The same epoch was recorded with other values.
    #[error(
        "vm {vm}: epoch {epoch} is already recorded with other counters or time; a committed epoch cannot change"
    )]
    Conflict {
        /// The VM.
        vm: String,
        /// The epoch.
        epoch: u64,
    },
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, HistoryError>;

/// A history store on disk.
pub struct History {
    db: DB,
    dir: PathBuf,
    resolution_ms: u64,
    sync: bool,
    min_free_bytes: std::sync::atomic::AtomicU64,
    /// Counter names by id: values hold ids, so that a sample is small and fast to scan.
    names: RwLock<Names>,
    /// Serialises read-modify-write of a step.
    write: Mutex<()>,
}

/// The store's counter names; ids are dense from 0, each kept under `N` + id.
#[derive(Default)]
struct Names {
    by_name: HashMap<String, u32>,
    by_id: Vec<String>,
}

fn name_key(id: u32) -> [u8; 5] {
    let b = id.to_be_bytes();
    [NAME_TAG, b[0], b[1], b[2], b[3]]
}

/// A RocksDB error: damaged files found while reading (a bad block checksum, a torn table)
/// make [`HistoryError::Corrupted`].
fn db_error(dir: &Path, what: String, e: rocksdb::Error) -> HistoryError {
    let text = e.to_string();
    if text.contains("Corruption") {
        HistoryError::Corrupted(dir.to_owned(), text)
    } else {
        HistoryError::Db(what, e)
    }
}

fn load_names(db: &DB, dir: &Path) -> Result<Names> {
    let bad = |why: String| HistoryError::Corrupted(dir.to_owned(), why);
    let mut names = Names::default();
    for item in db.iterator(IteratorMode::From(&[NAME_TAG], Direction::Forward)) {
        let (k, v) =
            item.map_err(|e| db_error(dir, format!("cannot read {}", dir.display()), e))?;
        if k.first() != Some(&NAME_TAG) {
            break;
        }
        let id = <[u8; 4]>::try_from(&k[1..])
            .map(u32::from_be_bytes)
            .map_err(|_| bad("a bad counter-name key".into()))?;
        if id as usize != names.by_id.len() || names.by_id.len() >= MAX_NAMES {
            return Err(bad(format!("counter name {id} out of sequence")));
        }
        let name = std::str::from_utf8(&v)
            .ok()
            .filter(|n| check_counter_name(n).is_ok() && !names.by_name.contains_key(*n))
            .ok_or_else(|| bad(format!("counter name {id} is invalid")))?;
        names.by_name.insert(name.to_owned(), id);
        names.by_id.push(name.to_owned());
    }
    Ok(names)
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("dir", &self.dir)
            .field("resolution_ms", &self.resolution_ms)
            .finish()
    }
}

/// Checks a VM id: 1 to [`MAX_VM_ID`] bytes of `A-Z a-z 0-9 . _ - :`.
pub fn check_vm_id(vm: &str) -> Result<()> {
    if vm.is_empty() || vm.len() > MAX_VM_ID {
        return Err(HistoryError::Invalid(format!(
            "a VM id must be 1 to {MAX_VM_ID} bytes long (got {})",
            vm.len()
        )));
    }
    if let Some(c) = vm
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
    {
        return Err(HistoryError::Invalid(format!(
            "VM id {vm:?} has {c:?}; allowed are A-Z a-z 0-9 . _ - :"
        )));
    }
    Ok(())
}

fn check_counter_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_COUNTER_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b',' && b != b'"')
    {
        return Err(HistoryError::Invalid(format!(
            "counter name {name:?}: must be 1 to {MAX_COUNTER_NAME} printable ASCII bytes without ',' or '\"'"
        )));
    }
    Ok(())
}

fn marker_text(resolution_ms: u64) -> String {
    format!("ftvm-history {FORMAT}\nresolution_ms {resolution_ms}\n")
}

/// The store's current manifest and its length: it changes with every flush and compaction.
fn manifest_mark(dir: &Path) -> Option<(String, u64)> {
    let current = std::fs::read_to_string(dir.join("CURRENT")).ok()?;
    let name = current.trim().to_string();
    let len = std::fs::metadata(dir.join(&name)).ok()?.len();
    Some((name, len))
}

/// Reads the marker; the resolution it records.
fn read_marker(dir: &Path) -> Result<u64> {
    let meta = std::fs::metadata(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            HistoryError::Missing(dir.to_owned())
        } else {
            HistoryError::Io(format!("cannot read {}", dir.display()), e)
        }
    })?;
    if !meta.is_dir() {
        return Err(HistoryError::NotAHistory(
            dir.to_owned(),
            "it is not a directory".into(),
        ));
    }
    let text = match std::fs::read(dir.join(MARKER)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(HistoryError::NotAHistory(
                dir.to_owned(),
                format!("it has no {MARKER} file"),
            ));
        }
        Err(e) => {
            return Err(HistoryError::Io(
                format!("cannot read {}", dir.join(MARKER).display()),
                e,
            ));
        }
    };
    let bad = |why: &str| HistoryError::Corrupted(dir.to_owned(), format!("{MARKER}: {why}"));
    let text = std::str::from_utf8(&text).map_err(|_| bad("not text"))?;
    let mut lines = text.lines();
    match lines.next() {
        Some(l) if l == format!("ftvm-history {FORMAT}") => {}
        Some(l) if l.starts_with("ftvm-history ") => {
            return Err(bad(&format!(
                "format {:?}, this ftvm reads {FORMAT}",
                &l[13..]
            )));
        }
        _ => return Err(bad("no `ftvm-history` header")),
    }
    let resolution = lines
        .next()
        .and_then(|l| l.strip_prefix("resolution_ms "))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("no valid `resolution_ms`"))?;
    if !dir.join("CURRENT").is_file() {
        return Err(bad("RocksDB's CURRENT file is missing"));
    }
    Ok(resolution)
}

fn db_options(create: bool) -> rocksdb::Options {
    let mut o = rocksdb::Options::default();
    o.create_if_missing(create);
    // zstd on 64 KiB blocks: with counter names still written out in every sample, a VM-day
    // (86,400 samples) measured 3.7 MiB against 9.1 MiB with LZ4 on 64 KiB blocks and 40 MiB
    // uncompressed (`cargo bench -p history --bench store`), with no slower export.
    o.set_compression_type(rocksdb::DBCompressionType::Zstd);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_size(64 << 10);
    o.set_block_based_table_factory(&table);
    o.set_keep_log_file_num(2);
    // A damaged write-ahead log is an error, not samples silently dropped from where the
    // damage starts (RocksDB's default, point-in-time recovery); a record torn by a crash at
    // the log's very end is still tolerated.
    o.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
    // Small memtables: a flush needs little room, well within `Options::min_free_bytes`.
    o.set_write_buffer_size(8 << 20);
    o
}

impl History {
    /// Opens the history at `dir`, creating it (and the directory) when there is none. An
    /// existing non-empty directory that is not a history is refused and left untouched; an
    /// existing history keeps the resolution it was made with, and a different
    /// `options.resolution_ms` is refused.
    pub fn create(dir: impl AsRef<Path>, options: Options) -> Result<History> {
        let dir = dir.as_ref();
        if options.resolution_ms == 0 {
            return Err(HistoryError::Invalid(
                "the history resolution must be at least 1 ms".into(),
            ));
        }
        match read_marker(dir) {
            Ok(resolution) => {
                if resolution != options.resolution_ms {
                    return Err(HistoryError::Invalid(format!(
                        "the history at {} has a resolution of {resolution} ms, not {} ms",
                        dir.display(),
                        options.resolution_ms
                    )));
                }
                return Self::open_with(dir, resolution, options, false);
            }
            Err(HistoryError::Missing(_)) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| HistoryError::Io(format!("cannot create {}", dir.display()), e))?;
            }
            Err(HistoryError::NotAHistory(_, why)) if why.contains(MARKER) => {
                let mut entries = std::fs::read_dir(dir)
                    .map_err(|e| HistoryError::Io(format!("cannot read {}", dir.display()), e))?;
                if entries.next().is_some() {
                    return Err(HistoryError::NotAHistory(
                        dir.to_owned(),
                        format!("it is not empty and has no {MARKER} file"),
                    ));
                }
            }
            Err(e) => return Err(e),
        }
        let db = DB::open(&db_options(true), dir)
            .map_err(|e| HistoryError::Db(format!("cannot create {}", dir.display()), e))?;
        // The marker last, atomically: a directory without it is never taken for a history.
        let tmp = dir.join(format!("{MARKER}.tmp"));
        std::fs::write(&tmp, marker_text(options.resolution_ms))
            .and_then(|()| std::fs::rename(&tmp, dir.join(MARKER)))
            .map_err(|e| {
                HistoryError::Io(format!("cannot write {}", dir.join(MARKER).display()), e)
            })?;
        Ok(History {
            db,
            dir: dir.to_owned(),
            resolution_ms: options.resolution_ms,
            sync: options.sync,
            min_free_bytes: options.min_free_bytes.into(),
            names: RwLock::new(Names::default()),
            write: Mutex::new(()),
        })
    }

    /// Opens an existing history for reading and writing. A missing directory, one that is
    /// not a history, or a corrupted one is an error, and nothing is written.
    pub fn open(dir: impl AsRef<Path>) -> Result<History> {
        let dir = dir.as_ref();
        let resolution = read_marker(dir)?;
        Self::open_with(dir, resolution, Options::default(), false)
    }

    /// Opens an existing history for reading only (the export): works on a read-only
    /// directory too.
    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<History> {
        let dir = dir.as_ref();
        let resolution = read_marker(dir)?;
        Self::open_with(dir, resolution, Options::default(), true)
    }

    fn open_with(
        dir: &Path,
        resolution_ms: u64,
        options: Options,
        read_only: bool,
    ) -> Result<History> {
        // Read-only first, without RocksDB's info log (its directory cannot be made under
        // /dev/null, and RocksDB then logs nowhere): a damaged store is found before anything
        // is written into it.
        let mut quiet = db_options(false);
        quiet.set_db_log_dir("/dev/null");
        // A store being written (a replica's) may delete a compacted file between the
        // manifest naming it and this open: that is not damage, so look again, a few times.
        // Likewise a flush between reading the manifest and replaying the logs (the log gone,
        // its data in a file the manifest read does not name yet) gives a view missing data:
        // the open is consistent when the manifest did not change while it ran.
        let open = || {
            let before = manifest_mark(dir);
            let db = DB::open_for_read_only(&quiet, dir, false);
            (db, before.is_some() && before == manifest_mark(dir))
        };
        let (mut checked, mut steady) = open();
        for _ in 0..10 {
            match &checked {
                Err(e) if e.to_string().contains("No such file") => {}
                Ok(_) if !steady => {}
                _ => break,
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            (checked, steady) = open();
        }
        let db = if read_only || checked.is_err() {
            checked
        } else {
            drop(checked);
            DB::open(&db_options(false), dir)
        }
        .map_err(|e| {
            let text = e.to_string();
            // A damaged file, or one the store names but that is gone.
            if text.contains("Corruption") || text.contains("No such file") {
                HistoryError::Corrupted(dir.to_owned(), text)
            } else {
                HistoryError::Db(format!("cannot open {}", dir.display()), e)
            }
        })?;
        let names = load_names(&db, dir)?;
        Ok(History {
            db,
            dir: dir.to_owned(),
            resolution_ms,
            sync: options.sync,
            min_free_bytes: options.min_free_bytes.into(),
            names: RwLock::new(names),
            write: Mutex::new(()),
        })
    }

    /// Sets the free-space reserve (see [`Options::min_free_bytes`]).
    pub fn set_min_free_bytes(&self, bytes: u64) {
        self.min_free_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Fails with [`HistoryError::Full`] when the store's file system has less free space
    /// than the reserve.
    pub fn check_space(&self) -> Result<()> {
        let path = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes())
            .map_err(|_| HistoryError::Invalid("the history path has a NUL byte".into()))?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `path` is a NUL-terminated string and `st` a buffer of the right type that
        // statvfs fills; it is read only when statvfs succeeded.
        let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(HistoryError::Io(
                format!("cannot check the free space of {}", self.dir.display()),
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: statvfs succeeded and filled `st`.
        let st = unsafe { st.assume_init() };
        if st.f_flag & libc::ST_RDONLY != 0 {
            return Err(HistoryError::Io(
                format!("cannot write {}", self.dir.display()),
                std::io::Error::from_raw_os_error(libc::EROFS),
            ));
        }
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        let min = self
            .min_free_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        if free < min {
            return Err(HistoryError::Full {
                dir: self.dir.display().to_string(),
                free,
                min,
            });
        }
        Ok(())
    }

    /// Writes the memtable out and compacts the whole store (for measuring its size, or
    /// after a large prune).
    pub fn compact(&self) -> Result<()> {
        self.db.flush().map_err(self.db_err("cannot flush"))?;
        self.db.compact_range::<&[u8], &[u8]>(None, None);
        Ok(())
    }

    /// Iterates over every stored key and value of `vm` without decoding; returns the bytes
    /// seen (the benchmark's baseline for the export).
    pub fn raw_scan(&self, vm: &str) -> Result<u64> {
        check_vm_id(vm)?;
        let start = sample_key(vm, 0);
        let prefix = &start[..start.len() - 8];
        let mut bytes = 0u64;
        for item in self
            .db
            .iterator(IteratorMode::From(&start, Direction::Forward))
        {
            let (k, v) = item.map_err(self.db_err("cannot read"))?;
            if !k.starts_with(prefix) {
                break;
            }
            bytes += (k.len() + v.len()) as u64;
        }
        Ok(bytes)
    }

    /// The time step, ms.
    pub fn resolution_ms(&self) -> u64 {
        self.resolution_ms
    }

    /// Where the store is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn step_of(&self, time_ms: u64) -> u64 {
        time_ms - time_ms % self.resolution_ms
    }

    fn db_err(&self, what: &str) -> impl FnOnce(rocksdb::Error) -> HistoryError + '_ {
        let what = format!("{}: {what}", self.dir.display());
        move |e| db_error(&self.dir, what, e)
    }

    /// Records a committed sample. Idempotent: the same (vm, epoch) again changes nothing.
    /// Within one step the latest commit is kept; a lower epoch that replaces a higher one
    /// (work rolled back by a failover) keeps the higher one as a rolled-back peak.
    pub fn record(&self, sample: &Sample) -> Result<Recorded> {
        check_vm_id(&sample.vm)?;
        if sample.counters.len() > MAX_COUNTERS {
            return Err(HistoryError::Invalid(format!(
                "a sample carries at most {MAX_COUNTERS} counters (got {})",
                sample.counters.len()
            )));
        }
        for name in sample.counters.keys() {
            check_counter_name(name)?;
        }
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cut) = self.pruned_before(&sample.vm)?
            && sample.time_ms < cut
        {
            return Ok(Recorded::Expired);
        }
        if let Some(cut) = self.cut(&sample.vm, PACKED_TAG)?
            && sample.time_ms < cut
        {
            return Ok(Recorded::Expired);
        }
        let step = self.step_of(sample.time_ms);
        let key = sample_key(&sample.vm, step);
        let point = Point {
            time_ms: sample.time_ms,
            epoch: sample.epoch,
            counters: sample.counters.clone(),
        };
        let new = match self.db.get(&key).map_err(self.db_err("cannot read"))? {
            None => Stored {
                step_ms: step,
                peaks: Vec::new(),
                last: point,
            },
            Some(bytes) => {
                let mut old = self.decode(&bytes, step)?;
                if let Some(same) = std::iter::once(&old.last)
                    .chain(old.peaks.iter())
                    .find(|p| p.epoch == sample.epoch)
                {
                    if *same == point {
                        return Ok(Recorded::Unchanged);
                    }
                    return Err(HistoryError::Conflict {
                        vm: sample.vm.clone(),
                        epoch: sample.epoch,
                    });
                }
                let later = (point.time_ms, point.epoch) > (old.last.time_ms, old.last.epoch);
                if !later {
                    // An older commit of this step arriving late: the step keeps its last one.
                    return Ok(Recorded::Unchanged);
                }
                if point.epoch < old.last.epoch {
                    if old.peaks.len() >= MAX_PEAKS {
                        return Err(HistoryError::Invalid(format!(
                            "vm {}: more than {MAX_PEAKS} rollbacks within one {} ms step",
                            sample.vm, self.resolution_ms
                        )));
                    }
                    old.peaks.push(old.last);
                }
                old.last = point;
                old
            }
        };
        self.check_space()?;
        // New counter names go into the same batch, and into the table only once written.
        let mut batch = WriteBatch::default();
        let mut added: Vec<String> = Vec::new();
        let value = {
            let names = self.names.read().unwrap_or_else(|p| p.into_inner());
            let mut id_of = |name: &str| -> Result<u32> {
                if let Some(&id) = names.by_name.get(name) {
                    return Ok(id);
                }
                let pos = added.iter().position(|a| a == name).unwrap_or_else(|| {
                    added.push(name.to_owned());
                    added.len() - 1
                });
                let id = names.by_id.len() + pos;
                if id >= MAX_NAMES {
                    return Err(HistoryError::Invalid(format!(
                        "the history holds at most {MAX_NAMES} distinct counter names"
                    )));
                }
                batch.put(name_key(id as u32), name.as_bytes());
                Ok(id as u32)
            };
            encode(&new, &mut id_of)?
        };
        batch.put(&key, value);
        let mut wo = WriteOptions::default();
        wo.set_sync(self.sync);
        self.db
            .write_opt(batch, &wo)
            .map_err(self.db_err("cannot write"))?;
        if !added.is_empty() {
            let mut names = self.names.write().unwrap_or_else(|p| p.into_inner());
            for name in added {
                let id = names.by_id.len() as u32;
                names.by_name.insert(name.clone(), id);
                names.by_id.push(name);
            }
        }
        Ok(Recorded::Written)
    }

    /// Packs, for every VM, the steps of each minute before `before_ms` (rounded down to a
    /// minute) into one entry of deltas (see `codec`), so that an export reads 60 times fewer
    /// entries and a fraction of the bytes; samples for those minutes that arrive later are
    /// not recorded ([`Recorded::Expired`]). It starts at each VM's packing cut, so calling
    /// it often costs only the minutes since the last call. Returns how many steps were
    /// packed.
    pub fn pack(&self, before_ms: u64) -> Result<u64> {
        let before_ms = before_ms - before_ms % PACK_MS;
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut packed = 0;
        for vm in self.vm_ids()? {
            let cut = self.packed_before(&vm)?.unwrap_or(0);
            if cut >= before_ms {
                continue;
            }
            let from = sample_key(&vm, cut);
            let to = sample_key(&vm, before_ms);
            let prefix = &from[..from.len() - 8];
            let mut batch = WriteBatch::default();
            let mut minute: Option<u64> = None;
            let mut group: Vec<Entry> = Vec::new();
            let flush =
                |group: &mut Vec<Entry>, minute: u64, batch: &mut WriteBatch| -> Result<u64> {
                    if group.len() < 2 {
                        group.clear();
                        return Ok(0);
                    }
                    let names = self
                        .names
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .by_id
                        .len();
                    let bad = |why| HistoryError::Corrupted(self.dir.clone(), why);
                    let mut steps = Vec::new();
                    for (k, v) in group.iter() {
                        let step = u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8"));
                        let mut entry = codec::Steps::new(step, v).map_err(bad)?;
                        let mut points = Vec::new();
                        while let Some((step, _)) = entry
                            .next(names, &mut points, &mut Vec::new())
                            .map_err(bad)?
                        {
                            steps.push((step, points.clone()));
                        }
                        batch.delete(k);
                    }
                    batch.put(
                        sample_key(&vm, minute),
                        codec::encode_minute(minute, &steps),
                    );
                    let n = steps.len() as u64;
                    group.clear();
                    Ok(n)
                };
            for item in self
                .db
                .iterator(IteratorMode::From(&from, Direction::Forward))
            {
                let (k, v) = item.map_err(self.db_err("cannot read"))?;
                if *k >= *to || !k.starts_with(prefix) || k.len() != from.len() {
                    break;
                }
                let step = u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8"));
                let m = step - step % PACK_MS;
                if minute != Some(m) {
                    if let Some(prev) = minute {
                        packed += flush(&mut group, prev, &mut batch)?;
                    }
                    minute = Some(m);
                }
                group.push((k, v));
            }
            if let Some(prev) = minute {
                packed += flush(&mut group, prev, &mut batch)?;
            }
            batch.put(
                [&[PACKED_TAG], vm.as_bytes()].concat(),
                before_ms.to_be_bytes(),
            );
            self.check_space()?;
            let mut wo = WriteOptions::default();
            wo.set_sync(self.sync);
            self.db
                .write_opt(batch, &wo)
                .map_err(self.db_err("cannot write"))?;
        }
        Ok(packed)
    }

    /// Deletes, for every VM, the steps that start before `before_ms` (rounded down to a
    /// minute, as packed minutes are whole), and remembers the cut so
    /// that late samples before it are not recorded again. Returns how many entries (steps or
    /// packed minutes) went.
    pub fn prune(&self, before_ms: u64) -> Result<u64> {
        // Whole minutes only: a packed minute is one entry.
        let before_ms = before_ms - before_ms % PACK_MS;
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut deleted = 0;
        for vm in self.vm_ids()? {
            let mut batch = WriteBatch::default();
            let from = sample_key(&vm, 0);
            let to = sample_key(&vm, before_ms);
            let mut n = 0;
            for item in self
                .db
                .iterator(IteratorMode::From(&from, Direction::Forward))
            {
                let (k, _) = item.map_err(self.db_err("cannot read"))?;
                if *k >= *to || !k.starts_with(&from[..from.len() - 8]) {
                    break;
                }
                n += 1;
            }
            if n == 0 {
                continue;
            }
            batch.delete_range(&from, &to);
            let cut = self.pruned_before(&vm)?.unwrap_or(0).max(before_ms);
            batch.put(pruned_key(&vm), cut.to_be_bytes());
            self.check_space()?;
            let mut wo = WriteOptions::default();
            wo.set_sync(self.sync);
            self.db
                .write_opt(batch, &wo)
                .map_err(self.db_err("cannot write"))?;
            deleted += n;
        }
        Ok(deleted)
    }

    /// The retention cut of `vm`: samples before it were deleted.
    pub fn pruned_before(&self, vm: &str) -> Result<Option<u64>> {
        self.cut(vm, PRUNED_TAG)
    }

    /// The packing cut of `vm`: minutes before it are packed, and closed to late samples.
    pub fn packed_before(&self, vm: &str) -> Result<Option<u64>> {
        self.cut(vm, PACKED_TAG)
    }

    fn cut(&self, vm: &str, tag: u8) -> Result<Option<u64>> {
        match self
            .db
            .get([&[tag], vm.as_bytes()].concat())
            .map_err(self.db_err("cannot read"))?
        {
            None => Ok(None),
            Some(v) => Ok(Some(u64::from_be_bytes(v.as_slice().try_into().map_err(
                |_| {
                    HistoryError::Corrupted(
                        self.dir.clone(),
                        format!("bad retention cut of vm {vm}"),
                    )
                },
            )?))),
        }
    }

    fn vm_ids(&self) -> Result<Vec<String>> {
        let mut vms = Vec::new();
        let mut seek = vec![SAMPLE_TAG];
        loop {
            let mut it = self
                .db
                .iterator(IteratorMode::From(&seek, Direction::Forward));
            let Some(item) = it.next() else { break };
            let (k, _) = item.map_err(self.db_err("cannot read"))?;
            if k.first() != Some(&SAMPLE_TAG) {
                break;
            }
            let (vm, _) = split_sample_key(&k)
                .ok_or_else(|| HistoryError::Corrupted(self.dir.clone(), "a bad key".into()))?;
            seek = [&[SAMPLE_TAG], vm.as_bytes(), &[1u8]].concat();
            vms.push(vm.to_owned());
        }
        Ok(vms)
    }

    /// The VMs in the store with the range of their samples, by id.
    pub fn vms(&self) -> Result<Vec<VmRange>> {
        let mut out = Vec::new();
        for vm in self.vm_ids()? {
            // (time, epoch) of the first point and of the last, without naming counters.
            let mut first: Option<(u64, u64)> = None;
            let mut last: Option<(u64, u64)> = None;
            let mut samples = 0;
            self.scan_ids(&vm, 0, None, |_, points, _, _| {
                samples += 1;
                let (a, z) = (&points[0], &points[points.len() - 1]);
                first.get_or_insert((a.time_ms, a.epoch));
                last = Some((z.time_ms, z.epoch));
                Ok(())
            })?;
            if let (Some(first), Some(last)) = (first, last) {
                out.push(VmRange {
                    samples,
                    first_ms: first.0,
                    last_ms: last.0,
                    first_epoch: first.1,
                    last_epoch: last.1,
                    pruned_before_ms: self.pruned_before(&vm)?,
                    vm,
                });
            }
        }
        Ok(out)
    }

    /// The stored steps of `vm` whose last point's time is in `[from_ms, to_ms)`, in order.
    pub fn range(&self, vm: &str, from_ms: u64, to_ms: u64) -> Result<Vec<Stored>> {
        let mut out = Vec::new();
        self.for_each(vm, from_ms, to_ms, |s| {
            out.push(s.clone());
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` with each stored step of `vm` whose last point's time is in
    /// `[from_ms, to_ms)`, in order, without collecting them.
    pub fn for_each(
        &self,
        vm: &str,
        from_ms: u64,
        to_ms: u64,
        f: impl FnMut(&Stored) -> Result<()>,
    ) -> Result<()> {
        self.scan(vm, from_ms, Some(to_ms), f)
    }

    /// [`History::for_each`] with no end when `to_ms` is none.
    pub fn scan(
        &self,
        vm: &str,
        from_ms: u64,
        to_ms: Option<u64>,
        mut f: impl FnMut(&Stored) -> Result<()>,
    ) -> Result<()> {
        self.scan_views(vm, from_ms, to_ms, |step_ms, points| {
            let mut points: Vec<Point> = points.iter().map(PointView::to_point).collect();
            let last = points.pop().expect("a step has a last point");
            f(&Stored {
                step_ms,
                peaks: points,
                last,
            })
        })
    }

    /// Like [`History::scan`], but hands `f` each step's points as borrowed views of the
    /// stored bytes (no allocation per counter): the export's path through a VM-month.
    pub fn scan_views(
        &self,
        vm: &str,
        from_ms: u64,
        to_ms: Option<u64>,
        mut f: impl FnMut(u64, &[PointView<'_>]) -> Result<()>,
    ) -> Result<()> {
        self.scan_ids(vm, from_ms, to_ms, |step, points, _, names| {
            let views: Vec<PointView<'_>> =
                points.iter().map(|p| p.view(names, Vec::new())).collect();
            f(step, &views)
        })
    }

    /// The steps of `vm` whose last point's time is in `[from_ms, to_ms)`, decoded in place:
    /// `f` gets each step's start, its points, whether it is a delta of the step it got before
    /// (one point with the same counters as that step's last, none lower: see `codec`), and
    /// the counter names by id.
    pub(crate) fn scan_ids(
        &self,
        vm: &str,
        from_ms: u64,
        to_ms: Option<u64>,
        mut f: impl FnMut(u64, &[codec::IdPoint], bool, &[String]) -> Result<()>,
    ) -> Result<()> {
        check_vm_id(vm)?;
        let to_ms = to_ms.map_or(u128::MAX, u128::from);
        // From the minute's start: `from` may lie inside a packed minute.
        let first = self.step_of(from_ms);
        let start = sample_key(vm, first - first % PACK_MS);
        let prefix = &start[..start.len() - 8];
        let mut ro = rocksdb::ReadOptions::default();
        ro.fill_cache(false);
        ro.set_readahead_size(2 << 20);
        let names = self.names.read().unwrap_or_else(|p| p.into_inner());
        let names = names.by_id.as_slice();
        let bad = |why| HistoryError::Corrupted(self.dir.clone(), why);
        // Reused from step to step: no allocation per step once warm.
        let mut points: Vec<codec::IdPoint> = Vec::new();
        let mut spare: Vec<codec::IdPoint> = Vec::new();
        // Whether `f` got the step before (a delta of one it did not get is not one to it).
        let mut gave_last = false;
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(&start);
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !k.starts_with(prefix) || k.len() != start.len() {
                break;
            }
            let step = u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"));
            if u128::from(step) >= to_ms {
                break;
            }
            let mut steps = codec::Steps::new(step, v).map_err(bad)?;
            while let Some((step, delta)) = steps
                .next(names.len(), &mut points, &mut spare)
                .map_err(bad)?
            {
                if u128::from(step) >= to_ms {
                    break;
                }
                let last = points.last().expect("a step has a last point");
                if last.time_ms >= from_ms {
                    if u128::from(last.time_ms) >= to_ms {
                        return Ok(());
                    }
                    f(step, &points, delta && gave_last, names)?;
                    gave_last = true;
                } else {
                    gave_last = false;
                }
            }
            it.next();
        }
        it.status().map_err(self.db_err("cannot read"))
    }

    fn decode(&self, bytes: &[u8], step_ms: u64) -> Result<Stored> {
        let names = self.names.read().unwrap_or_else(|p| p.into_inner());
        let mut points = Vec::with_capacity(1);
        codec::decode_step(bytes, names.by_id.len(), &mut points, &mut Vec::new())
            .map_err(|why| HistoryError::Corrupted(self.dir.clone(), why))?;
        Ok(Self::stored(step_ms, &points, &names.by_id))
    }

    /// A step's points as a [`Stored`].
    fn stored(step_ms: u64, points: &[codec::IdPoint], names: &[String]) -> Stored {
        let mut points: Vec<Point> = points.iter().map(|p| p.to_point(names)).collect();
        let last = points.pop().expect("a step has a last point");
        Stored {
            step_ms,
            peaks: points,
            last,
        }
    }

    /// The last stored step of `vm` whose last point is before `before_ms`.
    pub fn before(&self, vm: &str, before_ms: u64) -> Result<Option<Stored>> {
        check_vm_id(vm)?;
        let start = sample_key(vm, self.step_of(before_ms));
        let prefix = &start[..start.len() - 8];
        for item in self
            .db
            .iterator(IteratorMode::From(&start, Direction::Reverse))
        {
            let (k, v) = item.map_err(self.db_err("cannot read"))?;
            if !k.starts_with(prefix) || k.len() != start.len() {
                break;
            }
            let step = u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"));
            let names = self.names.read().unwrap_or_else(|p| p.into_inner());
            let bad = |why| HistoryError::Corrupted(self.dir.clone(), why);
            let mut steps = codec::Steps::new(step, &v).map_err(bad)?;
            let (mut points, mut spare) = (Vec::new(), Vec::new());
            let mut found = None;
            while let Some((step, _)) = steps
                .next(names.by_id.len(), &mut points, &mut spare)
                .map_err(bad)?
            {
                if points.last().expect("a step has a point").time_ms < before_ms {
                    found = Some(Self::stored(step, &points, &names.by_id));
                }
            }
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }
}

fn sample_key(vm: &str, step_ms: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(vm.len() + 10);
    k.push(SAMPLE_TAG);
    k.extend_from_slice(vm.as_bytes());
    k.push(0);
    k.extend_from_slice(&step_ms.to_be_bytes());
    k
}

fn split_sample_key(k: &[u8]) -> Option<(&str, u64)> {
    let body = k.strip_prefix(&[SAMPLE_TAG])?;
    if body.len() < 9 || body[body.len() - 9] != 0 {
        return None;
    }
    let vm = std::str::from_utf8(&body[..body.len() - 9]).ok()?;
    Some((
        vm,
        u64::from_be_bytes(body[body.len() - 8..].try_into().ok()?),
    ))
}

fn pruned_key(vm: &str) -> Vec<u8> {
    [&[PRUNED_TAG], vm.as_bytes()].concat()
}

/// A stored key and value.
type Entry = (Box<[u8]>, Box<[u8]>);

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A stored step: version, number of peaks, then each point (peaks, then the last) as varints:
/// time, epoch, number of counters, and (name id, value) for each counter in name order.
fn encode(s: &Stored, id_of: &mut impl FnMut(&str) -> Result<u32>) -> Result<Vec<u8>> {
    let mut out = vec![VALUE_VERSION, s.peaks.len() as u8];
    for p in s.peaks.iter().chain(std::iter::once(&s.last)) {
        put_varint(&mut out, p.time_ms);
        put_varint(&mut out, p.epoch);
        put_varint(&mut out, p.counters.len() as u64);
        for (name, value) in &p.counters {
            put_varint(&mut out, u64::from(id_of(name)?));
            put_varint(&mut out, *value);
        }
    }
    Ok(out)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("a truncated sample".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    #[inline]
    fn varint(&mut self) -> std::result::Result<u64, String> {
        // Most stored numbers (ids, deltas) fit in one byte.
        match self.0.split_first() {
            Some((&b, rest)) if b < 0x80 => {
                self.0 = rest;
                Ok(u64::from(b))
            }
            _ => self.long_varint(),
        }
    }

    fn long_varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for (i, &b) in self.0.iter().take(10).enumerate() {
            if i == 9 && b > 1 {
                return Err("a number too large".into());
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(v);
            }
        }
        // Ten bytes always end above (a value, or one too large): fewer did not end.
        Err("a truncated sample".into())
    }
}

/// A stored point, borrowing its counter names from the store's name table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointView<'a> {
    /// Commit time, ms.
    pub time_ms: u64,
    /// The committed epoch.
    pub epoch: u64,
    /// Counters in name order.
    pub counters: Vec<(&'a str, u64)>,
}

impl PointView<'_> {
    /// An owned copy.
    pub fn to_point(&self) -> Point {
        Point {
            time_ms: self.time_ms,
            epoch: self.epoch,
            counters: self
                .counters
                .iter()
                .map(|(n, v)| ((*n).to_owned(), *v))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests;
