//! History store costs: write cost per sample (against appending the same bytes to a plain
//! file, measured in the same run), size per VM-day at 1 s, and the export time for a
//! VM-month of synthetic samples (against a raw scan of the same keys, same run).
//!
//! `cargo bench -p history --bench store` (`FTVM_BENCH_DAYS=N` for a shorter "month";
//! `FTVM_BENCH_STORE=DIR` keeps the packed month in DIR, and a later run with the same DIR
//! only measures its export, e.g. under a profiler).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use history::{History, Options, Sample, export, names};

const DAY: u64 = 86_400;

/// A VM with 2 vCPUs, one disk, one network card and the console: 13 counters that grow
/// irregularly, as a guest's would.
fn sample(t: u64) -> Sample {
    let mut c = BTreeMap::new();
    let r = |k: u64| t.wrapping_mul(2_654_435_761).rotate_left(k as u32) % 1000;
    c.insert(names::vcpu_run_ns(0), t * 400_000_000 + r(1) * 1000);
    c.insert(names::vcpu_run_ns(1), t * 300_000_000 + r(2) * 1000);
    for (i, op) in ["read", "write", "flush"].iter().enumerate() {
        c.insert(
            names::block_requests("vda", op),
            t * 10 + r(3 + i as u64) % 10,
        );
        c.insert(
            names::block_bytes("vda", op),
            t * 40_960 + r(6 + i as u64) * 4096 % 40_960,
        );
    }
    for dir in ["rx", "tx"] {
        c.insert(names::net_packets("eth0", dir), t * 100 + r(9) % 100);
        c.insert(names::net_bytes("eth0", dir), t * 100_000 + r(10) * 100);
    }
    c.insert("serial/tx_bytes".into(), t * 20 + r(12) % 20);
    Sample {
        vm: "vm-0001".into(),
        time_ms: 1_700_000_000_000 + t * 1000,
        epoch: t * 40,
        counters: c,
    }
}

fn stats(mut d: Vec<Duration>) -> (Duration, Duration) {
    d.sort();
    (d[d.len() / 2], d[(d.len() * 99 / 100).min(d.len() - 1)])
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.ends_with(".sst") || n.ends_with(".log") || n.starts_with("MANIFEST")
        })
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

