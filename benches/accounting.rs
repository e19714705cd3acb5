//! What the accounting costs a guest: CPU-bound and I/O-bound work timed by the guest itself,
//! with the exporter and the accounting history off and on.
//!
//! `cargo bench --bench accounting [-- RUNS]` (default 10 runs per variant). All variants run
//! once per round, RUNS rounds, the order reversed every other round (A B C … C B A …), so that
//! load drifting on this shared machine falls on every variant alike. Variants:
//!
//! - `plain`: `ftvm run`.
//! - `exporter`: `ftvm run --metrics 127.0.0.1:0 --vm-name bench`, scraped by a thread of this
//!   bench every second (`GET /metrics`, 1 s: a usual Prometheus scrape interval), the first
//!   scrape as soon as the address is logged.
//! - `protected`: `ftvm run --replica` (default 25 ms epochs) with a fresh local replica, the
//!   guest started `--paused` and resumed once protected, so that its whole run is protected.
//! - `+history`: the same with `--history DIR --vm-name bench` on the primary and on the
//!   replica (history is only recorded for acknowledged checkpoints, so only protected runs
//!   have it).
//! - `+history+exporter`: that, with `--metrics` on both, both scraped every second.
//!
//! The per-vCPU and per-device counters cannot be switched off (relaxed atomics in the device
//! code, the vCPU thread's CPU clock read at each scrape or save): every variant has them.
//!
//! Workloads: `compute=400000000` on 2 vCPUs (the value is the mean of the two vCPUs' `ns=`)
//! and `disk-write=256,3 chunk-kib=64` on 1 vCPU to a 256 MiB image (the guest's `ns=`, the
//! writes and the final flush). Prints, per workload and comparison, the median and p99
//! (nearest rank: the worst run below 100 runs) of each variant, the on/off ratios of those,
//! and the median and range of the ratios of the pairs that ran in the same round.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::protection::{PROTECTED, Replica, cert, field, s, spawn_logged};

const LIMIT: Duration = Duration::from_secs(120);
const SCRAPE_EVERY: Duration = Duration::from_secs(1);
const VM: &str = "bench";

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    Exporter,
    Protected,
    History,
    HistoryExporter,
}

const VARIANTS: [Variant; 5] = [
    Variant::Plain,
    Variant::Exporter,
    Variant::Protected,
    Variant::History,
    Variant::HistoryExporter,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Exporter => "exporter",
            Variant::Protected => "protected",
            Variant::History => "+history",
            Variant::HistoryExporter => "+history+exporter",
        }
    }
    fn protected(self) -> bool {
        matches!(
            self,
            Variant::Protected | Variant::History | Variant::HistoryExporter
        )
    }
    fn history(self) -> bool {
        matches!(self, Variant::History | Variant::HistoryExporter)
    }
    fn exporter(self) -> bool {
        matches!(self, Variant::Exporter | Variant::HistoryExporter)
    }
}

struct Workload {
    label: &'static str,
    vcpus: u64,
    cmdline: &'static str,
    /// Size of the disk image in MiB (none if 0).
    disk_mib: u64,
    /// Prefix of each line with `ns=` that the run's value is the mean of.
    prefixes: &'static [&'static str],
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        label: "CPU: compute=400000000, 2 vCPUs",
        vcpus: 2,
        cmdline: "compute=400000000",
        disk_mib: 0,
        prefixes: &["vcpu0 compute", "vcpu1 compute"],
    },
    Workload {
        label: "I/O: disk-write=256,3 chunk-kib=64, 1 vCPU",
        vcpus: 1,
        cmdline: "disk-write=256,3 chunk-kib=64",
        disk_mib: 256,
        prefixes: &["vcpu0 disk-write ok"],
    },
];

