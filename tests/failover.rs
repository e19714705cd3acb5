//! Failover: the primary is killed with SIGKILL at random moments of its epochs; the replica
//! notices, takes over from the committed epoch on its own TAP of the same LAN, and the
//! client's TCP stream from the guest goes on: never reset, every byte the expected one, no
//! gap, no duplicate. A fence command that fails stops the takeover.
//!
//! The LAN is a network namespace with a bridge; the primary's and the replica's TAPs are its
//! ports and the test is the client, on the bridge's address.

mod common;

use std::io::Read;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::protection::{Replica, cert, s, spawn_logged};
use common::require_kvm;

const LIMIT: Duration = Duration::from_secs(60);
const SUBNET: &str = "10.77.30";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace with bridge br0 (the client's side, .1) and TAPs tapP and tapR as its ports.
struct Lan {
    name: String,
}

impl Lan {
    fn create() -> Self {
        let name = format!("ftvm-{}-failover", std::process::id());
        ip(&["netns", "add", &name]);
        let lan = Lan { name };
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &lan.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        exec(&["link", "set", "lo", "up"]);
        exec(&["link", "add", "br0", "type", "bridge"]);
        for tap in ["tapP", "tapR"] {
            exec(&["tuntap", "add", "dev", tap, "mode", "tap"]);
            exec(&["link", "set", tap, "master", "br0"]);
            exec(&["link", "set", tap, "up"]);
        }
        exec(&["addr", "add", &format!("{SUBNET}.1/24"), "dev", "br0"]);
        exec(&["link", "set", "br0", "up"]);
        let f = std::fs::File::open(format!("/run/netns/{}", lan.name)).unwrap();
        // SAFETY: setns with a namespace fd we opened; it affects only this thread.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        lan
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Reads the guest's tcp-stream on its own thread, checking every byte against the pattern.
struct Client {
    read: Arc<AtomicU64>,
    failed: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    fn connect() -> Self {
        let addr: std::net::SocketAddr = format!("{SUBNET}.2:19").parse().unwrap();
        let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .expect("connects to the guest");
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let (read, failed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(Mutex::new(None)),
            Arc::new(AtomicBool::new(false)),
        );
        let (r, f, st) = (read.clone(), failed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let (mut at, mut buf, mut want) = (0u64, vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
            while !st.load(Ordering::SeqCst) {
                match tcp.read(&mut buf) {
                    Ok(0) => {
                        *f.lock().unwrap() = Some(format!("the stream ended at byte {at}"));
                        return;
                    }
                    Ok(n) => {
                        ftvm_guest_abi::fill_pattern(19, at, &mut want[..n]);
                        if buf[..n] != want[..n] {
                            *f.lock().unwrap() =
                                Some(format!("the stream differs from byte {at} on"));
                            return;
                        }
                        at += n as u64;
                        r.store(at, Ordering::SeqCst);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => {
                        *f.lock().unwrap() = Some(format!("the stream failed at byte {at}: {e}"));
                        return;
                    }
                }
            }
        });
        Client {
            read,
            failed,
            stop,
            thread: Some(thread),
        }
    }

    fn read(&self) -> u64 {
        self.read.load(Ordering::SeqCst)
    }

    fn check(&self) {
        if let Some(e) = self.failed.lock().unwrap().clone() {
            panic!("{e}");
        }
    }

    /// Waits until `n` more bytes than now have arrived.
    fn wait_more(&self, n: u64, what: &str) {
        let (from, deadline) = (self.read(), Instant::now() + LIMIT);
        while self.read() < from + n {
            self.check();
            assert!(
                Instant::now() < deadline,
                "{what}: stuck at byte {}",
                self.read()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn certs(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String, String) {
    let (pc, rc) = (dir.join("p"), dir.join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    (pc, rc, pfp, rfp)
}

/// One protected guest, killed after `kill_after`: the stream goes on from the replica.
fn fail_over_once(dir: &std::path::Path, kill_after: Duration) -> String {
    let (pc, rc, pfp, rfp) = certs(dir);
    let replica = Replica::start_with(
        "127.0.0.1:0",
        &rc,
        &pfp,
        &[
            "--failover",
            "--failover-timeout",
            "300",
            "--net",
            "tap=tapR",
        ],
        &[],
    );
    let cmdline = format!("ip={SUBNET}.2/24 tcp-stream");
    let (mut primary, log, protected, _console) = spawn_logged(
        &[
            "run",
            "--mem",
            "64M",
            "--net",
            "tap=tapP",
            "--replica",
            &replica.addr,
            "--cert",
            &s(&pc),
            "--peer",
            &rfp,
            "--cmdline",
            &cmdline,
        ],
        &[],
        "protected",
    );
    protected
        .recv_timeout(LIMIT)
        .unwrap_or_else(|_| panic!("never protected: {}", log.lock().unwrap()));
    let client = Client::connect();
    client.wait_more(1 << 20, "the stream before the kill");
    std::thread::sleep(kill_after);
    let child = primary.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let before = client.read();
    replica.wait_log("took over");
    client.wait_more(4 << 20, "the stream after the takeover");
    client.check();
    let log = replica.log();
    let line = log
        .lines()
        .find(|l| l.contains("took over"))
        .unwrap()
        .to_string();
    drop(client);
    format!("{before} bytes before the kill; {line}")
}

#[test]
fn a_tcp_stream_survives_sigkill_of_the_primary() {
    require_kvm();
    let _lan = Lan::create();
    // Kills at different moments of the epoch (25 ms): spread over 10 ms steps.
    for i in 0..10u64 {
        let dir = tempfile::tempdir().unwrap();
        let after = Duration::from_millis(100 + i * 37);
        let said = fail_over_once(dir.path(), after);
        eprintln!("kill {i} after {after:?}: {said}");
    }
}

#[test]
fn a_failing_fence_stops_the_takeover() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc, pfp, rfp) = certs(dir.path());
    let replica = Replica::start_with(
        "127.0.0.1:0",
        &rc,
        &pfp,
        &[
            "--failover",
            "--failover-timeout",
            "200",
            "--fence",
            "exit 7",
        ],
        &[],
    );
    let (mut primary, log, protected, _console) = spawn_logged(
        &[
            "run",
            "--mem",
            "32M",
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
        "protected",
    );
    protected
        .recv_timeout(LIMIT)
        .unwrap_or_else(|_| panic!("never protected: {}", log.lock().unwrap()));
    let child = primary.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    replica.wait_log("not taking over: the fence command failed");
    // It keeps waiting: listening again, with nothing run.
    let deadline = Instant::now() + LIMIT;
    while replica.log().matches("replica listening").count() < 2 {
        assert!(Instant::now() < deadline, "{}", replica.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!replica.log().contains("took over"), "{}", replica.log());
}
