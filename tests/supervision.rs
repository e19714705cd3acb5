//! A VMM never dies quietly: every thread's failure ends the VM with one line naming the
//! thread; SIGTERM and SIGINT stop the VM in order.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::{Guarded, ftvm_ok, ftvm_with, last_count, require_kvm, spawn_ftvm};

const LIMIT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Runs a guest that would count forever with `fault` injected; returns (status, stderr).
fn run_with_fault(fault: &str, api: &Path) -> (Option<i32>, String) {
    let out = ftvm_with(
        Command::new(env!("CARGO_BIN_EXE_ftvm"))
            .env(vmm::event::FAULT_ENV, fault)
            .env_remove("RUST_LOG")
            .args([
                "run",
                "--vcpus",
                "2",
                "--mem",
                "64M",
                "--api",
                &s(api),
                "--cmdline",
                "count=0 interval-ms=20",
            ]),
        LIMIT,
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn each_vmm_thread_that_fails_ends_the_vm_with_one_line() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    for (fault, thread, how) in [
        ("vcpu0", "vcpu0", "panicked: fault injected at vcpu0"),
        ("vcpu1", "vcpu1", "panicked: fault injected at vcpu1"),
        ("devices", "devices", "panicked: fault injected at devices"),
        ("devices:error", "devices", "fault injected at devices"),
        ("api", "api", "panicked: fault injected at api"),
        ("api:error", "api", "fault injected at api"),
        ("control", "control", "panicked: fault injected at control"),
        ("control:error", "control", "fault injected at control"),
        ("signals", "signals", "panicked: fault injected at signals"),
    ] {
        let api = dir.path().join(format!("{}.sock", fault.replace(':', "-")));
        let (code, stderr) = run_with_fault(fault, &api);
        assert_eq!(code, Some(1), "{fault}: exit status; stderr:\n{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{fault}: one line on stderr, got:\n{stderr}"
        );
        let want = format!("ftvm: error: VMM thread {thread} failed: {how}");
        assert!(
            lines[0].starts_with(&want),
            "{fault}: expected '{want}…', got '{}'",
            lines[0]
        );
        assert!(!api.exists(), "{fault}: the API socket is removed");
    }
}

/// Sends `sig` to the guarded child and waits for its exit status.
fn signal_and_wait(child: &mut Guarded, sig: i32) -> std::process::ExitStatus {
    let c = child.0.as_mut().unwrap();
    // SAFETY: kill(2) of our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(c.id() as i32, sig) }, 0);
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(status) = c.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "ftvm did not stop after signal {sig}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigterm_during_disk_and_network_traffic_stops_in_order() {
    require_kvm();
    let ns = Netns::create("sigterm", 5);
    ns.enter();
    let dir = tempfile::tempdir().unwrap();
    let (done, busy) = (dir.path().join("done.img"), dir.path().join("busy.img"));
    for img in [&done, &busy] {
        std::fs::File::create(img)
            .unwrap()
            .set_len(300 << 20)
            .unwrap();
    }
    let sock = dir.path().join("api.sock");
    let cmdline = format!(
        "ip={}/24 tcp-echo @1:disk-write=16,11 @1:disk=0 @2:disk-write=256,12 @2:disk=1 \
         @2:chunk-kib=4",
        ns.guest_ip()
    );
    let net = format!("tap={}", ns.tap);
    let (mut vm, console, reader) = spawn_ftvm(&[
        "run",
        "--vcpus",
        "3",
        "--mem",
        "256M",
        "--disk",
        &s(&done),
        "--disk",
        &s(&busy),
        "--net",
        &net,
        "--api",
        &s(&sock),
        "--cmdline",
        &cmdline,
    ]);
    console.wait_for_line("vcpu0 workload net ", LIMIT);
    console.wait_for_line("vcpu1 disk-write ok", LIMIT);
    console.wait_for_line("vcpu2 workload disk-write", LIMIT);
    // Network traffic in flight: an echo client that never stops on its own.
    let addr: SocketAddr = format!("{}:7", ns.guest_ip()).parse().unwrap();
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut back = [0u8; 5];
    conn.write_all(b"hello").unwrap();
    conn.read_exact(&mut back).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pump = {
        let (mut conn, stop) = (conn.try_clone().unwrap(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if conn.write_all(&[7u8; 1024]).is_err() || conn.read(&mut buf).is_err() {
                    break;
                }
            }
        })
    };
    assert!(
        !console.text().contains("vcpu2 disk-write ok"),
        "the busy disk's workload ended before the signal"
    );
    let status = signal_and_wait(&mut vm, libc::SIGTERM);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    drop(conn);
    pump.join().unwrap();
    assert_eq!(status.code(), Some(143), "documented status after SIGTERM");
    assert!(!sock.exists(), "the API socket is removed");

    // The finished disk holds exactly what the guest wrote.
    let o = ftvm_with(
        Command::new(env!("CARGO_BIN_EXE_ftvm")).args([
            "run",
            "--vcpus",
            "1",
            "--mem",
            "128M",
            "--disk",
            &format!("{},readonly", s(&done)),
            "--cmdline",
            "disk-verify=16,11",
        ]),
        LIMIT,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "disk-verify: {out}");
    assert!(out.contains("vcpu0 disk-verify ok bytes=16777216"), "{out}");
}

