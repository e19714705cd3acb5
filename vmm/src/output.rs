//! The output gate: every byte the guest says to the world (network frames, console bytes)
//! passes through it. Open, it writes at once. Holding, it queues each output tagged with the
//! generation it was produced in, and writes a generation's outputs, in order, only when told
//! that generation may go ([`OutputGate::release`]). The VMM knows nothing of why; protection
//! seals a generation in each checkpoint's pause and releases it when the replica has
//! acknowledged that checkpoint, so nothing leaves before the state that produced it is safe.
//!
//! The queue is bounded ([`DEFAULT_LIMIT`] bytes). When it is full, devices stop taking output
//! from the guest (a network card leaves frames in its transmit ring: the guest sees
//! backpressure, nothing is dropped) until a release makes room; they are woken through the
//! event descriptors given to [`OutputGate::add_waiter`]. The console, whose writes cannot
//! wait, may exceed the bound (a guest prints far less than it sends).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// Bytes the gate holds before devices stop taking output.
pub const DEFAULT_LIMIT: usize = 32 << 20;
/// Room a network card needs before it takes another frame (the largest frame it sends).
pub const FRAME_ROOM: usize = 65_562;

/// Where released output goes.
pub struct Sink {
    out: Box<dyn Write + Send>,
    /// Console bytes: consecutive writes of one generation are merged into one queued item.
    merge: bool,
    name: String,
}

struct Held {
    generation: u64,
    sink: usize,
    data: Vec<u8>,
    since: Instant,
}

/// What the gate has done, for status and metrics. Counters are monotonic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputStats {
    /// Whether output is being held now.
    pub holding: bool,
    /// Items (frames, console writes) held now.
    pub held_items: u64,
    /// Bytes held now.
    pub held_bytes: u64,
    /// The most bytes ever held at once.
    pub high_water_bytes: u64,
    /// Items written after being held.
    pub released_items: u64,
    /// Bytes written after being held.
    pub released_bytes: u64,
    /// Items that went out at once (the gate was open).
    pub passed_items: u64,
    /// Times a device found the gate full and stopped taking output.
    pub full: u64,
    /// Writes that failed at release (the item is dropped and counted here).
    pub write_errors: u64,
    /// How long released items were held: counts per power-of-two bucket of microseconds
    /// (bucket i: [2^i, 2^(i+1)) µs; bucket 0 also holds 0).
    pub hold_us_log2: [u64; 32],
    /// The sum of those hold times, in nanoseconds (with the buckets, a Prometheus histogram).
    pub hold_ns_sum: u64,
}

impl OutputStats {
    /// The hold time below which a fraction `q` (0..=1) of released items fall, as the upper
    /// edge of its power-of-two bucket (None before any release).
    pub fn hold_quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.hold_us_log2.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.hold_us_log2.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(Duration::from_micros(1u64 << (i + 1).min(63)));
            }
        }
        None
    }
}

/// What one release (or opening) wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Items of frame sinks (network frames).
    pub frames: u64,
    /// Their bytes.
    pub frame_bytes: u64,
    /// Bytes of merging sinks (the console).
    pub console_bytes: u64,
}

impl Released {
    /// Nothing was written.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

struct Inner {
    holding: bool,
    /// The generation new output is tagged with.
    generation: u64,
    queue: VecDeque<Held>,
    bytes: usize,
    limit: usize,
    sinks: Vec<Sink>,
    waiters: Vec<EventFd>,
    /// A device found the gate full since the last release.
    blocked: bool,
    /// Rung when output starts waiting, or still waits after a release.
    doorbell: Option<Box<dyn Fn() + Send>>,
    stats: OutputStats,
}

/// The gate (see the module documentation). Shared by the devices and the VM's owner.
pub struct OutputGate {
    inner: Mutex<Inner>,
}

impl Default for OutputGate {
    fn default() -> Self {
        Self::new(DEFAULT_LIMIT)
    }
}

impl OutputGate {
    /// An open gate that holds at most `limit` bytes when holding.
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                holding: false,
                generation: 0,
                queue: VecDeque::new(),
                bytes: 0,
                limit,
                sinks: Vec::new(),
                waiters: Vec::new(),
                blocked: false,
                doorbell: None,
                stats: OutputStats::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a place output goes to; returns its number for [`Self::emit`]. `merge` joins
    /// consecutive writes (a console's bytes); without it each write stays one item (a frame).
    pub fn add_sink(&self, name: &str, out: Box<dyn Write + Send>, merge: bool) -> usize {
        let mut g = self.lock();
        g.sinks.push(Sink {
            out,
            merge,
            name: name.to_string(),
        });
        g.sinks.len() - 1
    }

    /// An event descriptor written when a release makes room after a device found the gate
    /// full.
    pub fn add_waiter(&self, evt: EventFd) {
        self.lock().waiters.push(evt);
    }

    /// Sets what is called when held output starts waiting (the queue was empty) and when
    /// output still waits after a release: a checkpoint policy can start one early.
    pub fn set_doorbell(&self, ring: Box<dyn Fn() + Send>) {
        self.lock().doorbell = Some(ring);
    }

