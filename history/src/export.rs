//! The billing export: per VM and interval, the usage between the committed counters at the
//! interval's start and at its last committed epoch — so the totals reconcile exactly with
//! those counters — with the epoch sequence checked (a repeat must carry the same counters;
//! an epoch lower than the one before is a rollback, whose rolled-back work is reported apart
//! and not billed).
//!
//! The interval `[from, to)` starts at the last point before `from` (or the VM's start, epoch
//! 0 with all counters 0, when it has none; or its first retained point when retention cut
//! the history before `from`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::codec::IdPoint;
use crate::{History, HistoryError, Point, Result, names};

/// What to export.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// One VM, or all.
    pub vm: Option<String>,
    /// Start, ms since the Unix epoch (inclusive); none: from the beginning.
    pub from_ms: Option<u64>,
    /// End, ms (exclusive); none: to the end.
    pub to_ms: Option<u64>,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One `billed` line per VM and one `rolled_back` line per rollback.
    Csv,
    /// One document with every counter.
    Json,
}

/// Where a VM's interval starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// At the VM's start: epoch 0, all counters 0.
    VmStart,
    /// At the last point before `from`.
    Before,
    /// At the first point retention kept (the history before it was deleted).
    Retained,
}

impl Start {
    fn name(self) -> &'static str {
        match self {
            Start::VmStart => "vm_start",
            Start::Before => "sample",
            Start::Retained => "retention_cut",
        }
    }
}

/// Work a failover rolled back: the counters went from `from_epoch` back to `to_epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rollback {
    /// When the lower epoch was committed, ms.
    pub at_ms: u64,
    /// The epoch whose work was lost.
    pub from_epoch: u64,
    /// The epoch the VM continued from.
    pub to_epoch: u64,
    /// The rolled-back amount of each counter.
    pub counters: BTreeMap<String, u64>,
}

/// One VM's usage over an interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    /// The VM.
    pub vm: String,
    /// How the interval starts.
    pub start: Start,
    /// The time of the starting point (none at the VM's start).
    pub start_ms: Option<u64>,
    /// The epoch of the starting point.
    pub start_epoch: u64,
    /// The time of the last committed point in the interval.
    pub end_ms: u64,
    /// The last committed epoch in the interval.
    pub end_epoch: u64,
    /// Steps in the interval.
    pub samples: u64,
    /// Billed: counters at `end_epoch` minus counters at the start, each counter.
    pub billed: BTreeMap<String, u64>,
    /// The counters at `end_epoch`, to reconcile with.
    pub end_counters: BTreeMap<String, u64>,
    /// Points that repeated the epoch before them (same counters; billed once).
    pub repeats: u64,
    /// Rolled-back work, reported apart and not billed.
    pub rollbacks: Vec<Rollback>,
}

impl Usage {
    /// The billed amounts summed into [`names::COLUMNS`].
    pub fn columns(&self) -> [u64; names::COLUMNS.len()] {
        columns(&self.billed)
    }
}

fn columns(counters: &BTreeMap<String, u64>) -> [u64; names::COLUMNS.len()] {
    let mut out = [0u64; names::COLUMNS.len()];
    for (name, v) in counters {
        if let Some(i) = names::column(name) {
            out[i] = out[i].saturating_add(*v);
        }
    }
    out
}

