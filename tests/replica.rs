//! `ftvm replica --api`: the replica's status (waiting, then committed with the epoch
//! advancing), its refusal of the VM's commands, one primary at a time (a second is refused
//! with the reason in its log while the first stays protected, and is served once the first
//! is gone), an orderly stop on SIGTERM, and clear one-line errors for a bad --api path.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Guarded, ftvm, ftvm_ok, last_count, require_kvm};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(20);

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

/// A process whose stderr is collected (RUST_LOG=info) and stdout is the guest's console.
struct Logged {
    child: Guarded,
    log: Arc<Mutex<String>>,
    console: common::Console,
}

impl Logged {
    fn spawn(args: &[&str]) -> Self {
        let mut child: Child = Command::new(env!("CARGO_BIN_EXE_ftvm"))
            .env("RUST_LOG", "info")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let console = common::Console::default();
        let (mut out, mut sink) = (child.stdout.take().unwrap(), console.clone());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut out, &mut sink);
        });
        let log = Arc::new(Mutex::new(String::new()));
        let (err, l) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        Logged {
            child: Guarded(Some(child)),
            log,
            console,
        }
    }

    /// Sends SIGTERM and waits for the process to end; returns its exit code.
    fn terminate(&mut self) -> Option<i32> {
        let child = self.child.0.as_mut().unwrap();
        // SAFETY: plain kill(2) of our child, which has not been reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            assert!(Instant::now() < deadline, "it did not stop: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log has a line containing `needle`; returns that line.
    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(l) = self.log().lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no '{needle}' in the log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `ftvm replica --api SOCK` pinning `peer`; returns it and the address it listens on.
fn replica(dir: &Path, sock: &Path, peer: &str) -> (Logged, String) {
    let r = Logged::spawn(&[
        "replica",
        "--listen",
        "127.0.0.1:0",
        "--cert",
        &s(&dir.join("r")),
        "--peer",
        peer,
        "--api",
        &s(sock),
    ]);
    let line = r.wait_log("replica listening");
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .expect("the replica says where")
        .to_string();
    (r, addr)
}

/// A protected guest (64 MiB, 2 vCPUs, counting and dirtying memory) with its API on `sock`;
/// returns once it counts (its API answers from then on).
fn primary(dir: &Path, sock: &Path, replica: &str, peer: &str) -> Logged {
    let p = Logged::spawn(&[
        "run",
        "--vcpus",
        "2",
        "--mem",
        "64M",
        "--api",
        &s(sock),
        "--replica",
        replica,
        "--cert",
        &s(&dir.join("p")),
        "--peer",
        peer,
        "--cmdline",
        "@0:count=0 @0:interval-ms=20 @1:dirty=20,8",
    ]);
    p.console
        .wait_until("counting", LIMIT, |t| last_count(t, 0) >= Some(1));
    p
}

fn status(sock: &Path) -> Value {
    serde_json::from_str(&ftvm_ok(&["status", "--api", &s(sock)])).unwrap()
}

/// Polls `status --api sock` until `done` holds of it.
fn wait_status(sock: &Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let st = status(sock);
        if done(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn epochs(v: &Value) -> u64 {
    v["epochs_committed"].as_u64().unwrap_or(0)
}

#[test]
fn the_replica_status_goes_from_waiting_to_committed_as_epochs_arrive() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pfp, rfp) = (cert(&dir.path().join("p")), cert(&dir.path().join("r")));
    let rsock = dir.path().join("replica.sock");
    let (mut replica, addr) = replica(dir.path(), &rsock, &pfp);

    let st = status(&rsock);
    assert_eq!(st["role"], "replica", "{st}");
    assert_eq!(st["state"], "waiting", "{st}");
    assert_eq!(st["listen"], addr.as_str(), "{st}");
    assert!(st["primary"].is_null(), "{st}");
    assert!(st["committed_epoch"].is_null(), "{st}");
    assert!(st["last_commit_ms_ago"].is_null(), "{st}");
    assert_eq!(epochs(&st), 0);

    let psock = dir.path().join("primary.sock");
    let primary = primary(dir.path(), &psock, &addr, &rfp);
    let first = wait_status(&rsock, "the first commits", |st| {
        st["state"] == "committed" && epochs(st) >= 5
    });
    assert_eq!(first["memory_mib"], 64, "{first}");
    assert_eq!(first["vcpus"], 2, "{first}");
    assert_eq!(first["sessions"], 1, "{first}");
    assert!(first["primary"].as_str().is_some(), "{first}");
    assert!(first["sync"].is_null(), "the sync is over: {first}");
    // The initial sync sent all of memory in pre-copy rounds before its full checkpoint.
    let sync = &first["last_sync"];
    assert!(sync["precopy_frames"].as_u64() >= Some(1), "{first}");
    assert!(sync["precopy_pages"].as_u64() >= Some(1), "{first}");
    assert!(sync["ms"].as_f64().is_some(), "{first}");
    assert!(first["last_commit_ms_ago"].as_f64().is_some(), "{first}");

    // The epoch advances, and both sides agree on what is committed.
    let e0 = first["committed_epoch"].as_u64().unwrap();
    let later = wait_status(&rsock, "the epoch to advance", |st| {
        st["committed_epoch"].as_u64() >= Some(e0 + 20)
    });
    assert_eq!(later["state"], "committed", "{later}");
    assert_eq!(later["primary"], first["primary"], "{later}");
    let p = wait_status(&psock, "the primary's ack", |st| {
        st["protection"]["committed_epoch"].as_u64() >= later["committed_epoch"].as_u64()
    });
    assert_eq!(p["protection"]["state"], "protected", "{p}");

    // A replica stopped in order tells its primary why at once (not by 1.5 s of silence).
    assert_eq!(replica.terminate(), Some(143), "{}", replica.log());
    primary.wait_log("closed by peer: replica closing");
    assert!(!rsock.exists(), "the API socket is removed");
}

#[test]
fn the_replicas_api_refuses_vm_commands_and_sigterm_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let pfp = cert(&dir.path().join("p"));
    cert(&dir.path().join("r"));
    let rsock = dir.path().join("replica.sock");
    let (mut replica, _) = replica(dir.path(), &rsock, &pfp);
    let snap = dir.path().join("snap");
    for args in [
        vec!["pause"],
        vec!["resume"],
        vec!["snapshot", "--to", snap.to_str().unwrap()],
    ] {
        let mut all = args.clone();
        all.extend(["--api", rsock.to_str().unwrap()]);
        let o = ftvm(&all, LIMIT);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("ftvm: error: ftvm refused: This is a replica: it runs no VM"),
            "{args:?}: {err}"
        );
    }
    assert!(!snap.exists(), "no snapshot was written");
    assert_eq!(status(&rsock)["state"], "waiting", "still serving");

    assert_eq!(replica.terminate(), Some(143), "{}", replica.log());
    assert!(!rsock.exists(), "the API socket is removed");
    assert!(
        replica.log().contains("replica stopped in order"),
        "{}",
        replica.log()
    );
}

