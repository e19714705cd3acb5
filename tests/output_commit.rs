//! Output commit, checked from outside: a capture on the TAP records when each frame the guest
//! sends leaves the VMM (the kernel's timestamp), the primary's log records when each
//! acknowledgement released how many frames; no frame leaves before a release that covers it.
//! With the replica stopped (SIGSTOP), frames and console bytes stop; when the link times out
//! the guest is unprotected, says so, and its output flows again.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::capture::{Capture, Frame};
use common::netns::Netns;
use common::protection::{Replica, cert, field, s, spawn_logged, status};
use common::require_kvm;

const LIMIT: Duration = Duration::from_secs(60);

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// (at_unix_ns, frames) of each release the primary logged, in order.
fn releases(log: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter(|l| l.contains("acknowledged: output released"))
        .map(|l| {
            let n = |k| field(l, k).and_then(|v| v.parse().ok()).unwrap();
            (n("at_unix_ns"), n("frames"))
        })
        .collect()
}

/// When the primary opened the gate because its replica was lost.
fn opened(log: &str) -> Option<u64> {
    log.lines()
        .find(|l| l.contains("output released: the guest is unprotected"))
        .and_then(|l| field(l, "at_unix_ns")?.parse().ok())
}

/// The k-th frame (1-based) captured must have left after releases that wrote at least k
/// frames had begun.
fn check_released_before_sent(frames: &[Frame], releases: &[(u64, u64)]) {
    let mut released = 0u64;
    let mut r = releases.iter().peekable();
    for (k, f) in frames.iter().enumerate() {
        while let Some(&&(at, n)) = r.peek() {
            if at > f.at_ns {
                break;
            }
            released += n;
            r.next();
        }
        assert!(
            (k as u64) < released,
            "frame {} left at {} ns, when releases had let out only {released} frames",
            k + 1,
            f.at_ns
        );
    }
}

