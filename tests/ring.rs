//! Capture with KVM's dirty ring: with background pre-copy, the image assembled from the
//! captures equals the primary's memory at every pause (pages the guest writes again after
//! their background copy, and pages only the VMM wrote, included); a ring smaller than what the
//! guest dirties loses nothing and the vCPU goes on; bad ring settings are refused clearly.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Console, TEST_GUEST, last_count, require_kvm};
use primary::capture::{CaptureError, CaptureStats, Capturer, Mode, Scope, Staging};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm::devices::virtio::block::BlockConfig;
use vmm::dirty_ring::DirtyLog;
use vmm::event::error_chain;
use vmm::memory::GuestMemoryMmap;
use vmm::{Kernel, Vm, VmConfig};

const LIMIT: Duration = Duration::from_secs(60);

fn config(vcpus: u64, mem_mib: u64, cmdline: &str, disks: Vec<BlockConfig>) -> (VmConfig, Console) {
    require_kvm();
    let console = Console::default();
    let config = VmConfig {
        mem_size: mem_mib << 20,
        vcpus,
        kernel: Kernel::Bytes {
            name: "test guest".into(),
            image: Arc::from(TEST_GUEST),
        },
        cmdline: Some(cmdline.into()),
        initrd: None,
        console: Box::new(console.clone()),
        disks,
        nets: Vec::new(),
    };
    (config, console)
}

/// Builds (not starts) a test-guest VM whose vCPUs log into dirty rings of `entries`.
fn ring_vm(
    vcpus: u64,
    mem_mib: u64,
    cmdline: &str,
    disks: Vec<BlockConfig>,
    entries: u32,
) -> (Vm, Console) {
    let (config, console) = config(vcpus, mem_mib, cmdline, disks);
    let vm = Vm::with_dirty_log(config, DirtyLog::Ring { entries }).expect("VM builds");
    (vm, console)
}

/// Every region's bytes (the VM is paused while this runs).
fn image(memory: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    memory
        .iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            vm_memory::Bytes::read_slice(memory, &mut v, r.start_addr()).unwrap();
            v
        })
        .collect()
}

/// A replica's memory: regions (start, bytes) that captures are applied to.
struct Assembled(Vec<(u64, Vec<u8>)>);

impl Assembled {
    fn zeroed(memory: &GuestMemoryMmap) -> Self {
        Self(
            memory
                .iter()
                .map(|r| (r.start_addr().0, vec![0u8; r.len() as usize]))
                .collect(),
        )
    }

    /// Writes the captured pages in, after checking the staging buffer's shape.
    fn apply(&mut self, staging: &Staging, epoch: usize) {
        assert_eq!(
            staging.data.len(),
            staging.gfns.len() * 4096,
            "epoch {epoch}"
        );
        assert!(
            staging.gfns.windows(2).all(|w| w[0] < w[1]),
            "epoch {epoch}: frame numbers are not strictly ascending"
        );
        for (gfn, page) in staging.gfns.iter().zip(staging.data.chunks(4096)) {
            let addr = gfn * 4096;
            let (start, bytes) = self
                .0
                .iter_mut()
                .find(|(s, b)| (*s..*s + b.len() as u64).contains(&addr))
                .unwrap_or_else(|| panic!("epoch {epoch}: page {addr:#x} is not guest RAM"));
            let off = (addr - *start) as usize;
            bytes[off..off + 4096].copy_from_slice(page);
        }
    }

    /// Panics with the first differing page if this is not `primary`.
    fn assert_equals(&self, primary: &[Vec<u8>], staging: &Staging, epoch: usize) {
        for ((start, mine), theirs) in self.0.iter().zip(primary) {
            if mine != theirs {
                let page = mine
                    .chunks(4096)
                    .zip(theirs.chunks(4096))
                    .position(|(a, b)| a != b)
                    .unwrap();
                let addr = start + page as u64 * 4096;
                panic!(
                    "epoch {epoch}: the assembled image differs from the primary's at page \
                     {addr:#x} (in this epoch's capture: {})",
                    staging.gfns.contains(&(addr / 4096))
                );
            }
        }
    }
}