fn seconds(ns: u64) -> String {
    format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// Checks the range: `from < to` when both are given.
pub fn check_range(from_ms: Option<u64>, to_ms: Option<u64>) -> Result<()> {
    match (from_ms, to_ms) {
        (Some(f), Some(t)) if f > t => Err(HistoryError::Invalid(format!(
            "the range is reversed: --from {f} is after --to {t}"
        ))),
        (Some(f), Some(t)) if f == t => Err(HistoryError::Invalid(format!(
            "the range is empty: --from and --to are both {f}"
        ))),
        _ => Ok(()),
    }
}

/// The usage of each VM the query selects. Errors: a bad range, an unknown VM, no samples in
/// the range, or an epoch sequence whose counters do not add up.
pub fn export(history: &History, query: &Query) -> Result<Vec<Usage>> {
    check_range(query.from_ms, query.to_ms)?;
    let from = query.from_ms.unwrap_or(0);
    let to = query.to_ms;
    let vms = history.vm_ids()?;
    let selected = match &query.vm {
        Some(vm) => {
            crate::check_vm_id(vm)?;
            if !vms.contains(vm) {
                return Err(HistoryError::Invalid(format!(
                    "unknown VM {vm}: the history at {} has {}",
                    history.dir().display(),
                    if vms.is_empty() {
                        "no VMs".to_string()
                    } else {
                        vms.join(", ")
                    }
                )));
            }
            vec![vm.clone()]
        }
        None => vms,
    };
    let mut out = Vec::new();
    for vm in &selected {
        if let Some(u) = usage(history, vm, from, to)? {
            out.push(u);
        }
    }
    if out.is_empty() {
        return Err(HistoryError::Invalid(format!(
            "no samples{} in [{}, {})",
            query
                .vm
                .as_ref()
                .map(|v| format!(" of VM {v}"))
                .unwrap_or_default(),
            from,
            query
                .to_ms
                .map(|t| t.to_string())
                .unwrap_or_else(|| "end".into())
        )));
    }
    Ok(out)
}

/// One VM's usage in `[from, to)`; none when it has no samples there.
pub fn usage(history: &History, vm: &str, from: u64, to: Option<u64>) -> Result<Option<Usage>> {
    let (start, base) = match history.before(vm, from)? {
        Some(s) => (Start::Before, Some(s.last)),
        None if history.pruned_before(vm)?.is_some() => (Start::Retained, None),
        None => (
            Start::VmStart,
            Some(Point {
                time_ms: 0,
                epoch: 0,
                counters: BTreeMap::new(),
            }),
        ),
    };
    let mut walk = Walk {
        vm,
        base,
        prev: None,
        from_zero: start == Start::VmStart,
        samples: 0,
        repeats: 0,
        rollbacks: Vec::new(),
        delta: IdPoint::default(),
        delta_live: false,
    };
    history.scan_ids(vm, from, to, |_, points, delta, names| {
        walk.samples += 1;
        if delta {
            return walk.step_delta(&points[0]);
        }
        walk.settle();
        for p in points {
            if !walk.step_fast(p, names)? {
                walk.step(&p.to_point(names))?;
            }
        }
        Ok(())
    })?;
    walk.settle();
    let Walk {
        base,
        prev,
        samples,
        repeats,
        rollbacks,
        ..
    } = walk;
    let (Some(base), Some(last)) = (base, prev) else {
        return Ok(None);
    };
    let mut billed = BTreeMap::new();
    for (name, &v) in &last.counters {
        let b = base.counters.get(name).copied().unwrap_or(0);
        let d = v.checked_sub(b).ok_or_else(|| {
            HistoryError::Invalid(format!(
                "vm {vm}: counter {name} at epoch {} ({v}) is below its value at the interval's start, epoch {} ({b}): work billed before the interval was rolled back; export a range that starts earlier",
                last.epoch, base.epoch
            ))
        })?;
        billed.insert(name.clone(), d);
    }
    Ok(Some(Usage {
        vm: vm.to_owned(),
        start,
        start_ms: (start != Start::VmStart).then_some(base.time_ms),
        start_epoch: base.epoch,
        end_ms: last.time_ms,
        end_epoch: last.epoch,
        samples,
        billed,
        end_counters: last.counters,
        repeats,
        rollbacks,
    }))
}

struct Walk<'a> {
    vm: &'a str,
    /// The starting point; none until the first point when starting at a retention cut.
    base: Option<Point>,
    prev: Option<Point>,
    /// The base is the VM's start (all counters 0, before any epoch, epoch 0 included).
    from_zero: bool,
    samples: u64,
    repeats: u64,
    rollbacks: Vec<Rollback>,
    /// The last point of a run of deltas, newer than `prev` while `delta_live`: copied here
    /// (a few words) rather than into `prev`'s map at each step.
    delta: IdPoint,
    delta_live: bool,
}