#[test]
fn no_output_leaves_before_its_checkpoint_is_acknowledged() {
    require_kvm();
    let ns = Netns::create("commit", 11);
    ns.enter();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    let replica = Replica::start("127.0.0.1:0", &rc, &pfp);
    let sock = dir.path().join("api.sock");
    let cmdline = format!(
        "ip={}/24 tcp-echo @1:count=0 @1:interval-ms=10",
        ns.guest_ip()
    );
    let tap = format!("tap={}", ns.tap);
    let (_primary, log, protected, console) = spawn_logged(
        &[
            "run",
            "--vcpus",
            "2",
            "--mem",
            "64M",
            "--api",
            &s(&sock),
            "--net",
            &tap,
            "--replica",
            &replica.addr,
            "--cert",
            &s(&pc),
            "--peer",
            &rfp,
            "--cmdline",
            &cmdline,
        ],
        &[("RUST_LOG", "info,primary::protect=debug")],
        common::protection::PROTECTED,
    );
    protected
        .recv_timeout(LIMIT)
        .expect("the guest is protected");
    let log_text = || log.lock().unwrap().clone();

    // Protected: every frame the guest sends is held, then released by an acknowledgement.
    let capture = Capture::start(&ns.tap);
    let passed = status(&sock)["protection"]["output"]["passed_items"].clone();
    let ping = std::process::Command::new("ping")
        .args(["-c", "100", "-i", "0.01", "-W", "5", &ns.guest_ip()])
        .output()
        .expect("ping runs");
    let out = String::from_utf8_lossy(&ping.stdout);
    assert!(out.contains(" 0% packet loss"), "{out}");
    let addr: std::net::SocketAddr = format!("{}:7", ns.guest_ip()).parse().unwrap();
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    for i in 0..50u8 {
        let msg = [i; 64];
        tcp.write_all(&msg).unwrap();
        let mut back = [0u8; 64];
        tcp.read_exact(&mut back).unwrap();
        assert_eq!(back, msg, "request {i} echoed exactly");
    }
    let st = status(&sock);
    let output = &st["protection"]["output"];
    assert_eq!(
        output["passed_items"], passed,
        "nothing went out unheld: {st}"
    );
    assert_eq!(output["held"], true, "{st}");
    assert!(output["released_items"].as_u64() > Some(150), "{st}");

    // The replica stops answering: output stops with it, until the link times out.
    let pid = replica.child.0.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) of our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = unix_ns();
    let mut pinger = std::process::Command::new("ping")
        .args(["-c", "400", "-i", "0.01", "-W", "1", &ns.guest_ip()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ping runs");
    // Console bytes as they arrive, until the primary gives up on its replica.
    let mut seen = Vec::new();
    let deadline = Instant::now() + LIMIT;
    let open_at = loop {
        seen.push((unix_ns(), console.text().len()));
        if let Some(at) = opened(&log_text()) {
            break at;
        }
        assert!(Instant::now() < deadline, "never degraded: {}", log_text());
        std::thread::sleep(Duration::from_millis(10));
    };
    let st = status(&sock);
    assert_ne!(st["protection"]["state"], "protected", "{st}");
    assert_eq!(st["protection"]["output"]["held"], false, "{st}");
    let _ = pinger.wait();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let frames = capture.stop();

    let log = log_text();
    let releases = releases(&log);
    let held: Vec<Frame> = frames
        .iter()
        .copied()
        .filter(|f| f.at_ns < open_at)
        .collect();
    check_released_before_sent(&held, &releases);

    // An acknowledgement the replica sent just before it stopped may still arrive; none
    // after that (one epoch is 25 ms; 100 ms of slack for this shared machine).
    let slack = 100_000_000;
    let late: Vec<_> = releases
        .iter()
        .filter(|r| r.0 > stopped + slack && r.0 < open_at)
        .collect();
    assert!(
        late.is_empty(),
        "releases after the replica stopped: {late:?}"
    );
    let last_release = releases.iter().filter(|r| r.0 < open_at).map(|r| r.0).max();
    let quiet_from = last_release.unwrap_or(stopped).max(stopped) + slack;
    assert!(
        open_at > quiet_from + 500_000_000,
        "the window is too short to check"
    );
    let escaped: Vec<_> = frames
        .iter()
        .filter(|f| f.at_ns > quiet_from && f.at_ns < open_at)
        .collect();
    assert!(
        escaped.is_empty(),
        "{} frames left while nothing was acknowledged: {escaped:?}",
        escaped.len()
    );
    let console_held: Vec<_> = seen
        .iter()
        .filter(|(t, _)| *t > quiet_from && *t < open_at)
        .map(|(_, len)| len)
        .collect();
    assert!(
        console_held.windows(2).all(|w| w[0] == w[1]),
        "console bytes arrived while nothing was acknowledged"
    );
    // Unprotected, the guest's output flows again: pings are answered, the console counts.
    assert!(
        frames.iter().filter(|f| f.at_ns > open_at).count() > 20,
        "no output after the guest became unprotected"
    );
    let before = console.text().len();
    console.wait_until("the console after degrading", LIMIT, |t| t.len() > before);
}

/// 30 s of a TCP stream from the guest and of pings through a protected VM at 40 Hz: every
/// byte is the pattern the guest sends, in order, and no ping is lost.
#[test]
fn a_tcp_stream_and_pings_stay_exact_for_30_seconds_at_40_hz() {
    require_kvm();
    let ns = Netns::create("commit30", 12);
    ns.enter();
    let dir = tempfile::tempdir().unwrap();
    let (pc, rc) = (dir.path().join("p"), dir.path().join("r"));
    let (pfp, rfp) = (cert(&pc), cert(&rc));
    let replica = Replica::start("127.0.0.1:0", &rc, &pfp);
    let sock = dir.path().join("api.sock");
    let cmdline = format!("ip={}/24 tcp-stream", ns.guest_ip());
    let tap = format!("tap={}", ns.tap);
    let (_primary, _log, _console) = common::protection::protected_primary(&[
        "run",
        "--mem",
        "64M",
        "--api",
        &s(&sock),
        "--net",
        &tap,
        "--replica",
        &replica.addr,
        "--cert",
        &s(&pc),
        "--peer",
        &rfp,
        "--epoch-ms",
        "25",
        "--cmdline",
        &cmdline,
    ]);
    let addr: std::net::SocketAddr = format!("{}:19", ns.guest_ip()).parse().unwrap();
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (mut at, mut buf, mut want) = (0u64, vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    let mut pinger = None;
    let mut start = Instant::now();
    while pinger.is_none() || start.elapsed() < Duration::from_secs(30) {
        // The pings start once the stream runs (its first MiB), and go on beside it.
        if pinger.is_none() && at >= 1 << 20 {
            pinger = Some(
                std::process::Command::new("ping")
                    .args(["-c", "600", "-i", "0.05", "-W", "5", &ns.guest_ip()])
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .expect("ping runs"),
            );
            start = Instant::now();
        }
        let n = tcp.read(&mut buf).expect("the stream goes on");
        assert!(n > 0, "the guest closed the stream");
        ftvm_guest_abi::fill_pattern(19, at, &mut want[..n]);
        assert!(
            buf[..n] == want[..n],
            "the stream differs from byte {at} on"
        );
        at += n as u64;
    }
    let out = pinger
        .expect("the stream ran")
        .wait_with_output()
        .expect("ping ends");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("600 packets transmitted, 600 received, 0% packet loss"),
        "{text}"
    );
    let st = status(&sock);
    assert_eq!(st["protection"]["state"], "protected", "{st}");
    assert!(at > 1 << 20, "only {at} bytes in 30 s");
    eprintln!("{at} bytes streamed in 30 s while protected");
}
