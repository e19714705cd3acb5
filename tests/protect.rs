//! `ftvm run --replica` and `ftvm replica` on loopback: the replica's committed image equals
//! the primary's at every epoch (a test mode logs digests on both sides) while the guest does
//! TCP and disk I/O; the guest becomes protected after an initial sync of pre-copy rounds,
//! stays running unprotected when its replica dies, is protected again when one comes back; a
//! peer with another certificate or another machine is refused.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::protection::{Replica, cert, digests, s, spawn_logged, status, wait_protection};
use common::{Guarded, last_count, require_kvm, spawn_ftvm};

const LIMIT: Duration = Duration::from_secs(60);

fn primary(
    sock: &Path,
    mem: &str,
    replica: &str,
    cert: &Path,
    peer: &str,
) -> (Guarded, common::Console) {
    let (vm, console, _) = spawn_ftvm(&[
        "run",
        "--vcpus",
        "2",
        "--mem",
        mem,
        "--api",
        &s(sock),
        "--replica",
        replica,
        "--cert",
        &s(cert),
        "--peer",
        peer,
        "--cmdline",
        "@0:count=0 @0:interval-ms=20 @1:dirty=20,8",
    ]);
    // The socket is bound before the guest runs: once it counts, the API answers.
    console.wait_until("counting", LIMIT, |t| last_count(t, 0) >= Some(1));
    (vm, console)
}

