//! Save and restore of the whole machine, in process: the guest continues where it was, and
//! a second save equals the first except for clock-bearing fields.

mod common;

use std::time::Duration;

use common::{Console, last_count, test_vm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::Vm;
use vmm::vm::{MachineState, RestoreOptions};

const LIMIT: Duration = Duration::from_secs(30);

fn dump(vm: &vmm::vm::Machine) -> Vec<(GuestAddress, Vec<u8>)> {
    vm.memory()
        .iter()
        .map(|r| {
            let mut buf = vec![0u8; r.len() as usize];
            vm.memory().read_slice(&mut buf, r.start_addr()).unwrap();
            (r.start_addr(), buf)
        })
        .collect()
}

fn restore(state: MachineState, memory: Vec<(GuestAddress, Vec<u8>)>) -> (Vm, Console) {
    let console = Console::default();
    let opts = RestoreOptions {
        console: Box::new(console.clone()),
        nets: None,
        disks: None,
    };
    let mut fill = move |m: &vmm::memory::GuestMemoryMmap| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        for (addr, bytes) in &memory {
            m.write_slice(bytes, *addr)?;
        }
        Ok(())
    };
    (
        Vm::restore(state, opts, vmm::vm::RestoreMemory::Fill(&mut fill)).expect("restores"),
        console,
    )
}

/// The saved state as text, with the fields that carry the passing of time blanked: the
/// kvmclock value and each vCPU's TSC MSR (0x10) keep counting between two saves.
fn comparable(state: &MachineState) -> String {
    let mut text = format!("{:?}", state.kvm.irqchips);
    text += &format!(
        "{:?}{:?}{:?}{:?}",
        state.config, state.pio, state.mmio, state.counters.blocks
    );
    for v in &state.vcpus {
        let msrs: Vec<_> = v.msrs.iter().filter(|m| m.index != 0x10).collect();
        text += &format!(
            "{:?}{:?}{:?}{:?}{:?}{:?}{:?}{:?}{:?}",
            v.cpuid, v.mp_state, v.regs, v.sregs, v.xcrs, v.debugregs, v.lapic.regs, msrs, v.events
        );
        text += &format!("{:?}", &v.xsave.region[..]);
    }
    text
}

#[test]
fn a_restored_guest_continues_counting_where_it_was() {
    let (vm, console) = test_vm(2, 64, "count=0 interval-ms=5");
    let vm = vm.start().unwrap();
    console.wait_until("both vCPUs counting", LIMIT, |t| {
        last_count(t, 0) >= Some(3) && last_count(t, 1) >= Some(3)
    });
    vm.pause().unwrap();
    let state = vm.save_state().unwrap();
    let memory = dump(&vm);
    let before = console.text();
    let (a, b) = (
        last_count(&before, 0).unwrap(),
        last_count(&before, 1).unwrap(),
    );
    vm.stop().unwrap();

    let (restored, console) = restore(state, memory);
    let restored = restored.start().unwrap();
    let text = console.wait_until("counting on", LIMIT, |t| {
        let all = format!("{before}{t}");
        last_count(&all, 0) > Some(a + 2) && last_count(&all, 1) > Some(b + 2)
    });
    common::assert_counts_continue(&before, &text, 0);
    common::assert_counts_continue(&before, &text, 1);
    assert_eq!(restored.wait_event(Some(Duration::ZERO)), None);
    restored.stop().unwrap();
}

#[test]
fn save_restore_save_gives_the_same_state() {
    let (vm, console) = test_vm(2, 64, "count=0 interval-ms=5");
    let vm = vm.start().unwrap();
    console.wait_for("vcpu1 count 2\n", LIMIT);
    vm.pause().unwrap();
    let first = vm.save_state().unwrap();
    let text1 = comparable(&first);
    let memory = dump(&vm);
    vm.stop().unwrap();

    let (restored, _console) = restore(first, memory.clone());
    // Started paused: a second save straight after the restore, before any guest code runs.
    let restored = restored.start_paused().unwrap();
    let second = restored.save_state().unwrap();
    assert_eq!(text1, comparable(&second));
    assert_eq!(dump(&restored), memory, "memory identical");
    restored.stop().unwrap();
}

