//! Epochs captured from a running guest, encoded, decoded and applied to a replica's memory:
//! after every epoch the replica's memory and state equal the primary's at that epoch's pause,
//! pages the VMM itself wrote (block reads) included; and a VM restored from the replica's
//! committed state continues the guest.

mod common;

use std::time::Duration;

use checkpoint::wire::{self, Decoder, Encoder, EncoderOptions, FrameKind, MachineShape};
use common::{Console, assert_counts_continue, last_count, test_vm_with};
use primary::capture::{Scope, Staging, capture};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm::devices::virtio::block::BlockConfig;
use vmm::memory::GuestMemoryMmap;
use vmm::vm::{RestoreMemory, RestoreOptions};

const LIMIT: Duration = Duration::from_secs(60);
const EPOCHS: u64 = 120;

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

#[test]
fn the_replica_equals_the_primary_after_every_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let mut pattern = vec![0u8; 8 << 20];
    ftvm_guest_abi::fill_pattern(5, 0, &mut pattern);
    std::fs::write(&img, &pattern).unwrap();
    // vCPU 0 reads the disk at random (the VMM writes guest memory), vCPU 1 counts, vCPU 2
    // dirties memory as fast as it can.
    let disks = vec![BlockConfig {
        path: img.clone(),
        read_only: true,
    }];
    let (vm, console) = test_vm_with(
        3,
        32,
        "@0:disk-randread=8,100000000 @0:chunk-kib=16 @1:count=0 @1:interval-ms=2 \
         @2:dirty=400,4",
        disks.clone(),
    );
    let vm = vm.start().unwrap();
    console.wait_until("counting", LIMIT, |t| last_count(t, 1) >= Some(2));

    let mut staging = Staging::default();
    let mut primary_image = Vec::new();
    let (state, _) = capture(
        &vm,
        Scope::All,
        &mut staging,
        Some(&mut |m: &GuestMemoryMmap| primary_image = image(m)),
    )
    .unwrap();
    let shape = MachineShape::of(&state).unwrap();
    let ram: Vec<_> = vm
        .memory()
        .iter()
        .map(|r| (r.start_addr(), r.len() as usize))
        .collect();
    let replica = GuestMemoryMmap::from_ranges(&ram).unwrap();
    let mut encoder = Encoder::new(shape.clone(), EncoderOptions::default()).unwrap();
    let mut decoder = Decoder::new(shape).unwrap();
    let mut committed: Option<u64> = None;
    let mut committed_state;
    let mut dirty_epochs = 0;
    let mut vmm_written = false;
    let (mut state, mut epoch) = (state, 0u64);
    loop {
        let kind = if epoch == 0 {
            FrameKind::Full
        } else {
            FrameKind::Incremental
        };
        let frame = encoder
            .encode(epoch, kind, &staging.gfns, &staging.data, &state)
            .unwrap();
        let decoded = decoder.decode(&frame, Some(&replica)).unwrap();
        wire::check_order(committed, decoded.epoch, decoded.kind).unwrap();
        wire::apply(&decoded, &replica).unwrap();
        committed = Some(decoded.epoch);
        assert_eq!(
            checkpoint::codec::encode(decoded.state.as_ref().unwrap()).unwrap(),
            checkpoint::codec::encode(&state).unwrap(),
            "epoch {epoch}: the replica's state is the primary's"
        );
        let replica_image = image(&replica);
        for (i, (a, b)) in primary_image.iter().zip(&replica_image).enumerate() {
            if a != b {
                let page = a
                    .chunks(4096)
                    .zip(b.chunks(4096))
                    .position(|(x, y)| x != y)
                    .unwrap();
                panic!("epoch {epoch}: region {i} differs first at page {page}");
            }
        }
        committed_state = decoded.state.unwrap();
        if epoch == EPOCHS {
            break;
        }
        // The guest runs for a while between two pauses (the epoch interval, not a wait for
        // a condition).
        std::thread::sleep(Duration::from_millis(5));
        epoch += 1;
        let before = vm.block_counters()[0].values();
        let (s, stats) = capture(
            &vm,
            Scope::Dirty,
            &mut staging,
            Some(&mut |m: &GuestMemoryMmap| primary_image = image(m)),
        )
        .unwrap();
        state = s;
        if stats.pages > 0 {
            dirty_epochs += 1;
        }
        vmm_written |= vm.block_counters()[0].values() != before;
    }
    assert!(
        dirty_epochs > EPOCHS / 2,
        "only {dirty_epochs} epochs dirtied memory"
    );
    assert!(vmm_written, "the VMM wrote guest memory during the epochs");

    // The replica's committed state runs: the guest counts on from where it was.
    vm.pause().unwrap();
    let before = console.text();
    vm.stop().unwrap();
    let restored_console = Console::default();
    let mut fill = |m: &GuestMemoryMmap| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        for (r, bytes) in m.iter().zip(image(&replica)) {
            vm_memory::Bytes::write_slice(m, &bytes, r.start_addr())?;
        }
        Ok(())
    };
    let restored = vmm::Vm::restore(
        committed_state,
        RestoreOptions {
            console: Box::new(restored_console.clone()),
            nets: None,
            disks: None,
        },
        RestoreMemory::Fill(&mut fill),
    )
    .unwrap()
    .start()
    .unwrap();
    let now = last_count(&before, 1).unwrap();
    restored_console.wait_until("counting on", LIMIT, |t| {
        last_count(t, 1).is_some_and(|c| c > now + 3)
    });
    restored.pause().unwrap();
    let after = restored_console.text();
    restored.stop().unwrap();
    // The replica is a few counts behind the primary's last print (its last epoch came
    // before them): what the restored guest prints continues the committed point exactly.
    let committed_text: String = before
        .lines()
        .filter(|l| {
            !l.starts_with("vcpu1 count ")
                || l[12..]
                    .parse::<u64>()
                    .is_ok_and(|c| c <= first_count(&after))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert_counts_continue(&committed_text, &after, 1);
}

/// The first count the restored guest printed, minus one: the committed guest's last.
fn first_count(after: &str) -> u64 {
    common::counts(after, 1).first().copied().unwrap_or(1) - 1
}

/// What a replica holds, as comparable bytes: epoch, state encoding and memory.
fn held(shared: &replica::Shared) -> (u64, Vec<u8>, Vec<Vec<u8>>) {
    let c = shared.lock().unwrap();
    let c = c.as_ref().expect("a committed checkpoint");
    (
        c.epoch,
        checkpoint::codec::encode(&c.state).unwrap(),
        image(&c.memory),
    )
}

#[test]
fn a_bad_frame_never_changes_what_the_replica_committed() {
    let (vm, console) = test_vm_with(2, 16, "@0:count=0 @0:interval-ms=2 @1:dirty=50,2", vec![]);
    let vm = vm.start().unwrap();
    console.wait_until("counting", LIMIT, |t| last_count(t, 0) >= Some(2));
    let mut staging = Staging::default();
    let (state, _) = capture(&vm, Scope::All, &mut staging, None).unwrap();
    let shape = MachineShape::of(&state).unwrap();
    let mut encoder = Encoder::new(shape.clone(), EncoderOptions::default()).unwrap();
    let mut decoder = Decoder::new(shape).unwrap();
    let shared = replica::Shared::default();
    let full = encoder
        .encode(0, FrameKind::Full, &staging.gfns, &staging.data, &state)
        .unwrap();
    assert_eq!(
        replica::commit(&mut decoder, &mut None, &full, &shared),
        Ok(0)
    );
    // Capture until the guest has dirtied something (it writes all the time), with a deadline.
    let deadline = std::time::Instant::now() + LIMIT;
    let state = loop {
        let (state, stats) = capture(&vm, Scope::Dirty, &mut staging, None).unwrap();
        if stats.pages > 0 {
            break state;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest dirtied nothing"
        );
        std::thread::yield_now();
    };
    let next = encoder
        .encode(
            1,
            FrameKind::Incremental,
            &staging.gfns,
            &staging.data,
            &state,
        )
        .unwrap();
    let later = encoder
        .encode(
            2,
            FrameKind::Incremental,
            &staging.gfns,
            &staging.data,
            &state,
        )
        .unwrap();
    vm.stop().unwrap();

    let before = held(&shared);
    let mut bad: Vec<(String, Vec<u8>)> = vec![
        ("out of order (epoch 2 after 0)".into(), later.clone()),
        ("empty".into(), Vec::new()),
        (
            "a replay of the full checkpoint's header only".into(),
            full[..56].to_vec(),
        ),
    ];
    for cut in [1, 55, 56, 57, next.len() / 2, next.len() - 1] {
        bad.push((format!("truncated to {cut}"), next[..cut].to_vec()));
    }
    for at in [0, 20, 47, 60, next.len() / 2, next.len() - 1] {
        let mut f = next.clone();
        f[at] ^= 0x40;
        bad.push((format!("byte {at} flipped"), f));
    }
    let mut trailing = next.clone();
    trailing.push(0);
    bad.push(("a trailing byte".into(), trailing));
    for (what, frame) in &bad {
        assert!(
            replica::commit(&mut decoder, &mut None, frame, &shared).is_err(),
            "{what}: accepted"
        );
        assert!(
            held(&shared) == before,
            "{what}: the committed checkpoint changed"
        );
    }
    // The good next frame still commits.
    assert_eq!(
        replica::commit(&mut decoder, &mut None, &next, &shared),
        Ok(1)
    );
    assert!(held(&shared) != before);

    // Pre-copy rounds build a separate image: what is committed does not move until the full
    // frame that ends the sync, and a sync that never ends (the primary died) changes nothing.
    let committed = held(&shared);
    let mut sync = None;
    let mut frame = Vec::new();
    let gfns: Vec<u64> = (0..8).collect();
    let ones = vec![0x11u8; 8 * 4096];
    encoder
        .encode_precopy_into(0, &gfns, &ones, &mut frame)
        .unwrap();
    assert_eq!(
        replica::commit(&mut decoder, &mut sync, &frame, &shared),
        Ok(0)
    );
    assert!(sync.is_some(), "the pre-copy round landed in a sync image");
    assert!(held(&shared) == committed, "a pre-copy round was committed");
    let twos = vec![0x22u8; 4096];
    encoder
        .encode_precopy_into(1, &[3], &twos, &mut frame)
        .unwrap();
    replica::commit(&mut decoder, &mut sync, &frame, &shared).unwrap();
    assert!(held(&shared) == committed, "a pre-copy round was committed");
    // The full frame ends the sync: its pages over the rounds' image, with its state.
    let threes = vec![0x33u8; 4096];
    let full = encoder
        .encode(9, FrameKind::Full, &[5], &threes, &state)
        .unwrap();
    assert_eq!(
        replica::commit(&mut decoder, &mut sync, &full, &shared),
        Ok(9)
    );
    assert!(sync.is_none(), "the sync image became the committed one");
    let (epoch, _, memory) = held(&shared);
    assert_eq!(epoch, 9);
    let page = |g: usize| &memory[0][g * 4096..(g + 1) * 4096];
    for (g, byte) in [(0, 0x11), (3, 0x22), (5, 0x33), (7, 0x11)] {
        assert!(page(g).iter().all(|&b| b == byte), "page {g}");
    }
    // Everything the rounds did not send is zero, not the old committed image.
    assert!(memory[0][8 * 4096..].iter().all(|&b| b == 0));
}
