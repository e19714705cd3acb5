//! The machine through the `vmm` library, with the embedded test guest: ring 3 at native speed,
//! dirty tracking, pause and resume.

mod common;

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use common::{last_count, test_vm};
use vmm::VmEvent;
use vmm::vcpu::VcpuRunState as VcpuState;

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn the_guest_runs_in_ring_3() {
    let (vm, console) = test_vm(2, 64, "count=0 interval-ms=5");
    let vm = vm.start().unwrap();
    console.wait_until("both vCPUs counting", LIMIT, |t| {
        last_count(t, 0).is_some() && last_count(t, 1).is_some()
    });
    vm.pause().unwrap();
    for v in 0..2 {
        let sregs = vm.vcpu_sregs(v).unwrap();
        assert_eq!(sregs.cs.dpl, 3, "vCPU {v} code segment DPL");
        assert_eq!(sregs.cs.selector & 3, 3, "vCPU {v} CPL (CS.RPL)");
        assert_eq!(sregs.ss.dpl, 3, "vCPU {v} stack segment DPL");
        assert_eq!(sregs.cs.l, 1, "vCPU {v} in 64-bit mode");
    }
    vm.resume();
    vm.stop().unwrap();
}

#[test]
fn the_guest_computes_at_native_speed() {
    const N: u64 = 200_000_000;
    let (vm, console) = test_vm(1, 64, &format!("compute={N}"));
    let vm = vm.start().unwrap();
    let text = console.wait_for("all 1 vcpus done", LIMIT);
    assert_eq!(vm.wait_event(Some(LIMIT)), Some(VmEvent::PowerOff(0)));
    let line = text
        .lines()
        .find(|l| l.starts_with("vcpu0 compute "))
        .expect("compute line");
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    let guest_ns = field("ns=");
    assert_eq!(field("result="), ftvm_guest_abi::compute(N, 1));

    let start = Instant::now();
    black_box(ftvm_guest_abi::compute(black_box(N), black_box(1)));
    let host_ns = start.elapsed().as_nanos() as u64;
    eprintln!("compute {N}: guest {guest_ns} ns, host {host_ns} ns");
    // Emulated ring-0 code would be ~1000x slower; native ring 3 is within 10x (coarse bound).
    assert!(
        guest_ns < host_ns * 10,
        "guest took {guest_ns} ns, host {host_ns} ns: not native speed"
    );
}

#[test]
fn dirty_pages_are_exactly_the_pages_written() {
    // 12 pages spread over 64..100 MiB, not adjacent, one of them in the last page of a 2 MiB
    // guest page.
    let pages: Vec<u64> = (0..11u64)
        .map(|i| (64 << 20) + i * 3 * (1 << 20) + (i % 3) * 0x5000)
        .chain([(66 << 20) - 4096])
        .collect();
    let list: Vec<String> = pages.iter().map(|p| format!("{p:#x}")).collect();
    let (vm, console) = test_vm(1, 128, &format!("touch={} interval-ms=5", list.join(",")));
    let vm = vm.start().unwrap();
    console.wait_for("vcpu0 touch round 1\n", LIMIT);

    // Start from a clean bitmap, then let the guest complete two whole rounds.
    vm.pause().unwrap();
    vm.take_dirty_pages().unwrap();
    let rounds = |t: &str| {
        t.lines()
            .rev()
            .find_map(|l| l.strip_prefix("vcpu0 touch round ")?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let at_pause = rounds(&console.text());
    vm.resume();
    let text = console.wait_until("two more rounds", LIMIT, |t| rounds(t) >= at_pause + 2);
    vm.pause().unwrap();
    let dirty = vm.take_dirty_pages().unwrap();

    let dirty: BTreeSet<u64> = dirty.addresses().collect();
    let chosen: BTreeSet<u64> = pages.iter().copied().collect();
    common::assert_dirty_exactly(&dirty, &chosen, &common::named_pages(&vm, &text));

    // While paused the guest writes nothing; a write by the VMM itself is tracked too.
    common::assert_vmm_writes_tracked(&vm, 0x300_0000);
    vm.resume();
    vm.stop().unwrap();
}

#[test]
fn pause_stops_the_guest_and_resume_restarts_it() {
    let (vm, console) = test_vm(2, 64, "count=0 interval-ms=2");
    let vm = vm.start().unwrap();
    let counts = |t: &str| (last_count(t, 0).unwrap_or(0), last_count(t, 1).unwrap_or(0));
    console.wait_until("both vCPUs counting", LIMIT, |t| {
        let (a, b) = counts(t);
        a >= 3 && b >= 3
    });

    vm.pause().unwrap();
    assert_eq!(vm.vcpu_states(), vec![VcpuState::Paused; 2]);
    let frozen = console.text();
    // A paused guest prints nothing: 100 intervals pass without a byte.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(console.text(), frozen, "the guest ran while paused");

    vm.resume();
    let (a, b) = counts(&frozen);
    console.wait_until("counting again", LIMIT, |t| {
        let (x, y) = counts(t);
        x > a && y > b
    });

    // 1,000 cycles lose no vCPU: both keep counting afterwards and nothing crashed.
    for _ in 0..1000 {
        vm.pause().unwrap();
        vm.resume();
    }
    let (a, b) = counts(&console.text());
    console.wait_until("both vCPUs still counting", LIMIT, |t| {
        let (x, y) = counts(t);
        x > a + 2 && y > b + 2
    });
    assert_eq!(
        vm.wait_event(Some(Duration::ZERO)),
        None,
        "no crash or power-off"
    );
    assert_eq!(vm.vcpu_states(), vec![VcpuState::Running; 2]);
    vm.stop().unwrap();
}

#[test]
fn a_thousand_pauses_of_busy_vcpus_lose_nothing() {
    // Both vCPUs compute without exits, so every pause has to kick them out of KVM_RUN.
    const N: u64 = 3_000_000_000;
    let (vm, console) = test_vm(2, 64, &format!("compute={N}"));
    let vm = vm.start().unwrap();
    console.wait_for("ftvm-guest: boot", LIMIT);
    for _ in 0..1000 {
        // Each pause finds the vCPUs back on their way into the guest (on a loaded host a
        // resume-then-pause could otherwise catch them before they ever left the pause).
        let deadline = std::time::Instant::now() + LIMIT;
        while vm.vcpu_states().iter().any(|s| *s != VcpuState::Running) {
            assert!(std::time::Instant::now() < deadline, "vCPUs did not resume");
            std::thread::yield_now();
        }
        vm.pause().unwrap();
        vm.resume();
    }
    let kicks: u64 = vm
        .vcpu_counters()
        .iter()
        .map(|c| c.exits(vmm::vcpu::ExitReason::Interrupted))
        .sum();
    assert!(kicks > 0, "pauses kick vCPUs out of KVM_RUN");
    let text = console.wait_for("ftvm-guest: all 2 vcpus done", Duration::from_secs(120));
    for v in 0..2u64 {
        let result = format!("result={}\n", ftvm_guest_abi::compute(N, v + 1));
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("vcpu{v} compute "))
                    && format!("{l}\n").ends_with(&result)),
            "vCPU {v} did not finish its computation correctly:\n{text}"
        );
    }
    assert_eq!(vm.wait_event(Some(LIMIT)), Some(VmEvent::PowerOff(0)));
    vm.stop().unwrap();
}
