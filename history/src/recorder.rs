//! Recording one VM's committed counters as they come, without ever stopping the VM.
//!
//! A [`Recorder`] writes each commit's counters into a [`History`]. When a write fails (a full
//! or read-only disk, a damaged store) the VM goes on: the recorder is *behind*, keeps the
//! latest unrecorded sample (only the latest: counters are cumulative, so writing the latest
//! one catches the billed totals up exactly; the steps in between stay empty), and writes it
//! at the next commit or on [`Recorder::retry`] (which [`Recorder::tick`] calls, from a thread
//! that [`Recorder::tick_every`] starts, for when commits stop while it is behind). It logs
//! once when it falls behind and once when it catches up, and counts every failed write.
//!
//! The tick also packs the minutes older than [`PACK_LAG_MS`] once a minute
//! ([`History::pack`]), so that the billing export reads a recorded month quickly.
//!
//! ```no_run
//! # use std::collections::BTreeMap;
//! let history = history::History::create("/var/lib/ftvm/history", history::Options::default())?;
//! let recorder = std::sync::Arc::new(history::Recorder::new(history, "vm1")?);
//! let _timer = recorder.tick_every(std::time::Duration::from_secs(1));
//! let mut counters = BTreeMap::new();
//! counters.insert(history::names::vcpu_run_ns(0), 1_250_000_000);
//! recorder.record(42, counters);
//! assert!(!recorder.status().behind);
//! # Ok::<(), history::HistoryError>(())
//! ```

use std::collections::BTreeMap;
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{History, PACK_MS, Result, Sample, check_vm_id};

/// [`Recorder::tick`] packs the minutes older than this (ms): late enough that no commit
/// still comes for them, except from a recorder that is behind, which does not pack.
pub const PACK_LAG_MS: u64 = 2 * PACK_MS;

/// Records one VM's commits into a history; see the [module](self).
pub struct Recorder {
    history: History,
    vm: String,
    state: Mutex<State>,
    /// A copy of where it stands, for readers that must not wait for a slow write.
    published: Mutex<RecorderStatus>,
}

#[derive(Default)]
struct State {
    behind_since_ms: Option<u64>,
    failures: u64,
    recorded: Option<(u64, u64)>,
    pending: Option<Sample>,
    last_error: Option<String>,
    packed_at_ms: Option<u64>,
}

/// Where a [`Recorder`] stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecorderStatus {
    /// A commit is not recorded yet: the last write failed.
    pub behind: bool,
    /// Since when (ms since the Unix epoch) it is behind.
    pub behind_since_ms: Option<u64>,
    /// Writes that failed so far.
    pub failures: u64,
    /// The last recorded epoch and its commit time (ms).
    pub recorded_epoch: Option<u64>,
    /// See `recorded_epoch`.
    pub recorded_ms: Option<u64>,
    /// The latest commit not recorded yet (the one the next try writes).
    pub pending_epoch: Option<u64>,
    /// Why the last write failed (kept after catching up).
    pub last_error: Option<String>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An error and its causes on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

impl Recorder {
    /// A recorder of `vm`'s commits into `history`. Errors: `vm` is not a valid VM id.
    pub fn new(history: History, vm: &str) -> Result<Recorder> {
        check_vm_id(vm)?;
        Ok(Recorder {
            history,
            vm: vm.to_owned(),
            state: Mutex::new(State::default()),
            published: Mutex::default(),
        })
    }

    /// The store.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The VM.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the commit of `epoch` with `counters`, now. True when it is recorded (and so
    /// is everything before it); false when the write failed and it is kept for the next try.
    pub fn record(&self, epoch: u64, counters: BTreeMap<String, u64>) -> bool {
        self.record_at(now_ms(), epoch, counters)
    }

    /// [`Recorder::record`] of a commit made at `time_ms` (ms since the Unix epoch).
    pub fn record_at(&self, time_ms: u64, epoch: u64, counters: BTreeMap<String, u64>) -> bool {
        let mut st = self.lock();
        // A newer commit replaces one kept back: its cumulative counters include it.
        st.pending = Some(Sample {
            vm: self.vm.clone(),
            time_ms,
            epoch,
            counters,
        });
        let done = self.write_pending(&mut st);
        self.publish(&st);
        done
    }

    /// Writes the commit kept back, if any. True when nothing is left behind.
    pub fn retry(&self) -> bool {
        let mut st = self.lock();
        if st.pending.is_none() {
            return true;
        }
        let done = self.write_pending(&mut st);
        self.publish(&st);
        done
    }