#[test]
fn sigint_stops_in_order_too() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let (mut vm, console, reader) = spawn_ftvm(&[
        "run",
        "--vcpus",
        "1",
        "--mem",
        "64M",
        "--api",
        &s(&sock),
        "--cmdline",
        "count=0 interval-ms=20",
    ]);
    console.wait_until("counting", LIMIT, |t| last_count(t, 0) >= Some(2));
    let status = signal_and_wait(&mut vm, libc::SIGINT);
    reader.join().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(!sock.exists());
}

/// Starts a guest that counts forever with an API socket.
fn counting_vm(sock: &Path) -> (Guarded, common::Console, std::thread::JoinHandle<()>) {
    let started = spawn_ftvm(&[
        "run",
        "--vcpus",
        "2",
        "--mem",
        "64M",
        "--api",
        &s(sock),
        "--cmdline",
        "count=0 interval-ms=20",
    ]);
    started
        .1
        .wait_until("counting", LIMIT, |t| last_count(t, 0) >= Some(1));
    started
}

#[test]
fn idle_and_slow_clients_do_not_delay_status() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let _vm = counting_vm(&sock);
    // One client connects and sends nothing; one sends half a request line; one sends the
    // head of a PUT and only part of its body.
    let idle = UnixStream::connect(&sock).unwrap();
    let mut slow = UnixStream::connect(&sock).unwrap();
    slow.write_all(b"GET /sta").unwrap();
    let mut short = UnixStream::connect(&sock).unwrap();
    short
        .write_all(b"PUT /snapshot HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"pa")
        .unwrap();
    for _ in 0..20 {
        let out = ftvm_ok(&["status", "--api", &s(&sock)]);
        assert!(out.contains("\"state\":\"running\""), "{out}");
    }
    // They were all still connected while status was answered: nothing waited for them.
    for c in [&idle, &slow] {
        c.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let r = (&*c).read(&mut b);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a stalled client was dropped early: {r:?}"
        );
    }
    // The short body gets a clear answer once its deadline passes, without its content.
    short
        .set_read_timeout(Some(checkpoint::api::BODY_TIMEOUT * 4))
        .unwrap();
    let mut answer = String::new();
    short.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(!answer.contains("{\"pa"), "{answer}");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_huge_request_line_is_refused_with_flat_memory() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let vm = counting_vm(&sock);
    let pid = vm.0.0.as_ref().unwrap().id();
    let before = rss_kib(pid);
    let mut c = UnixStream::connect(&sock).unwrap();
    c.write_all(b"GET /").unwrap();
    // Up to 1 GiB without a newline: the server stops reading long before.
    let chunk = vec![b'a'; 1 << 16];
    let mut sent: u64 = 0;
    while sent < 1 << 30 {
        match c.write(&chunk) {
            Ok(n) => sent += n as u64,
            Err(_) => break,
        }
    }
    assert!(sent < 64 << 20, "the server kept reading: {sent} bytes");
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    if !answer.is_empty() {
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        assert!(!answer.contains("aaaa"), "the answer echoes the input");
    }
    let after = rss_kib(pid);
    assert!(
        after < before + 16 * 1024,
        "memory grew from {before} KiB to {after} KiB"
    );
    // And the VMM still answers.
    assert!(ftvm_ok(&["status", "--api", &s(&sock)]).contains("running"));
}

