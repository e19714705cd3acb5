//! Planned switch-over, ftvm against QEMU live migration, in the same run, for an idle and a
//! busy 1 GiB guest.
//!
//! `cargo bench --bench migrate [-- RUNS [PAGES_PER_S]]` (defaults 10 runs, 25,600 pages/s:
//! 100 MiB of pages a second). Each run does, in turn: ftvm idle, QEMU idle, ftvm busy, QEMU
//! busy, ftvm stream, ftvm busy + stream, so that load drifting on the host spreads over all.
//!
//! ftvm: a protected primary (`ftvm run --mem 1G`, the test guest) and a replica with
//! `--failover` on this host, in a LAN namespace (tests/common/lan.rs); `ftvm migrate --api
//! SOCK` hands the guest over.
//! - stop → resume: from the pause (the primary's "handed over" log line's timestamp less the
//!   `total_ms` that `migrate` answers, which counts from just before the pause) to the
//!   replica's `took over … at_unix_ns` (logged once the VM is restored and announced, before
//!   its vCPU threads start); split into pause → handed over (`migrate`'s `total_ms`: pause,
//!   last checkpoint, its commit, the handover's answer) and handed over → took over (of which
//!   the replica's own `activation_us`).
//! - guests: idle (`count=0 interval-ms=1000`: asleep but for a line a second); busy (one word
//!   into one page after another over 480 MiB at PAGES_PER_S, `dirty=`); stream (`tcp-stream`
//!   read by a client); busy + stream (the stream, and a second vCPU running the busy loop).
//!   How busy each really was: pages per checkpoint (`status`'s `last_pages`) × checkpoints
//!   per second, over 1 s before the switch-over.
//! - client gap (stream guests): the last read of the stream before the replica took over →
//!   the first after, as the client's `read()` returns them (the stream's longest gap in the
//!   second before, with output released once per 25 ms epoch, is printed next to it).
//!
//! QEMU (`qemu-system-x86_64 -accel kvm -m 1G`, Debian's 7.2): two processes, the destination
//! with `-incoming tcp:127.0.0.1:PORT`, QMP `migrate` on the source with `max-bandwidth` raised
//! to 10 GiB/s (7.2's default, 128 MiB/s, is barely above the busy guest's 100 MiB/s of pages;
//! ftvm's link has no throttle) and the default 300 ms `downtime-limit`.
//! - stop → resume: the timestamps of the source's STOP event and the destination's RESUME
//!   event; also `query-migrate`'s `downtime` and `total-time`.
//! - the guest is benches/qemu_firmware.S as `-bios` (why not Linux or a protected-mode loop:
//!   see that file). Idle: halted in real mode. Busy: the same page-writing loop as ftvm's,
//!   at the same rate over 480 MiB, in 64-bit ring 3 (entered through QEMU's gdbstub). How
//!   busy it really was: the guest's page counter (RCX, read with `info registers`) over 1 s
//!   before the migration, and `query-migrate`'s `dirty-pages-rate`.
//!
//! Prints median and p99 of each and the ratio ftvm/QEMU of the medians and of the p99s. A
//! failed switch-over (either side) is printed with what the logs say, the runs go on, and the
//! bench exits 1 at the end.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::lan::{Lan, SUBNET};
use common::protection::{Replica, cert, field, protected_primary, s};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(60);
/// Each busy guest's working set, in MiB.
const WORKING_SET_MIB: u64 = 480;
const QEMU: &str = "qemu-system-x86_64";
const FIRMWARE: &str = include_str!("qemu_firmware.S");
/// Offsets of the patched words in the firmware image, and where `entry64` is once mapped.
const FW_CYCLES: usize = 0x100;
const FW_START: usize = 0x108;
const FW_END: usize = 0x110;
const FW_ENTRY64: u64 = 0xF0200;
const FW_READY: &str = "EAX=600df00d";

type Res<T> = Result<T, String>;

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Waits until `done` gives a value, polling every `every`; `what` names it in the error.
fn wait<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut done: impl FnMut() -> Res<Option<T>>,
) -> Res<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = done()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        std::thread::sleep(every);
    }
}

// ---------------------------------------------------------------------------------------
// The client of the guest's tcp-stream, keeping the time of every read.