fn main() {
    let days: u64 = std::env::var("FTVM_BENCH_DAYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let tmp = tempfile::tempdir().unwrap();
    let kept = std::env::var_os("FTVM_BENCH_STORE").map(std::path::PathBuf::from);
    if let Some(dir) = kept.as_ref().filter(|d| d.join(history::MARKER).exists()) {
        export_only(dir, days);
        return;
    }

    // 1. Write cost per sample: RocksDB record vs appending the same bytes to a file.
    let h = History::create(tmp.path().join("write"), Options::default()).unwrap();
    let mut file = std::fs::File::create(tmp.path().join("plain")).unwrap();
    let n = 20_000u64;
    let (mut store, mut plain) = (Vec::new(), Vec::new());
    for t in 0..n {
        let s = sample(t);
        let line = format!("{:?}\n", s);
        let a = Instant::now();
        file.write_all(line.as_bytes()).unwrap();
        plain.push(a.elapsed());
        let a = Instant::now();
        h.record(&s).unwrap();
        store.push(a.elapsed());
    }
    let (sm, sp) = stats(store);
    let (pm, pp) = stats(plain);
    println!(
        "write per sample ({n} samples, 13 counters): record median {:.1} us p99 {:.1} us; plain file append median {:.1} us p99 {:.1} us; ratio median {:.1}x p99 {:.1}x",
        sm.as_secs_f64() * 1e6,
        sp.as_secs_f64() * 1e6,
        pm.as_secs_f64() * 1e6,
        pp.as_secs_f64() * 1e6,
        sm.as_secs_f64() / pm.as_secs_f64(),
        sp.as_secs_f64() / pp.as_secs_f64()
    );
    drop(h);

    // 1b. Write cost per VM-second as a replica records: every commit, one each 25 ms (the
    // default epoch), 40 into each 1 s step (the step keeps the last).
    let h = History::create(tmp.path().join("commits"), Options::default()).unwrap();
    let (mut per_commit, mut per_second) = (Vec::new(), Vec::new());
    for sec in 0..500u64 {
        let a = Instant::now();
        for c in 0..40u64 {
            let mut s = sample(sec * 40 + c);
            s.time_ms = 1_700_000_000_000 + sec * 1000 + c * 25;
            let b = Instant::now();
            h.record(&s).unwrap();
            per_commit.push(b.elapsed());
        }
        per_second.push(a.elapsed());
    }
    let (cm, cp) = stats(per_commit);
    let (vm, vp) = stats(per_second);
    println!(
        "write per VM-second at 40 commits/s (500 s): median {:.0} us p99 {:.0} us ({:.3} % / {:.3} % of a core); per commit median {:.1} us p99 {:.1} us",
        vm.as_secs_f64() * 1e6,
        vp.as_secs_f64() * 1e6,
        vm.as_secs_f64() * 100.0,
        vp.as_secs_f64() * 100.0,
        cm.as_secs_f64() * 1e6,
        cp.as_secs_f64() * 1e6
    );
    drop(h);

    // 2. Size of one VM-day at 1 s, and 3. export time for `days` days.
    let dir = kept.unwrap_or_else(|| tmp.path().join("month"));
    let h = History::create(&dir, Options::default()).unwrap();
    let a = Instant::now();
    for t in 0..days * DAY {
        h.record(&sample(t)).unwrap();
        if t + 1 == DAY {
            h.compact().unwrap();
            println!(
                "size of one VM-day at 1 s (86400 samples, compacted, zstd): {:.2} MiB ({} bytes/sample)",
                dir_size(&dir) as f64 / (1 << 20) as f64,
                dir_size(&dir) / DAY
            );
        }
    }
    h.compact().unwrap();
    let fill = a.elapsed();
    println!(
        "filled {days} VM-days ({} samples) in {:.1} s; store {:.1} MiB",
        days * DAY,
        fill.as_secs_f64(),
        dir_size(&dir) as f64 / (1 << 20) as f64
    );
    drop(h);
    let measure = |label: &str| measure(&dir, days, label);
    let unpacked = measure("1 s entries");

    let h = History::open(&dir).unwrap();
    let a = Instant::now();
    let n = h.pack(u64::MAX).unwrap();
    h.compact().unwrap();
    println!(
        "packed {n} steps into minutes in {:.1} s; store {:.1} MiB",
        a.elapsed().as_secs_f64(),
        dir_size(&dir) as f64 / (1 << 20) as f64
    );
    drop(h);
    let packed = measure("packed minutes");
    println!(
        "export packed / export unpacked (medians, same run): {:.2}x",
        packed.as_secs_f64() / unpacked.as_secs_f64()
    );
}

/// The export of `days` VM-days from `dir` against a raw scan of its keys,
/// `FTVM_BENCH_RUNS` times each (default 5); returns the export's median.
fn measure(dir: &std::path::Path, days: u64, label: &str) -> Duration {
    let runs: usize = std::env::var("FTVM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let h = History::open_read_only(dir).unwrap();
    let (mut exp, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let a = Instant::now();
        let u = export::export(&h, &export::Query::default()).unwrap();
        exp.push(a.elapsed());
        assert_eq!(u[0].samples, days * DAY);
        assert_eq!(u[0].billed, u[0].end_counters);
        let a = Instant::now();
        assert!(h.raw_scan("vm-0001").unwrap() > 0);
        raw.push(a.elapsed());
    }
    let a = Instant::now();
    let ranges = h.vms().unwrap();
    let ls = a.elapsed();
    assert_eq!(ranges[0].samples, days * DAY);
    println!(
        "`accounting ls` of {days} VM-days ({label}): {:.3} s",
        ls.as_secs_f64()
    );
    let (em, ep) = stats(exp);
    let (rm, rp) = stats(raw);
    println!(
        "export of {days} VM-days, {label}: median {:.3} s p99 {:.3} s ({runs} runs); raw scan of the same keys median {:.3} s; ratio median {:.2}x (p99 {:.2}x)",
        em.as_secs_f64(),
        ep.as_secs_f64(),
        rm.as_secs_f64(),
        em.as_secs_f64() / rm.as_secs_f64(),
        ep.as_secs_f64() / rp.as_secs_f64()
    );
    em
}

/// Only the export of a month kept by an earlier run.
fn export_only(dir: &std::path::Path, days: u64) {
    measure(dir, days, "packed minutes (kept store)");
}
