//! virtio-net's transmit and receive queues against hostile descriptor chains, over an
//! in-memory backend instead of a TAP.
//!
//! Input: a flags byte, four u16 lengths of frames the host sends (0: none), then guest memory
//! from address 0 (receive queue's descriptors at 0x0 and available ring at 0x100, transmit
//! queue's at 0x200 and 0x300; used rings at 0xF_0000 and 0xF_1000, outside the input). Chains
//! are published one at a time; after each the target checks:
//!
//! - transmit: the chain comes back on the used ring with length 0 and exactly one of
//!   `tx_packets`, `tx_dropped`, `invalid_chains` moves; a frame handed to the backend is at
//!   most 65,536 bytes and equals the chain's bytes minus the 12-byte header (`tx_bytes` grows
//!   by its length); a refused chain hands nothing to the backend; no guest byte but the used
//!   ring changes;
//! - receive: exactly one of `rx_packets`, `rx_dropped`, `invalid_chains` moves; a delivered
//!   frame's used length is header + frame, the header says num_buffers = 1, the bytes are the
//!   frame's, written in order into the chain's writable buffers and nowhere else; a dropped
//!   frame did not fit; an invalid chain leaves the frame pending for the next buffer.
#![no_main]

use std::collections::VecDeque;
use std::io::{Error, ErrorKind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use ftvm_fuzz::layout::net::{
    FLAG_RX_FIRST, FLAG_SEND_FAILS, HEADER, INPUT_MAX, MAX_RX_FRAMES, MEM, RX, TX,
};
use ftvm_fuzz::{
    CheckedMemory, QueueLayout, Ranges, desc_bytes, next_chain, pattern, writable, writes_over,
};
use ftvm_guest_abi::virtio::NET_HDR_LEN;
use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::net::{Net, NetBackend, NetCounters};
use vmm::devices::virtio::{Interrupt, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

/// Largest frame the device may hand to the backend.
const MAX_FRAME: usize = 65536;

#[derive(Default)]
struct WireState {
    to_guest: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
    send_fails: bool,
}

#[derive(Clone, Default)]
struct Wire(Arc<Mutex<WireState>>);

impl NetBackend for Wire {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut w = self.0.lock().unwrap();
        let f = w
            .to_guest
            .pop_front()
            .ok_or(Error::from(ErrorKind::WouldBlock))?;
        // A TAP truncates a frame larger than the read buffer.
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }
    fn send(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        let mut w = self.0.lock().unwrap();
        w.sent.push(frame.to_vec());
        if w.send_fails {
            return Err(Error::from(ErrorKind::BrokenPipe));
        }
        Ok(frame.len())
    }
}

struct Rig {
    mem: CheckedMemory,
    irq: Arc<Interrupt>,
}

static RIG: Mutex<Option<Rig>> = Mutex::new(None);

fn rig() -> Rig {
    let mut base = pattern(MEM, 0x3c);
    for q in [RX, TX] {
        let used = q.used as usize;
        base[used..used + q.used_len() as usize].fill(0);
    }
    Rig {
        mem: CheckedMemory::new(base),
        irq: Arc::new(Interrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            Arc::new(|| {}),
        )),
    }
}

fn counts(c: &NetCounters) -> [u64; 7] {
    [
        &c.tx_packets,
        &c.tx_bytes,
        &c.tx_dropped,
        &c.rx_packets,
        &c.rx_bytes,
        &c.rx_dropped,
        &c.invalid_chains,
    ]
    .map(|a| a.load(Ordering::Relaxed))
}
const TX_PACKETS: usize = 0;
const TX_BYTES: usize = 1;
const TX_DROPPED: usize = 2;
const RX_PACKETS: usize = 3;
const RX_BYTES: usize = 4;
const RX_DROPPED: usize = 5;
const INVALID: usize = 6;

fn delta(net: &Net<Wire>, before: [u64; 7]) -> [u64; 7] {
    let now = counts(&net.counters());
    std::array::from_fn(|i| now[i] - before[i])
}

fn published(r: &Rig, q: &QueueLayout) -> u16 {
    let a = q.avail_idx_addr() as usize;
    u16::from_le_bytes([r.mem.shadow()[a], r.mem.shadow()[a + 1]])
}

fn used_ring(q: &QueueLayout) -> Ranges {
    let mut r = Ranges::default();
    r.add(q.used, q.used_len());
    r
}