/// The acceptance test of replication: over more than 100 epochs of a guest that dirties
/// memory, echoes TCP and reads its disk (so the VMM writes guest memory too), what the replica
/// committed for each epoch equals, byte for byte, memory and state as the primary captured
/// them in that epoch's pause — the first one built by pre-copy rounds while the guest ran.
#[test]
fn the_replica_equals_the_primary_after_every_epoch_over_the_network() {
    require_kvm();
    let ns = Netns::create("protect", 9);
    ns.enter();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let mut pattern = vec![0u8; 8 << 20];
    ftvm_guest_abi::fill_pattern(3, 0, &mut pattern);
    std::fs::write(&img, &pattern).unwrap();
    // A second disk that the guest writes while the epochs run.
    let written = dir.path().join("written.img");
    std::fs::write(&written, vec![0u8; 8 << 20]).unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    let env = [(checkpoint::wire::DIGEST_ENV, "1")];
    let copies = dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let replica = Replica::start_with("127.0.0.1:0", &rc, &pfp, &["--disk-dir", &s(&copies)], &env);
    let sock = dir.path().join("api.sock");
    let cmdline = format!(
        "ip={}/24 tcp-echo @1:disk-randread=8,100000000 @1:chunk-kib=16 @2:dirty=100,8 \
         @3:disk-write=8,7 @3:disk=1 @3:chunk-kib=1",
        ns.guest_ip()
    );
    let disk = format!("{},readonly", s(&img));
    let tap = format!("tap={}", ns.tap);
    let (primary, primary_log, _, console) = spawn_logged(
        &[
            "run",
            "--vcpus",
            "4",
            "--mem",
            "64M",
            "--api",
            &s(&sock),
            "--disk",
            &disk,
            "--disk",
            &s(&written),
            "--net",
            &tap,
            "--replica",
            &replica.addr,
            "--cert",
            &s(&pc),
            "--peer",
            &rfp,
            "--precopy-rounds",
            "3",
            "--cmdline",
            &cmdline,
        ],
        &env,
        common::protection::PROTECTED,
    );

    // TCP traffic through the guest's echo service for as long as the epochs run.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr: std::net::SocketAddr = format!("{}:7", ns.guest_ip()).parse().unwrap();
    let echo = {
        let stop = stop.clone();
        std::thread::spawn(move || -> u64 {
            use std::io::{Read, Write};
            let deadline = Instant::now() + LIMIT;
            let mut conn = loop {
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(c) => break c,
                    Err(e) if Instant::now() > deadline => panic!("no echo service: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let (mut echoed, mut n) = (0u64, 0u8);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n = n.wrapping_add(1);
                let out = vec![n; 4096];
                conn.write_all(&out).unwrap();
                let mut back = vec![0u8; out.len()];
                conn.read_exact(&mut back).unwrap();
                assert!(back == out, "the echo differs");
                echoed += back.len() as u64;
            }
            echoed
        })
    };

    let deadline = Instant::now() + LIMIT * 2;
    while digests(&replica.log(), "committed image").len() < 110 {
        assert!(
            Instant::now() < deadline,
            "fewer than 110 epochs committed in time; replica: {}\nprimary: {}",
            replica.log(),
            primary_log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = status(&sock);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let echoed = echo.join().expect("the echo client");
    drop(primary);

    assert!(echoed > 0, "TCP went through the guest");
    assert_eq!(st["protection"]["state"], "protected", "{st}");
    let text = console.text();
    assert!(
        text.contains("vcpu1 workload disk-randread") && !text.contains("refused"),
        "the guest read its disk all along: {text}"
    );
    let primary_log = primary_log.lock().unwrap().clone();
    let captured: std::collections::HashMap<u64, String> =
        digests(&primary_log, "epoch image").into_iter().collect();
    let committed = digests(&replica.log(), "committed image");
    assert!(
        primary_log.contains("sync round sent round=0"),
        "the sync used pre-copy rounds: {primary_log}"
    );
    for (epoch, digest) in &committed {
        assert_eq!(
            captured.get(epoch),
            Some(digest),
            "epoch {epoch}: the replica's image differs from the primary's"
        );
    }
    let epochs: Vec<u64> = committed.iter().map(|c| c.0).collect();
    assert!(epochs.len() >= 110 && epochs[0] == 0, "{epochs:?}");
    assert!(
        epochs.windows(2).all(|w| w[1] == w[0] + 1),
        "committed epochs follow each other: {epochs:?}"
    );
    let distinct: std::collections::HashSet<_> = committed.iter().map(|c| &c.1).collect();
    assert!(
        distinct.len() > 100,
        "the image changed from epoch to epoch"
    );
    // Both disks are in every digest; the written one changed over several epochs.
    assert!(
        committed.iter().all(|c| c.1.split('-').count() == 4),
        "{committed:?}"
    );
    let written_disk: std::collections::HashSet<_> = committed
        .iter()
        .map(|c| c.1.rsplit('-').next().unwrap().to_string())
        .collect();
    let took = text
        .lines()
        .find(|l| l.starts_with("vcpu3 disk-write ok"))
        .unwrap_or("vcpu3 disk-write not finished");
    eprintln!("{took}; the written disk had {} states", written_disk.len());
    assert!(
        written_disk.len() > 5,
        "the written disk changed in only {} epochs",
        written_disk.len()
    );
}

#[test]
fn a_guest_is_protected_survives_its_replica_and_is_protected_again() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    let replica = Replica::start("127.0.0.1:0", &rc, &pfp);
    let sock = dir.path().join("api.sock");
    let (_vm, console) = primary(&sock, "64M", &replica.addr, &pc, &rfp);
    let st = wait_protection(&sock, "protection", |p| {
        p["state"] == "protected" && p["epochs_committed"].as_u64() >= Some(40)
    });
    assert_eq!(st["state"], "running");

    // The replica dies: the guest runs on, unprotected, and says so.
    let addr = replica.addr.clone();
    drop(replica);
    wait_protection(&sock, "degraded mode", |p| p["state"] != "protected");
    let now = last_count(&console.text(), 0).unwrap();
    console.wait_until("counting while unprotected", LIMIT, |t| {
        last_count(t, 0) > Some(now + 5)
    });
    assert_ne!(status(&sock)["protection"]["state"], "protected");

    // A replica comes back on the same address: a new full checkpoint protects the guest again.
    let replica = Replica::start(&addr, &rc, &pfp);
    let before = status(&sock)["protection"]["epochs_committed"]
        .as_u64()
        .unwrap();
    wait_protection(&sock, "protection again", |p| {
        p["state"] == "protected" && p["epochs_committed"].as_u64() > Some(before + 20)
    });
    assert!(
        replica.log().contains("primary connected"),
        "{}",
        replica.log()
    );
}

#[test]
fn peers_with_other_certificates_or_machines_are_refused() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc, other) = (
        dir.path().join("p"),
        dir.path().join("r"),
        dir.path().join("o"),
    );
    let (pfp, rfp, ofp) = (cert(&pc), cert(&rc), cert(&other));

    // The replica pins another primary: this one is refused and stays unprotected.
    let replica = Replica::start("127.0.0.1:0", &rc, &ofp);
    let sock = dir.path().join("a.sock");
    let (vm, _) = primary(&sock, "64M", &replica.addr, &pc, &rfp);
    replica.wait_log("but --peer pins");
    assert_ne!(status(&sock)["protection"]["state"], "protected");
    drop(vm);
    drop(replica);

    // The primary pins another replica: refused on the primary's side.
    let replica = Replica::start("127.0.0.1:0", &rc, &pfp);
    let sock = dir.path().join("b.sock");
    let (vm, _) = primary(&sock, "64M", &replica.addr, &pc, &ofp);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        assert_ne!(status(&sock)["protection"]["state"], "protected");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(vm);

    // A replica that holds a 64 MiB machine refuses a 128 MiB one.
    let sock = dir.path().join("c.sock");
    let (first, _) = primary(&sock, "64M", &replica.addr, &pc, &rfp);
    wait_protection(&sock, "the first machine", |p| p["state"] == "protected");
    drop(first);
    let sock = dir.path().join("d.sock");
    let (_second, _) = primary(&sock, "128M", &replica.addr, &pc, &rfp);
    replica.wait_log("differs from this one");
    assert_ne!(status(&sock)["protection"]["state"], "protected");
}

