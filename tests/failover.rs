//! Failover: the primary is killed with SIGKILL at random moments of its epochs; the replica
//! notices, takes over from the committed epoch on its own TAP of the same LAN, and the
//! client's TCP stream from the guest goes on: never reset, every byte the expected one, no
//! gap, no duplicate. A fence command that fails stops the takeover.
//!
//! The LAN is a network namespace with a bridge; the primary's and the replica's TAPs are its
//! ports and the test is the client, on the bridge's address.

mod common;

use std::time::{Duration, Instant};

use common::lan::{Client, Lan, SUBNET};
use common::protection::{Replica, cert, protected_primary, s, spawn_logged};
use common::{counts, require_kvm};

const LIMIT: Duration = Duration::from_secs(60);

fn certs(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String, String) {
    let (pc, rc) = (dir.join("p"), dir.join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    (pc, rc, pfp, rfp)
}

/// One protected guest, killed after `kill_after`: the stream goes on from the replica.
fn fail_over_once(lan: &Lan, dir: &std::path::Path, kill_after: Duration) -> String {
    let (pc, rc, pfp, rfp) = certs(dir);
    lan.enter("R");
    let replica = Replica::start_with(
        &Lan::rep_addr("R"),
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
    lan.enter("P");
    let (mut primary, _log, _console) = protected_primary(&[
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
    ]);
    lan.enter_lan();
    let client = Client::connect();
    client.wait_more(1 << 20, "the stream before the kill");
    // Pings every 20 ms across the kill: only those sent while the replica waits out its
    // timeout (300 ms) and activates may go unanswered.
    let ping = std::process::Command::new("ping")
        .args(["-c", "150", "-i", "0.02", "-W", "2", &format!("{SUBNET}.2")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping runs");
    std::thread::sleep(kill_after);
    let child = primary.0.as_mut().unwrap();
    let killed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    child.kill().unwrap();
    child.wait().unwrap();
    let before = client.read();
    let line = replica.wait_log("took over");
    client.wait_more(4 << 20, "the stream after the takeover");
    client.check();
    let took_over: u64 = common::protection::field(&line, "at_unix_ns")
        .and_then(|v| v.parse().ok())
        .expect("the takeover says when");
    // Pings lost are those sent during the outage (from about the kill: replies the primary
    // still held for their checkpoint die with it, until the new primary answers): 14-16 for
    // the ~300 ms outages here. Bounded with 300 ms of slack (two epochs of held replies, and
    // the odd ping a full-speed stream costs on this shared machine even unprotected);
    // `cargo bench --bench failover` measures the outage.
    let out = ping.wait_with_output().expect("ping ends");
    let text = String::from_utf8_lossy(&out.stdout);
    let answered: std::collections::BTreeSet<u64> = text
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    let lost: Vec<u64> = (1..=150).filter(|q| !answered.contains(q)).collect();
    let outage = took_over.saturating_sub(killed) / 1_000_000;
    assert!(
        lost.len() as u64 <= (outage + 300) / 20,
        "{} pings lost for a {outage} ms outage: {lost:?}",
        lost.len()
    );
    let received = answered.len() as u64;
    // The stream ran long enough for the hot standby to be built on the synced image.
    assert_eq!(
        common::protection::field(&line, "standby"),
        Some("\"hot\""),
        "{line}"
    );
    drop(client);
    format!(
        "{before} bytes before the kill, {} pings lost; {line}",
        150 - received
    )
}

#[test]
fn a_tcp_stream_survives_sigkill_of_the_primary() {
    require_kvm();
    let lan = Lan::create();
    // Kills at different moments of the epoch (25 ms): spread over 10 ms steps.
    for i in 0..10u64 {
        let dir = tempfile::tempdir().unwrap();
        let after = Duration::from_millis(100 + i * 37);
        let said = fail_over_once(&lan, dir.path(), after);
        eprintln!("kill {i} after {after:?}: {said}");
    }
}

/// A replica with `--fence` and the arguments in `fence`, whose primary is killed: the fence stops
/// the takeover with `why` in the log, and the replica waits for a primary again, running
/// nothing.
fn fence_stops_the_takeover(fence: &[&str], why: &str) {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc, pfp, rfp) = certs(dir.path());
    let args = [
        &["--failover", "--failover-timeout", "200", "--fence"][..],
        fence,
    ]
    .concat();
    let replica = Replica::start_with("127.0.0.1:0", &rc, &pfp, &args, &[]);
    let (mut primary, _log, _console) =
        small_primary(&replica.addr, &s(&pc), &rfp, "count=0 interval-ms=20");
    let child = primary.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    replica.wait_log(why);
    // It keeps waiting: listening again, with nothing run.
    let deadline = Instant::now() + LIMIT;
    while replica.log().matches("replica listening").count() < 2 {
        assert!(Instant::now() < deadline, "{}", replica.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!replica.log().contains("took over"), "{}", replica.log());
}

#[test]
fn a_failing_fence_stops_the_takeover() {
    fence_stops_the_takeover(&["exit 7"], "not taking over: the fence command failed");
}

/// A fence command that hangs is killed at --fence-timeout: no takeover, the replica says why
/// and waits for a primary again.
#[test]
fn a_hanging_fence_is_killed_and_stops_the_takeover() {
    fence_stops_the_takeover(
        &["sleep 600", "--fence-timeout", "1"],
        "not taking over: the fence command did not finish within 1 s (killed)",
    );
}

/// The replica that took over protects the guest with the next replica it was given, and that
/// one takes over in turn when the new primary is killed: the stream survives both.
#[test]
fn the_new_primary_is_protected_again_and_survives_a_second_failover() {
    require_kvm();
    let lan = Lan::create();
    let dir = tempfile::tempdir().unwrap();
    let (pc, r1c, r2c) = (
        dir.path().join("p"),
        dir.path().join("r1"),
        dir.path().join("r2"),
    );
    let (pfp, r1fp, r2fp) = (cert(&pc), cert(&r1c), cert(&r2c));
    let failover = ["--failover", "--failover-timeout", "300"];
    lan.enter("S");
    let second = Replica::start_with(
        &Lan::rep_addr("S"),
        &r2c,
        &r1fp,
        &[&failover[..], &["--net", "tap=tapS"]].concat(),
        &[],
    );
    lan.enter("R");
    let mut first = Replica::start_with(
        &Lan::rep_addr("R"),
        &r1c,
        &pfp,
        &[
            &failover[..],
            &[
                "--net",
                "tap=tapR",
                "--then-replica",
                &second.addr,
                "--then-peer",
                &r2fp,
            ],
        ]
        .concat(),
        &[],
    );
    let cmdline = format!("ip={SUBNET}.2/24 tcp-stream");
    lan.enter("P");
    let (mut primary, _log, _console) = protected_primary(&[
        "run",
        "--mem",
        "64M",
        "--net",
        "tap=tapP",
        "--replica",
        &first.addr,
        "--cert",
        &s(&pc),
        "--peer",
        &r1fp,
        "--cmdline",
        &cmdline,
    ]);
    lan.enter_lan();
    let client = Client::connect();
    client.wait_more(1 << 20, "the stream before the first kill");
    let child = primary.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    first.wait_log("took over");
    first.wait_log("protected replica=");
    client.wait_more(2 << 20, "the stream from the first replica");
    let child = first.child.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    second.wait_log("took over");
    client.wait_more(4 << 20, "the stream from the second replica");
    client.check();
}

/// A guest writing its disk is failed over mid-write: it finishes on the replica, and the
/// replica's copy of the disk then holds exactly what the guest wrote — every block, the
/// guest's own write count — so no write the guest had seen completed was lost.
#[test]
fn a_guest_writing_its_disk_finishes_on_the_replica_with_a_complete_disk() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    let copies = dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 16 << 20]).unwrap();
    let replica = Replica::start_with(
        "127.0.0.1:0",
        &rc,
        &pfp,
        &[
            "--failover",
            "--failover-timeout",
            "300",
            "--disk-dir",
            &s(&copies),
        ],
        &[],
    );
    let sock = dir.path().join("api.sock");
    // Paused until protected, so that every write happens under protection.
    let (mut primary, _log, console) = protected_primary(&[
        "run",
        "--mem",
        "64M",
        "--disk",
        &s(&img),
        "--api",
        &s(&sock),
        "--paused",
        "--replica",
        &replica.addr,
        "--cert",
        &s(&pc),
        "--peer",
        &rfp,
        "--cmdline",
        "disk-write=16,5 chunk-kib=1",
    ]);
    common::ftvm_ok(&["resume", "--api", &s(&sock)]);
    console.wait_for("workload disk-write", LIMIT);
    // Some epochs of writes, then the primary dies mid-write.
    let deadline = Instant::now() + LIMIT;
    while status_epochs(&sock) < 8 {
        assert!(Instant::now() < deadline, "no epochs");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !console.text().contains("disk-write ok"),
        "the write ended too soon"
    );
    let child = primary.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    replica.wait_log("took over");
    let line = replica.console.wait_for_line("vcpu0 disk-write ok", LIMIT);
    assert!(line.contains("bytes=16777216"), "{line}");
    let counts = replica.console.wait_for_line("blk0 counts", LIMIT);
    assert!(
        counts.contains("writes=16384"),
        "the guest's own count: {counts}"
    );
    // The guest flushed and powered off: its disk, on the replica, is the whole pattern.
    replica.wait_log("guest powered off");
    let disk = std::fs::read(copies.join("disk0.img")).unwrap();
    let mut want = vec![0u8; 16 << 20];
    ftvm_guest_abi::fill_pattern(5, 0, &mut want);
    let first_bad = disk.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(
        first_bad, None,
        "the replica's disk differs from the pattern"
    );
}

fn status_epochs(sock: &std::path::Path) -> u64 {
    common::protection::status(sock)["protection"]["epochs_committed"]
        .as_u64()
        .unwrap_or(0)
}

/// Planned switch-over: `ftvm migrate` hands a protected guest to its replica while a TCP
/// stream runs; the old primary exits 0, the stream goes on exactly. On an unprotected VM it
/// is refused and the guest runs on.
#[test]
fn migrate_hands_the_guest_over_with_the_stream_running() {
    require_kvm();
    let lan = Lan::create();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc, pfp, rfp) = certs(dir.path());
    lan.enter("R");
    let replica = Replica::start_with(
        &Lan::rep_addr("R"),
        &rc,
        &pfp,
        &["--failover", "--net", "tap=tapR"],
        &[],
    );
    let sock = dir.path().join("api.sock");
    let cmdline = format!("ip={SUBNET}.2/24 tcp-stream");
    lan.enter("P");
    let (mut primary, _log, _console) = protected_primary(&[
        "run",
        "--mem",
        "64M",
        "--net",
        "tap=tapP",
        "--api",
        &s(&sock),
        "--replica",
        &replica.addr,
        "--cert",
        &s(&pc),
        "--peer",
        &rfp,
        "--cmdline",
        &cmdline,
    ]);
    lan.enter_lan();
    let client = Client::connect();
    client.wait_more(1 << 20, "the stream before the switch-over");
    let answer = common::ftvm_ok(&["migrate", "--api", &s(&sock)]);
    assert!(answer.contains("\"handed_over\":true"), "{answer}");
    let child = primary.0.as_mut().unwrap();
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the old primary did not end");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "the old primary exits 0: {status}");
    let took = replica.wait_log("took over");
    client.wait_more(4 << 20, "the stream from the new primary");
    client.check();
    eprintln!("migrate answered {}; the replica: {took}", answer.trim());
    // A second migrate finds no VM there any more: a clear error.
    let again = common::ftvm(&["migrate", "--api", &s(&sock)], LIMIT);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).starts_with("ftvm: error: "),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // The new primary is not protected: a second migrate is refused, the guest runs on.
    let dir2 = tempfile::tempdir().unwrap();
    let sock2 = dir2.path().join("api.sock");
    let (_vm, _log, _, console) = spawn_logged(
        &[
            "run",
            "--mem",
            "32M",
            "--api",
            &s(&sock2),
            "--cmdline",
            "count=0 interval-ms=20",
        ],
        &[],
        "never",
    );
    console.wait_for("count 2", LIMIT);
    let out = common::ftvm(&["migrate", "--api", &s(&sock2)], LIMIT);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not protected"), "{err}");
    let now = console.text().len();
    console.wait_until("counting after the refused migrate", LIMIT, |t| {
        t.len() > now
    });
}

