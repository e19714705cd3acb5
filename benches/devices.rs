//! Device throughput with the test guest: sequential and 4 KiB random block I/O, and TCP
//! both ways over a TAP in a network namespace, with vCPU exits per request.
//!
//! `cargo bench --bench devices`. Needs root (network namespace, TAP) and /dev/kvm.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::netns::Netns;
use vmm::devices::virtio::block::BlockConfig;
use vmm::devices::virtio::net::NetConfig;
use vmm::vcpu::ExitReason;

const LIMIT: Duration = Duration::from_secs(300);

fn exits(vm: &vmm::RunningVm) -> u64 {
    vm.vcpu_counters()
        .iter()
        .map(|c| ExitReason::ALL.iter().map(|&r| c.exits(r)).sum::<u64>())
        .sum()
}

fn block(label: &str, img: &std::path::Path, cmdline: &str) {
    let disks = vec![BlockConfig {
        path: img.to_path_buf(),
        read_only: false,
    }];
    let (vm, console) = common::test_vm_with(1, 256, cmdline, disks);
    let vm = vm.start().unwrap();
    let line = console.wait_for_line("vcpu0 disk-", LIMIT);
    assert!(line.contains(" ok "), "{line}\n{}", console.text());
    let counters = vm.block_counters()[0].clone();
    let all_exits = exits(&vm);
    vm.stop().unwrap();
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.parse().ok())
            .unwrap()
    };
    let (bytes, ns) = (field("bytes="), field("ns="));
    let c = &counters;
    let requests = c.read_requests.load(std::sync::atomic::Ordering::Relaxed)
        + c.write_requests.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{label:<34} {:>8.1} MiB/s {:>9.0} req/s  {:.2} exits/request",
        bytes as f64 / (1 << 20) as f64 / (ns as f64 / 1e9),
        requests as f64 / (ns as f64 / 1e9),
        all_exits as f64 / requests as f64
    );
}

fn tcp(ns: &Netns) {
    let nets = vec![NetConfig {
        tap: ns.tap.clone(),
        mac: None,
    }];
    let mib = 256u64;
    let cmdline = format!("ip={}/24 http-file={mib},1 tcp-sink", ns.guest_ip());
    let (vm, console) = common::test_vm_full(1, 256, &cmdline, Vec::new(), nets);
    let vm = vm.start().unwrap();
    console.wait_for_line("vcpu0 workload net ", LIMIT);
    let connect = |port: u16| {
        let s = TcpStream::connect((ns.guest_ip().as_str(), port)).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s
    };

    let e0 = exits(&vm);
    let start = Instant::now();
    let mut s = connect(80);
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let t = start.elapsed();
    let c = vm.net_counters()[0].clone();
    let tx = c.tx_packets.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{:<34} {:>8.1} MiB/s  ({} MiB in {:.2?}, {:.2} exits/packet sent)",
        "TCP guest -> host (http-file)",
        got as f64 / (1 << 20) as f64 / t.as_secs_f64(),
        got >> 20,
        t,
        (exits(&vm) - e0) as f64 / tx as f64
    );

    let rx0 = c.rx_packets.load(std::sync::atomic::Ordering::Relaxed);
    let e0 = exits(&vm);
    let start = Instant::now();
    let mut s = connect(9);
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        s.write_all(&chunk).unwrap();
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = s.read(&mut buf); // the guest closes once it has read everything
    let t = start.elapsed();
    let rx = c.rx_packets.load(std::sync::atomic::Ordering::Relaxed) - rx0;
    println!(
        "{:<34} {:>8.1} MiB/s  ({mib} MiB in {t:.2?}, {:.2} exits/packet received)",
        "TCP host -> guest (tcp-sink)",
        mib as f64 / t.as_secs_f64(),
        (exits(&vm) - e0) as f64 / rx as f64
    );
    vm.stop().unwrap();
}

fn main() {
    let img = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
    img.as_file().set_len(1 << 30).unwrap();
    println!(
        "devices benchmark (1 vCPU guest; image in {})",
        std::env::temp_dir().display()
    );
    block(
        "block sequential write, 1 MiB reqs",
        img.path(),
        "disk-write=512,1 chunk-kib=1024",
    );
    block(
        "block sequential read+verify, 1 MiB",
        img.path(),
        "disk-verify=512,1 chunk-kib=1024",
    );
    block(
        "block 4 KiB random read",
        img.path(),
        "disk-randread=512,20000 chunk-kib=4",
    );
    block(
        "block 4 KiB sequential write",
        img.path(),
        "disk-write=64,1 chunk-kib=4",
    );
    let ns = Netns::create("bench", 9);
    ns.enter();
    tcp(&ns);
}
