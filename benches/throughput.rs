//! What protection costs in throughput: a TCP stream from the guest to a client (its output
//! held until each checkpoint is acknowledged) and the guest's disk writes (mirrored to the
//! replica with each epoch), unprotected and protected by a local replica at 40 Hz.
//!
//! `cargo bench --bench throughput [-- RUNS]` (default 3 runs per configuration): prints the
//! median MiB/s and the ratio to unprotected, measured in the same run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::protection::{Replica, cert, s, spawn_logged};

const LIMIT: Duration = Duration::from_secs(120);

/// Starts the guest with `cmdline` (protected at 40 Hz with `policy` if given); returns it,
/// its replica and its console once it runs (and is protected).
fn start(
    dir: &std::path::Path,
    extra: &[&str],
    cmdline: &str,
    policy: Option<&str>,
) -> (common::Guarded, Option<Replica>, common::Console) {
    let (pc, rc) = (dir.join("p"), dir.join("r"));
    let copies = dir.join("copies");
    std::fs::create_dir_all(&copies).unwrap();
    // Paused until protected, so that the guest's whole run is measured protected.
    let sock = dir.join("api.sock");
    let mut args: Vec<String> = ["run", "--vcpus", "1", "--mem", "128M", "--paused", "--api"]
        .iter()
        .map(|a| a.to_string())
        .chain([s(&sock)])
        .chain(extra.iter().map(|a| a.to_string()))
        .collect();
    let mut replica = None;
    if let Some(policy) = policy {
        let (pfp, rfp) = (cert(&pc), cert(&rc));
        let r = Replica::start_with("127.0.0.1:0", &rc, &pfp, &["--disk-dir", &s(&copies)], &[]);
        for a in [
            "--replica",
            &r.addr,
            "--cert",
            &s(&pc),
            "--peer",
            &rfp,
            "--epoch-ms",
            "25",
            "--checkpoint-policy",
            policy,
        ] {
            args.push(a.to_string());
        }
        replica = Some(r);
    }
    args.extend(["--cmdline".to_string(), cmdline.to_string()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (vm, _, protected, console) = spawn_logged(&argv, &[], common::protection::PROTECTED);
    if policy.is_some() {
        protected
            .recv_timeout(LIMIT)
            .expect("the guest is protected");
    }
    // The socket is bound before the guest is started.
    let deadline = Instant::now() + LIMIT;
    while !common::ftvm(&["resume", "--api", &s(&sock)], LIMIT)
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the guest never resumed");
        std::thread::sleep(Duration::from_millis(20));
    }
    (vm, replica, console)
}

/// MiB/s read from the guest's tcp-stream service over `secs` seconds.
fn tcp(ns: &Netns, policy: Option<&str>, secs: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let tap = format!("tap={}", ns.tap);
    let cmdline = format!("ip={}/24 tcp-stream", ns.guest_ip());
    let (_vm, _replica, console) = start(dir.path(), &["--net", &tap], &cmdline, policy);
    console.wait_for("workload net", LIMIT);
    let addr: std::net::SocketAddr = format!("{}:19", ns.guest_ip()).parse().unwrap();
    let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let (start, mut got) = (Instant::now(), 0u64);
    while start.elapsed() < Duration::from_secs(secs) {
        got += c.read(&mut buf).unwrap() as u64;
    }
    got as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

/// MiB/s of the guest writing `mib` MiB to its disk, as the guest times it.
fn disk(policy: Option<&str>, mib: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; (mib << 20) as usize]).unwrap();
    let cmdline = format!("disk-write={mib},3 chunk-kib=64");
    let (_vm, _replica, console) = start(dir.path(), &["--disk", &s(&img)], &cmdline, policy);
    let line = console.wait_for_line("vcpu0 disk-write ok", LIMIT);
    let ns: f64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ns=")?.parse().ok())
        .expect("the guest times its writes");
    mib as f64 / (ns / 1e9)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    common::require_kvm();
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let ns = Netns::create("thru", 22);
    ns.enter();
    println!("| workload | unprotected MiB/s | 40 Hz early MiB/s (×) | 40 Hz fixed MiB/s (×) |");
    println!("|---|---|---|---|");
    let configs = [None, Some("early"), Some("fixed")];
    let tcp: Vec<f64> = configs
        .iter()
        .map(|p| median((0..runs).map(|_| tcp(&ns, *p, 5)).collect()))
        .collect();
    println!(
        "| TCP guest→client, 5 s | {:.1} | {:.1} ({:.2}) | {:.1} ({:.2}) |",
        tcp[0],
        tcp[1],
        tcp[1] / tcp[0],
        tcp[2],
        tcp[2] / tcp[0]
    );
    let dsk: Vec<f64> = configs
        .iter()
        .map(|p| median((0..runs).map(|_| disk(*p, 64)).collect()))
        .collect();
    println!(
        "| disk write 64 MiB, 64 KiB requests | {:.1} | {:.1} ({:.2}) | {:.1} ({:.2}) |",
        dsk[0],
        dsk[1],
        dsk[1] / dsk[0],
        dsk[2],
        dsk[2] / dsk[0]
    );
}
