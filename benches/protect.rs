//! What protection costs a guest: the same CPU-bound and memory-writing workloads unprotected,
//! with dirty logging alone (the log harvested, and so re-armed, every epoch: the write-protect
//! faults any tracker costs on PVM, with no pause, copy or send), and protected by a local
//! replica, at 10, 40 and 100 Hz (epochs of 100, 25 and 10 ms).
//!
//! `cargo bench --bench protect [-- RUNS]`: each configuration runs RUNS times (default 5),
//! round-robin so that load drifting on the host spreads over all of them. Unprotected and
//! protected runs are the `ftvm` binary; dirty logging alone runs in this process (the CLI has
//! no such mode), next to an in-process run without harvesting that shows the two ways of
//! running the guest agree. The guest times its own work (compute: 2×10⁹ iterations; dirty:
//! one word per page at 200 MiB/s over 64 MiB for 3 s; randpages: whole pages of pseudo-random
//! bytes as fast as it can over 64 MiB for 3 s; both report pages written). Prints median and
//! worst of each, the median's slowdown against unprotected and, for protected runs, the
//! median and worst of the slowdown of each run against the logging-alone run just before it.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm::VmEvent;

const FTVM: &str = env!("CARGO_BIN_EXE_ftvm");
const LIMIT: Duration = Duration::from_secs(120);

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

/// The value of `key` (ending in `=`) on the line of `out` that starts with `prefix`.
fn value(out: &str, prefix: &str, key: &str) -> f64 {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.parse().ok())
        })
        .unwrap_or_else(|| panic!("no '{prefix}…{key}' in:\n{out}"))
}

/// Runs the guest once in an `ftvm` process, protected if `protect` says how.
fn run_ftvm(cmdline: &str, protect: Option<(&str, &Path, &str, u64)>) -> String {
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
    assert!(o.status.success(), "ftvm run failed: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs the guest once in this process (same machine as `ftvm run --vcpus 1 --mem 256M`),
/// harvesting the dirty log every `epoch` if given; returns its console.
fn run_here(cmdline: &str, epoch: Option<Duration>) -> String {
    let (vm, console) = common::test_vm(1, 256, cmdline);
    let vm = vm.start().expect("the VM starts");
    let deadline = Instant::now() + LIMIT;
    let mut next = Instant::now() + epoch.unwrap_or(LIMIT);
    loop {
        let now = Instant::now();
        assert!(now < deadline, "the guest did not finish in {LIMIT:?}");
        match vm.wait_event(Some(next.min(deadline).saturating_duration_since(now))) {
            Some(VmEvent::PowerOff(0)) => break,
            Some(e) => panic!("the guest failed: {e:?}\n{}", console.text()),
            None => {
                if let Some(e) = epoch {
                    vm.take_dirty_pages().expect("harvest");
                    next += e;
                }
            }
        }
    }
    vm.stop().expect("the VM stops");
    console.wait_for("all 1 vcpus done", LIMIT)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// `ftvm run`.
    Unprotected,
    /// In this process, dirty log never harvested.
    Here,
    /// In this process, dirty log harvested every so many ms.
    Logging(u64),
    /// `ftvm run --replica` with this epoch in ms.
    Protected(u64),
}

fn hz(ms: u64) -> u64 {
    1000 / ms
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Unprotected => "unprotected".into(),
            Mode::Here => "in-process".into(),
            Mode::Logging(ms) => format!("logging {} Hz", hz(ms)),
            Mode::Protected(ms) => format!("protected {} Hz", hz(ms)),
        }
    }
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
    println!(
        "{runs} runs each, round-robin; 1 vCPU, 256 MiB; replica on {addr}; {} host CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // (label, command line, line prefix, key, more is better)
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
        (
            "randpages unpaced, 3 s",
            "randpages=0,64 secs=3",
            "vcpu0 randpages",
            "written=",
            true,
        ),
    ];
    let mut modes = vec![Mode::Unprotected, Mode::Here];
    for ms in [100, 25, 10] {
        modes.extend([Mode::Logging(ms), Mode::Protected(ms)]);
    }
    for (label, cmdline, prefix, key, more_is_better) in workloads {
        let mut values: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        for _ in 0..runs {
            for (mode, v) in modes.iter().zip(&mut values) {
                let out = match *mode {
                    Mode::Unprotected => run_ftvm(cmdline, None),
                    Mode::Here => run_here(cmdline, None),
                    Mode::Logging(ms) => run_here(cmdline, Some(Duration::from_millis(ms))),
                    Mode::Protected(ms) => run_ftvm(
                        cmdline,
                        Some((addr.as_str(), pc.as_path(), rfp.as_str(), ms)),
                    ),
                };
                v.push(value(&out, prefix, key));
            }
        }
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        // Slowdown of `a` against `b`: above 1 means slower.
        let slowdown = |a: f64, b: f64| if more_is_better { b / a } else { a / b };
        let base = median(&values[0]);
        for (i, (mode, v)) in modes.iter().zip(&values).enumerate() {
            let m = median(v);
            let worst = if more_is_better {
                v.iter().copied().fold(f64::INFINITY, f64::min)
            } else {
                v.iter().copied().fold(0.0, f64::max)
            };
            // Against logging alone at the same rate, run by run: the two runs of a pair ran
            // one after the other, so load drifting on the host cancels out of their ratio.
            let vs_logging = match mode {
                Mode::Protected(_) => {
                    let r: Vec<f64> = v
                        .iter()
                        .zip(&values[i - 1])
                        .map(|(&p, &l)| slowdown(p, l))
                        .collect();
                    format!(
                        " ×{:.3} logging alone (pairs: median, worst ×{:.3})",
                        median(&r),
                        r.iter().copied().fold(0.0, f64::max)
                    )
                }
                _ => String::new(),
            };
            println!(
                "{label:<24} {:<15} median {m:>14.0} worst {worst:>14.0} {key:<9} ×{:.3} unprotected{vs_logging}",
                mode.name(),
                slowdown(m, base),
            );
        }
    }
    let _ = replica.kill();
    let _ = replica.wait();
    std::thread::sleep(Duration::from_millis(10));
}