/// The replica records each committed epoch's counters in its accounting history: after a
/// guest's known disk writes (and their console line, which output commit holds until the
/// epoch that printed it is committed), the billing export bills exactly those writes.
#[test]
fn the_replica_s_history_bills_exactly_the_guest_s_disk_writes() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc, pfp, rfp) = certs(dir.path());
    let copies = dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let hist = dir.path().join("history");
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let replica = Replica::start_with(
        "127.0.0.1:0",
        &rc,
        &pfp,
        &[
            "--disk-dir",
            &s(&copies),
            "--history",
            &s(&hist),
            "--vm-name",
            "billed",
        ],
        &[],
    );
    let sock = dir.path().join("api.sock");
    let (_primary, _log, console) = protected_primary(&[
        "run",
        "--vcpus",
        "2",
        "--mem",
        "32M",
        "--disk",
        &s(&img),
        "--api",
        &s(&sock),
        "--paused",
        "--replica",
        &replica.addr,
        "--cert",
        &s(&pc),
        "--peer",
        &rfp,
        "--cmdline",
        "@0:disk-write=4,5 @0:chunk-kib=4 @1:count=0 @1:interval-ms=50",
    ]);
    common::ftvm_ok(&["resume", "--api", &s(&sock)]);
    // Held until committed: once it is out, the replica has recorded the writes.
    // (vCPU 1 counts on: the guest does not power off, which would release the line itself.)
    let counts = console.wait_for_line("blk0 counts", LIMIT);
    assert!(counts.contains("writes=1024"), "{counts}");
    // The line can also have gone out while the link was down (degraded, on a loaded
    // machine): wait until two more checkpoints are committed while protected.
    let committed = |sock: &std::path::Path| {
        let st = common::protection::status(sock);
        (st["protection"]["state"] == "protected")
            .then(|| st["protection"]["committed_epoch"].as_u64())
            .flatten()
    };
    let deadline = Instant::now() + LIMIT;
    let seen = loop {
        if let Some(e) = committed(&sock) {
            break e;
        }
        assert!(Instant::now() < deadline, "never protected again");
        std::thread::sleep(Duration::from_millis(10));
    };
    while committed(&sock).is_none_or(|e| e < seen + 2) {
        assert!(Instant::now() < deadline, "no further commits");
        std::thread::sleep(Duration::from_millis(10));
    }
    // An orderly stop of the replica, then the export.
    stop_in_order(&replica);
    let doc = export(&hist);
    let vm = &doc["vms"][0];
    assert_eq!(vm["vm"], "billed", "{doc}");
    assert_eq!(vm["billed"]["block_write_requests"], 1024, "{doc}");
    assert_eq!(vm["billed"]["block_write_bytes"], 4 << 20, "{doc}");
    assert_eq!(vm["billed_counters"], vm["end_counters"], "{doc}");
}