/// A thread that fetches `/metrics` from each address every [`SCRAPE_EVERY`] until stopped.
struct Scraper {
    stop: Arc<AtomicBool>,
    scrapes: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

fn scrape(addr: &str) -> usize {
    let mut c = TcpStream::connect(addr).expect("the exporter accepts");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = Vec::new();
    c.read_to_end(&mut body).unwrap();
    assert!(
        body.starts_with(b"HTTP/1.1 200"),
        "scrape of {addr} failed: {}",
        String::from_utf8_lossy(&body)
    );
    body.len()
}

impl Scraper {
    fn start(addrs: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let scrapes = Arc::new(AtomicU64::new(0));
        let (st, n) = (stop.clone(), scrapes.clone());
        let thread = std::thread::spawn(move || {
            let mut next = Instant::now();
            while !st.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    for a in &addrs {
                        scrape(a);
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    next += SCRAPE_EVERY;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Scraper {
            stop,
            scrapes,
            thread,
        }
    }

    /// Stops the thread; returns the number of scrapes it made.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the scraper ran");
        self.scrapes.load(Ordering::Relaxed)
    }
}

/// Waits until `log` has a "serving metrics" line; returns its address.
fn metrics_addr(log: impl Fn() -> String) -> String {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(a) = log()
            .lines()
            .find(|l| l.contains("serving metrics"))
            .and_then(|l| field(l, "addr"))
        {
            // Logged as `addr=Some(127.0.0.1:PORT)`.
            return a
                .trim_start_matches("Some(")
                .trim_end_matches(')')
                .to_string();
        }
        assert!(Instant::now() < deadline, "no metrics address: {}", log());
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Certs {
    primary: PathBuf,
    replica: PathBuf,
    primary_fp: String,
    replica_fp: String,
}

/// What one run gives: the guest's time in ns and the number of scrapes made during it.
struct Run {
    ns: f64,
    scrapes: u64,
}

fn run(w: &Workload, v: Variant, certs: &Certs) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--vcpus".into(),
        w.vcpus.to_string(),
        "--mem".into(),
        "128M".into(),
    ];
    let mut replica = None;
    if w.disk_mib > 0 {
        let img = d.join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(w.disk_mib << 20)
            .unwrap();
        args.extend(["--disk".into(), s(&img)]);
    }
    if v.exporter() || v.history() {
        args.extend(["--vm-name".into(), VM.into()]);
    }
    if v.exporter() {
        args.extend(["--metrics".into(), "127.0.0.1:0".into()]);
    }
    let sock = d.join("api.sock");
    if v.protected() {
        let copies = d.join("copies");
        std::fs::create_dir_all(&copies).unwrap();
        let mut extra = vec!["--disk-dir".to_string(), s(&copies)];
        if v.history() {
            extra.extend([
                "--history".into(),
                s(&d.join("replica-history")),
                "--vm-name".into(),
                VM.into(),
            ]);
        }
        if v.exporter() {
            extra.extend(["--metrics".into(), "127.0.0.1:0".into()]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let r = Replica::start_with(
            "127.0.0.1:0",
            &certs.replica,
            &certs.primary_fp,
            &extra,
            &[],
        );
        args.extend([
            "--replica".into(),
            r.addr.clone(),
            "--cert".into(),
            s(&certs.primary),
            "--peer".into(),
            certs.replica_fp.clone(),
            "--paused".into(),
            "--api".into(),
            s(&sock),
        ]);
        if v.history() {
            args.extend(["--history".into(), s(&d.join("history"))]);
        }
        replica = Some(r);
    }
    args.extend(["--cmdline".into(), w.cmdline.into()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut vm, log, protected, console) = spawn_logged(&argv, &[], PROTECTED);
    let scraper = v.exporter().then(|| {
        let mut addrs = vec![metrics_addr(|| log.lock().unwrap().clone())];
        if let Some(r) = &replica {
            addrs.push(metrics_addr(|| r.log()));
        }
        Scraper::start(addrs)
    });
    if v.protected() {
        if protected.recv_timeout(LIMIT).is_err() {
            panic!("never protected: {}", log.lock().unwrap());
        }
        let o = common::ftvm(&["resume", "--api", &s(&sock)], LIMIT);
        assert!(o.status.success(), "resume failed: {o:?}");
    }
    let ns: f64 = w
        .prefixes
        .iter()
        .map(|p| {
            let line = console.wait_for_line(p, LIMIT);
            line.split_whitespace()
                .find_map(|x| x.strip_prefix("ns=")?.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no ns= in {line}"))
        })
        .sum::<f64>()
        / w.prefixes.len() as f64;
    // The guest powers off and ftvm exits; the scraper runs until then, as Prometheus would.
    let mut child = vm.0.take().unwrap();
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "ftvm did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        status.success(),
        "ftvm failed: {status}\n{}",
        log.lock().unwrap()
    );
    let scrapes = scraper.map_or(0, Scraper::finish);
    if v.history() {
        // The history was written: it holds this VM.
        let h = s(&d.join("history"));
        let o = common::ftvm(&["accounting", "ls", "--history", &h], LIMIT);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains(VM),
            "no history in {h}: {o:?}"
        );
    }
    drop(replica);
    Run { ns, scrapes }
}

/// Nearest-rank percentile `p` (0 < p ≤ 100) of `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn main() {
    common::require_kvm();
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let certs = Certs {
        primary_fp: cert(&pc),
        replica_fp: cert(&rc),
        primary: pc,
        replica: rc,
    };
    println!(
        "{runs} runs per variant, round-robin (order reversed every other round); {} host CPUs; \
         scrapes every {} s",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        SCRAPE_EVERY.as_secs()
    );
    let started = Instant::now();
    // times[workload][variant][round], scrapes[workload][variant]
    let mut times = vec![vec![Vec::new(); VARIANTS.len()]; WORKLOADS.len()];
    let mut scrapes = vec![vec![0u64; VARIANTS.len()]; WORKLOADS.len()];
    for round in 0..runs {
        for (wi, w) in WORKLOADS.iter().enumerate() {
            let mut order: Vec<usize> = (0..VARIANTS.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for vi in order {
                let r = run(w, VARIANTS[vi], &certs);
                times[wi][vi].push(r.ns);
                scrapes[wi][vi] += r.scrapes;
            }
        }
        eprintln!(
            "round {}/{runs} done after {:.0} s",
            round + 1,
            started.elapsed().as_secs_f64()
        );
    }
    // (off, on) pairs by index into VARIANTS.
    let comparisons = [(0, 1), (2, 3), (2, 4)];
    println!(
        "| workload | off → on | runs | off median / p99 ms | on median / p99 ms | on/off median | on/off p99 | pairs on/off median (min–max) | scrapes/run (all exporters) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (wi, w) in WORKLOADS.iter().enumerate() {
        for (off, on) in comparisons {
            let (a, b) = (&times[wi][off], &times[wi][on]);
            let pairs: Vec<f64> = b.iter().zip(a).map(|(b, a)| b / a).collect();
            let ms = |x: f64| x / 1e6;
            println!(
                "| {} | {} → {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.3} | {:.3} | {:.3} ({:.3}–{:.3}) | {:.1} |",
                w.label,
                VARIANTS[off].name(),
                VARIANTS[on].name(),
                a.len(),
                ms(percentile(a, 50.0)),
                ms(percentile(a, 99.0)),
                ms(percentile(b, 50.0)),
                ms(percentile(b, 99.0)),
                percentile(b, 50.0) / percentile(a, 50.0),
                percentile(b, 99.0) / percentile(a, 99.0),
                percentile(&pairs, 50.0),
                pairs.iter().copied().fold(f64::INFINITY, f64::min),
                pairs.iter().copied().fold(0.0, f64::max),
                scrapes[wi][on] as f64 / b.len() as f64,
            );
        }
    }
    println!("total {:.0} s", started.elapsed().as_secs_f64());
}