#[test]
fn a_second_primary_is_refused_while_the_first_lives_and_served_once_it_is_gone() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pfp, rfp) = (cert(&dir.path().join("p")), cert(&dir.path().join("r")));
    let rsock = dir.path().join("replica.sock");
    let (replica, addr) = replica(dir.path(), &rsock, &pfp);

    let (asock, bsock) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let a = primary(dir.path(), &asock, &addr, &rfp);
    wait_status(&asock, "the first primary's protection", |st| {
        st["protection"]["state"] == "protected"
    });
    let st = status(&rsock);
    let first = st["primary"]
        .as_str()
        .expect("a primary is served")
        .to_string();

    // The second is refused at once, and its log says why.
    let b = primary(dir.path(), &bsock, &addr, &rfp);
    let line = b.wait_log("another primary is connected");
    assert!(
        line.contains(&format!("another primary is connected: {first}")),
        "{line}"
    );
    replica.wait_log("refused a primary");
    // Meanwhile the first stays protected: its epochs keep being committed.
    let before = epochs(&status(&asock)["protection"]);
    let st = wait_status(&asock, "the first primary's epochs", |st| {
        epochs(&st["protection"]) >= before + 20
    });
    assert_eq!(st["protection"]["state"], "protected", "{st}");
    let b_st = status(&bsock);
    assert_ne!(b_st["protection"]["state"], "protected", "{b_st}");
    assert_eq!(epochs(&b_st["protection"]), 0, "{b_st}");
    let st = status(&rsock);
    assert_eq!(st["primary"], first.as_str(), "{st}");
    assert_eq!(st["state"], "committed", "{st}");
    assert!(st["primaries_refused"].as_u64() >= Some(1), "{st}");

    // The first dies: once the replica has noticed (its link's idle timeout), the second is
    // served and protected.
    drop(a);
    let b_st = wait_status(&bsock, "the second primary's protection", |st| {
        st["protection"]["state"] == "protected" && epochs(&st["protection"]) >= 5
    });
    let st = status(&rsock);
    assert_eq!(st["state"], "committed", "{st}");
    assert_ne!(st["primary"], first.as_str(), "{st}");
    assert_eq!(st["sessions"], 2, "{st}");
    assert!(
        st["committed_epoch"].as_u64() >= b_st["protection"]["committed_epoch"].as_u64(),
        "the replica holds the second primary's checkpoints: {st} {b_st}"
    );
    assert!(replica.log().contains("primary lost"), "{}", replica.log());
}

