//! virtio-blk against hostile descriptor chains.
//!
//! The input is guest memory from address 0: the descriptor table at 0x0, the available ring
//! at 0x100 (its `idx` says how many chains are published), headers and data wherever the
//! descriptors point. The rest of the 1 MiB guest holds a fixed pattern; the used ring is at
//! 0xF_0000. The target publishes the chains one at a time and, after each, checks:
//!
//! - exactly one chain was consumed and returned on the used ring with its head index;
//! - exactly one counter moved: an op counter (status OK), `errors` (IOERR), `unsupported`
//!   (UNSUPP), or `invalid_chains` (used length 0, no status written);
//! - the device changed no guest byte outside the chain's device-writable buffers and the used
//!   ring, and wrote the status where the chain's last byte is;
//! - the used length never exceeds the chain's writable bytes;
//! - the disk changed only for a write with status OK, exactly by the data it carried, and a
//!   read with status OK put the disk's bytes into the guest.
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use ftvm_fuzz::layout::blk::{DISK_LEN, INPUT_MAX, MEM, QUEUE};
use ftvm_fuzz::{CheckedMemory, Ranges, desc_bytes, next_chain, pattern, writable, writes_over};
use ftvm_guest_abi::virtio::{BLK_S_IOERR, BLK_S_OK, BLK_S_UNSUPP, BLK_T_IN, BLK_T_OUT};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vmm::devices::virtio::Interrupt;
use vmm::devices::virtio::VirtioDevice;
use vmm::devices::virtio::block::{Block, BlockConfig, BlockCounters};
use vmm_sys_util::eventfd::EventFd;

struct Rig {
    mem: CheckedMemory,
    block: Block,
    disk: std::fs::File,
    base_disk: Vec<u8>,
    disk_dirty: bool,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    let mut base = pattern(MEM, 0x5a);
    let used = QUEUE.used as usize;
    base[used..used + QUEUE.used_len() as usize].fill(0);
    let mem = CheckedMemory::new(base);
    let dir = ftvm_fuzz::scratch_dir();
    let path = dir.path().join("disk.img");
    let base_disk = pattern(DISK_LEN, 0xa5);
    std::fs::write(&path, &base_disk).expect("disk image");
    let irq = Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        Arc::new(|| {}),
    ));
    let config = BlockConfig {
        path: path.clone(),
        read_only: false,
    };
    let block = Block::new(config, mem.mem.clone(), irq).expect("block device");
    let disk = std::fs::File::open(&path).expect("disk image");
    Rig {
        mem,
        block,
        disk,
        base_disk,
        disk_dirty: false,
        _dir: dir,
    }
}

static RIG: Mutex<Option<Rig>> = Mutex::new(None);

fn counts(c: &BlockCounters) -> [u64; 7] {
    [
        &c.read_requests,
        &c.write_requests,
        &c.flush_requests,
        &c.get_id_requests,
        &c.errors,
        &c.unsupported,
        &c.invalid_chains,
    ]
    .map(|a| a.load(Ordering::Relaxed))
}
const OK_COUNTERS: std::ops::Range<usize> = 0..4;
const ERRORS: usize = 4;
const UNSUPPORTED: usize = 5;
const INVALID: usize = 6;

fn read_disk(r: &Rig) -> Vec<u8> {
    let mut now = vec![0u8; DISK_LEN + 1];
    let n = r.disk.read_at(&mut now, 0).expect("read disk image");
    assert_eq!(n, DISK_LEN, "the disk image changed size");
    now.truncate(DISK_LEN);
    now
}