#[test]
fn ring_captures_with_precopy_equal_the_primary_at_every_pause() {
    const EPOCHS: usize = 120;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let mut pattern = vec![0u8; 8 << 20];
    ftvm_guest_abi::fill_pattern(9, 0, &mut pattern);
    std::fs::write(&img, &pattern).unwrap();
    // vCPU 0 reads the disk at random (the VMM writes guest memory, which KVM's ring does not
    // see), vCPU 1 counts, vCPU 2 writes a word into each page of 1 MiB over and over, so
    // pages are written again after their background copy.
    let disks = vec![BlockConfig {
        path: img,
        read_only: true,
    }];
    let (vm, console) = ring_vm(
        3,
        32,
        "@0:disk-randread=8,100000000 @0:chunk-kib=16 @1:count=0 @1:interval-ms=2 \
         @2:dirty=400,3",
        disks,
        4096,
    );
    let vm = vm.start().unwrap();
    console.wait_until("counting", LIMIT, |t| last_count(t, 1) >= Some(2));
    let mut capturer = Capturer::new(
        &vm,
        Mode::Ring {
            interval: Duration::from_millis(1),
        },
    )
    .unwrap();

    let mut staging = Staging::default();
    let mut primary = Vec::new();
    capturer
        .capture(
            &vm,
            Scope::All,
            &mut staging,
            Some(&mut |m: &GuestMemoryMmap| primary = image(m)),
        )
        .unwrap();
    let mut replica = Assembled::zeroed(vm.memory());
    replica.apply(&staging, 0);
    replica.assert_equals(&primary, &staging, 0);

    let mut all: Vec<CaptureStats> = Vec::new();
    let mut vmm_written = false;
    for epoch in 1..=EPOCHS {
        // The guest runs for an epoch between two pauses (the epoch interval, not a wait for a
        // condition); the pre-copy thread harvests and copies meanwhile.
        std::thread::sleep(Duration::from_millis(12));
        let before = vm.block_counters()[0].values();
        let (_, stats) = capturer
            .capture(
                &vm,
                Scope::Dirty,
                &mut staging,
                Some(&mut |m: &GuestMemoryMmap| primary = image(m)),
            )
            .unwrap();
        vmm_written |= vm.block_counters()[0].values() != before;
        replica.apply(&staging, epoch);
        replica.assert_equals(&primary, &staging, epoch);
        all.push(stats);
    }
    capturer.stop().unwrap();
    vm.stop().unwrap();

    let precopied = all.iter().filter(|s| s.copied_running > 0).count();
    assert!(
        precopied > EPOCHS / 2,
        "only {precopied} of {EPOCHS} epochs pre-copied anything"
    );
    let copies: usize = all.iter().map(|s| s.copied_running + s.copied_paused).sum();
    let pages: usize = all.iter().map(|s| s.pages).sum();
    assert!(
        copies > pages,
        "no page was written again after its copy ({copies} copies of {pages} pages)"
    );
    let paused_after_precopy = all
        .iter()
        .filter(|s| s.copied_running > 0 && s.copied_paused > 0)
        .count();
    assert!(
        paused_after_precopy > 0,
        "no pause had pages to copy besides the pre-copied ones"
    );
    assert!(vmm_written, "the VMM wrote guest memory during the epochs");
}

#[test]
fn a_full_ring_loses_nothing_and_the_vcpu_goes_on() {
    // 256 entries per vCPU (KVM's smallest ring); vCPU 1 writes 1,024 distinct pages over and
    // over for 3 s, far more than the ring holds between two captures.
    let (vm, console) = ring_vm(
        2,
        32,
        "@0:count=0 @0:interval-ms=5 @1:dirty=200,8 @1:secs=3",
        Vec::new(),
        vmm::dirty_ring::MIN_ENTRIES,
    );
    let vm = vm.start().unwrap();
    console.wait_for("vcpu1 workload dirty", LIMIT);
    let ring = vm.live_dirty().expect("ring mode").ring().clone();
    let mut capturer = Capturer::new(&vm, Mode::StopAndCopy).unwrap();
    let mut staging = Staging::default();
    let mut primary = Vec::new();
    capturer
        .capture(
            &vm,
            Scope::All,
            &mut staging,
            Some(&mut |m: &GuestMemoryMmap| primary = image(m)),
        )
        .unwrap();
    let mut replica = Assembled::zeroed(vm.memory());
    replica.apply(&staging, 0);

    let deadline = Instant::now() + LIMIT;
    let mut epoch = 0;
    let full_before_end = loop {
        // Long epochs: the ring fills up between two captures.
        std::thread::sleep(Duration::from_millis(40));
        epoch += 1;
        let done = console.text().contains("vcpu1 dirty written=");
        let full = ring.full_exits();
        capturer
            .capture(
                &vm,
                Scope::Dirty,
                &mut staging,
                Some(&mut |m: &GuestMemoryMmap| primary = image(m)),
            )
            .unwrap();
        replica.apply(&staging, epoch);
        replica.assert_equals(&primary, &staging, epoch);
        if done {
            break full;
        }
        assert!(
            Instant::now() < deadline,
            "vCPU 1 never finished its writes (ring full {full} times)"
        );
    };
    let text = console.wait_for("vcpu1 done", LIMIT);
    capturer.stop().unwrap();
    vm.stop().unwrap();
    assert!(
        full_before_end > 0,
        "the ring never filled up, so this test tests nothing"
    );
    let written: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("vcpu1 dirty written=")?.trim().parse().ok())
        .unwrap();
    assert!(
        written > 4 * 1024,
        "vCPU 1 wrote only {written} words in 3 s"
    );
    assert!(epoch >= 20, "only {epoch} epochs were captured");
}

