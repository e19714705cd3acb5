//! virtio-blk end to end with the test guest: bytes on the image, a second boot that verifies
//! them, a read-only disk, exact counters, and pausing in the middle of disk traffic.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::test_vm_with;
use vmm::VmEvent;
use vmm::devices::virtio::block::{BlockConfig, BlockCounters};

const LIMIT: Duration = Duration::from_secs(60);

fn image(mib: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(mib << 20).unwrap(); // sparse
    f
}

fn disk(f: &tempfile::NamedTempFile, read_only: bool) -> Vec<BlockConfig> {
    vec![BlockConfig {
        path: f.path().to_path_buf(),
        read_only,
    }]
}

/// The guest's own `blk0 counts ...` line as (reads, read-bytes, writes, write-bytes, flushes).
fn guest_counts(text: &str) -> [u64; 5] {
    let line = text
        .lines()
        .find(|l| l.starts_with("blk0 counts "))
        .unwrap_or_else(|| panic!("no counts line in:\n{text}"));
    let mut out = [0; 5];
    for (i, key) in [
        "reads=",
        "read-bytes=",
        "writes=",
        "write-bytes=",
        "flushes=",
    ]
    .iter()
    .enumerate()
    {
        out[i] = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}"));
    }
    out
}

fn host_counts(c: &BlockCounters) -> [u64; 5] {
    [
        c.read_requests.load(Ordering::Relaxed),
        c.read_bytes.load(Ordering::Relaxed),
        c.write_requests.load(Ordering::Relaxed),
        c.write_bytes.load(Ordering::Relaxed),
        c.flush_requests.load(Ordering::Relaxed),
    ]
}

fn run_to_power_off(
    vcpus: u64,
    cmdline: &str,
    disks: Vec<BlockConfig>,
) -> (u32, String, [u64; 5], u64) {
    let (vm, console) = test_vm_with(vcpus, 128, cmdline, disks);
    let vm = vm.start().unwrap();
    let status = match vm.wait_event(Some(LIMIT)) {
        Some(VmEvent::PowerOff(s)) => s,
        other => panic!("guest did not power off: {other:?}\n{}", console.text()),
    };
    let c = vm.block_counters()[0].clone();
    vm.stop().unwrap();
    let c = &c;
    (
        status,
        console.text(),
        host_counts(c),
        c.errors.load(Ordering::Relaxed),
    )
}

#[test]
fn the_guest_writes_a_pattern_the_host_reads_and_a_second_boot_verifies() {
    let img = image(32);
    let (status, text, host, errors) =
        run_to_power_off(2, "disk-write=4,77 chunk-kib=64", disk(&img, false));
    assert_eq!(status, 0, "{text}");
    assert!(text.contains("vcpu0 disk-write ok bytes=4194304"), "{text}");

    // The host finds the pattern byte for byte, and nothing else on the disk.
    let bytes = std::fs::read(img.path()).unwrap();
    let mut want = vec![0u8; 4 << 20];
    ftvm_guest_abi::fill_pattern(77, 0, &mut want);
    assert!(
        bytes[..4 << 20] == want[..],
        "image differs from the guest's pattern"
    );
    assert!(
        bytes[4 << 20..].iter().all(|&b| b == 0),
        "bytes written past the transfer"
    );

    // Exact counters: the VMM's equal the guest's own, and the bytes on the image.
    assert_eq!(host, guest_counts(&text), "host vs guest counts");
    assert_eq!(host[2], 64, "4 MiB in 64 KiB requests");
    assert_eq!(host[3], want.len() as u64);
    assert_eq!(errors, 0);

    let (status, text, host, _) =
        run_to_power_off(1, "disk-verify=4,77 chunk-kib=128", disk(&img, false));
    assert_eq!(status, 0, "{text}");
    assert!(
        text.contains("vcpu0 disk-verify ok bytes=4194304"),
        "{text}"
    );
    assert_eq!(host, guest_counts(&text));
    assert_eq!(host, [32, 4 << 20, 0, 0, 0]);

    // And a different pattern is noticed.
    let (status, text, _, _) = run_to_power_off(1, "disk-verify=1,78", disk(&img, false));
    assert_eq!(status, 5, "{text}");
    assert!(text.contains("disk-verify mismatch at byte 0"), "{text}");
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let img = image(8);
    let (status, text, host, errors) = run_to_power_off(1, "disk-write=1,5", disk(&img, true));
    assert_eq!(status, 4, "the guest saw its write refused:\n{text}");
    assert!(
        text.contains("disk-write refused status=1 sector=0"),
        "{text}"
    );
    assert!(
        std::fs::read(img.path()).unwrap().iter().all(|&b| b == 0),
        "image changed"
    );
    assert_eq!(host, [0; 5]);
    assert_eq!(errors, 1);
}

#[test]
fn pausing_during_disk_traffic_loses_nothing() {
    let img = image(64);
    let (vm, console) = test_vm_with(2, 128, "disk-write=48,3 chunk-kib=16", disk(&img, false));
    let vm = vm.start().unwrap();
    console.wait_for("vcpu0 workload disk-write", LIMIT);
    let mut cycles = 0;
    while !console.text().contains("disk-write ok") && cycles < 300 {
        vm.pause().unwrap();
        // Quiesced: nothing moves while paused.
        let before = host_counts(&vm.block_counters()[0]);
        std::thread::sleep(Duration::from_millis(1));
        assert_eq!(
            host_counts(&vm.block_counters()[0]),
            before,
            "device ran while paused"
        );
        vm.resume();
        cycles += 1;
    }
    assert_eq!(
        vm.wait_event(Some(LIMIT)),
        Some(VmEvent::PowerOff(0)),
        "{}",
        console.text()
    );
    let counters = vm.block_counters()[0].clone();
    vm.stop().unwrap();
    assert!(
        cycles > 10,
        "the workload ended before the test could pause it much ({cycles})"
    );
    let text = console.text();
    assert_eq!(host_counts(&counters), guest_counts(&text));
    let bytes = std::fs::read(img.path()).unwrap();
    let mut want = vec![0u8; 48 << 20];
    ftvm_guest_abi::fill_pattern(3, 0, &mut want);
    assert!(
        bytes[..48 << 20] == want[..],
        "image differs after {cycles} pauses"
    );
}
