//! Start-up time: from spawning `ftvm run` to the guest's first console line.
//!
//! `cargo bench --bench startup [-- RUNS]` (default 30 runs). Prints median, min and max.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let runs = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30usize);
    let mut samples: Vec<Duration> = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ftvm"))
            .args([
                "run",
                "--vcpus",
                "2",
                "--mem",
                "512M",
                "--cmdline",
                "count=1 interval-ms=0",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("ftvm starts");
        let mut console = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        console.read_line(&mut first).expect("console line");
        samples.push(start.elapsed());
        // Drain the rest so that the guest's console never sees a closed pipe.
        std::io::copy(&mut console, &mut std::io::sink()).expect("console drains");
        assert!(
            first.starts_with("ftvm-guest: boot"),
            "unexpected first line {first:?}"
        );
        assert!(child.wait().expect("ftvm exits").success());
    }
    samples.sort();
    println!(
        "start-up to first console line, {runs} runs: median={:.2?} min={:.2?} max={:.2?}",
        samples[runs / 2],
        samples[0],
        samples[runs - 1]
    );
}
