//! Time to pause every vCPU of a running guest and to resume them.
//!
//! `cargo bench --bench pause_resume [-- CYCLES]`. Prints median, p99 and max of `Vm::pause`
//! and `Vm::resume` for a 2-vCPU guest whose vCPUs compute (always inside KVM_RUN, so every
//! pause must kick them out) and for one whose vCPUs idle (parked in the VMM's wait).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what:<28} n={:<5} median={:>9.1?} p99={:>9.1?} max={:>9.1?}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1]
    );
}

fn run(label: &str, vcpus: u64, cmdline: &str, cycles: usize) {
    let (vm, console) = common::test_vm(vcpus, 256, cmdline);
    let vm = vm.start().expect("starts");
    console.wait_for("ftvm-guest: boot", Duration::from_secs(30));
    // Let every vCPU get going before measuring.
    std::thread::sleep(Duration::from_millis(50));
    let mut pause = Vec::with_capacity(cycles);
    let mut resume = Vec::with_capacity(cycles);
    let mut both = Vec::with_capacity(cycles);
    for _ in 0..cycles {
        let t0 = Instant::now();
        vm.pause().expect("pause");
        let t1 = Instant::now();
        vm.resume();
        let t2 = Instant::now();
        pause.push(t1 - t0);
        resume.push(t2 - t1);
        both.push(t2 - t0);
        // Let the guest run between cycles, as the epoch loop does (there: 25 ms).
        let until = Instant::now() + Duration::from_micros(500);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }
    report(&format!("{label}: pause"), pause);
    report(&format!("{label}: resume"), resume);
    report(&format!("{label}: pause+resume"), both);
    vm.stop().unwrap();
}

fn main() {
    let cycles = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    println!(
        "pause/resume over {cycles} cycles ({} host CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    run("2 vCPUs busy", 2, "compute=1000000000000", cycles);
    run("1 vCPU busy", 1, "compute=1000000000000", cycles);
    run("2 vCPUs idle", 2, "count=0 interval-ms=1000", cycles);
}
