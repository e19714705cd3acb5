//! Stop-and-copy epochs: the pause of each capture against the dirty set, next to the steps no
//! capture can avoid, measured in the same pauses (stopping the vCPUs and devices, harvesting
//! the dirty log, copying that many pages) and the state save.
//!
//! `cargo bench --bench epoch [-- EPOCHS]`: a 1-vCPU guest writing one word per page at a set
//! rate over a 256 MiB working set, captured every 25 ms (the default epoch).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use primary::capture::{CaptureStats, Scope, Staging, capture};

const EPOCH: Duration = Duration::from_millis(25);

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    format!("{:>8.2?} {:>8.2?}", pct(&v, 0.5), pct(&v, 0.99))
}

fn run(label: &str, cmdline: &str, epochs: usize) {
    let (vm, console) = common::test_vm(1, 512, cmdline);
    let vm = vm.start().expect("starts");
    console.wait_for("ftvm-guest: boot", Duration::from_secs(30));
    let mut staging = Staging::default();
    // The first capture takes everything (and clears the log); warm-up epochs follow.
    capture(&vm, Scope::All, &mut staging, None).expect("capture");
    let mut stats: Vec<CaptureStats> = Vec::new();
    for i in 0..epochs + 10 {
        let until = Instant::now() + EPOCH;
        while Instant::now() < until {
            std::thread::sleep(until - Instant::now());
        }
        let (_, s) = capture(&vm, Scope::Dirty, &mut staging, None).expect("capture");
        if i >= 10 {
            stats.push(s);
        }
    }
    vm.stop().unwrap();
    let col = |f: fn(&CaptureStats) -> Duration| summary(stats.iter().map(f).collect());
    let mut pages: Vec<usize> = stats.iter().map(|s| s.pages).collect();
    pages.sort();
    let irreducible: Vec<f64> = stats
        .iter()
        .map(|s| s.pause.as_secs_f64() / (s.stop + s.harvest + s.copy).as_secs_f64())
        .collect();
    let mut ratio = irreducible;
    ratio.sort_by(f64::total_cmp);
    println!(
        "{label:<22} {:>6} MiB {} | {} | {} | {} | {} | {:>5.2} {:>5.2}",
        (pages[pages.len() / 2] * 4096) >> 20,
        col(|s| s.pause),
        col(|s| s.stop),
        col(|s| s.harvest),
        col(|s| s.copy),
        col(|s| s.save),
        ratio[ratio.len() / 2],
        ratio[((ratio.len() - 1) as f64 * 0.99) as usize],
    );
}

fn main() {
    let epochs = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    println!(
        "stop-and-copy, {epochs} epochs of {EPOCH:?} each, {} host CPUs; times median p99",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<22} {:>10} {:>17} | {:>17} | {:>17} | {:>17} | {:>17} | pause/(stop+harvest+copy) p50 p99",
        "workload", "dirty/ep", "pause", "stop", "harvest", "copy", "save state"
    );
    run("idle", "count=0 interval-ms=1000", epochs);
    for mib_per_epoch in [1u64, 16, 64] {
        let rate = mib_per_epoch * 1000 / EPOCH.as_millis() as u64;
        run(
            &format!("{mib_per_epoch} MiB/epoch target"),
            &format!("dirty={rate},256"),
            epochs,
        );
    }
}
