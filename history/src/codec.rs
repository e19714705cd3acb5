//! The stored values, read step by step without allocating per step.
//!
//! Three kinds of value sit under a sample key:
//!
//! - a single step ([`VALUE_VERSION`], see `encode`): its points (rolled-back peaks, then the
//!   last) with (name id, value) pairs;
//! - a packed minute of format 3 ([`PACK_VERSION`]): each step's offset in the minute and its
//!   single-step bytes;
//! - a packed minute of format 4 ([`PACK_DELTA_VERSION`], what [`super::History::pack`]
//!   writes): each step's offset and either its single-step bytes (`FULL`), or (`DELTA`) how
//!   much time, epoch and each counter grew since the step before's last point, when the step
//!   is one point with the same counters, none lower, at a time and epoch no lower. Counters
//!   are cumulative, so a delta is a few small varints: a minute's raw bytes shrink to about a
//!   third, and decoding it is an addition per counter.

use super::{PACK_DELTA_VERSION, PACK_MS, PACK_VERSION, Reader, VALUE_VERSION, put_varint};

const FULL: u8 = 0;
const DELTA: u8 = 1;

/// A decoded point: counter name ids and their values, in name order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct IdPoint {
    pub time_ms: u64,
    pub epoch: u64,
    pub ids: Vec<u32>,
    pub values: Vec<u64>,
}

type Res<T> = std::result::Result<T, String>;

/// Decodes single-step bytes into `points` (cleared first; vectors of `spare` reused).
pub(crate) fn decode_step(
    bytes: &[u8],
    names: usize,
    points: &mut Vec<IdPoint>,
    spare: &mut Vec<IdPoint>,
) -> Res<()> {
    spare.append(points);
    let mut r = Reader(bytes);
    let head = r.take(2)?;
    if head[0] != VALUE_VERSION {
        return Err(format!("a sample of format {}", head[0]));
    }
    for _ in 0..=head[1] {
        let mut p = spare.pop().unwrap_or_default();
        p.ids.clear();
        p.values.clear();
        p.time_ms = r.varint()?;
        p.epoch = r.varint()?;
        let n = r.varint()?;
        if n > super::MAX_COUNTERS as u64 {
            return Err(format!("a sample with {n} counters"));
        }
        for _ in 0..n {
            let id = r.varint()?;
            if id >= names as u64 {
                return Err(format!("an unknown counter name id {id}"));
            }
            p.ids.push(id as u32);
            p.values.push(r.varint()?);
        }
        points.push(p);
    }
    if !r.0.is_empty() {
        return Err("trailing bytes after a sample".into());
    }
    Ok(())
}

/// The steps of one stored value, in order.
pub(crate) struct Steps<'a> {
    key_step: u64,
    r: Reader<'a>,
    format: u8,
    left: u64,
    last_step: Option<u64>,
}