fn run_tx(r: &mut Rig, net: &mut Net<Wire>, wire: &Wire) {
    let n = published(r, &TX);
    let idx = TX.avail_idx_addr() as usize;
    if n > TX.size {
        r.mem.set(idx, &n.to_le_bytes());
        assert_eq!(
            net.process_tx(),
            0,
            "tx: chains taken from an overfull ring"
        );
        return;
    }
    let mut used = 0u16;
    for k in 0..n {
        r.mem.set(idx, &(k + 1).to_le_bytes());
        r.mem.accept_writes(&Ranges::default(), "publishing");
        let next_avail = net.queue_states()[1].next_avail;
        assert_eq!(next_avail, k, "tx: the device skipped or repeated a chain");
        let (head, descs) = next_chain(&r.mem.mem, &TX, k).expect("a published chain");
        let before = counts(&net.counters());
        let sent_before = wire.0.lock().unwrap().sent.len();

        assert_eq!(net.process_tx(), 1, "tx chain {k}: not processed alone");

        let (used_idx, (id, used_len)) = TX.used_entry(r.mem.bytes(), used);
        if head < TX.size {
            assert_eq!(
                (used_idx, id, used_len),
                (used + 1, u32::from(head), 0),
                "tx chain {k}"
            );
            used += 1;
        } else {
            // A head index past the table has no used entry to return it in.
            assert_eq!(used_idx, used, "tx chain {k}: head {head} returned");
        }
        let d = delta(net, before);
        assert_eq!(
            d[TX_PACKETS] + d[TX_DROPPED] + d[INVALID] + d[RX_PACKETS] + d[RX_DROPPED],
            1,
            "tx chain {k}: counter deltas {d:?}"
        );
        assert_eq!(
            d[INVALID] + d[TX_PACKETS] + d[TX_DROPPED],
            1,
            "tx chain {k}: {d:?}"
        );
        // The chain's bytes as the device read them.
        let bytes: Option<Vec<u8>> = descs
            .iter()
            .map(|d| desc_bytes(r.mem.shadow(), d).map(<[u8]>::to_vec))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        r.mem.accept_writes(&used_ring(&TX), "virtio-net tx");
        let sent = wire.0.lock().unwrap().sent[sent_before..].to_vec();
        if d[INVALID] == 1 {
            assert!(
                sent.is_empty(),
                "tx chain {k}: refused, yet a frame went out"
            );
            continue;
        }
        assert_eq!(
            sent.len(),
            1,
            "tx chain {k}: {} frames for one chain",
            sent.len()
        );
        let frame = &sent[0];
        assert!(
            frame.len() <= MAX_FRAME,
            "tx chain {k}: frame of {} bytes",
            frame.len()
        );
        assert!(
            descs.iter().all(|d| !d.is_write_only()),
            "tx chain {k}: writable buffer sent"
        );
        let bytes = bytes.expect("a sent chain lies in memory");
        assert!(
            bytes.len() > NET_HDR_LEN,
            "tx chain {k}: header-only chain sent"
        );
        assert!(
            bytes[NET_HDR_LEN..] == frame[..],
            "tx chain {k}: frame differs from the chain's bytes after the header"
        );
        if d[TX_PACKETS] == 1 {
            assert_eq!(d[TX_BYTES], frame.len() as u64, "tx chain {k}: tx_bytes");
        } else {
            assert_eq!(
                d[TX_BYTES], 0,
                "tx chain {k}: dropped frame counted in tx_bytes"
            );
        }
    }
}

