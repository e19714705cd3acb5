//! `ftvm run --replica` and `ftvm replica` on loopback: the guest becomes protected, stays
//! running unprotected when its replica dies, is protected again when one comes back; a peer
//! with another certificate or another machine is refused.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Guarded, ftvm_ok, last_count, require_kvm, spawn_ftvm};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// `ftvm cert --out DIR`; returns the fingerprint it prints.
fn cert(dir: &Path) -> String {
    ftvm_ok(&["cert", "--out", &s(dir)])
        .trim()
        .lines()
        .last()
        .unwrap()
        .to_string()
}

/// A replica process and its log.
struct Replica {
    _child: Guarded,
    log: Arc<Mutex<String>>,
    addr: String,
}

impl Replica {
    fn start(listen: &str, cert: &Path, peer: &str) -> Self {
        let mut child: Child = Command::new(env!("CARGO_BIN_EXE_ftvm"))
            .env("RUST_LOG", "info")
            .args([
                "replica",
                "--listen",
                listen,
                "--cert",
                &s(cert),
                "--peer",
                peer,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (err, l) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(a) = line
                    .split("addr=")
                    .nth(1)
                    .filter(|_| line.contains("listening"))
                {
                    let _ = tx.send(a.trim().to_string());
                }
                l.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx.recv_timeout(LIMIT).expect("the replica listens");
        Replica {
            _child: Guarded(Some(child)),
            log,
            addr,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the replica's log mentions `needle`.
    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + LIMIT;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no '{needle}' in the replica's log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn status(sock: &Path) -> Value {
    serde_json::from_str(&ftvm_ok(&["status", "--api", &s(sock)])).unwrap()
}

/// Waits until the primary's protection satisfies `done`.
fn wait_protection(sock: &Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let st = status(sock);
        if done(&st["protection"]) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

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