impl<'a> Steps<'a> {
    /// The steps of the value stored under the key of `key_step`.
    pub fn new(key_step: u64, bytes: &'a [u8]) -> Res<Steps<'a>> {
        let format = *bytes.first().ok_or("an empty value")?;
        let mut r = Reader(bytes);
        let left = match format {
            PACK_VERSION | PACK_DELTA_VERSION => {
                r.take(1)?;
                let n = r.varint()?;
                if n == 0 || n > PACK_MS {
                    return Err(format!("a packed minute of {n} steps"));
                }
                n
            }
            _ => 1,
        };
        Ok(Steps {
            key_step,
            r,
            format,
            left,
            last_step: None,
        })
    }

    /// Decodes the next step into `points`: its start, and whether it is a delta of the step
    /// before (then `points`, which held that step, now holds its one new point). None after
    /// the last step.
    pub fn next(
        &mut self,
        names: usize,
        points: &mut Vec<IdPoint>,
        spare: &mut Vec<IdPoint>,
    ) -> Res<Option<(u64, bool)>> {
        if self.left == 0 {
            if !self.r.0.is_empty() {
                return Err("trailing bytes after a packed minute".into());
            }
            return Ok(None);
        }
        self.left -= 1;
        if self.format != PACK_VERSION && self.format != PACK_DELTA_VERSION {
            let all = std::mem::take(&mut self.r.0);
            decode_step(all, names, points, spare)?;
            return Ok(Some((self.key_step, false)));
        }
        let offset = self.r.varint()?;
        let step = self
            .key_step
            .checked_add(offset)
            .filter(|s| offset < PACK_MS && self.last_step.is_none_or(|l| *s > l))
            .ok_or("a packed minute with steps out of order")?;
        let first = self.last_step.is_none();
        self.last_step = Some(step);
        let kind = if self.format == PACK_DELTA_VERSION {
            self.r.take(1)?[0]
        } else {
            FULL
        };
        match kind {
            FULL => {
                let len = usize::try_from(self.r.varint()?).map_err(|_| "a step too long")?;
                let body = self.r.take(len)?;
                if body.first() != Some(&VALUE_VERSION) {
                    return Err("a packed minute holding something other than steps".into());
                }
                decode_step(body, names, points, spare)?;
                Ok(Some((step, false)))
            }
            DELTA if !first => {
                let keep = points
                    .len()
                    .checked_sub(1)
                    .ok_or("a delta without a step before it")?;
                if keep > 0 {
                    spare.extend(points.drain(..keep));
                }
                let p = &mut points[0];
                let overflow = || "a delta past 2^64".to_string();
                p.time_ms = p
                    .time_ms
                    .checked_add(self.r.varint()?)
                    .ok_or_else(overflow)?;
                p.epoch = p.epoch.checked_add(self.r.varint()?).ok_or_else(overflow)?;
                for v in &mut p.values {
                    *v = v.checked_add(self.r.varint()?).ok_or_else(overflow)?;
                }
                Ok(Some((step, true)))
            }
            DELTA => Err("a packed minute that starts with a delta".into()),
            k => Err(format!("a packed step of kind {k}")),
        }
    }
}

/// The single-step bytes of `points` (peaks, then the last point).
pub(crate) fn encode_step(points: &[IdPoint]) -> Vec<u8> {
    let mut out = vec![VALUE_VERSION, (points.len() - 1) as u8];
    for p in points {
        put_varint(&mut out, p.time_ms);
        put_varint(&mut out, p.epoch);
        put_varint(&mut out, p.ids.len() as u64);
        for (id, v) in p.ids.iter().zip(&p.values) {
            put_varint(&mut out, u64::from(*id));
            put_varint(&mut out, *v);
        }
    }
    out
}

impl IdPoint {
    /// The point with its counters named.
    pub fn to_point(&self, names: &[String]) -> super::Point {
        super::Point {
            time_ms: self.time_ms,
            epoch: self.epoch,
            counters: self
                .ids
                .iter()
                .zip(&self.values)
                .map(|(id, v)| (names[*id as usize].clone(), *v))
                .collect(),
        }
    }

    /// A view of the point with its counters named (into `counters`, cleared first).
    pub fn view<'n>(
        &self,
        names: &'n [String],
        mut counters: Vec<(&'n str, u64)>,
    ) -> super::PointView<'n> {
        counters.clear();
        counters.extend(
            self.ids
                .iter()
                .zip(&self.values)
                .map(|(id, v)| (names[*id as usize].as_str(), *v)),
        );
        super::PointView {
            time_ms: self.time_ms,
            epoch: self.epoch,
            counters,
        }
    }
}

/// A packed minute (format 4) of `steps`, each a step's start and its points (at least one).
pub(crate) fn encode_minute(minute: u64, steps: &[(u64, Vec<IdPoint>)]) -> Vec<u8> {
    let mut out = vec![PACK_DELTA_VERSION];
    put_varint(&mut out, steps.len() as u64);
    let mut before: Option<&IdPoint> = None;
    for (step, points) in steps {
        put_varint(&mut out, step - minute);
        let delta = match (before, points.as_slice()) {
            (Some(b), [p])
                if p.ids == b.ids
                    && p.time_ms >= b.time_ms
                    && p.epoch >= b.epoch
                    && p.values.iter().zip(&b.values).all(|(now, was)| now >= was) =>
            {
                Some((b, p))
            }
            _ => None,
        };
        match delta {
            Some((b, p)) => {
                out.push(DELTA);
                put_varint(&mut out, p.time_ms - b.time_ms);
                put_varint(&mut out, p.epoch - b.epoch);
                for (now, was) in p.values.iter().zip(&b.values) {
                    put_varint(&mut out, now - was);
                }
            }
            None => {
                out.push(FULL);
                let bytes = encode_step(points);
                put_varint(&mut out, bytes.len() as u64);
                out.extend_from_slice(&bytes);
            }
        }
        before = points.last();
    }
    out
}
