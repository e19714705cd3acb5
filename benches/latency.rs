//! What output commit adds to a network round trip: ping and a 64-byte TCP request/response
//! through the test guest (on a TAP in a network namespace), unprotected and protected by a
//! local replica at 40 and 100 Hz with the `fixed` and the `early` checkpoint policy.
//!
//! `cargo bench --bench latency [-- ROUNDS]`: ROUNDS pings (10 ms apart) and ROUNDS TCP
//! exchanges per configuration (default 300). Prints median and p99 in milliseconds, and the
//! ratio of each median to the unprotected one measured in the same run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::protection::{Replica, cert, s, spawn_logged};

const LIMIT: Duration = Duration::from_secs(60);

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// (ping RTTs, TCP RTTs) in ms for one configuration.
fn measure(ns: &Netns, rounds: usize, protect: Option<(u64, &str)>) -> (Vec<f64>, Vec<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let cmdline = format!("ip={}/24 tcp-echo", ns.guest_ip());
    let tap = format!("tap={}", ns.tap);
    let mut args: Vec<String> = ["run", "--vcpus", "1", "--mem", "64M", "--net", &tap]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let mut replica = None;
    if let Some((hz, policy)) = protect {
        let (pfp, rfp) = (cert(&pc), cert(&rc));
        let r = Replica::start("127.0.0.1:0", &rc, &pfp);
        for a in [
            "--replica",
            &r.addr,
            "--cert",
            &s(&pc),
            "--peer",
            &rfp,
            "--epoch-ms",
            &(1000 / hz).to_string(),
            "--checkpoint-policy",
            policy,
        ] {
            args.push(a.to_string());
        }
        replica = Some(r);
    }
    args.extend(["--cmdline".to_string(), cmdline]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (vm, _, protected, console) = spawn_logged(&argv, &[], common::protection::PROTECTED);
    console.wait_for("workload net", LIMIT);
    if protect.is_some() {
        protected
            .recv_timeout(LIMIT)
            .expect("the guest is protected");
    }

    let out = std::process::Command::new("ping")
        .args(["-c", &rounds.to_string(), "-i", "0.01", "-W", "5"])
        .arg(ns.guest_ip())
        .output()
        .expect("ping runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let ping: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert!(ping.len() * 100 >= rounds * 99, "pings lost: {text}");

    let addr: std::net::SocketAddr = format!("{}:7", ns.guest_ip()).parse().unwrap();
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rtt = Vec::new();
    for i in 0..rounds {
        let msg = [i as u8; 64];
        let start = Instant::now();
        tcp.write_all(&msg).unwrap();
        let mut back = [0u8; 64];
        tcp.read_exact(&mut back).unwrap();
        rtt.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(back, msg);
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(vm);
    drop(replica);
    (ping, rtt)
}

fn main() {
    common::require_kvm();
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let ns = Netns::create("latency", 21);
    ns.enter();
    let configs: [(&str, Option<(u64, &str)>); 5] = [
        ("unprotected", None),
        ("40 Hz fixed", Some((40, "fixed"))),
        ("40 Hz early", Some((40, "early"))),
        ("100 Hz fixed", Some((100, "fixed"))),
        ("100 Hz early", Some((100, "early"))),
    ];
    println!(
        "| configuration | ping p50 / p99 ms | ×unprot. p50 | TCP 64 B p50 / p99 ms | ×unprot. p50 |"
    );
    println!("|---|---|---|---|---|");
    let mut base = (0.0, 0.0);
    for (name, protect) in configs {
        let (mut ping, mut tcp) = measure(&ns, rounds, protect);
        let (p50, p99) = (quantile(&mut ping, 0.5), quantile(&mut ping, 0.99));
        let (t50, t99) = (quantile(&mut tcp, 0.5), quantile(&mut tcp, 0.99));
        if protect.is_none() {
            base = (p50, t50);
        }
        println!(
            "| {name} | {p50:.3} / {p99:.3} | {:.1} | {t50:.3} / {t99:.3} | {:.1} |",
            p50 / base.0,
            t50 / base.1
        );
    }
}