fn run(r: &mut Rig, data: &[u8]) {
    r.mem.reset();
    if r.disk_dirty {
        r.disk_dirty = false;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(r._dir.path().join("disk.img"))
            .expect("disk image");
        f.write_all_at(&r.base_disk, 0).expect("reset disk image");
    }
    let input = &data[..data.len().min(INPUT_MAX)];
    r.mem.set(0, input);
    let idx_addr = QUEUE.avail_idx_addr() as usize;
    let published = u16::from_le_bytes([r.mem.shadow()[idx_addr], r.mem.shadow()[idx_addr + 1]]);
    r.block.reset();
    r.block
        .activate(0, vec![QUEUE.queue(0, 0)])
        .expect("activate");
    let mut disk = r.base_disk.clone();

    if published > QUEUE.size {
        // More chains than the ring holds: the queue refuses them all.
        r.mem.set(idx_addr, &published.to_le_bytes());
        let before = counts(&r.block.counters());
        assert_eq!(
            r.block.process_queue(),
            0,
            "chains taken from an overfull ring"
        );
        assert_eq!(counts(&r.block.counters()), before);
        r.mem.accept_writes(&Ranges::default(), "overfull ring");
        r.mem.assert_same("overfull ring");
        return;
    }

    let mut used = 0u16;
    for k in 0..published {
        // Publish one more chain.
        r.mem.set(idx_addr, &(k + 1).to_le_bytes());
        r.mem.accept_writes(&Ranges::default(), "publishing");
        let next_avail = r.block.queue_states()[0].next_avail;
        assert_eq!(next_avail, k, "the device skipped or repeated a chain");
        let (head, descs) = next_chain(&r.mem.mem, &QUEUE, next_avail).expect("a published chain");
        let before = counts(&r.block.counters());

        let done = r.block.process_queue();

        if writes_over(&descs, idx_addr as u64, 2) {
            // The chain's data may rewrite the available index and so publish more chains,
            // which the device then takes in the same call: legitimate, but past what this
            // target predicts. Check only that each was counted once, then stop.
            let delta: u64 = counts(&r.block.counters())
                .iter()
                .zip(before)
                .map(|(a, b)| a - b)
                .sum();
            assert!(done >= 1, "chain {k}: not processed");
            assert_eq!(
                delta, done as u64,
                "chain {k}: {done} chains, {delta} counts"
            );
            r.mem.accept_unchecked();
            r.disk_dirty = true;
            return;
        }
        assert_eq!(done, 1, "chain {k}: one chain published, {done} processed");
        let (used_idx, (id, used_len)) = QUEUE.used_entry(r.mem.bytes(), used);
        let used_len = if head < QUEUE.size {
            assert_eq!(used_idx, used + 1, "chain {k}: used idx");
            assert_eq!(
                id,
                u32::from(head),
                "chain {k}: used id is not the chain's head"
            );
            used += 1;
            used_len
        } else {
            // A head index past the table has no used entry to return it in.
            assert_eq!(used_idx, used, "chain {k}: head {head} returned");
            0
        };
        let delta: Vec<u64> = counts(&r.block.counters())
            .iter()
            .zip(before)
            .map(|(a, b)| a - b)
            .collect();
        assert_eq!(
            delta.iter().sum::<u64>(),
            1,
            "chain {k}: counter deltas {delta:?}"
        );

        let mut allowed = writable(&descs);
        let writable_len = allowed.0.iter().map(|r| r.end - r.start).sum::<u64>();
        allowed.add(QUEUE.used, QUEUE.used_len());
        // The request as the device read it, before it wrote anything.
        let request = Request::read(r.mem.shadow(), &descs);
        let changed = r.mem.accept_writes(&allowed, "virtio-blk");

        if used_len == 0 {
            assert_eq!(
                delta[INVALID], 1,
                "chain {k}: used length 0 but not counted invalid"
            );
            // Nothing but the used ring may have changed.
            let ring = QUEUE.used..QUEUE.used + QUEUE.used_len();
            for c in &changed {
                assert!(
                    ring.contains(&(c.start as u64)) && ring.contains(&(c.end as u64 - 1)),
                    "chain {k}: dropped chain wrote {c:x?}"
                );
            }
        } else {
            assert_eq!(
                delta[INVALID], 0,
                "chain {k}: completed chain counted invalid"
            );
            assert!(
                u64::from(used_len) <= writable_len,
                "chain {k}: used length {used_len} > writable bytes {writable_len}"
            );
            let last = descs.last().expect("a completed chain has descriptors");
            assert!(
                last.is_write_only(),
                "chain {k}: status in a read-only buffer"
            );
            let status_addr = (last.addr().0 + u64::from(last.len()) - 1) as usize;
            let status = r.mem.bytes()[status_addr];
            // A status byte inside the used ring is overwritten by the used entry: unobservable.
            let ring = QUEUE.used..QUEUE.used + QUEUE.used_len();
            if ring.contains(&(status_addr as u64)) {
                continue;
            }
            match status {
                BLK_S_OK => assert_eq!(
                    delta[OK_COUNTERS].iter().sum::<u64>(),
                    1,
                    "chain {k}: status OK without an op counter"
                ),
                BLK_S_IOERR => assert_eq!(delta[ERRORS], 1, "chain {k}: IOERR not counted"),
                BLK_S_UNSUPP => {
                    assert_eq!(delta[UNSUPPORTED], 1, "chain {k}: UNSUPP not counted")
                }
                s => panic!("chain {k}: status byte {s:#x} at {status_addr:#x}"),
            }
            check_disk(r, k, status, &descs, &request, &mut disk);
        }
        // A chain that rewrote the rings may have re-published a different head: fine, the
        // next step walks memory as it is now.
    }
    r.mem.assert_same("virtio-blk");
    if read_disk(r) != disk {
        panic!("the disk changed outside the checked requests");
    }
}