/// Reads the guest's tcp-stream on its own thread, checking every byte against the pattern
/// and keeping (unix ns, bytes so far) for each read.
struct Stream {
    reads: Arc<Mutex<Vec<(u64, u64)>>>,
    failed: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn connect() -> Res<Self> {
        // A new guest: the client asks for its MAC afresh.
        let _ = std::process::Command::new("ip")
            .args(["neigh", "flush", "dev", "br0"])
            .output();
        let addr: std::net::SocketAddr = format!("{SUBNET}.2:19").parse().unwrap();
        let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("cannot connect to the guest's stream: {e}"))?;
        tcp.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let reads = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let failed = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, f, st) = (reads.clone(), failed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let (mut at, mut buf, mut want) = (0u64, vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
            let fail = |m: String| *f.lock().unwrap() = Some(m);
            while !st.load(Ordering::SeqCst) {
                match tcp.read(&mut buf) {
                    Ok(0) => return fail(format!("the stream ended at byte {at}")),
                    Ok(n) => {
                        let now = unix_ns();
                        ftvm_guest_abi::fill_pattern(19, at, &mut want[..n]);
                        if buf[..n] != want[..n] {
                            return fail(format!("the stream differs from byte {at} on"));
                        }
                        at += n as u64;
                        r.lock().unwrap().push((now, at));
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return fail(format!("the stream failed at byte {at}: {e}")),
                }
            }
        });
        Ok(Stream {
            reads,
            failed,
            stop,
            thread: Some(thread),
        })
    }

    fn bytes(&self) -> u64 {
        self.reads.lock().unwrap().last().map_or(0, |r| r.1)
    }

    fn check(&self) -> Res<()> {
        match self.failed.lock().unwrap().clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits until `n` more bytes than now have arrived.
    fn wait_more(&self, n: u64, what: &str) -> Res<()> {
        let from = self.bytes();
        wait(what, LIMIT, Duration::from_millis(2), || {
            self.check()?;
            Ok((self.bytes() >= from + n).then_some(()))
        })
    }

    /// The last read before `t` and the first after it (unix ns).
    fn around(&self, t: u64) -> Option<(u64, u64)> {
        let reads = self.reads.lock().unwrap();
        let last = reads.iter().rev().find(|r| r.0 < t)?.0;
        let first = reads.iter().find(|r| r.0 >= t)?.0;
        Some((last, first))
    }

    /// The longest time between two reads from `from` to `to` (unix ns).
    fn longest_gap(&self, from: u64, to: u64) -> u64 {
        let reads = self.reads.lock().unwrap();
        let times: Vec<u64> = reads
            .iter()
            .map(|r| r.0)
            .filter(|&t| t >= from && t <= to)
            .collect();
        times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }

    /// Stops the reader and reports what went wrong on the stream, if anything did.
    fn finish(mut self) -> Res<()> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| "the stream's reader panicked".to_string())?;
        }
        self.check()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("the stream's reader panicked");
        }
    }
}

// ---------------------------------------------------------------------------------------
// ftvm.

/// The ftvm guests.
#[derive(Clone, Copy)]
enum Guest {
    /// A counter printed once a second; the vCPU sleeps in between (no network).
    Idle,
    /// The TCP stream alone, which a client reads.
    Stream,
    /// Writing this many pages a second (no network), like QEMU's busy guest.
    Busy(u64),
    /// The TCP stream, and a second vCPU writing this many pages a second.
    BusyStream(u64),
}

struct FtvmRun {
    stop_resume_ms: f64,
    handed_ms: f64,
    /// From the "handed over" log line to the replica's "took over".
    handed_to_took_ms: f64,
    /// The replica's own activation time (restore and announce).
    activation_ms: f64,
    /// (last byte from the old → first from the new, the longest gap in the second before).
    client: Option<(f64, f64)>,
    pages_per_s: f64,
}

/// Unix ns of a log line's timestamp (tracing's `2026-11-27T10:35:21.123456Z`, UTC).
fn log_time(line: &str) -> Res<u64> {
    let bad = || format!("no timestamp at the start of the log line: {line}");
    let stamp = line.split_whitespace().next().ok_or_else(bad)?;
    let stamp = stamp.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = stamp.split_once('T').ok_or_else(bad)?;
    let num = |s: &str| s.parse::<i64>().map_err(|_| bad());
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || t.len() != 3 {
        return Err(bad());
    }
    let (y, m, day) = (num(d[0])?, num(d[1])?, num(d[2])?);
    // Days since 1970-01-01 of a proleptic Gregorian date (the civil-from-days inverse).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let (secs, frac) = t[2].split_once('.').unwrap_or((t[2], "0"));
    let frac_ns = format!("{frac:0<9}")[..9]
        .parse::<i64>()
        .map_err(|_| bad())?;
    let total = days * 86_400 + num(t[0])? * 3600 + num(t[1])? * 60 + num(secs)?;
    Ok((total * 1_000_000_000 + frac_ns) as u64)
}

