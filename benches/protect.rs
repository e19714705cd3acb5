//! What protection costs a guest: the same CPU-bound and memory-writing workloads unprotected
//! and protected by a local replica at 10, 40 and 100 Hz (epochs of 100, 25 and 10 ms).
//!
//! `cargo bench --bench protect [-- RUNS]`: each configuration runs RUNS times (default 5);
//! the guest times its own work (compute: 2×10⁹ iterations; dirty: one word per page at
//! 200 MiB/s over 64 MiB for 3 s, reporting pages written). Prints median and worst.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const FTVM: &str = env!("CARGO_BIN_EXE_ftvm");

fn cert(dir: &Path) -> String {
    let o = Command::new(FTVM)
        .args(["cert", "--out", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success());
    String::from_utf8(o.stdout)
        .unwrap()
        .trim()
        .lines()
        .last()
        .unwrap()
        .to_string()
}

/// Runs the guest once; returns the value of `key=` on its line starting with `prefix`.
fn run(cmdline: &str, protect: Option<(&str, &Path, &str, u64)>, prefix: &str, key: &str) -> f64 {
    let mut cmd = Command::new(FTVM);
    cmd.args(["run", "--vcpus", "1", "--mem", "256M", "--cmdline", cmdline]);
    if let Some((addr, cert, peer, ms)) = protect {
        cmd.args([
            "--replica",
            addr,
            "--cert",
            cert.to_str().unwrap(),
            "--peer",
            peer,
        ]);
        cmd.args(["--epoch-ms", &ms.to_string()]);
    }
    let o = cmd.stderr(Stdio::null()).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    out.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.parse().ok())
        })
        .unwrap_or_else(|| panic!("no '{prefix}…{key}' in:\n{out}"))
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    let mut replica = Command::new(FTVM)
        .env("RUST_LOG", "info")
        .args([
            "replica",
            "--listen",
            "127.0.0.1:0",
            "--cert",
            rc.to_str().unwrap(),
        ])
        .args(["--peer", &pfp])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(replica.stderr.take().unwrap()).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.contains("listening")
                .then(|| l.split("addr=").nth(1).map(str::to_string))
                .flatten()
        })
        .expect("the replica listens");
    std::thread::spawn(move || for _ in lines {});
    println!("{runs} runs each; 1 vCPU, 256 MiB; replica on {addr}");
    let workloads = [
        (
            "compute 2e9",
            "compute=2000000000",
            "vcpu0 compute",
            "ns=",
            false,
        ),
        (
            "dirty 200 MiB/s, 3 s",
            "dirty=200,64 secs=3",
            "vcpu0 dirty",
            "written=",
            true,
        ),
    ];
    for (label, cmdline, prefix, key, more_is_better) in workloads {
        let mut base = 0.0;
        for (name, ms) in [
            ("unprotected", 0u64),
            ("10 Hz", 100),
            ("40 Hz", 25),
            ("100 Hz", 10),
        ] {
            let mut v: Vec<f64> = (0..runs)
                .map(|_| {
                    let p = (ms > 0).then_some((addr.as_str(), pc.as_path(), rfp.as_str(), ms));
                    run(cmdline, p, prefix, key)
                })
                .collect();
            v.sort_by(f64::total_cmp);
            let (median, worst) = if more_is_better {
                (v[v.len() / 2], v[0])
            } else {
                (v[v.len() / 2], v[v.len() - 1])
            };
            if ms == 0 {
                base = median;
            }
            let slowdown = if more_is_better {
                base / median
            } else {
                median / base
            };
            println!(
                "{label:<22} {name:<12} median {median:>14.0} worst {worst:>14.0} {key:<9} slowdown ×{slowdown:.3}"
            );
        }
    }
    let _ = replica.kill();
    let _ = replica.wait();
    std::thread::sleep(Duration::from_millis(10));
}