#[test]
fn a_bad_api_path_is_one_clear_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let pfp = cert(&dir.path().join("p"));
    let rdir = dir.path().join("r");
    cert(&rdir);
    let a_dir = dir.path().join("a-directory");
    std::fs::create_dir(&a_dir).unwrap();
    let live = dir.path().join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let missing = dir.path().join("no/such/dir/x.sock");
    for (path, want) in [
        (
            &a_dir,
            format!(
                "ftvm: error: Cannot use {} as the API socket: it exists and is not a socket (nothing was removed)",
                a_dir.display()
            ),
        ),
        (
            &live,
            format!(
                "ftvm: error: Cannot use {} as the API socket: another process is serving it",
                live.display()
            ),
        ),
        (
            &missing,
            format!(
                "ftvm: error: Cannot listen on API socket {}: No such file or directory",
                missing.display()
            ),
        ),
    ] {
        let o = ftvm(
            &[
                "replica",
                "--listen",
                "127.0.0.1:0",
                "--cert",
                &s(&rdir),
                "--peer",
                &pfp,
                "--api",
                &s(path),
            ],
            LIMIT,
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{}: {err}", path.display());
        assert_eq!(err.lines().count(), 1, "{}: {err}", path.display());
        assert!(err.starts_with(&want), "{err}");
    }
    assert!(a_dir.is_dir(), "the directory is left alone");
    assert!(
        std::os::unix::net::UnixStream::connect(&live).is_ok(),
        "the live socket is left alone"
    );
}

/// A session with a primary that panics is reported with its cause, and the replica serves on.
#[test]
fn a_session_that_panics_is_reported_and_the_replica_serves_on() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (common::protection::cert(&pc), common::protection::cert(&rc));
    let mut replica = common::protection::Replica::start_with(
        "127.0.0.1:0",
        &rc,
        &pfp,
        &[],
        &[("FTVM_INJECT_FAULT", "session")],
    );
    let _primary = common::protection::spawn_logged(
        &[
            "run",
            "--mem",
            "32M",
            "--replica",
            &replica.addr,
            "--cert",
            pc.to_str().unwrap(),
            "--peer",
            &rfp,
            "--cmdline",
            "count=0 interval-ms=50",
        ],
        &[],
        "guest started",
    );
    replica.wait_log("the session with a primary failed: task");
    assert!(
        replica.log().contains("fault injected at session"),
        "{}",
        replica.log()
    );
    assert!(
        replica
            .child
            .0
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "the replica serves on"
    );
}