#[test]
fn bad_requests_get_short_answers_that_do_not_echo() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let _vm = counting_vm(&sock);
    let ask = |raw: &[u8]| {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.write_all(raw).unwrap();
        let mut a = String::new();
        c.read_to_string(&mut a).unwrap();
        a
    };
    let a = ask(b"GET /secret-path-xyz HTTP/1.1\r\n\r\n");
    assert!(a.starts_with("HTTP/1.1 404"), "{a}");
    assert!(!a.contains("secret-path-xyz"), "{a}");
    let a = ask(b"\xff\xfe\xfd /status HTTP/1.1\r\n\r\n");
    assert!(a.starts_with("HTTP/1.1 400"), "{a}");
    let body = br#"{"path":"/tmp/x.snap","raw":"yes"}"#;
    let a = ask(format!(
        "PUT /snapshot HTTP/1.1\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        String::from_utf8_lossy(body)
    )
    .as_bytes());
    assert!(a.starts_with("HTTP/1.1 400"), "{a}");
    assert!(!Path::new("/tmp/x.snap").exists());
    let a = ask(b"PUT /snapshot HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n");
    assert!(a.starts_with("HTTP/1.1 413"), "{a}");
}

#[test]
fn the_api_path_is_never_taken_from_someone_else() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let run = |sock: &Path| {
        ftvm_with(
            Command::new(env!("CARGO_BIN_EXE_ftvm")).args([
                "run",
                "--vcpus",
                "1",
                "--mem",
                "64M",
                "--api",
                &s(sock),
                "--cmdline",
                "count=1",
            ]),
            LIMIT,
        )
    };
    // A regular file (say, a disk image) at the path: refused, untouched.
    let file = dir.path().join("disk.img");
    std::fs::write(&file, b"precious").unwrap();
    let o = run(&file);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert!(o.stdout.is_empty(), "no guest code ran");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    // A socket another VM serves: refused; the other VM keeps its socket.
    let live = dir.path().join("live.sock");
    let _other = counting_vm(&live);
    let o = run(&live);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("another process is serving it"), "{err}");
    assert!(ftvm_ok(&["status", "--api", &s(&live)]).contains("running"));

    // A stale socket (nobody listening) is replaced, and removed at the end.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let o = run(&stale);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!stale.exists());
}

#[test]
fn back_to_back_snapshots_with_busy_cores_leave_the_vm_running() {
    require_kvm();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            })
        })
        .collect();
    // In memory (tmpfs): the test is about run state, not about how fast a disk syncs.
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (vm, console) = common::test_vm(2, 16, "count=0 interval-ms=5");
    let vm = vm.start().unwrap();
    console.wait_until("counting", LIMIT, |t| last_count(t, 0) >= Some(1));
    use checkpoint::api::Command as C;
    let status = |vm: &vmm::RunningVm| {
        primary::control::execute(vm, C::Status).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for i in 0..1000 {
        if i % 50 == 0 {
            primary::control::execute(&vm, C::Pause).unwrap();
            assert_eq!(status(&vm), "paused");
            primary::control::execute(&vm, C::Resume).unwrap();
        }
        let path = dir.path().join(format!("s{}.snap", i % 2));
        primary::control::execute(
            &vm,
            C::Snapshot {
                path,
                raw: i % 3 == 0,
            },
        )
        .unwrap();
        assert_eq!(status(&vm), "running", "after snapshot {i}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in burners {
        b.join().unwrap();
    }
    // The guest is really running: its counter moves on.
    let now = last_count(&console.text(), 0).unwrap();
    console.wait_until("more counting", LIMIT, |t| last_count(t, 0) > Some(now + 2));
    // A paused VM stays paused through a snapshot.
    primary::control::execute(&vm, C::Pause).unwrap();
    let path = dir.path().join("paused.snap");
    primary::control::execute(&vm, C::Snapshot { path, raw: false }).unwrap();
    assert_eq!(status(&vm), "paused");
    assert!(
        vm.vcpu_states()
            .iter()
            .all(|s| *s != vmm::vcpu::VcpuRunState::Running)
    );
    vm.stop().unwrap();
}