/// A request's header and, for a write, its data, read from guest memory before the device ran.
struct Request {
    kind: Option<u32>,
    sector: u64,
    data: Vec<u8>,
}

impl Request {
    fn read(mem: &[u8], descs: &[Descriptor]) -> Self {
        let header = descs
            .first()
            .and_then(|d| desc_bytes(mem, d))
            .filter(|h| h.len() == 16);
        let kind = header.map(|h| u32::from_le_bytes(h[0..4].try_into().unwrap()));
        let sector = header.map_or(0, |h| u64::from_le_bytes(h[8..16].try_into().unwrap()));
        let data = if kind == Some(BLK_T_OUT) {
            data_bytes(mem, descs)
        } else {
            Vec::new()
        };
        Self { kind, sector, data }
    }
}

/// The bytes of a chain's data buffers: between the header and the status byte.
fn data_bytes(mem: &[u8], descs: &[Descriptor]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, d) in descs.iter().enumerate().skip(1) {
        let Some(mut b) = desc_bytes(mem, d) else {
            return Vec::new();
        };
        if i == descs.len() - 1 {
            b = &b[..b.len().saturating_sub(1)];
        }
        v.extend_from_slice(b);
    }
    v
}

/// Checks the disk against `disk` (what it should hold) after chain `k`; updates `disk`.
fn check_disk(
    r: &mut Rig,
    k: u16,
    status: u8,
    descs: &[Descriptor],
    req: &Request,
    disk: &mut [u8],
) {
    if status == BLK_S_OK && req.kind == Some(BLK_T_OUT) {
        let at = (req.sector * 512) as usize;
        disk[at..at + req.data.len()].copy_from_slice(&req.data);
        r.disk_dirty = true;
    }
    let now = read_disk(r);
    if now != disk {
        let at = now
            .iter()
            .zip(disk.iter())
            .position(|(a, b)| a != b)
            .unwrap();
        panic!(
            "chain {k}: disk byte {at:#x} changed (status {status}, type {:?})",
            req.kind
        );
    }
    // Overlapping buffers (or one over the used ring) overwrite each other's data; only
    // disjoint ones can be compared.
    let mut w = writable(descs).0;
    w.push(QUEUE.used..QUEUE.used + QUEUE.used_len());
    let disjoint = w.iter().enumerate().all(|(i, a)| {
        w[i + 1..]
            .iter()
            .all(|b| a.end <= b.start || b.end <= a.start)
    });
    if status == BLK_S_OK && req.kind == Some(BLK_T_IN) && disjoint {
        let got = data_bytes(r.mem.bytes(), descs);
        let at = (req.sector * 512) as usize;
        assert!(
            got == disk[at..at + got.len()],
            "chain {k}: read returned other bytes"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut guard = RIG.lock().unwrap_or_else(|e| e.into_inner());
    let r = guard.get_or_insert_with(rig);
    run(r, data);
});
