//! Epoch pauses against the dirty set, for each way of capturing, side by side with the steps
//! no capture can avoid, measured in the same run:
//!
//! - `stop-and-copy`: KVM's dirty bitmap, everything in the pause;
//! - `ring, in pause`: the dirty ring, still everything in the pause (the ring's harvest alone);
//! - `ring + pre-copy`: the dirty ring with background pre-copy every 2 ms and a last round
//!   just before the pause, which copies only what was written since.
//!
//! Each pause is split into its steps (stopping the vCPUs and devices, harvesting the dirty
//! log, copying the pages, saving the state), measured in the same pauses; next to them, a
//! plain memcpy of as many scattered pages as the stop-and-copy epochs had, timed alone.
//!
//! `cargo bench --bench epoch [-- EPOCHS]`: a 1-vCPU guest writing one word per page at a set
//! rate over a 256 MiB working set, captured every 25 ms (the default epoch).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use primary::capture::{CaptureStats, Capturer, DEFAULT_PRECOPY_INTERVAL, Mode, Scope, Staging};
use vmm::dirty_ring::DirtyLog;
use vmm::{Kernel, Vm, VmConfig};

const EPOCH: Duration = Duration::from_millis(25);
const WARM_UP: usize = 10;
/// Entries per vCPU ring: 64 MiB of pages, more than the guest dirties between two harvests.
const RING_ENTRIES: u32 = 16384;

#[derive(Clone, Copy, PartialEq)]
enum Way {
    StopAndCopy,
    RingInPause,
    RingPrecopy,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::StopAndCopy => "stop-and-copy",
            Way::RingInPause => "ring, in pause",
            Way::RingPrecopy => "ring + pre-copy",
        }
    }
}

fn pct<T: Copy>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// "p50/p99" of `v` in ms.
fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    format!("{:.3}/{:.3}", ms(pct(&v, 0.5)), ms(pct(&v, 0.99)))
}

fn vm(cmdline: &str, log: DirtyLog) -> (Vm, common::Console) {
    let console = common::Console::default();
    let vm = Vm::with_dirty_log(
        VmConfig {
            mem_size: 512 << 20,
            vcpus: 1,
            kernel: Kernel::Bytes {
                name: "test guest".into(),
                image: Arc::from(common::TEST_GUEST),
            },
            cmdline: Some(cmdline.into()),
            initrd: None,
            console: Box::new(console.clone()),
            disks: Vec::new(),
            nets: Vec::new(),
        },
        log,
    )
    .expect("VM builds");
    (vm, console)
}

/// Captures `epochs` epochs of a guest running `cmdline` the given way, after a full capture;
/// returns the full capture's stats and the epochs'.
fn run(way: Way, cmdline: &str, epochs: usize) -> (CaptureStats, Vec<CaptureStats>) {
    let log = match way {
        Way::StopAndCopy => DirtyLog::Bitmap,
        _ => DirtyLog::Ring {
            entries: RING_ENTRIES,
        },
    };
    let (vm, console) = vm(cmdline, log);
    let vm = vm.start().expect("starts");
    console.wait_for("ftvm-guest: boot", Duration::from_secs(30));
    let mode = match way {
        Way::RingPrecopy => Mode::Ring {
            interval: DEFAULT_PRECOPY_INTERVAL,
        },
        _ => Mode::StopAndCopy,
    };
    let mut capturer = Capturer::new(&vm, mode).expect("capturer");
    let mut staging = Staging::default();
    // The first capture takes everything (and clears the log); warm-up epochs follow.
    let (_, full) = capturer
        .capture(&vm, Scope::All, &mut staging, None)
        .expect("capture");
    let mut stats = Vec::new();
    for i in 0..epochs + WARM_UP {
        let until = Instant::now() + EPOCH;
        while Instant::now() < until {
            std::thread::sleep(until - Instant::now());
        }
        let (_, s) = capturer
            .capture(&vm, Scope::Dirty, &mut staging, None)
            .expect("capture");
        if i >= WARM_UP {
            stats.push(s);
        }
    }
    if let Some(live) = vm.live_dirty() {
        let full = live.ring().full_exits();
        if full > 0 {
            println!("  ({full} ring-full exits)");
        }
    }
    capturer.stop().expect("precopy thread");
    vm.stop().expect("stops");
    (full, stats)
}