#[test]
fn bad_ring_settings_are_refused_with_the_reason() {
    for (entries, want) in [
        (
            100,
            "A dirty ring of 100 entries is not possible: it must be a power of two",
        ),
        (0, "A dirty ring of 0 entries is not possible"),
        (
            1 << 30,
            "A dirty ring of 1073741824 entries is larger than this KVM's",
        ),
    ] {
        let (config, _) = config(1, 16, "count=1", Vec::new());
        let err = Vm::with_dirty_log(config, DirtyLog::Ring { entries })
            .err()
            .unwrap_or_else(|| panic!("a ring of {entries} entries was accepted"));
        let msg = error_chain(&err);
        assert!(msg.starts_with(want), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    // Ring capture needs a VM built with the ring; the bitmap VM still captures stop-and-copy.
    let (config, console) = config(1, 16, "count=0 interval-ms=5", Vec::new());
    let vm = Vm::new(config).unwrap().start().unwrap();
    console.wait_until("counting", LIMIT, |t| last_count(t, 0) >= Some(1));
    let err = Capturer::new(
        &vm,
        Mode::Ring {
            interval: Duration::from_millis(2),
        },
    )
    .unwrap_err();
    assert!(matches!(err, CaptureError::NoRing), "{err}");
    assert!(error_chain(&err).contains("DirtyLog::Ring"), "{err}");
    let mut capturer = Capturer::new(&vm, Mode::StopAndCopy).unwrap();
    let (_, stats) = capturer
        .capture(&vm, Scope::All, &mut Staging::default(), None)
        .unwrap();
    assert_eq!(stats.pages, 16 << 8);
    capturer.stop().unwrap();
    vm.stop().unwrap();
}

#[test]
fn the_ring_reports_exactly_the_pages_written() {
    // 8 pages spread over 24..31 MiB, not adjacent; vCPU 0 writes each of them every round.
    let pages: Vec<u64> = (0..8u64)
        .map(|i| (24 << 20) + i * (7 << 17) + (i % 3) * 0x3000)
        .collect();
    let list: Vec<String> = pages.iter().map(|p| format!("{p:#x}")).collect();
    let (vm, console) = ring_vm(
        1,
        64,
        &format!("touch={} interval-ms=5", list.join(",")),
        Vec::new(),
        1024,
    );
    let vm = vm.start().unwrap();
    console.wait_for("vcpu0 touch round 1\n", LIMIT);
    let rounds = |t: &str| {
        t.lines()
            .rev()
            .find_map(|l| l.strip_prefix("vcpu0 touch round ")?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    vm.pause().unwrap();
    vm.take_dirty_pages().unwrap();
    let at_pause = rounds(&console.text());
    vm.resume();
    let text = console.wait_until("two more rounds", LIMIT, |t| rounds(t) >= at_pause + 2);
    vm.pause().unwrap();
    let dirty: BTreeSet<u64> = vm.take_dirty_pages().unwrap().addresses().collect();

    let chosen: BTreeSet<u64> = pages.iter().copied().collect();
    // Besides them the guest writes only its stack and the console lock when it prints.
    common::assert_dirty_exactly(&dirty, &chosen, &common::named_pages(&vm, &text));

    // Paused, the ring logs nothing; what the VMM writes is reported, and only that.
    common::assert_vmm_writes_tracked(&vm, 0x200_0000);
    vm.resume();
    vm.stop().unwrap();
}

#[test]
fn a_failed_precopy_thread_fails_the_capture_and_is_reported() {
    const NAME: &str = "a_failed_precopy_thread_fails_the_capture_and_is_reported";
    if std::env::var_os("FTVM_INJECT_FAULT").is_none() {
        // The fault is read once per process: run this test again, alone, in a child with it.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env("FTVM_INJECT_FAULT", "precopy:error")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "{text}");
        return;
    }
    let (vm, console) = ring_vm(1, 16, "count=0 interval-ms=5", Vec::new(), 1024);
    let vm = vm.start().unwrap();
    console.wait_until("counting", LIMIT, |t| last_count(t, 0) >= Some(1));
    let mut capturer = Capturer::new(
        &vm,
        Mode::Ring {
            interval: Duration::from_millis(2),
        },
    )
    .unwrap();
    // The VM's owner hears of it, as of any VMM thread's failure.
    match vm.wait_event(Some(LIMIT)) {
        Some(vmm::VmEvent::ThreadFailed { thread, cause }) => {
            assert_eq!(thread, "precopy");
            assert!(cause.starts_with("fault injected at precopy"), "{cause}");
        }
        other => panic!("expected the precopy thread's failure, got {other:?}"),
    }
    // The next capture says why it cannot be trusted, on one line; so does every later one.
    let err = capturer
        .capture(&vm, Scope::Dirty, &mut Staging::default(), None)
        .unwrap_err();
    let msg = error_chain(&err);
    assert!(
        msg.starts_with("VMM thread precopy failed: fault injected at precopy"),
        "{msg}"
    );
    let err = capturer
        .capture(&vm, Scope::Dirty, &mut Staging::default(), None)
        .unwrap_err();
    assert!(matches!(err, CaptureError::Precopy(_)), "{err}");
    capturer.stop().unwrap();
    vm.stop().unwrap();
}