fn run_rx(r: &mut Rig, net: &mut Net<Wire>, wire: &Wire, frames: &mut VecDeque<Vec<u8>>) {
    let n = published(r, &RX);
    let idx = RX.avail_idx_addr() as usize;
    if n > RX.size {
        r.mem.set(idx, &n.to_le_bytes());
        net.process_rx();
        assert_eq!(
            net.queue_states()[0].next_avail,
            0,
            "rx: chains taken from an overfull ring"
        );
        r.mem.accept_writes(&Ranges::default(), "overfull rx ring");
        return;
    }
    // What the device holds: the frame it read and could not yet place.
    let mut pending: Option<Vec<u8>> = None;
    let mut used = 0u16;
    for k in 0..n {
        r.mem.set(idx, &(k + 1).to_le_bytes());
        r.mem.accept_writes(&Ranges::default(), "publishing");
        let next_avail = net.queue_states()[0].next_avail;
        assert_eq!(next_avail, k, "rx: the device skipped or repeated a chain");
        let (head, descs) = next_chain(&r.mem.mem, &RX, k).expect("a published chain");
        let before = counts(&net.counters());

        let done = net.process_rx();

        if writes_over(&descs, idx as u64, 2) {
            // A frame written over the available index publishes more chains, which the
            // device fills in the same call: legitimate, but past what this target predicts.
            let d = delta(net, before);
            let n = d[RX_PACKETS] + d[RX_DROPPED] + d[INVALID];
            assert_eq!(n, done as u64, "rx chain {k}: {done} chains, {n} counts");
            r.mem.accept_unchecked();
            return;
        }

        if pending.is_none() {
            pending = frames.pop_front();
        }
        let Some(frame) = pending.clone() else {
            assert_eq!(done, 0, "rx chain {k}: used without a frame to deliver");
            assert!(wire.0.lock().unwrap().to_guest.is_empty());
            r.mem.accept_writes(&Ranges::default(), "rx without frames");
            return;
        };
        assert_eq!(
            done, 1,
            "rx chain {k}: a frame and a buffer, yet {done} chains used"
        );
        let (used_idx, (id, used_len)) = RX.used_entry(r.mem.bytes(), used);
        let used_len = if head < RX.size {
            assert_eq!(
                (used_idx, id),
                (used + 1, u32::from(head)),
                "rx chain {k}: used"
            );
            used += 1;
            used_len
        } else {
            // A head index past the table has no used entry to return it in.
            assert_eq!(used_idx, used, "rx chain {k}: head {head} returned");
            0
        };
        let d = delta(net, before);
        assert_eq!(
            d[RX_PACKETS] + d[RX_DROPPED] + d[INVALID] + d[TX_PACKETS] + d[TX_DROPPED],
            1,
            "rx chain {k}: counter deltas {d:?}"
        );
        let total = NET_HDR_LEN + frame.len();
        let writable_len: u64 = descs
            .iter()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum();
        if d[RX_PACKETS] == 1 {
            assert_eq!(used_len as usize, total, "rx chain {k}: used length");
            assert_eq!(d[RX_BYTES], frame.len() as u64, "rx chain {k}: rx_bytes");
            assert!(
                descs.iter().all(|d| d.is_write_only()),
                "rx chain {k}: readable buffer"
            );
            // Header + frame, in order, into the first `total` writable bytes.
            let mut expect = vec![0u8; NET_HDR_LEN];
            expect[10] = 1;
            expect.extend_from_slice(&frame);
            let mut allowed = used_ring(&RX);
            let mut left = total;
            let mut parts = Vec::new();
            for desc in &descs {
                let n = (desc.len() as usize).min(left);
                allowed.add(desc.addr().0, n as u64);
                parts.push((desc.addr().0 as usize, n));
                left -= n;
            }
            r.mem.accept_writes(&allowed, "virtio-net rx");
            // Buffers that overlap each other or the used ring overwrite each other's bytes.
            let mut w = writable(&descs).0;
            w.push(RX.used..RX.used + RX.used_len());
            let disjoint = w.iter().enumerate().all(|(i, a)| {
                w[i + 1..]
                    .iter()
                    .all(|b| a.end <= b.start || b.end <= a.start)
            });
            if disjoint {
                let mem = r.mem.bytes();
                let got: Vec<u8> = parts
                    .iter()
                    .flat_map(|&(a, n)| mem[a..a + n].to_vec())
                    .collect();
                assert!(
                    got == expect,
                    "rx chain {k}: delivered bytes differ from the frame"
                );
            }
            // The device reads the next frame at once, and holds it until a buffer comes.
            pending = frames.pop_front();
        } else {
            assert_eq!(
                used_len, 0,
                "rx chain {k}: dropped chain with used length {used_len}"
            );
            r.mem
                .accept_writes(&used_ring(&RX), "virtio-net rx (dropped)");
            if d[RX_DROPPED] == 1 {
                assert!(
                    total as u64 > writable_len,
                    "rx chain {k}: frame of {total} bytes dropped, {writable_len} bytes offered"
                );
                pending = frames.pop_front();
            } else {
                assert_eq!(d[INVALID], 1, "rx chain {k}: {d:?}");
                assert!(
                    net.rx_pending(),
                    "rx chain {k}: frame lost with an invalid chain"
                );
            }
        }
        assert_eq!(
            net.rx_pending(),
            pending.is_some(),
            "rx chain {k}: pending frame"
        );
    }
}

fn run(r: &mut Rig, data: &[u8]) {
    r.mem.reset();
    let Some(header) = data.get(..HEADER) else {
        return;
    };
    let flags = header[0];
    let body = &data[HEADER..];
    r.mem.set(0, &body[..body.len().min(INPUT_MAX)]);

    let wire = Wire::default();
    // Frames as the device will get them: its buffer holds a header, a whole MAX_FRAME and one
    // byte more (a longer frame is dropped), so every u16-sized frame arrives whole.
    let mut frames = VecDeque::new();
    {
        let mut w = wire.0.lock().unwrap();
        w.send_fails = flags & FLAG_SEND_FAILS != 0;
        for i in 0..MAX_RX_FRAMES {
            let len = usize::from(u16::from_le_bytes([header[1 + 2 * i], header[2 + 2 * i]]));
            if len > 0 {
                let f = pattern(len, i as u8);
                frames.push_back(f[..len.min(MAX_FRAME)].to_vec());
                w.to_guest.push_back(f);
            }
        }
    }
    let mut net = Net::new(
        wire.clone(),
        [6, 0, 0, 0, 0, 1],
        r.mem.mem.clone(),
        r.irq.clone(),
    );
    net.activate(0, vec![RX.queue(0, 0), TX.queue(0, 0)])
        .expect("activate");
    if flags & FLAG_RX_FIRST != 0 {
        run_rx(r, &mut net, &wire, &mut frames);
        run_tx(r, &mut net, &wire);
    } else {
        run_tx(r, &mut net, &wire);
        run_rx(r, &mut net, &wire, &mut frames);
    }
    r.mem.assert_same("virtio-net");
}

fuzz_target!(|data: &[u8]| {
    let mut guard = RIG.lock().unwrap_or_else(|e| e.into_inner());
    let r = guard.get_or_insert_with(rig);
    run(r, data);
});