#[test]
fn a_failing_replication_thread_ends_the_vm_with_one_line() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (_, rfp) = (cert(&pc), cert(&rc));
    for (fault, how) in [
        ("replication", "panicked: fault injected at replication"),
        ("replication:error", "fault injected at replication"),
    ] {
        let o = common::ftvm_with(
            Command::new(env!("CARGO_BIN_EXE_ftvm"))
                .env(vmm::event::FAULT_ENV, fault)
                .env_remove("RUST_LOG")
                .args([
                    "run",
                    "--vcpus",
                    "1",
                    "--mem",
                    "64M",
                    "--cmdline",
                    "count=0",
                ])
                .args([
                    "--replica",
                    "127.0.0.1:9",
                    "--cert",
                    &s(&pc),
                    "--peer",
                    &rfp,
                ]),
            LIMIT,
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{fault}: {err}");
        assert_eq!(err.lines().count(), 1, "{fault}: {err}");
        assert!(
            err.starts_with(&format!(
                "ftvm: error: VMM thread replication failed: {how}"
            )),
            "{fault}: {err}"
        );
    }
}

/// Encoding (primary) and verifying (replica) all of a 2 GiB guest's memory takes seconds: both
/// happen off the connection's runtime thread, or the link's 1.5 s silence timeout fires first
/// and the guest is never protected (seen before the fix).
#[test]
fn a_2_gib_guest_is_protected() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    let replica = Replica::start("127.0.0.1:0", &rc, &pfp);
    let sock = dir.path().join("api.sock");
    let (_vm, _console) = primary(&sock, "2G", &replica.addr, &pc, &rfp);
    wait_protection(&sock, "protection of 2 GiB", |p| {
        p["state"] == "protected" && p["epochs_committed"].as_u64() >= Some(5)
    });
}

/// A replica without `--disk-dir` cannot keep a primary's disks: it refuses the primary with
/// the reason, which the primary logs; the guest runs on unprotected.
#[test]
fn a_primary_with_disks_needs_a_replica_with_a_disk_dir() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    let replica = Replica::start("127.0.0.1:0", &rc, &pfp);
    let (_vm, log, refused, console) = spawn_logged(
        &[
            "run",
            "--mem",
            "32M",
            "--disk",
            &s(&img),
            "--replica",
            &replica.addr,
            "--cert",
            &s(&pc),
            "--peer",
            &rfp,
            "--cmdline",
            "count=0 interval-ms=20",
        ],
        &[],
        "--disk-dir",
    );
    let line = refused
        .recv_timeout(LIMIT)
        .unwrap_or_else(|_| panic!("no refusal: {}", log.lock().unwrap()));
    assert!(
        line.contains("has 1 disk(s)") && line.contains("unprotected"),
        "{line}"
    );
    let now = last_count(&console.text(), 0).unwrap_or(0);
    console.wait_until("counting unprotected", LIMIT, |t| {
        last_count(t, 0) > Some(now + 3)
    });
    assert!(
        replica.log().contains("start the replica with --disk-dir"),
        "{}",
        replica.log()
    );
}