impl Walk<'_> {
    /// The usual step: a later epoch with the same counters as the point before, checked and
    /// taken without allocating. False when the general [`Walk::step`] must do it.
    fn step_fast(&mut self, p: &IdPoint, names: &[String]) -> Result<bool> {
        let Some(prev) = &mut self.prev else {
            return Ok(false);
        };
        if p.epoch <= prev.epoch
            || prev.counters.len() != p.ids.len()
            || !prev
                .counters
                .keys()
                .zip(&p.ids)
                .all(|(a, id)| *a == names[*id as usize])
        {
            return Ok(false);
        }
        if prev
            .counters
            .values()
            .zip(&p.values)
            .any(|(was, now)| now < was)
        {
            return Ok(false); // the general step names the counter in its error
        }
        for (was, now) in prev.counters.values_mut().zip(&p.values) {
            *was = *now;
        }
        prev.epoch = p.epoch;
        prev.time_ms = p.time_ms;
        Ok(true)
    }

    /// A step stored as a delta of the point before, which this walk took last: the same
    /// counters, none lower, at an epoch no lower (see `codec`). Only the epoch is left to
    /// check.
    fn step_delta(&mut self, p: &IdPoint) -> Result<()> {
        let vm = self.vm;
        let (epoch, same) = if self.delta_live {
            (self.delta.epoch, self.delta.values == p.values)
        } else {
            let prev = self
                .prev
                .as_ref()
                .filter(|prev| prev.counters.len() == p.values.len())
                .ok_or_else(|| {
                    HistoryError::Invalid(format!(
                        "vm {vm}: a stored delta at epoch {} does not follow its point",
                        p.epoch
                    ))
                })?;
            (prev.epoch, prev.counters.values().eq(p.values.iter()))
        };
        if p.epoch == epoch {
            if !same {
                return Err(HistoryError::Invalid(format!(
                    "vm {vm}: epoch {} appears twice with different counters",
                    p.epoch
                )));
            }
            self.repeats += 1;
        }
        self.delta.time_ms = p.time_ms;
        self.delta.epoch = p.epoch;
        self.delta.values.clear();
        self.delta.values.extend_from_slice(&p.values);
        self.delta_live = true;
        Ok(())
    }

    /// Brings `prev` up to the last delta taken.
    fn settle(&mut self) {
        if !std::mem::take(&mut self.delta_live) {
            return;
        }
        let prev = self.prev.as_mut().expect("a delta follows a point");
        for (was, now) in prev.counters.values_mut().zip(&self.delta.values) {
            *was = *now;
        }
        prev.epoch = self.delta.epoch;
        prev.time_ms = self.delta.time_ms;
    }

    fn step(&mut self, p: &Point) -> Result<()> {
        let prev = match (&self.prev, &self.base) {
            (Some(prev), _) | (None, Some(prev)) => prev,
            (None, None) => {
                // Starting at the first retained point: it is the base, nothing billed for it.
                self.base = Some(p.clone());
                self.prev = Some(p.clone());
                return Ok(());
            }
        };
        let vm = self.vm;
        if self.from_zero && self.prev.is_none() {
            // The first point after the VM's start: anything from zero is forward.
        } else if p.epoch > prev.epoch {
            // Fast path: the same counters as before (the usual case).
            for (name, &was) in &prev.counters {
                match p.counters.get(name) {
                    Some(&now) if now >= was => {}
                    Some(&now) => {
                        return Err(HistoryError::Invalid(format!(
                            "vm {vm}: counter {name} went backwards from {was} (epoch {}) to {now} (epoch {}) without a rollback",
                            prev.epoch, p.epoch
                        )));
                    }
                    None => {
                        return Err(HistoryError::Invalid(format!(
                            "vm {vm}: counter {name} disappeared at epoch {}",
                            p.epoch
                        )));
                    }
                }
            }
        } else if p.epoch == prev.epoch {
            if p.counters != prev.counters {
                return Err(HistoryError::Invalid(format!(
                    "vm {vm}: epoch {} appears twice with different counters",
                    p.epoch
                )));
            }
            self.repeats += 1;
        } else {
            let mut lost = BTreeMap::new();
            for (name, &was) in &prev.counters {
                let now = p.counters.get(name).copied().unwrap_or(0);
                let d = was.checked_sub(now).ok_or_else(|| {
                    HistoryError::Invalid(format!(
                        "vm {vm}: rolling back from epoch {} to {}, counter {name} rose from {was} to {now}",
                        prev.epoch, p.epoch
                    ))
                })?;
                lost.insert(name.clone(), d);
            }
            if let Some(name) = p.counters.keys().find(|n| !prev.counters.contains_key(*n)) {
                return Err(HistoryError::Invalid(format!(
                    "vm {vm}: counter {name} appears when rolling back to epoch {}",
                    p.epoch
                )));
            }
            self.rollbacks.push(Rollback {
                at_ms: p.time_ms,
                from_epoch: prev.epoch,
                to_epoch: p.epoch,
                counters: lost,
            });
        }
        self.prev = Some(p.clone());
        Ok(())
    }
}

/// Renders an export.
pub fn render(history: &History, usages: &[Usage], format: Format) -> String {
    match format {
        Format::Csv => render_csv(usages),
        Format::Json => render_json(history, usages),
    }
}