/// A guest that powers off ends its primary's link on purpose: a replica with --failover does
/// not bring it back.
#[test]
fn a_guest_that_powers_off_is_not_taken_over() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc, pfp, rfp) = certs(dir.path());
    let replica = Replica::start_with(
        "127.0.0.1:0",
        &rc,
        &pfp,
        &["--failover", "--failover-timeout", "200"],
        &[],
    );
    let (mut primary, _log, _console) =
        small_primary(&replica.addr, &s(&pc), &rfp, "count=30 interval-ms=20");
    let status = primary.0.as_mut().unwrap().wait().unwrap();
    assert!(status.success(), "the guest powered off: {status}");
    // The replica sees the close on its next read ("on purpose") or while it sends an
    // acknowledgement ("primary lost ... stays as it was"): either way, no takeover.
    let deadline = Instant::now() + LIMIT;
    while !replica
        .log()
        .contains("closed the link on purpose: not taking over")
        && !replica
            .log()
            .contains("the committed checkpoint stays as it was")
    {
        assert!(Instant::now() < deadline, "{}", replica.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    // Well past the failover timeout: still no takeover.
    let deadline = Instant::now() + Duration::from_millis(600);
    while Instant::now() < deadline {
        assert!(!replica.log().contains("took over"), "{}", replica.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// --failover-timeout is 1 to 60000 ms: 0 and 60001 are refused with the range, 1 and 60000
/// pass the check (and fail later here, on a missing --cert directory).
#[test]
fn the_failover_timeout_is_checked_at_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let missing = s(&dir.path().join("no-cert"));
    let fp = "00".repeat(32);
    for (ms, in_range) in [("0", false), ("1", true), ("60000", true), ("60001", false)] {
        let out = common::ftvm(
            &[
                "replica",
                "--listen",
                "127.0.0.1:0",
                "--cert",
                &missing,
                "--peer",
                &fp,
                "--failover",
                "--failover-timeout",
                ms,
            ],
            LIMIT,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{ms}: {err}");
        assert_eq!(!err.contains("out of range"), in_range, "{ms}: {err}");
    }
}

/// A guest counting on the console, protected by `replica` (with the certificates of `certs`)
/// until the replica has `standbys` standbys built (or says its standby thread failed); then
/// the primary is killed. Returns the primary's console: what it released.
fn count_until_killed(
    (pc, rfp): (&std::path::Path, &str),
    replica: &Replica,
    standbys: usize,
) -> String {
    let (mut primary, _log, console) =
        small_primary(&replica.addr, &s(pc), rfp, "count=0 interval-ms=20");
    console.wait_until("ten counts", LIMIT, |t| counts(t, 0).len() >= 10);
    let deadline = Instant::now() + LIMIT;
    while replica.log().matches("hot standby ready").count() < standbys
        && !replica.log().contains("VMM thread standby failed")
    {
        assert!(Instant::now() < deadline, "{}", replica.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let child = primary.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    console.text()
}

/// The guest the replica runs after a takeover continues the killed primary's count: past
/// everything the primary released, one by one, without booting again.
fn assert_continues(released: &str, replica: &Replica) {
    let last = counts(released, 0)
        .last()
        .copied()
        .expect("the primary counted");
    let text = replica
        .console
        .wait_until("counts after the takeover", LIMIT, |t| {
            counts(t, 0).len() >= 5
        });
    let after = counts(&text, 0);
    assert!(
        after[0] > last,
        "resumed at {} after {last} was released",
        after[0]
    );
    let want: Vec<u64> = (after[0]..after[0] + after.len() as u64).collect();
    assert_eq!(after, want, "{text}");
    assert!(!text.contains("ftvm-guest: boot"), "{text}");
}

/// The standby is rebuilt on each image a sync commits: after one primary powered off and
/// another synced, the takeover loads the second one's state into a standby built on its image.
#[test]
fn the_hot_standby_follows_each_new_primary_s_image() {
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
            // A fence that succeeds (it is given the lost primary and the epoch).
            "--fence",
            "test -n \"$FTVM_PRIMARY\" && test -n \"$FTVM_EPOCH\"",
        ],
        &[],
    );
    let (mut first, _log, _console) =
        small_primary(&replica.addr, &s(&pc), &rfp, "count=30 interval-ms=20");
    assert!(first.0.as_mut().unwrap().wait().unwrap().success());
    replica.wait_log("hot standby ready");
    let released = count_until_killed((&pc, &rfp), &replica, 2);
    let line = replica.wait_log("took over");
    assert_eq!(
        common::protection::field(&line, "standby"),
        Some("\"hot\""),
        "{line}"
    );
    let activation: u64 = common::protection::field(&line, "activation_us")
        .and_then(|v| v.parse().ok())
        .expect("the takeover says how long activation took");
    assert!(activation > 0, "{line}");
    assert_continues(&released, &replica);
}

/// A standby thread that fails is reported with its name and cause when it fails, and the
/// takeover then builds the machine cold: the guest continues all the same.
#[test]
fn a_failed_standby_is_reported_and_the_takeover_builds_cold() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc, pfp, rfp) = certs(dir.path());
    let replica = Replica::start_with(
        "127.0.0.1:0",
        &rc,
        &pfp,
        &["--failover", "--failover-timeout", "200"],
        &[("FTVM_INJECT_FAULT", "standby:error")],
    );
    let released = count_until_killed((&pc, &rfp), &replica, 1);
    assert!(
        replica
            .log()
            .contains("VMM thread standby failed: fault injected at standby"),
        "{}",
        replica.log()
    );
    let line = replica.wait_log("took over");
    assert_eq!(
        common::protection::field(&line, "standby"),
        Some("\"cold\""),
        "{line}"
    );
    assert_continues(&released, &replica);
}

/// The guest's clock goes on across a takeover as real time does: the first clock reading
/// after the takeover is at least the replica's silence timeout past the last one the primary
/// released (a frozen clock would show an epoch or two). The restored state was captured
/// before the outage; the takeover moves its TSCs and kvmclock on by the time since the commit
/// (tests/snapshot.rs checks that at the KVM level). Under PVM, where this runs in CI, the
/// guest reads the host's TSC directly, so this holds here even without that step.
#[test]
fn the_guest_s_clock_moves_on_across_a_takeover() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc, pfp, rfp) = certs(dir.path());
    let replica = Replica::start_with(
        "127.0.0.1:0",
        &rc,
        &pfp,
        &["--failover", "--failover-timeout", "300"],
        &[],
    );
    let (mut primary, _log, console) = small_primary(
        &replica.addr,
        &s(&pc),
        &rfp,
        "@0:clock=0 @0:interval-ms=10 @1:count=0 @1:interval-ms=1000",
    );
    let readings = |t: &str| -> Vec<(u64, u64)> {
        t.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("vcpu0 clock ")?;
                let (k, ms) = rest.split_once(" ms ")?;
                Some((k.parse().ok()?, ms.trim().parse().ok()?))
            })
            .collect()
    };
    console.wait_until("clock readings", LIMIT, |t| readings(t).len() >= 20);
    replica.wait_log("hot standby ready");
    let child = primary.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let before = readings(&console.text());
    let after_text = replica
        .console
        .wait_until("clock readings after the takeover", LIMIT, |t| {
            readings(t).len() >= 3
        });
    let after = readings(&after_text);
    let ((k0, ms0), (k1, ms1)) = (*before.last().unwrap(), after[0]);
    assert!(k1 > k0, "resumed at reading {k1} after {k0}");
    // Only a lower bound: under PVM a fresh VM's guest sometimes reads a TSC based at 0 and
    // the restored one the host's, a jump of hours forward (see the README, "Failover").
    let gap = ms1.saturating_sub(ms0);
    eprintln!("the guest's clock: {ms0} ms (reading {k0}) -> {ms1} ms (reading {k1})");
    assert!(
        gap >= 300,
        "the guest's clock moved {gap} ms ({ms0} -> {ms1}) between reading {k0} (released by the primary) and \
         {k1} (the first after the takeover); it should cover the 300 ms silence at least\n{}",
        replica.log()
    );
}