/// Flips one byte of the state section of a valid snapshot file and fixes the CRC, so that
/// the damage reaches the decoder and the restore (untrusted input all the way down).
fn mutate(bytes: &[u8], seed: u64) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let state_len = u64::from_le_bytes(out[16..24].try_into().unwrap()) as usize;
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    x ^= x >> 29;
    let at = 40 + (x as usize % state_len);
    out[at] ^= (x >> 8) as u8 | 1;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[..32]);
    crc.update(&out[40..]);
    out[32..36].copy_from_slice(&crc.finalize().to_le_bytes());
    out
}

#[test]
fn damaged_state_never_panics_the_vmm() {
    let (vm, console) = test_vm(1, 32, "count=0 interval-ms=5");
    let vm = vm.start().unwrap();
    console.wait_for("vcpu0 count 2\n", LIMIT);
    vm.pause().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.snap");
    checkpoint::snapshot::write(&good, &vm.save_state().unwrap(), vm.memory()).unwrap();
    vm.stop().unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let (mut refused, mut restored) = (0, 0);
    for seed in 0..60u64 {
        let path = dir.path().join("bad.snap");
        std::fs::write(&path, mutate(&bytes, seed)).unwrap();
        let result = std::panic::catch_unwind(|| {
            let opts = RestoreOptions {
                console: Box::new(std::io::sink()),
                nets: None,
                disks: None,
            };
            match checkpoint::snapshot::restore(&path, opts) {
                Ok(vm) => {
                    // Whatever the damage did to the guest, the VMM runs it and stops it.
                    let vm = vm.start().expect("a restored VM starts");
                    let _ = vm.wait_event(Some(Duration::from_millis(20)));
                    vm.stop().unwrap();
                    true
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    false
                }
            }
        });
        match result {
            Ok(true) => restored += 1,
            Ok(false) => refused += 1,
            Err(_) => panic!("restoring mutation {seed} panicked"),
        }
    }
    eprintln!("damaged snapshots: {refused} refused, {restored} restored and run");
    assert!(refused > 0, "some damage must be detected");
}

#[test]
fn a_raw_snapshot_restores_by_mapping_and_the_file_stays_untouched() {
    let (vm, console) = test_vm(2, 64, "count=0 interval-ms=5");
    let vm = vm.start().unwrap();
    console.wait_until("both vCPUs counting", LIMIT, |t| {
        last_count(t, 0) >= Some(3) && last_count(t, 1) >= Some(3)
    });
    vm.pause().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.snap");
    let encoding = checkpoint::snapshot::MemoryEncoding::Raw;
    checkpoint::snapshot::write_with(&path, &vm.save_state().unwrap(), vm.memory(), encoding)
        .unwrap();
    let before = console.text();
    vm.stop().unwrap();
    let file = std::fs::read(&path).unwrap();

    let restored_console = Console::default();
    let opts = RestoreOptions {
        console: Box::new(restored_console.clone()),
        nets: None,
        disks: None,
    };
    let restored = checkpoint::snapshot::restore(&path, opts).unwrap();
    let restored = restored.start().unwrap();
    let (a, b) = (
        last_count(&before, 0).unwrap(),
        last_count(&before, 1).unwrap(),
    );
    let text = restored_console.wait_until("counting on", LIMIT, |t| {
        let all = format!("{before}{t}");
        last_count(&all, 0) > Some(a + 2) && last_count(&all, 1) > Some(b + 2)
    });
    common::assert_counts_continue(&before, &text, 0);
    common::assert_counts_continue(&before, &text, 1);
    restored.pause().unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        file,
        "the guest's writes reached the snapshot file"
    );
    restored.stop().unwrap();
}