/// p50/p99 of copying `pages` pages spread over 256 MiB (every third page) into a buffer.
fn memcpy_alone(pages: usize, rounds: usize) -> String {
    if pages == 0 {
        return "0/0".into();
    }
    let src = vec![1u8; 256 << 20];
    let mut dst = vec![0u8; pages * 4096];
    let span = src.len() / 4096;
    let mut times = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let t = Instant::now();
        for (i, d) in dst.chunks_mut(4096).enumerate() {
            let p = (r + i * 3) % span;
            d.copy_from_slice(&src[p * 4096..(p + 1) * 4096]);
        }
        times.push(t.elapsed());
        std::hint::black_box(&dst);
    }
    summary(times)
}

fn report(label: &str, way: Way, stats: &[CaptureStats]) -> usize {
    let col = |f: fn(&CaptureStats) -> Duration| summary(stats.iter().map(f).collect());
    let median = |f: fn(&CaptureStats) -> usize| {
        let mut v: Vec<usize> = stats.iter().map(f).collect();
        v.sort();
        pct(&v, 0.5)
    };
    let mut ratio: Vec<f64> = stats
        .iter()
        .map(|s| s.pause.as_secs_f64() / (s.stop + s.harvest + s.copy).as_secs_f64())
        .collect();
    ratio.sort_by(f64::total_cmp);
    let pages = median(|s| s.pages);
    println!(
        "{label:<9} {:<16} {:>6} {:>6} {:>6} | {:>13} | {:>13} {:>13} {:>13} {:>13} | {:>5.2}/{:<5.2} | {:>13} {:>13}",
        way.name(),
        pages,
        median(|s| s.copied_paused),
        median(|s| s.copied_running),
        col(|s| s.pause),
        col(|s| s.stop),
        col(|s| s.harvest),
        col(|s| s.copy),
        col(|s| s.save),
        pct(&ratio, 0.5),
        pct(&ratio, 0.99),
        col(|s| s.last_round),
        col(|s| s.assemble),
    );
    pages
}

fn main() {
    let epochs = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    println!(
        "{epochs} epochs of {EPOCH:?} per row, {} host CPUs; times in ms, p50/p99; pages: median \
         per epoch (in the checkpoint / copied in the pause / copied while the guest ran)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<9} {:<16} {:>6} {:>6} {:>6} | {:>13} | {:>13} {:>13} {:>13} {:>13} | {:>11} | {:>13} {:>13}",
        "workload",
        "way",
        "pages",
        "paused",
        "ran",
        "pause",
        "stop",
        "harvest",
        "copy",
        "save state",
        "pause/s+h+c",
        "last round",
        "assemble"
    );
    let mut workloads = vec![("idle".to_string(), "count=0 interval-ms=1000".to_string())];
    for mib_per_epoch in [1u64, 16, 64] {
        let rate = mib_per_epoch * 1000 / EPOCH.as_millis() as u64;
        workloads.push((
            format!("{mib_per_epoch} MiB/ep"),
            format!("dirty={rate},256"),
        ));
    }
    let mut fulls = Vec::new();
    for (label, cmdline) in &workloads {
        let mut pages = 0;
        for way in [Way::StopAndCopy, Way::RingInPause, Way::RingPrecopy] {
            let (full, stats) = run(way, cmdline, epochs);
            let p = report(label, way, &stats);
            fulls.push(format!(
                "{}: pause {:.3} ms, {} pages copied in it",
                way.name(),
                ms(full.pause),
                full.copied_paused
            ));
            if way == Way::StopAndCopy {
                pages = p;
            }
        }
        println!(
            "{label:<9} memcpy of {pages} scattered pages alone: {} ms",
            memcpy_alone(pages, epochs)
        );
    }
    println!("first (full) capture of the 512 MiB guest, one per row above:");
    for f in fulls {
        println!("  {f}");
    }
}