    /// Whether `len` more bytes fit; when not, the caller should stop taking output until its
    /// waiter fires (counted as one `full` event per stop).
    pub fn has_room(&self, len: usize) -> bool {
        let mut g = self.lock();
        if !g.holding || g.bytes + len <= g.limit {
            return true;
        }
        if !g.blocked {
            g.blocked = true;
            g.stats.full += 1;
        }
        false
    }

    /// Writes `data` to sink `sink` at once (open, nothing queued) or queues it.
    pub fn emit(&self, sink: usize, data: &[u8]) -> std::io::Result<()> {
        let mut g = self.lock();
        let g = &mut *g;
        let Some(merge) = g.sinks.get(sink).map(|s| s.merge) else {
            return Err(std::io::Error::other(format!("no output sink {sink}")));
        };
        if !g.holding {
            // Anything still queued goes first (the gate opens in one step, so this is rare).
            release_locked(g, u64::MAX);
            g.stats.passed_items += 1;
            return write_item(&mut g.sinks[sink], data);
        }
        let generation = g.generation;
        match g.queue.back_mut() {
            Some(last) if merge && last.sink == sink && last.generation == generation => {
                last.data.extend_from_slice(data);
            }
            _ => {
                if g.queue.is_empty()
                    && let Some(ring) = &g.doorbell
                {
                    ring();
                }
                g.queue.push_back(Held {
                    generation,
                    sink,
                    data: data.to_vec(),
                    since: Instant::now(),
                });
                g.stats.held_items += 1;
            }
        }
        g.bytes += data.len();
        g.stats.held_bytes = g.bytes as u64;
        g.stats.high_water_bytes = g.stats.high_water_bytes.max(g.bytes as u64);
        Ok(())
    }

    /// Starts holding output (from the current generation on).
    pub fn hold(&self) {
        self.lock().holding = true;
    }

    /// Closes the current generation (call it while the VM is paused, with the checkpoint
    /// that covers it): returns its number; output from now on belongs to the next one.
    pub fn seal(&self) -> u64 {
        let mut g = self.lock();
        let sealed = g.generation;
        g.generation += 1;
        sealed
    }

    /// Writes, in order, every held output of generations up to `upto`; returns what it
    /// wrote. A failed write drops that item and is counted.
    pub fn release(&self, upto: u64) -> Released {
        release_locked(&mut self.lock(), upto)
    }

    /// Stops holding: everything held goes out now, and later output at once.
    pub fn open(&self) -> Released {
        let mut g = self.lock();
        g.holding = false;
        let released = release_locked(&mut g, u64::MAX);
        wake(&mut g);
        released
    }