/// How many pages a second the primary checkpoints: the pages of the last checkpoint ×
/// checkpoints per second, sampled from `status` over `over`.
fn checkpointed_pages_per_s(sock: &Path, over: Duration) -> Res<f64> {
    let sample = || -> Res<(u64, u64)> {
        let out = common::ftvm(&["status", "--api", &s(sock)], LIMIT);
        if !out.status.success() {
            return Err(format!(
                "status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let p = &v["protection"];
        Ok((
            p["epochs_committed"].as_u64().unwrap_or(0),
            p["last_pages"].as_u64().unwrap_or(0),
        ))
    };
    let (start, first) = (Instant::now(), sample()?);
    let mut pages = vec![];
    let mut last = first;
    while start.elapsed() < over {
        std::thread::sleep(Duration::from_millis(40));
        last = sample()?;
        pages.push(last.1 as f64);
    }
    let epochs_per_s = (last.0 - first.0) as f64 / start.elapsed().as_secs_f64();
    Ok(pages.iter().sum::<f64>() / pages.len().max(1) as f64 * epochs_per_s)
}

fn ftvm_once(lan: &Lan, dir: &Path, guest: Guest) -> Res<FtvmRun> {
    let (pc, rc) = (dir.join("p"), dir.join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    // Hosts are namespaces (see tests/common/lan.rs); replication on its own veth.
    lan.enter("R");
    let replica = Replica::start_with(
        &Lan::rep_addr("R"),
        &rc,
        &pfp,
        &["--failover", "--net", "tap=tapR"],
        &[],
    );
    let sock = dir.join("api.sock");
    let stream_cmdline = format!("ip={SUBNET}.2/24 tcp-stream");
    let (cmdline, vcpus) = match guest {
        Guest::Idle => ("count=0 interval-ms=1000".to_string(), "1"),
        Guest::Stream => (stream_cmdline, "1"),
        Guest::Busy(pages) => (
            format!("dirty={},{WORKING_SET_MIB}", pages.div_ceil(256)),
            "1",
        ),
        // `dirty=` shares its rate and working set between the vCPUs: vCPU 1 gets half.
        Guest::BusyStream(pages) => {
            let mib_per_s = (pages * 2).div_ceil(256);
            let dirty = format!(" @1:dirty={mib_per_s},{}", WORKING_SET_MIB * 2);
            (stream_cmdline + &dirty, "2")
        }
    };
    lan.enter("P");
    let (mut primary, log, _console) = protected_primary(&[
        "run",
        "--mem",
        "1G",
        "--vcpus",
        vcpus,
        "--net",
        "tap=tapP",
        "--api",
        &s(&sock),
        "--replica",
        &replica.addr,
        "--cert",
        &s(&pc),
        "--peer",
        &rfp,
        "--cmdline",
        &cmdline,
    ]);
    lan.enter_lan();
    let stream = match guest {
        Guest::Idle | Guest::Busy(_) => None,
        _ => {
            let stream = Stream::connect()?;
            stream.wait_more(1 << 20, "the stream before the switch-over")?;
            Some(stream)
        }
    };
    let pages_per_s = checkpointed_pages_per_s(&sock, Duration::from_secs(1))?;
    let before = unix_ns();
    let out = common::ftvm(&["migrate", "--api", &s(&sock)], LIMIT);
    if !out.status.success() {
        let tail = |log: &str| {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(12)..].join("\n")
        };
        return Err(format!(
            "ftvm migrate failed: {}the primary's log ends:\n{}\nthe replica's log ends:\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&log.lock().unwrap()),
            tail(&replica.log())
        ));
    }
    let answer: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("migrate's answer is not JSON ({e}): {out:?}"))?;
    let handed_ms = answer["total_ms"]
        .as_f64()
        .ok_or_else(|| format!("no total_ms in migrate's answer {answer}"))?;
    let child = primary.0.as_mut().unwrap();
    let status = wait(
        "the old primary's end",
        LIMIT,
        Duration::from_millis(5),
        || child.try_wait().map_err(|e| e.to_string()),
    )?;
    if !status.success() {
        return Err(format!("the old primary ended with {status}"));
    }
    let handed = wait(
        "the old primary's log",
        LIMIT,
        Duration::from_millis(5),
        || {
            let l = log.lock().unwrap();
            Ok(l.lines()
                .find(|l| l.contains("handed over:"))
                .map(str::to_string))
        },
    )?;
    replica.wait_log("took over");
    if let Some(stream) = &stream {
        stream.wait_more(1 << 20, "the stream from the new primary")?;
    }
    let took = replica.log();
    let took = took.lines().find(|l| l.contains("took over")).unwrap();
    let resumed: u64 = field(took, "at_unix_ns")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no at_unix_ns in {took}"))?;
    let activation_us: f64 = field(took, "activation_us")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no activation_us in {took}"))?;
    let handed_at = log_time(&handed)?;
    let stopped = handed_at - (handed_ms * 1e6) as u64;
    let client = match stream {
        None => None,
        Some(stream) => {
            let (last_old, first_new) = stream
                .around(resumed)
                .ok_or("the client read nothing on one side of the takeover")?;
            let steady = stream.longest_gap(before - 1_000_000_000, before);
            stream.finish()?;
            Some(((first_new - last_old) as f64 / 1e6, steady as f64 / 1e6))
        }
    };
    Ok(FtvmRun {
        stop_resume_ms: (resumed as f64 - stopped as f64) / 1e6,
        handed_ms,
        handed_to_took_ms: (resumed as f64 - handed_at as f64) / 1e6,
        activation_ms: activation_us / 1e3,
        client,
        pages_per_s,
    })
}

// ---------------------------------------------------------------------------------------
// QEMU.

/// A QEMU process, killed and waited for on drop.
struct Qemu {
    child: Option<Child>,
    qmp: Qmp,
    name: &'static str,
}

impl Qemu {
    fn start(name: &'static str, dir: &Path, fw: &Path, extra: &[&str]) -> Res<Self> {
        let qmp = dir.join(format!("{name}.qmp"));
        let gdb = dir.join(format!("{name}.gdb"));
        let mut child = Command::new(QEMU)
            .args([
                "-accel",
                "kvm",
                "-m",
                "1G",
                "-nodefaults",
                "-display",
                "none",
            ])
            .arg("-bios")
            .arg(fw)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-gdb")
            .arg(format!("unix:{},server=on,wait=off", gdb.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {QEMU}: {e}"))?;
        let qmp = match Qmp::connect(&qmp, &mut child) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let mut err = String::new();
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut err);
                }
                let _ = child.wait();
                return Err(format!("QEMU ({name}): {e}: {err}"));
            }
        };
        Ok(Qemu {
            child: Some(child),
            qmp,
            name,
        })
    }

    fn gdb_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.gdb", self.name))
    }

    /// The guest's register `reg` (`RCX`, …) from `info registers`.
    fn register(&mut self, reg: &str) -> Res<u64> {
        let text = self.qmp.hmp("info registers")?;
        let key = format!("{reg}=");
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(&key))
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .ok_or_else(|| format!("no {reg} in {text}"))
    }

    /// Ends the process with QMP `quit`; a failure to answer or to exit 0 is reported.
    fn stop(mut self) -> Res<()> {
        let mut child = self.child.take().unwrap();
        let asked = self.qmp.cmd("quit", json!({}));
        let ended = wait("QEMU's exit", LIMIT, Duration::from_millis(5), || {
            child.try_wait().map_err(|e| e.to_string())
        });
        if ended.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        asked?;
        match ended? {
            st if st.success() => Ok(()),
            st => Err(format!("QEMU ({}) ended with {st}", self.name)),
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A QMP connection: commands and the events that arrive meanwhile.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Every event so far, in order.
    events: Vec<Value>,
    partial: String,
}

impl Qmp {
    fn connect(path: &Path, child: &mut Child) -> Res<Self> {
        let sock = wait("QMP's socket", LIMIT, Duration::from_millis(10), || {
            if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("QEMU ended with {st}"));
            }
            Ok(UnixStream::connect(path).ok())
        })?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(sock.try_clone().map_err(|e| e.to_string())?),
            writer: sock,
            events: vec![],
            partial: String::new(),
        };
        let greeting = q.next(LIMIT)?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// The next message that is not an event (events are kept), within `limit`.
    fn next(&mut self, limit: Duration) -> Res<Value> {
        let deadline = Instant::now() + limit;
        loop {
            match self.reader.read_line(&mut self.partial) {
                Ok(0) => return Err("QMP closed".into()),
                Ok(_) if self.partial.ends_with('\n') => {
                    let line = std::mem::take(&mut self.partial);
                    let v: Value = serde_json::from_str(&line)
                        .map_err(|e| format!("bad QMP message ({e}): {line}"))?;
                    if v.get("event").is_some() {
                        self.events.push(v);
                    } else {
                        return Ok(v);
                    }
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(format!("QMP: {e}")),
            }
            if Instant::now() > deadline {
                return Err(format!("QMP did not answer within {limit:?}"));
            }
        }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Res<Value> {
        let msg = json!({"execute": name, "arguments": args}).to_string() + "\n";
        self.writer
            .write_all(msg.as_bytes())
            .map_err(|e| format!("QMP {name}: {e}"))?;
        let v = self.next(LIMIT)?;
        match v.get("return") {
            Some(r) => Ok(r.clone()),
            None => Err(format!("QMP {name}: {v}")),
        }
    }

    fn hmp(&mut self, line: &str) -> Res<String> {
        let r = self.cmd("human-monitor-command", json!({"command-line": line}))?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }

    /// The first event `name` at or after index `from` of [`Self::events`]: its timestamp in
    /// unix µs. Reads more events until it comes.
    fn event_us(&mut self, name: &str, from: usize) -> Res<u64> {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(e) = self.events[from.min(self.events.len())..]
                .iter()
                .find(|e| e["event"] == name)
            {
                let t = &e["timestamp"];
                return Ok(t["seconds"].as_u64().unwrap_or(0) * 1_000_000
                    + t["microseconds"].as_u64().unwrap_or(0));
            }
            if Instant::now() > deadline {
                return Err(format!("no {name} event: {:?}", self.events));
            }
            // A harmless command reads what came meanwhile.
            self.cmd("query-status", json!({}))?;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A connection to QEMU's gdbstub (the GDB remote protocol), to set registers.
struct Gdb {
    sock: BufReader<UnixStream>,
}

impl Gdb {
    fn connect(path: &Path) -> Res<Self> {
        let sock = UnixStream::connect(path).map_err(|e| format!("gdbstub: {e}"))?;
        sock.set_read_timeout(Some(LIMIT))
            .map_err(|e| e.to_string())?;
        Ok(Gdb {
            sock: BufReader::new(sock),
        })
    }

    /// Sends one packet and returns the answer's body. Stop replies (`T…`, which QEMU sends
    /// unasked when the connection stops the VM) are skipped.
    fn packet(&mut self, body: &str) -> Res<String> {
        let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        self.sock
            .get_mut()
            .write_all(format!("${body}#{sum:02x}").as_bytes())
            .map_err(|e| format!("gdbstub ({body}): {e}"))?;
        loop {
            let answer = self.answer(body)?;
            if !answer.starts_with('T') {
                return Ok(answer);
            }
        }
    }

    /// The next packet from the stub, acknowledged.
    fn answer(&mut self, body: &str) -> Res<String> {
        let err = |e: std::io::Error| format!("gdbstub ({body}): {e}");
        let mut byte = [0u8];
        // Acknowledgements ('+') come first; then $answer#xx.
        loop {
            self.sock.read_exact(&mut byte).map_err(err)?;
            match byte[0] {
                b'+' => {}
                b'$' => break,
                b'-' => return Err(format!("gdbstub refused the packet {body}")),
                other => return Err(format!("gdbstub: unexpected byte {other:#x}")),
            }
        }
        let mut answer = vec![];
        self.sock.read_until(b'#', &mut answer).map_err(err)?;
        answer.pop();
        let mut sum = [0u8; 2];
        self.sock.read_exact(&mut sum).map_err(err)?;
        self.sock.get_mut().write_all(b"+").map_err(err)?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    /// Writes register `n` (the remote protocol's number) with `bytes` bytes of `value`.
    fn set(&mut self, n: u32, value: u64, bytes: usize) -> Res<()> {
        let hex: String = value.to_le_bytes()[..bytes]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        match self.packet(&format!("P{n:x}={hex}"))?.as_str() {
            "OK" => Ok(()),
            other => Err(format!("gdbstub: writing register {n} answered {other}")),
        }
    }
}

/// Puts the firmware's vCPU, parked with its page tables and GDT ready, into 64-bit ring 3
/// at `entry64` (see benches/qemu_firmware.S), and resumes it.
fn enter_ring3(q: &mut Qemu, dir: &Path) -> Res<()> {
    wait(
        "the firmware's page tables",
        LIMIT,
        Duration::from_millis(5),
        || {
            Ok(q.qmp
                .hmp("info registers")?
                .contains(FW_READY)
                .then_some(()))
        },
    )?;
    let mut gdb = Gdb::connect(&q.gdb_path(dir))?;
    // QEMU accepts register writes only from a client that read the target description.
    gdb.packet("qSupported:xmlRegisters=i386")?;
    let xml = gdb.packet("qXfer:features:read:target.xml:0,ffb")?;
    if !xml.starts_with(['l', 'm']) {
        return Err(format!("gdbstub: no target description: {xml}"));
    }
    // Reading the registers makes QEMU fetch them from KVM and write them back on resume
    // (a bare `P` changes QEMU's stale copy only).
    gdb.packet("g")?;
    // Remote numbers of QEMU's x86-64 registers: rsp 7, rip 16, eflags 17, cs 18, ss 19,
    // ds 20, es 21, cr0 27, cr3 29, cr4 30, efer 32. Paging before the segments: QEMU reads
    // their descriptors from the GDT through the page tables.
    for (n, value, bytes) in [
        (29, 0x1000, 8),      // CR3: the PML4
        (30, 0x620, 8),       // CR4: PAE, OSFXSR, OSXMMEXCPT
        (32, 0x500, 8),       // EFER: LME, LMA
        (27, 0x8000_0011, 8), // CR0: PG, ET, PE
        (18, 0x1b, 4),        // CS: ring-3 64-bit code
        (19, 0x23, 4),        // SS
        (20, 0x23, 4),        // DS
        (21, 0x23, 4),        // ES
        (7, 0x8000, 8),       // RSP (unused)
        (17, 0x2, 4),         // RFLAGS: interrupts off
        (16, FW_ENTRY64, 8),  // RIP
    ] {
        gdb.set(n, value, bytes)?;
    }
    match gdb.packet("D")?.as_str() {
        "OK" => Ok(()),
        other => Err(format!("gdbstub: detach answered {other}")),
    }
}

/// Pages a second the busy guest writes: its counter (RCX) over `over`.
fn guest_pages_per_s(q: &mut Qemu, over: Duration) -> Res<f64> {
    let (t0, c0) = (Instant::now(), q.register("RCX")?);
    std::thread::sleep(over);
    let c1 = q.register("RCX")?;
    Ok(c1.wrapping_sub(c0) as f64 / t0.elapsed().as_secs_f64())
}

struct QemuRun {
    stop_resume_ms: f64,
    downtime_ms: f64,
    total_ms: f64,
    guest_pages_per_s: f64,
    dirty_pages_rate: f64,
}

fn qemu_once(dir: &Path, firmware: &[u8], cycles: Option<u64>) -> Res<QemuRun> {
    let mut fw = firmware.to_vec();
    fw[FW_CYCLES..FW_CYCLES + 8].copy_from_slice(&cycles.unwrap_or(0).to_le_bytes());
    // The same working set as ftvm's busy vCPU: 480 MiB from 16 MiB.
    fw[FW_START..FW_START + 8].copy_from_slice(&(16u64 << 20).to_le_bytes());
    fw[FW_END..FW_END + 8].copy_from_slice(&((16 + WORKING_SET_MIB) << 20).to_le_bytes());
    let fw_path = dir.join("fw.bin");
    std::fs::write(&fw_path, &fw).map_err(|e| e.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let incoming = format!("tcp:127.0.0.1:{port}");
    let mut src = Qemu::start("src", dir, &fw_path, &[])?;
    let mut dst = Qemu::start("dst", dir, &fw_path, &["-incoming", &incoming])?;
    let guest_pages_per_s = if cycles.is_some() {
        enter_ring3(&mut src, dir)?;
        let regs = src.qmp.hmp("info registers")?;
        if !regs.contains("CPL=3") {
            return Err(format!("the busy guest is not in ring 3: {regs}"));
        }
        // Into the loop's steady state (the first pass over fresh memory is slower).
        std::thread::sleep(Duration::from_secs(1));
        guest_pages_per_s(&mut src, Duration::from_secs(1))?
    } else {
        wait(
            "the idle guest's halt",
            LIMIT,
            Duration::from_millis(5),
            || {
                Ok(src
                    .qmp
                    .hmp("info registers")?
                    .contains("HLT=1")
                    .then_some(()))
            },
        )?;
        0.0
    };
    src.qmp.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 10u64 << 30}),
    )?;
    let from = src.qmp.events.len();
    src.qmp
        .cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
    let mut dirty_rate = 0.0f64;
    let info = wait("the migration", LIMIT, Duration::from_millis(5), || {
        let m = src.qmp.cmd("query-migrate", json!({}))?;
        if let Some(r) = m["ram"]["dirty-pages-rate"].as_f64() {
            dirty_rate = dirty_rate.max(r);
        }
        match m["status"].as_str() {
            Some("completed") => Ok(Some(m)),
            Some("failed" | "cancelled") => Err(format!("QEMU's migration failed: {m}")),
            _ => Ok(None),
        }
    })?;
    let stop = src.qmp.event_us("STOP", from)?;
    let resume = dst.qmp.event_us("RESUME", 0)?;
    // The guest runs on the destination: running, and the busy loop's counter moves on.
    let st = dst.qmp.cmd("query-status", json!({}))?;
    if st["status"] != "running" {
        return Err(format!("the destination does not run the guest: {st}"));
    }
    if cycles.is_some() {
        let c0 = dst.register("RCX")?;
        wait(
            "the busy guest's loop on the destination",
            LIMIT,
            Duration::from_millis(5),
            || Ok((dst.register("RCX")? != c0).then_some(())),
        )?;
    }
    src.stop()?;
    dst.stop()?;
    Ok(QemuRun {
        stop_resume_ms: (resume as f64 - stop as f64) / 1e3,
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
        guest_pages_per_s,
        dirty_pages_rate: dirty_rate,
    })
}

/// Assembles benches/qemu_firmware.S into its 64 KiB image with binutils.
fn build_firmware(dir: &Path) -> Res<Vec<u8>> {
    let (src, obj, bin) = (dir.join("fw.S"), dir.join("fw.o"), dir.join("fw-image.bin"));
    std::fs::write(&src, FIRMWARE).map_err(|e| e.to_string())?;
    let run = |cmd: &mut Command| -> Res<()> {
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {cmd:?} (binutils, which gcc brings): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    };
    run(Command::new("as").arg("-o").arg(&obj).arg(&src))?;
    run(Command::new("ld")
        .args(["-Ttext=0", "-e", "0", "--oformat", "binary", "-o"])
        .arg(&bin)
        .arg(&obj))?;
    let image = std::fs::read(&bin).map_err(|e| e.to_string())?;
    if image.len() != 64 << 10 {
        return Err(format!(
            "the firmware image is {} bytes, not 64 KiB",
            image.len()
        ));
    }
    Ok(image)
}

/// The host's TSC frequency (the guest's under KVM), measured against the monotonic clock.
fn tsc_hz() -> f64 {
    // SAFETY: RDTSC has no memory effects; every x86-64 CPU has it.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(200));
    (tsc() - c0) as f64 / t0.elapsed().as_secs_f64()
}

fn q(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    common::require_kvm();
    let mut args = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<u64>().ok());
    let runs = args.next().unwrap_or(10).max(1) as usize;
    let pages_per_s = args.next().unwrap_or(25_600).max(1);
    let version = match Command::new(QEMU).arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        _ => {
            eprintln!(
                "{QEMU} cannot be run: install Debian's qemu-system-x86 (scripts/setup.sh does)"
            );
            std::process::exit(1);
        }
    };
    let work = tempfile::tempdir().unwrap();
    let firmware = build_firmware(work.path()).unwrap_or_else(|e| {
        eprintln!("cannot build QEMU's guest: {e}");
        std::process::exit(1);
    });
    let hz = tsc_hz();
    let cycles = (hz / pages_per_s as f64).round() as u64;
    eprintln!("{version}; TSC {:.0} MHz: {cycles} cycles a page", hz / 1e6);
    let lan = Lan::create();
    // Results by ftvm guest (idle, busy, stream, busy + stream) and QEMU guest (idle, busy).
    let mut ftvm: [Vec<FtvmRun>; 4] = Default::default();
    let mut qemu: [Vec<QemuRun>; 2] = Default::default();
    // Failed runs are reported at the end (and make the bench fail), not dropped.
    let mut failures = vec![];
    let guests = [
        ("idle", Guest::Idle),
        ("busy", Guest::Busy(pages_per_s)),
        ("stream", Guest::Stream),
        ("busy + stream", Guest::BusyStream(pages_per_s)),
    ];
    for i in 0..runs {
        for (k, (kind, guest)) in guests.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            // The shared test helpers fail by panicking: a failed run, not the end of all.
            let once = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ftvm_once(&lan, dir.path(), *guest)
            }))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                Err(format!("panicked: {}", msg.unwrap_or_default()))
            });
            match once {
                Ok(f) => {
                    report_ftvm(i, kind, &f);
                    ftvm[k].push(f);
                }
                Err(e) => {
                    eprintln!("run {i} {kind} ftvm FAILED: {e}");
                    failures.push(format!("ftvm, {kind}, run {i}: {e}"));
                }
            }
            if k >= 2 {
                continue;
            }
            let busy = k == 1;
            let dir = tempfile::tempdir().unwrap();
            match qemu_once(dir.path(), &firmware, busy.then_some(cycles)) {
                Ok(r) => {
                    eprintln!(
                        "run {i} {kind} QEMU: stop→resume {:.2} ms, downtime {} ms, total {} ms, \
                         guest {:.0} pages/s, dirty-pages-rate {:.0}",
                        r.stop_resume_ms,
                        r.downtime_ms,
                        r.total_ms,
                        r.guest_pages_per_s,
                        r.dirty_pages_rate
                    );
                    qemu[k].push(r);
                }
                Err(e) => {
                    eprintln!("run {i} {kind} QEMU FAILED: {e}");
                    failures.push(format!("QEMU, {kind}, run {i}: {e}"));
                }
            }
        }
    }
    print_table(runs, pages_per_s, &guests, &ftvm, &qemu);
    // Its namespace goes now: `exit` below would skip the drop.
    drop(lan);
    if !failures.is_empty() {
        println!("{} switch-over(s) failed:", failures.len());
        for f in &failures {
            println!("- {}", f.lines().next().unwrap_or_default());
        }
        std::process::exit(1);
    }
}