#[test]
fn a_bad_counter_list_is_refused_before_the_guest_prints() {
    let (vm, console) = test_vm(2, 32, "count=0 interval-ms=10");
    let vm = vm.start().unwrap();
    console.wait_until("counting", LIMIT, |t| last_count(t, 1) >= Some(2));
    vm.pause().unwrap();
    let good = vm.save_state().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, damage: &dyn Fn(&mut MachineState)| {
        let mut state = vm.save_state().unwrap();
        damage(&mut state);
        let path = dir.path().join(name);
        checkpoint::snapshot::write(&path, &state, vm.memory()).unwrap();
        path
    };
    let n = good.counters.vcpus[1].len();
    let cases = [
        // One short is the layout before the CPU-time counter (format 2.0), still accepted.
        // Two short is refused.
        write("short.snap", &|s| {
            s.counters.vcpus[1].pop();
            s.counters.vcpus[1].pop();
        }),
        write("long.snap", &|s| s.counters.vcpus[1].push(1)),
        write("missing.snap", &|s| {
            s.counters.vcpus.pop();
        }),
        write("net.snap", &|s| s.counters.serial.push(0)),
    ];
    vm.stop().unwrap();
    assert!(n > 2);
    for path in cases {
        let o = common::ftvm(&["restore", "--from", path.to_str().unwrap()], LIMIT);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{}: {err}", path.display());
        assert!(err.contains("counters"), "{}: {err}", path.display());
        assert!(
            o.stdout.is_empty(),
            "{}: the guest printed before the restore was refused: {}",
            path.display(),
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

/// `MachineState::advance_clocks` (what a takeover does for the time since the commit) moves
/// kvmclock and every vCPU's TSC MSR on by the same time: a machine restored from the advanced
/// state reads them an hour later than the saved ones.
#[test]
fn advanced_clocks_reach_the_restored_machine() {
    let (vm, console) = test_vm(2, 64, "count=0 interval-ms=5");
    let vm = vm.start().unwrap();
    console.wait_for("vcpu1 count 2\n", LIMIT);
    vm.pause().unwrap();
    let mut state = vm.save_state().unwrap();
    let memory = dump(&vm);
    vm.stop().unwrap();
    let tsc = |s: &MachineState| -> Vec<u64> {
        s.vcpus
            .iter()
            .map(|v| {
                v.msrs
                    .iter()
                    .find(|m| m.index == 0x10)
                    .expect("TSC saved")
                    .data
            })
            .collect()
    };
    let (tsc0, clock0) = (tsc(&state), state.kvm.clock.clock);
    let khz = u64::from(state.vcpus[0].tsc_khz.expect("TSC frequency saved"));
    let hour = Duration::from_secs(3600);
    assert_eq!(state.advance_clocks(hour), 2, "both vCPUs' TSCs moved");

    let (restored, _console) = restore(state, memory);
    let restored = restored.start_paused().unwrap();
    let again = restored.save_state().unwrap();
    restored.stop().unwrap();
    let hour_ns = hour.as_nanos() as u64;
    assert!(
        again.kvm.clock.clock >= clock0 + hour_ns,
        "kvmclock {} -> {}",
        clock0,
        again.kvm.clock.clock
    );
    // Under PVM (this project's CI machine) the guest reads the host's TSC itself and KVM
    // ignores a written one: it never falls behind real time, so it has nothing to catch up.
    // SAFETY: rdtsc reads a counter; it has no effect on memory.
    let host = unsafe { core::arch::x86_64::_rdtsc() };
    for (before, after) in tsc0.iter().zip(tsc(&again)) {
        assert!(
            after >= before + 3600 * khz * 1000 || after.abs_diff(host) < khz * 1000,
            "TSC {before} -> {after} at {khz} kHz (the host's: {host})"
        );
    }
}
