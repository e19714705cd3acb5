//! Bytes per epoch, raw against on the wire: epochs captured from a running guest every 25 ms
//! and encoded twice, with the default options (zero pages elided, zstd level 1) and with
//! XOR-delta on. The guest writes pseudo-random pages (`randpages=`, whole or partly rewritten)
//! or, for contrast, one word per page (`dirty=`).
//!
//! `cargo bench --bench wire_epoch [-- EPOCHS]`: a 1-vCPU, 256 MiB guest with a 64 MiB working
//! set; EPOCHS measured epochs per workload (default 100) after 10 warm-up ones. Prints median
//! and p99 of each column.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use checkpoint::wire::{Encoder, EncoderOptions, FrameKind, FrameStats, MachineShape};
use primary::capture::{Scope, Staging, capture};

const EPOCH: Duration = Duration::from_millis(25);
const WARMUP: usize = 10;

fn pct<T: Copy + PartialOrd>(v: &mut [T], p: f64) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// "median p99" of `v`, formatted by `f`.
fn col<T: Copy + PartialOrd>(mut v: Vec<T>, f: impl Fn(T) -> String) -> String {
    let (m, p) = (pct(&mut v, 0.5), pct(&mut v, 0.99));
    format!("{:>7} {:>7}", f(m), f(p))
}

fn mib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1 << 20) as f64)
}

fn pc(r: f64) -> String {
    format!("{:.1}%", r * 100.0)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

struct Epoch {
    plain: FrameStats,
    delta: FrameStats,
    plain_time: Duration,
    delta_time: Duration,
}

fn run(label: &str, cmdline: &str, workload: &str, epochs: usize) {
    let (vm, console) = common::test_vm(1, 256, cmdline);
    let vm = vm.start().expect("starts");
    console.wait_for_line(
        &format!("vcpu0 workload {workload} "),
        Duration::from_secs(60),
    );
    let mut staging = Staging::default();
    let (state, _) = capture(&vm, Scope::All, &mut staging, None).expect("capture");
    let shape = MachineShape::of(&state).expect("shape");
    let delta_opts = EncoderOptions {
        delta: true,
        ..EncoderOptions::default()
    };
    let mut plain = Encoder::new(shape.clone(), EncoderOptions::default()).expect("encoder");
    let mut delta = Encoder::new(shape, delta_opts).expect("encoder");
    let mut out = Vec::new();
    // The full first frame: it gives the delta encoder every page's content.
    for e in [&mut plain, &mut delta] {
        e.encode_into(
            0,
            FrameKind::Full,
            &staging.gfns,
            &staging.data,
            &state,
            &mut out,
        )
        .expect("encode");
    }
    let mut results = Vec::new();
    let mut next = Instant::now() + EPOCH;
    for epoch in 1..=(WARMUP + epochs) as u64 {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += EPOCH;
        let (state, _) = capture(&vm, Scope::Dirty, &mut staging, None).expect("capture");
        let (g, d, k) = (&staging.gfns, &staging.data, FrameKind::Incremental);
        let t0 = Instant::now();
        let p = plain.encode_into(epoch, k, g, d, &state, &mut out);
        let t1 = Instant::now();
        let q = delta.encode_into(epoch, k, g, d, &state, &mut out);
        let t2 = Instant::now();
        if epoch as usize > WARMUP {
            results.push(Epoch {
                plain: p.expect("encode"),
                delta: q.expect("encode"),
                plain_time: t1 - t0,
                delta_time: t2 - t1,
            });
        }
    }
    vm.stop().expect("stops");
    let late = results
        .iter()
        .filter(|e| e.plain_time + e.delta_time > EPOCH)
        .count();
    let of = |f: fn(&Epoch) -> u64| results.iter().map(f).collect::<Vec<_>>();
    let ratio = |f: fn(&Epoch) -> f64| results.iter().map(f).collect::<Vec<_>>();
    let time = |f: fn(&Epoch) -> Duration| results.iter().map(f).collect::<Vec<_>>();
    println!(
        "{label:<30} | {} | {} {} | {} {} | {} {}{}",
        col(of(|e| e.plain.raw_bytes), mib),
        col(of(|e| e.plain.wire_bytes), mib),
        col(
            ratio(|e| e.plain.wire_bytes as f64 / e.plain.raw_bytes as f64),
            pc
        ),
        col(of(|e| e.delta.wire_bytes), mib),
        col(
            ratio(|e| e.delta.wire_bytes as f64 / e.delta.raw_bytes as f64),
            pc
        ),
        col(time(|e| e.plain_time), ms),
        col(time(|e| e.delta_time), ms),
        if late > 0 {
            format!("  ({late} epochs' encoding outran {EPOCH:?})")
        } else {
            String::new()
        },
    );
}

fn main() {
    let epochs = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100);
    println!(
        "{epochs} epochs of {EPOCH:?} per workload, 1 vCPU, 256 MiB, 64 MiB working set, zstd level 1; each column median p99"
    );
    println!(
        "{:<30} | {:>15} | {:>15} {:>15} | {:>15} {:>15} | {:>15} {:>15}",
        "workload",
        "raw MiB",
        "wire MiB",
        "wire/raw",
        "delta MiB",
        "delta/raw",
        "encode ms",
        "delta enc ms"
    );
    // Rates in MiB/s of pages: 40 is 1 MiB per 25 ms epoch, 160 is 4 MiB.
    for (label, cmdline, workload) in [
        ("random, asked 1 MiB/epoch", "randpages=40,64", "randpages"),
        ("random, asked 4 MiB/epoch", "randpages=160,64", "randpages"),
        (
            "25% rewritten, asked 4 MiB/ep",
            "randpages=160,64 randpages-fill=25",
            "randpages",
        ),
        (
            "3% rewritten, asked 4 MiB/ep",
            "randpages=160,64 randpages-fill=3",
            "randpages",
        ),
        ("one word/page, asked 4 MiB/ep", "dirty=160,64", "dirty"),
    ] {
        run(label, cmdline, workload, epochs);
    }
}