    fn write_pending(&self, st: &mut State) -> bool {
        let Some(sample) = st.pending.take() else {
            return true;
        };
        match self.history.record(&sample) {
            Ok(done) => {
                // An expired one (its minute packed or pruned: a clock set back) is not
                // recorded; the next commit's cumulative counters carry it.
                if done != crate::Recorded::Expired {
                    st.recorded = Some((sample.epoch, sample.time_ms));
                }
                st.pending = None;
                if let Some(since) = st.behind_since_ms.take() {
                    tracing::info!(
                        vm = %self.vm,
                        epoch = sample.epoch,
                        behind_ms = now_ms().saturating_sub(since),
                        failures = st.failures,
                        "the accounting history caught up"
                    );
                }
                true
            }
            Err(e) => {
                let why = chain(&e);
                st.failures += 1;
                if st.behind_since_ms.is_none() {
                    st.behind_since_ms = Some(now_ms());
                    tracing::warn!(
                        vm = %self.vm,
                        epoch = sample.epoch,
                        "the accounting history is behind (the VM runs on; the latest commit \
                         is retried, later failures are only counted): {why}"
                    );
                }
                st.last_error = Some(why);
                st.pending = Some(sample);
                false
            }
        }
    }

    /// Where it stands (as of its last write: this never waits for one in progress).
    pub fn status(&self) -> RecorderStatus {
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn publish(&self, st: &State) {
        let now = RecorderStatus {
            behind: st.behind_since_ms.is_some(),
            behind_since_ms: st.behind_since_ms,
            failures: st.failures,
            recorded_epoch: st.recorded.map(|r| r.0),
            recorded_ms: st.recorded.map(|r| r.1),
            pending_epoch: st.pending.as_ref().map(|s| s.epoch),
            last_error: st.last_error.clone(),
        };
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = now;
    }

    /// [`Recorder::status`] as a JSON object (the `history` object of a replica's status):
    /// `dir`, `vm`, `behind`, `behind_since_ms`, `write_failures`, `recorded_epoch`,
    /// `recorded_ms`, `pending_epoch`, `last_error`.
    pub fn status_json(&self) -> serde_json::Value {
        let s = self.status();
        serde_json::json!({
            "dir": self.history.dir().display().to_string(),
            "vm": self.vm,
            "behind": s.behind,
            "behind_since_ms": s.behind_since_ms,
            "write_failures": s.failures,
            "recorded_epoch": s.recorded_epoch,
            "recorded_ms": s.recorded_ms,
            "pending_epoch": s.pending_epoch,
            "last_error": s.last_error,
        })
    }

    /// At `now_ms`: [`Recorder::retry`]; then, once a minute and unless behind, packs the
    /// minutes before `now_ms - PACK_LAG_MS`. A failed pack is logged and left for the next
    /// minute (the samples are recorded, only not packed yet).
    pub fn tick(&self, now_ms: u64) {
        let due = {
            let mut st = self.lock();
            let due = self.pack_due(&mut st, now_ms);
            self.publish(&st);
            due
        };
        // Packing takes a while: not under the state's lock, which each commit's record
        // needs (the store orders a pack and a record itself).
        if due && let Err(e) = self.history.pack(now_ms.saturating_sub(PACK_LAG_MS)) {
            let why = chain(&e);
            tracing::warn!(vm = %self.vm, "cannot pack the accounting history (tried again in a minute): {why}");
            let mut st = self.lock();
            st.last_error = Some(why);
            self.publish(&st);
        }
    }

    /// Retries a pending sample; then whether a pack is due (once a minute, unless behind),
    /// counting it as done.
    fn pack_due(&self, st: &mut State, now_ms: u64) -> bool {
        if st.pending.is_some() && !self.write_pending(st) {
            return false;
        }
        if st
            .packed_at_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < PACK_MS)
        {
            return false;
        }
        st.packed_at_ms = Some(now_ms);
        true
    }

    /// Calls [`Recorder::tick`] every `period` on a thread of its own until the returned
    /// guard is dropped (or [`Timer::stop`]ped), so that a recorder that fell behind catches
    /// up even when no commit comes any more, and the history gets packed.
    pub fn tick_every(self: &Arc<Self>, period: Duration) -> std::io::Result<Timer> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let me = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("history".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                    let ticked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        me.tick(now_ms())
                    }));
                    if let Err(panic) = ticked {
                        // Said now, with its cause (retries and packing stop with it), and
                        // again by the join.
                        tracing::error!(
                            vm = %me.vm,
                            "the history thread panicked: {}",
                            panic_text(panic.as_ref())
                        );
                        std::panic::resume_unwind(panic);
                    }
                }
            })?;
        Ok(Timer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("vm", &self.vm)
            .field("history", &self.history)
            .field("status", &self.status())
            .finish()
    }
}

/// The thread of [`Recorder::tick_every`]; stops it when dropped.
#[derive(Debug)]
pub struct Timer {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Timer {
    /// Stops the thread and waits for it; an error when it panicked.
    pub fn stop(mut self) -> std::result::Result<(), String> {
        self.finish()
    }

    fn finish(&mut self) -> std::result::Result<(), String> {
        drop(self.stop.take());
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(panic)) => Err(format!(
                "the history thread panicked: {}",
                panic_text(panic.as_ref())
            )),
            _ => Ok(()),
        }
    }
}

/// A panic's message.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::error!("{e}");
        }
    }
}