    /// Figures so far.
    pub fn stats(&self) -> OutputStats {
        let g = self.lock();
        OutputStats {
            holding: g.holding,
            ..g.stats.clone()
        }
    }
}

fn release_locked(g: &mut Inner, upto: u64) -> Released {
    let (mut items, mut bytes) = (0u64, 0u64);
    let mut out = Released::default();
    while g.queue.front().is_some_and(|h| h.generation <= upto) {
        let Some(h) = g.queue.pop_front() else { break };
        g.bytes -= h.data.len();
        let held_ns = h.since.elapsed().as_nanos() as u64;
        g.stats.hold_ns_sum = g.stats.hold_ns_sum.saturating_add(held_ns);
        let held = held_ns / 1000;
        let bucket = (64 - held.leading_zeros()).saturating_sub(1).min(31) as usize;
        g.stats.hold_us_log2[bucket] += 1;
        g.stats.held_items -= 1;
        if let Some(s) = g.sinks.get_mut(h.sink)
            && let Err(e) = write_item(s, &h.data)
        {
            if g.stats.write_errors == 0 {
                tracing::warn!(
                    "output to {} failed (later failures are counted): {e}",
                    s.name
                );
            }
            g.stats.write_errors += 1;
        }
        items += 1;
        bytes += h.data.len() as u64;
        if g.sinks.get(h.sink).is_some_and(|s| s.merge) {
            out.console_bytes += h.data.len() as u64;
        } else {
            out.frames += 1;
            out.frame_bytes += h.data.len() as u64;
        }
    }
    g.stats.released_items += items;
    g.stats.released_bytes += bytes;
    g.stats.held_bytes = g.bytes as u64;
    if items > 0 {
        wake(g);
    }
    if g.holding
        && !g.queue.is_empty()
        && let Some(ring) = &g.doorbell
    {
        ring();
    }
    out
}

/// Wakes the devices that found the gate full.
fn wake(g: &mut Inner) {
    if g.blocked {
        g.blocked = false;
        for w in &g.waiters {
            let _ = w.write(1);
        }
    }
}

fn write_item(s: &mut Sink, data: &[u8]) -> std::io::Result<()> {
    if s.merge {
        s.out.write_all(data)
    } else {
        // One frame, one write: a TAP takes a frame whole or not at all.
        match s.out.write(data)? {
            n if n == data.len() => Ok(()),
            n => Err(std::io::Error::other(format!(
                "{n} of {} bytes written",
                data.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);
    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Recorder {
        fn take(&self) -> Vec<Vec<u8>> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    fn gate(limit: usize) -> (OutputGate, Recorder, Recorder) {
        let g = OutputGate::new(limit);
        let (net, console) = (Recorder::default(), Recorder::default());
        assert_eq!(g.add_sink("net", Box::new(net.clone()), false), 0);
        assert_eq!(g.add_sink("console", Box::new(console.clone()), true), 1);
        (g, net, console)
    }

    #[test]
    fn an_open_gate_writes_at_once() {
        let (g, net, console) = gate(100);
        g.emit(0, b"frame").unwrap();
        g.emit(1, b"x").unwrap();
        assert_eq!(net.take(), [b"frame".to_vec()]);
        assert_eq!(console.take(), [b"x".to_vec()]);
        assert_eq!(g.stats().passed_items, 2);
        assert!(g.emit(2, b"?").is_err(), "no such sink");
    }

    #[test]
    fn held_output_leaves_in_order_when_its_generation_is_released() {
        let (g, net, console) = gate(1000);
        g.hold();
        let g0 = g.seal();
        g.emit(0, b"a1").unwrap();
        g.emit(1, b"he").unwrap();
        g.emit(1, b"llo").unwrap();
        g.emit(0, b"a2").unwrap();
        let g1 = g.seal();
        g.emit(0, b"b1").unwrap();
        g.emit(1, b"!").unwrap();
        let g2 = g.seal();
        assert!(net.take().is_empty() && console.take().is_empty());
        assert!(g.release(g0).is_empty(), "nothing was produced in {g0}");
        let r = g.release(g1);
        assert_eq!((r.frames, r.frame_bytes, r.console_bytes), (2, 4, 5));
        assert_eq!(net.take(), [b"a1".to_vec(), b"a2".to_vec()]);
        assert_eq!(console.take(), [b"hello".to_vec()], "merged console bytes");
        assert_eq!(g.stats().held_bytes, 3);
        let r = g.release(g2);
        assert_eq!((r.frames, r.frame_bytes, r.console_bytes), (1, 2, 1));
        assert_eq!(net.take(), [b"b1".to_vec()]);
        assert_eq!(console.take(), [b"!".to_vec()]);
        let s = g.stats();
        assert_eq!(
            (s.released_items, s.released_bytes, s.held_items),
            (5, 12, 0)
        );
        assert_eq!(s.high_water_bytes, 12);
        assert!(s.hold_quantile(0.99).is_some());
        // Five items were held from their emit to now: the sum covers them all.
        assert!(s.hold_ns_sum > 0, "{s:?}");
        assert_eq!(s.hold_us_log2.iter().sum::<u64>(), 5);
    }

    #[test]
    fn a_full_gate_stops_devices_until_a_release_makes_room() {
        let (g, net, _) = gate(10);
        let waiter = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        g.add_waiter(waiter.try_clone().unwrap());
        g.hold();
        // Limit - 1, limit, limit + 1.
        assert!(g.has_room(10));
        g.emit(0, b"123456789").unwrap();
        assert!(g.has_room(1), "9 + 1 = the limit");
        assert!(!g.has_room(2), "one past the limit");
        assert!(!g.has_room(2));
        assert_eq!(g.stats().full, 1, "one stop counted once");
        assert!(waiter.read().is_err(), "not woken yet");
        let sealed = g.seal();
        g.release(sealed);
        assert_eq!(waiter.read().unwrap(), 1, "woken by the release");
        assert!(g.has_room(10));
        assert_eq!(net.take().len(), 1);
    }

    #[test]
    fn the_doorbell_rings_when_output_starts_waiting_and_when_it_still_waits() {
        let (g, _, _) = gate(1000);
        let rings = Arc::new(Mutex::new(0));
        let r = rings.clone();
        g.set_doorbell(Box::new(move || *r.lock().unwrap() += 1));
        g.emit(0, b"open: no ring").unwrap();
        assert_eq!(*rings.lock().unwrap(), 0);
        g.hold();
        g.emit(0, b"first").unwrap();
        g.emit(0, b"second").unwrap();
        assert_eq!(
            *rings.lock().unwrap(),
            1,
            "one ring for a queue that was empty"
        );
        let first = g.seal();
        g.emit(0, b"third").unwrap();
        g.release(first);
        assert_eq!(
            *rings.lock().unwrap(),
            2,
            "output still waits after the release"
        );
        g.release(g.seal());
        assert_eq!(*rings.lock().unwrap(), 2, "nothing waits");
    }

    #[test]
    fn opening_releases_everything_and_passes_later_output() {
        let (g, net, _) = gate(100);
        g.hold();
        g.emit(0, b"held").unwrap();
        assert_eq!(g.open().frame_bytes, 4);
        g.emit(0, b"now").unwrap();
        assert_eq!(net.take(), [b"held".to_vec(), b"now".to_vec()]);
        assert!(!g.stats().holding);
    }
}