fn render_csv(usages: &[Usage]) -> String {
    let mut out = String::from("kind,vm,start_ms,end_ms,from_epoch,to_epoch,samples,cpu_seconds");
    for c in names::COLUMNS {
        out.push(',');
        out.push_str(c);
    }
    out.push('\n');
    let mut line = |kind: &str,
                    vm: &str,
                    start: String,
                    end: u64,
                    e0: u64,
                    e1: u64,
                    n: String,
                    cols: [u64; names::COLUMNS.len()]| {
        let _ = write!(
            out,
            "{kind},{vm},{start},{end},{e0},{e1},{n},{}",
            seconds(cols[0])
        );
        for v in cols {
            let _ = write!(out, ",{v}");
        }
        out.push('\n');
    };
    for u in usages {
        line(
            "billed",
            &u.vm,
            u.start_ms.map(|t| t.to_string()).unwrap_or_default(),
            u.end_ms,
            u.start_epoch,
            u.end_epoch,
            u.samples.to_string(),
            u.columns(),
        );
        for r in &u.rollbacks {
            line(
                "rolled_back",
                &u.vm,
                r.at_ms.to_string(),
                r.at_ms,
                r.from_epoch,
                r.to_epoch,
                String::new(),
                columns(&r.counters),
            );
        }
    }
    out
}

fn render_json(history: &History, usages: &[Usage]) -> String {
    let column_map = |cols: [u64; names::COLUMNS.len()]| {
        let mut m = serde_json::Map::new();
        for (name, v) in names::COLUMNS.iter().zip(cols) {
            m.insert((*name).into(), v.into());
        }
        m.insert("cpu_seconds".into(), seconds(cols[0]).into());
        serde_json::Value::Object(m)
    };
    let vms: Vec<serde_json::Value> = usages
        .iter()
        .map(|u| {
            serde_json::json!({
                "vm": u.vm,
                "start": { "kind": u.start.name(), "ms": u.start_ms, "epoch": u.start_epoch },
                "end": { "ms": u.end_ms, "epoch": u.end_epoch },
                "samples": u.samples,
                "billed": column_map(u.columns()),
                "billed_counters": u.billed,
                "end_counters": u.end_counters,
                "epochs": { "repeats": u.repeats, "rollbacks": u.rollbacks.len() },
                "rolled_back": u.rollbacks.iter().map(|r| serde_json::json!({
                    "at_ms": r.at_ms,
                    "from_epoch": r.from_epoch,
                    "to_epoch": r.to_epoch,
                    "amounts": column_map(columns(&r.counters)),
                    "counters": r.counters,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "history": history.dir().display().to_string(),
        "resolution_ms": history.resolution_ms(),
        "vms": vms,
    });
    let mut s = serde_json::to_string_pretty(&doc).expect("JSON of plain values");
    s.push('\n');
    s
}

/// `ftvm accounting ls`: the VMs and their ranges, one line each.
pub fn render_ls(ranges: &[crate::VmRange]) -> String {
    let mut out =
        String::from("vm,samples,first_ms,last_ms,first_epoch,last_epoch,pruned_before_ms\n");
    for r in ranges {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{}",
            r.vm,
            r.samples,
            r.first_ms,
            r.last_ms,
            r.first_epoch,
            r.last_epoch,
            r.pruned_before_ms
                .map(|t| t.to_string())
                .unwrap_or_default()
        );
    }
    out
}

/// Parses a time for `--from`/`--to`: milliseconds since the Unix epoch (`1764234000000`) or
/// UTC as `YYYY-MM-DDTHH:MM:SS[.mmm]Z`.
pub fn parse_time(s: &str) -> Result<u64> {
    let bad = || {
        HistoryError::Invalid(format!(
            "bad time {s:?}: give milliseconds since 1970-01-01 UTC or YYYY-MM-DDTHH:MM:SS[.mmm]Z"
        ))
    };
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| bad());
    }
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[b.len() - 1] != b'Z'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<u64> {
        let t = s.get(r).ok_or_else(bad)?;
        if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        t.parse().map_err(|_| bad())
    };
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    let ms = match &s[19..s.len() - 1] {
        "" => 0,
        f if f.len() == 4 && f.starts_with('.') => num(20..23)?,
        _ => return Err(bad()),
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if y < 1970
        || !(1..=12).contains(&mo)
        || d == 0
        || d > month_days[(mo - 1) as usize]
        || h > 23
        || mi > 59
        || sec > 59
    {
        return Err(bad());
    }
    let leap_years = |y: u64| y / 4 - y / 100 + y / 400;
    let days = (y - 1970) * 365 + leap_years(y - 1) - leap_years(1969)
        + month_days[..(mo - 1) as usize].iter().sum::<u64>()
        + (d - 1);
    Ok(((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + ms)
}
