//! Failover time: SIGKILL of a protected primary → the first byte of the guest's TCP stream
//! the client receives from the new primary. Parts: detection (the replica's silence
//! timeout, counted from the last frame it heard, which came before the kill), fencing (none
//! here), activation (loading the committed state into the hot standby), and took over →
//! first byte (starting the VM's threads, the RARP and TCP probes, the client's answer, the
//! guest's resent data).
//!
//! `cargo bench --bench failover [-- RUNS [TIMEOUT_MS]]` (defaults 20 runs, 250 ms, the
//! default `--failover-timeout`): prints median and p99 of each part.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::lan::{Client, Lan, SUBNET};
use common::protection::{Replica, cert, field, s};

const LIMIT: Duration = Duration::from_secs(60);

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// (total, detection, activation, took over → first byte) in ms for one failover.
fn once(
    lan: &Lan,
    dir: &std::path::Path,
    timeout_ms: u64,
    kill_after: Duration,
) -> (f64, f64, f64, f64) {
    let (pc, rc) = (dir.join("p"), dir.join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    let t = timeout_ms.to_string();
    lan.enter("R");
    let replica = Replica::start_with(
        &Lan::rep_addr("R"),
        &rc,
        &pfp,
        &["--failover", "--failover-timeout", &t, "--net", "tap=tapR"],
        &[],
    );
    let cmdline = format!("ip={SUBNET}.2/24 tcp-stream");
    lan.enter("P");
    let (mut primary, _log, _console) = common::protection::protected_primary(&[
        "run",
        "--mem",
        "64M",
        "--net",
        "tap=tapP",
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
    let client = Client::connect();
    client.wait_more(1 << 20, "the stream before the kill");
    std::thread::sleep(kill_after);
    let child = primary.0.as_mut().unwrap();
    child.kill().unwrap();
    let killed = Instant::now();
    // Bytes the old primary had released arrive first: the new primary's come after a stall.
    let (mut last, mut last_change) = (client.read(), Instant::now());
    let resumed = loop {
        client.check();
        let now = client.read();
        if now != last {
            if last_change.elapsed() >= Duration::from_millis(50) {
                break (Instant::now(), unix_ns());
            }
            (last, last_change) = (now, Instant::now());
        }
        assert!(killed.elapsed() < LIMIT, "the stream never resumed");
        std::thread::sleep(Duration::from_micros(200));
    };
    child.wait().unwrap();
    replica.wait_log("took over");
    let log = replica.log();
    let line = log.lines().find(|l| l.contains("took over")).unwrap();
    let num = |k| field(line, k).and_then(|v| v.parse::<f64>().ok()).unwrap();
    let total = (resumed.0 - killed).as_secs_f64() * 1000.0;
    let after = resumed.1.saturating_sub(num("at_unix_ns") as u64) as f64 / 1e6;
    (
        total,
        num("detection_ms"),
        num("activation_us") / 1000.0,
        after,
    )
}

fn q(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    common::require_kvm();
    let mut args = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<u64>().ok());
    let runs = args.next().unwrap_or(20) as usize;
    let timeout = args.next().unwrap_or(250);
    let lan = Lan::create();
    let (mut total, mut detect, mut activate, mut after) = (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        // Kills spread over the epoch: 7 ms apart, 25 ms epochs.
        let kill_after = Duration::from_millis(50 + (i as u64 * 7) % 200);
        let (t, d, a, r) = once(&lan, dir.path(), timeout, kill_after);
        eprintln!(
            "run {i}: total {t:.1} ms, detection {d:.0} ms, activation {a:.2} ms, \
             took over → first byte {r:.1} ms"
        );
        total.push(t);
        detect.push(d);
        activate.push(a);
        after.push(r);
    }
    println!("failover with --failover-timeout {timeout} ms, {runs} SIGKILLs (ms):");
    println!("| part | p50 | p99 |");
    println!("|---|---|---|");
    for (name, v) in [
        ("kill → first byte from the new primary", &mut total),
        ("detection", &mut detect),
        ("activation", &mut activate),
        ("took over → first byte (start, announce, TCP)", &mut after),
    ] {
        println!("| {name} | {:.1} | {:.1} |", q(v, 0.5), q(v, 0.99));
    }
}