/// A TCP segment seen on the LAN: (source port, destination port, sequence, acknowledgement,
/// flags, payload bytes).
fn tcp_segment(f: &common::capture::Frame) -> Option<(u16, u16, u32, u32, u8, usize)> {
    let h = &f.head;
    if h[12..14] != [0x08, 0x00] || h[23] != 6 {
        return None;
    }
    let ihl = usize::from(h[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([h[16], h[17]]));
    let t = &h[14 + ihl..];
    let doff = usize::from(t[12] >> 4) * 4;
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((
        u16::from_be_bytes([t[0], t[1]]),
        u16::from_be_bytes([t[2], t[3]]),
        be32(&t[4..8]),
        be32(&t[8..12]),
        t[13],
        total.checked_sub(ihl + doff)?,
    ))
}

/// After a takeover the new primary sends the guest's TCP peer (the client) four one-byte
/// probes one byte below its last acknowledgement; the client answers them with
/// acknowledgements of what it has, and the stream goes on exactly.
#[test]
fn a_takeover_probes_the_guest_s_tcp_peers_and_they_answer() {
    require_kvm();
    let lan = Lan::create();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc, pfp, rfp) = certs(dir.path());
    lan.enter("R");
    let replica = Replica::start_with(
        &Lan::rep_addr("R"),
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
    lan.enter("P");
    let cmdline = format!("ip={SUBNET}.2/24 tcp-stream");
    let (mut primary, _log, _console) = protected_primary(&[
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
    ]);
    lan.enter_lan();
    let client = Client::connect();
    client.wait_more(1 << 20, "the stream before the kill");
    // The replica's port of the LAN: frames from its host, and the LAN's frames to it.
    let capture = common::capture::Capture::start_both("toR");
    let child = primary.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let line = replica.wait_log("took over");
    assert_eq!(
        common::protection::field(&line, "tcp_probes"),
        Some("4"),
        "{line}"
    );
    client.wait_more(1 << 20, "the stream after the takeover");
    client.check();
    let frames = capture.stop();
    let probes: Vec<_> = frames
        .iter()
        .filter(|f| !f.outgoing)
        .filter_map(|f| Some((f.at_ns, tcp_segment(f)?)))
        .filter(|(_, (sport, _, _, _, flags, payload))| {
            *sport == 19 && *flags == 0x10 && *payload == 1
        })
        .collect();
    assert_eq!(
        probes.len(),
        4,
        "four probes from the guest's port: {probes:?}"
    );
    let (first_at, (_, client_port, seq, _, _, _)) = probes[0];
    assert!(probes.iter().all(|(_, p)| p.2 == seq), "{probes:?}");
    // The client's acknowledgements of them, before the guest sent data again: to the guest's
    // port, no data, acknowledging at least the probed byte.
    let resumed_at = frames
        .iter()
        .filter(|f| !f.outgoing && f.at_ns >= first_at)
        .find(|f| tcp_segment(f).is_some_and(|t| t.0 == 19 && t.5 > 1))
        .map_or(u64::MAX, |f| f.at_ns);
    let answers = frames
        .iter()
        .filter(|f| f.outgoing && (first_at..resumed_at).contains(&f.at_ns))
        .filter_map(tcp_segment)
        .filter(|&(sport, dport, _, ack, flags, payload)| {
            sport == client_port
                && dport == 19
                && flags & 0x10 != 0
                && payload == 0
                && ack.wrapping_sub(seq.wrapping_add(1)) < 1 << 30
        })
        .count();
    assert!(answers >= 1, "the client answered none of the probes");
}

/// The replica's history goes on across its takeover and bills exactly what the guest did: a
/// guest writing its disk is killed mid-write; the replica takes over, protected again by the
/// next replica, numbers its epochs on from the committed one and records its acknowledged
/// checkpoints in the same history; when the guest has finished, the export bills exactly the
/// guest's own count of writes and bytes — rising epochs, no rollback, no repeat.
#[test]
fn the_history_bills_exactly_across_a_takeover_with_rising_epochs() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, r1c, r2c) = (
        dir.path().join("p"),
        dir.path().join("r1"),
        dir.path().join("r2"),
    );
    let (pfp, r1fp, r2fp) = (cert(&pc), cert(&r1c), cert(&r2c));
    let (hist, c1, c2) = (
        dir.path().join("history"),
        dir.path().join("c1"),
        dir.path().join("c2"),
    );
    std::fs::create_dir(&c1).unwrap();
    std::fs::create_dir(&c2).unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 16 << 20]).unwrap();
    let second = Replica::start_with("127.0.0.1:0", &r2c, &r1fp, &["--disk-dir", &s(&c2)], &[]);
    let first = Replica::start_with(
        "127.0.0.1:0",
        &r1c,
        &pfp,
        &[
            "--failover",
            "--failover-timeout",
            "200",
            "--disk-dir",
            &s(&c1),
            "--history",
            &s(&hist),
            "--vm-name",
            "goes-on",
            "--then-replica",
            &second.addr,
            "--then-peer",
            &r2fp,
        ],
        &[],
    );
    let sock = dir.path().join("api.sock");
    // Paused until protected, so that every write is under protection.
    let (mut primary, _log, console) = protected_primary(&[
        "run",
        "--vcpus",
        "2",
        "--mem",
        "32M",
        "--disk",
        &s(&img),
        "--api",
        &s(&sock),
        "--paused",
        "--replica",
        &first.addr,
        "--cert",
        &s(&pc),
        "--peer",
        &r1fp,
        "--cmdline",
        "@0:disk-write=16,5 @0:chunk-kib=4 @1:count=0 @1:interval-ms=50",
    ]);
    common::ftvm_ok(&["resume", "--api", &s(&sock)]);
    console.wait_for("workload disk-write", LIMIT);
    let deadline = Instant::now() + LIMIT;
    while status_epochs(&sock) < 8 {
        assert!(Instant::now() < deadline, "no epochs");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !console.text().contains("disk-write ok"),
        "the write ended too soon"
    );
    let child = primary.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let line = first.wait_log("took over");
    let took: u64 = common::protection::field(&line, "epoch")
        .and_then(|e| e.parse().ok())
        .expect("the takeover's epoch");
    let counts = first.console.wait_for_line("blk0 counts", LIMIT);
    assert!(
        counts.contains("writes=4096"),
        "the guest's own count: {counts}"
    );
    // The count line was held until its checkpoint was acknowledged, and acknowledged
    // checkpoints are recorded before their output goes: the history has every write.
    stop_in_order(&first);
    let doc = export(&hist);
    let vm = &doc["vms"][0];
    assert_eq!(vm["vm"], "goes-on", "{doc}");
    assert_eq!(vm["epochs"]["rollbacks"], 0, "{doc}");
    assert_eq!(vm["epochs"]["repeats"], 0, "{doc}");
    let end = vm["end"]["epoch"].as_u64().expect("an end epoch");
    assert!(
        end > took,
        "the history ends at epoch {end}, taken over at {took}: {doc}"
    );
    assert_eq!(vm["billed"]["block_write_requests"], 4096, "{doc}");
    assert_eq!(vm["billed"]["block_write_bytes"], 16 << 20, "{doc}");
    assert_eq!(vm["billed_counters"], vm["end_counters"], "{doc}");
}

