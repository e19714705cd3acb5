//! Snapshot, kill, restore in a new process: a guest that counts, writes its disk and holds a
//! TCP connection carries on as if nothing happened.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::netns::Netns;
use common::{ftvm_ok, last_count, require_kvm, spawn_ftvm};

const LIMIT: Duration = Duration::from_secs(60);

fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

#[test]
fn a_snapshot_survives_the_vmm_being_killed() {
    require_kvm();
    let ns = Netns::create("restore", 3);
    ns.enter();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(160 << 20)
        .unwrap();
    let (sock, snap) = (dir.path().join("api.sock"), dir.path().join("vm.snap"));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let cmdline = format!(
        "ip={}/24 tcp-echo @1:count=0 @1:interval-ms=5 @2:disk-write=128,7 @2:chunk-kib=4",
        ns.guest_ip()
    );
    let net = format!("tap={}", ns.tap);
    let (mut first, console, reader) = spawn_ftvm(&[
        "run",
        "--vcpus",
        "3",
        "--mem",
        "256M",
        "--disk",
        &s(&img),
        "--net",
        &net,
        "--api",
        &s(&sock),
        "--cmdline",
        &cmdline,
    ]);
    console.wait_for_line("vcpu0 workload net ", LIMIT);
    console.wait_for_line("vcpu2 workload disk-write", LIMIT);
    console.wait_until("counting", LIMIT, |t| last_count(t, 1) >= Some(3));
    let addr: SocketAddr = format!("{}:7", ns.guest_ip()).parse().unwrap();
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    echo(&mut conn, b"before the snapshot");

    // Pause, so that the guest prints nothing more; snapshot; kill. Everything the first VMM
    // printed (read once its output has closed) is exactly what the saved guest printed.
    ftvm_ok(&["pause", "--api", &s(&sock)]);
    let answer = ftvm_ok(&["snapshot", "--api", &s(&sock), "--to", &s(&snap)]);
    assert!(answer.contains("\"memory_bytes\""), "{answer}");
    let child = first.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    let before = console.text();
    let counted = last_count(&before, 1).unwrap_or(0);
    assert!(
        !before.contains("disk-write ok"),
        "the disk workload finished before the snapshot"
    );

    // A new process continues the guest.
    let api2 = s(&dir.path().join("api2.sock"));
    let (_second, console, _) = spawn_ftvm(&["restore", "--from", &s(&snap), "--api", &api2]);
    let text = console.wait_until("counting on", LIMIT, |t| {
        last_count(&format!("{before}{t}"), 1) > Some(counted + 3)
    });
    common::assert_counts_continue(&before, &text, 1);

    // The TCP connection made before the snapshot still works, and so does a new one.
    echo(&mut conn, b"after the restore, same connection");
    let mut fresh = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    echo(&mut fresh, b"a new connection");

    // The disk workload, interrupted by the snapshot, completes, and the image holds exactly
    // the pattern: nothing lost or doubled across the two processes.
    let done = console.wait_for_line("vcpu2 disk-write ok", Duration::from_secs(120));
    assert!(done.contains("bytes=134217728"), "{done}");
    let bytes = std::fs::read(&img).unwrap();
    let mut want = vec![0u8; 128 << 20];
    ftvm_guest_abi::fill_pattern(7, 0, &mut want);
    assert!(
        bytes[..128 << 20] == want[..],
        "the image differs from the pattern"
    );
}

#[test]
fn bad_snapshot_files_are_clear_errors_and_start_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.snap");
    std::fs::write(
        &path,
        b"FTVMSNAP\x09\x00 not really a snapshot, and too short",
    )
    .unwrap();
    let o = common::ftvm(&["restore", "--from", path.to_str().unwrap()], LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("snapshot format 9.x"), "{err}");
    assert!(o.stdout.is_empty(), "no guest output");
    std::fs::write(&path, b"hello").unwrap();
    let o = common::ftvm(&["restore", "--from", path.to_str().unwrap()], LIMIT);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not an ftvm snapshot"));
    let o = common::ftvm(&["restore", "--from", "/nonexistent/vm.snap"], LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Cannot open snapshot /nonexistent/vm.snap") && err.contains("No such file"),
        "{err}"
    );
}
