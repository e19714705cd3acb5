//! virtio-net end to end: the test guest on a TAP in a network namespace answers 100 pings,
//! serves a 12 MiB file over TCP and echoes, and every counter agrees exactly: the guest's own,
//! the VMM's, and the host kernel's on the TAP.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::test_vm_full;
use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::net::NetConfig;

const LIMIT: Duration = Duration::from_secs(60);

fn connect(ns: &Netns, port: u16) -> TcpStream {
    let addr: SocketAddr = format!("{}:{port}", ns.guest_ip()).parse().unwrap();
    let s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connects to the guest");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

#[test]
fn the_guest_answers_pings_serves_a_file_and_counts_exactly() {
    common::require_kvm();
    let ns = Netns::create("net", 1);
    ns.enter();
    let nets = vec![NetConfig {
        tap: ns.tap.clone(),
        mac: None,
    }];
    let cmdline = format!("ip={}/24 tcp-echo tcp-stream http-file=12,5", ns.guest_ip());
    let (vm, console) = test_vm_full(1, 128, &cmdline, Vec::new(), nets);
    let vm = vm.start().unwrap();
    let text = console.wait_for_line("vcpu0 workload net ", LIMIT);
    let counters_addr = text
        .split_whitespace()
        .find_map(|w| u64::from_str_radix(w.strip_prefix("counters=0x")?, 16).ok())
        .expect("the guest says where its counters are");

    // 100 pings, none lost.
    let ping = Command::new("ping")
        .args(["-c", "100", "-i", "0.01", "-W", "5", &ns.guest_ip()])
        .output()
        .expect("ping runs");
    let out = String::from_utf8_lossy(&ping.stdout);
    assert!(
        out.contains("100 packets transmitted, 100 received, 0% packet loss"),
        "{out}"
    );

    // A 12 MiB download whose sha256 matches the pattern the guest serves.
    let mut s = connect(&ns, 80);
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP header")
        + 4;
    let header = String::from_utf8_lossy(&response[..split]);
    assert!(header.starts_with("HTTP/1.0 200 OK"), "{header}");
    assert!(header.contains("Content-Length: 12582912"), "{header}");
    let body = &response[split..];
    let mut want = vec![0u8; 12 << 20];
    ftvm_guest_abi::fill_pattern(5, 0, &mut want);
    assert_eq!(body.len(), want.len());
    assert_eq!(
        Sha256::digest(body),
        Sha256::digest(&want),
        "sha256 of the download"
    );

    // Echo.
    let mut s = connect(&ns, 7);
    let msg: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    s.write_all(&msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
    drop(s);

    // The endless stream: its first 3 MiB are the pattern (seed 19).
    let mut s = connect(&ns, 19);
    let mut got = vec![0u8; 3 << 20];
    s.read_exact(&mut got).unwrap();
    let mut want = vec![0u8; got.len()];
    ftvm_guest_abi::fill_pattern(19, 0, &mut want);
    assert!(got == want, "tcp-stream bytes differ from the pattern");
    drop(s);

    // Exact counters once traffic has stopped: guest == VMM == TAP.
    let c = vm.net_counters()[0].clone();
    let read = |i: u64| -> u64 {
        vm.memory()
            .read_obj(GuestAddress(counters_addr + 8 * i))
            .unwrap()
    };
    let snapshot = || {
        let guest = [read(0), read(1), read(2), read(3)];
        let vmm = [
            c.rx_packets.load(Ordering::Relaxed),
            c.rx_bytes.load(Ordering::Relaxed),
            c.tx_packets.load(Ordering::Relaxed),
            c.tx_bytes.load(Ordering::Relaxed),
        ];
        // What the host sent into the TAP is what the guest received, and the other way round.
        let tap = [
            ns.tap_stat("tx_packets"),
            ns.tap_stat("tx_bytes"),
            ns.tap_stat("rx_packets"),
            ns.tap_stat("rx_bytes"),
        ];
        (guest, vmm, tap)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let (guest, vmm, tap) = loop {
        let s = snapshot();
        if (s.0 == s.1 && s.1 == s.2) || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        guest, vmm,
        "guest vs VMM [rx pkts, rx bytes, tx pkts, tx bytes]"
    );
    assert_eq!(vmm, tap, "VMM vs TAP");
    assert!(guest[0] > 100, "received at least the pings: {guest:?}");
    assert!(guest[3] > 12 << 20, "sent at least the file: {guest:?}");
    for (name, v) in [
        ("rx_dropped", &c.rx_dropped),
        ("tx_dropped", &c.tx_dropped),
        ("invalid", &c.invalid_chains),
    ] {
        assert_eq!(v.load(Ordering::Relaxed), 0, "{name}");
    }
    vm.stop().unwrap();
}

#[test]
fn the_namespace_is_removed_even_when_a_test_fails() {
    let name = std::panic::catch_unwind(|| {
        let ns = Netns::create("fail", 2);
        assert!(Netns::exists(&ns.name));
        let name = ns.name.clone();
        std::panic::panic_any(name);
    })
    .expect_err("the closure panics")
    .downcast::<String>()
    .expect("it panics with the namespace's name");
    assert!(!Netns::exists(&name), "{name} is still there");
}