/// Stops `r` with SIGTERM and waits until it says it stopped in order.
fn stop_in_order(r: &Replica) {
    let pid = r.child.0.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    r.wait_log("stopped in order");
}

/// `ftvm accounting export --format json` of the history `hist`.
fn export(hist: &std::path::Path) -> serde_json::Value {
    let out = common::ftvm(
        &[
            "accounting",
            "export",
            "--history",
            &s(hist),
            "--format",
            "json",
        ],
        LIMIT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A protected 32 MiB primary running `cmdline`, protected by the replica at `addr` (certificate
/// `cert`, the replica's fingerprint `peer`).
fn small_primary(
    addr: &str,
    cert: &str,
    peer: &str,
    cmdline: &str,
) -> (
    common::Guarded,
    std::sync::Arc<std::sync::Mutex<String>>,
    common::Console,
) {
    protected_primary(&[
        "run",
        "--mem",
        "32M",
        "--replica",
        addr,
        "--cert",
        cert,
        "--peer",
        peer,
        "--cmdline",
        cmdline,
    ])
}

/// A guest appending numbered, checksummed records to its disk (each written and flushed
/// before the guest says so, which output commit holds until committed) is killed mid-log: the
/// replica's copy of the disk at the takeover holds a gap-free, clean prefix with every record
/// the guest had told about, and the guest finishes its log on the replica.
#[test]
fn a_guest_appending_records_keeps_every_record_it_told_about() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc, pfp, rfp) = certs(dir.path());
    let copies = dir.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let replica = Replica::start_with(
        "127.0.0.1:0",
        &rc,
        &pfp,
        &[
            "--failover",
            "--failover-timeout",
            "200",
            "--disk-dir",
            &s(&copies),
        ],
        &[],
    );
    let sock = dir.path().join("api.sock");
    let (mut primary, _log, console) = protected_primary(&[
        "run",
        "--mem",
        "32M",
        "--disk",
        &s(&img),
        "--api",
        &s(&sock),
        "--paused",
        "--replica",
        &replica.addr,
        "--cert",
        &s(&pc),
        "--peer",
        &rfp,
        "--cmdline",
        "disk-log=800 interval-ms=2",
    ]);
    common::ftvm_ok(&["resume", "--api", &s(&sock)]);
    let told = |t: &str| -> Vec<u64> {
        t.lines()
            .filter_map(|l| {
                l.strip_prefix("vcpu0 disk-log record ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .collect()
    };
    console.wait_until("100 records told", LIMIT, |t| told(t).len() >= 100);
    let child = primary.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let before = told(&console.text());
    let last_told = *before.last().unwrap();
    assert_eq!(before, (1..=last_told).collect::<Vec<_>>());
    assert!(last_told < 800, "the log ended before the kill");
    replica.wait_log("took over");
    // The committed copy as the takeover found it (the new primary may have appended a record
    // or be writing one: a torn last block only ends the prefix there).
    let at_takeover = dir.path().join("at-takeover.img");
    std::fs::copy(copies.join("disk0.img"), &at_takeover).unwrap();
    let verify = |disk: &std::path::Path| -> (u64, u64, u64) {
        let out = common::ftvm_ok(&[
            "run",
            "--mem",
            "32M",
            "--disk",
            &s(disk),
            "--cmdline",
            "disk-log-verify=4",
        ]);
        let line = out
            .lines()
            .find(|l| l.starts_with("vcpu0 disk-log-verify "))
            .unwrap_or_else(|| panic!("no verification: {out}"));
        let n = |k: &str| -> u64 {
            common::protection::field(line, k)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{line}"))
        };
        (n("records"), n("gaps"), n("damaged"))
    };
    let (records, gaps, damaged) = verify(&at_takeover);
    assert!(
        records >= last_told,
        "the replica's copy has {records} clean records; the guest told about {last_told}"
    );
    assert_eq!(gaps, 0);
    assert!(
        damaged <= 1,
        "at most the block being written when copied: {damaged}"
    );
    // The guest finishes its log on the replica, and powers off.
    replica
        .console
        .wait_for("vcpu0 disk-log done records=800", LIMIT);
    replica.wait_log("guest powered off");
    assert_eq!(verify(&copies.join("disk0.img")), (800, 0, 0));
}