fn report_ftvm(i: usize, kind: &str, f: &FtvmRun) {
    let client = f.client.map_or(String::new(), |(gap, usual)| {
        format!(", client gap {gap:.1} ms (usual {usual:.1})")
    });
    eprintln!(
        "run {i} {kind} ftvm: stop→resume {:.2} ms (pause→handed over {:.2}, \
         handed over→took over {:.2}, activation {:.2}){client}, {:.0} pages/s",
        f.stop_resume_ms, f.handed_ms, f.handed_to_took_ms, f.activation_ms, f.pages_per_s
    );
}

fn print_table(
    runs: usize,
    pages_per_s: u64,
    guests: &[(&str, Guest); 4],
    ftvm: &[Vec<FtvmRun>; 4],
    qemu: &[Vec<QemuRun>; 2],
) {
    println!(
        "planned switch-over of a 1 GiB guest, {runs} runs, busy = {pages_per_s} pages/s \
         asked (ms unless said; p99 of fewer than 100 runs is the worst or next to it):"
    );
    println!(
        "| guest | measure | ftvm p50 | ftvm p99 | QEMU p50 | QEMU p99 | ftvm/QEMU p50 | ftvm/QEMU p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let cell = |v: &[f64], p: f64| {
        if v.is_empty() {
            String::new()
        } else {
            format!("{:.2}", q(v, p))
        }
    };
    // `ratio`: whether ftvm/QEMU means something for this row (times, not rates).
    let row = |g: &str, m: &str, f: &[f64], r: &[f64], ratio: bool| {
        if f.is_empty() && r.is_empty() {
            return;
        }
        let rat = |p: f64| {
            if ratio && !f.is_empty() && !r.is_empty() {
                format!("{:.2}", q(f, p) / q(r, p))
            } else {
                String::new()
            }
        };
        println!(
            "| {g} | {m} | {} | {} | {} | {} | {} | {} |",
            cell(f, 0.5),
            cell(f, 0.99),
            cell(r, 0.5),
            cell(r, 0.99),
            rat(0.5),
            rat(0.99)
        );
    };
    let none: Vec<QemuRun> = vec![];
    for (k, (g, _)) in guests.iter().enumerate() {
        let (f, r) = (&ftvm[k], qemu.get(k).unwrap_or(&none));
        let col = |k: fn(&FtvmRun) -> Option<f64>| f.iter().filter_map(k).collect::<Vec<_>>();
        let qcol = |k: fn(&QemuRun) -> f64| r.iter().map(k).collect::<Vec<_>>();
        let stop_resume = (col(|x| Some(x.stop_resume_ms)), qcol(|x| x.stop_resume_ms));
        row(g, "stop → resume", &stop_resume.0, &stop_resume.1, true);
        let downtime = (col(|x| Some(x.handed_ms)), qcol(|x| x.downtime_ms));
        row(
            g,
            "ftvm: pause → handed over; QEMU: downtime (query-migrate)",
            &downtime.0,
            &downtime.1,
            true,
        );
        row(
            g,
            "ftvm: handed over → took over",
            &col(|x| Some(x.handed_to_took_ms)),
            &[],
            false,
        );
        row(
            g,
            "ftvm: activation (restore, announce)",
            &col(|x| Some(x.activation_ms)),
            &[],
            false,
        );
        row(
            g,
            "QEMU: total-time (query-migrate)",
            &[],
            &qcol(|x| x.total_ms),
            false,
        );
        row(
            g,
            "client: last byte from the old → first from the new",
            &col(|x| x.client.map(|c| c.0)),
            &[],
            false,
        );
        row(
            g,
            "client: longest gap in the second before",
            &col(|x| x.client.map(|c| c.1)),
            &[],
            false,
        );
        let rate = (col(|x| Some(x.pages_per_s)), qcol(|x| x.guest_pages_per_s));
        row(
            g,
            "pages dirtied/s (ftvm: checkpointed; QEMU: the guest's count)",
            &rate.0,
            &rate.1,
            false,
        );
        row(
            g,
            "QEMU: dirty-pages-rate (query-migrate, highest seen)",
            &[],
            &qcol(|x| x.dirty_pages_rate),
            false,
        );
    }
}
