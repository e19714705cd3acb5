//! virtio-net against a mock driver and an in-memory backend: frames both ways, and the
//! malformed chains a hostile guest can build.

use std::collections::VecDeque;
use std::io::{Error, ErrorKind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use ftvm_guest_abi::virtio::{DESC_F_NEXT, DESC_F_WRITE, NET_HDR_LEN};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::device::MAX_FRAME;
use super::{Net, NetBackend, NetConfig, NetCounters};
use crate::devices::virtio::test_driver::{Desc, TestQueue};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::memory::GuestMemoryMmap;

#[derive(Clone, Default)]
struct Wire {
    to_guest: Arc<Mutex<VecDeque<Vec<u8>>>>,
    from_guest: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl NetBackend for Wire {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let frame = self.to_guest.lock().unwrap().pop_front();
        let f = frame.ok_or_else(|| Error::from(ErrorKind::WouldBlock))?;
        // As a TAP does: a frame longer than the buffer is truncated.
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }
    fn send(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.from_guest.lock().unwrap().push(frame.to_vec());
        Ok(frame.len())
    }
}

const MEM: usize = 4 << 20;
const BUF: u64 = 0x10_0000;

struct Rig {
    mem: GuestMemoryMmap,
    rxq: TestQueue,
    txq: TestQueue,
    net: Net<Wire>,
    wire: Wire,
}

fn rig() -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let irq = Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        Arc::new(|| {}),
    ));
    let wire = Wire::default();
    let mut net = Net::new(wire.clone(), [6, 1, 2, 3, 4, 5], mem.clone(), irq);
    let (rxq, rx) = TestQueue::new(&mem, 0, 16);
    let (txq, tx) = TestQueue::new(&mem, 0x8000, 16);
    net.activate(0, vec![rx, tx]).unwrap();
    Rig {
        mem,
        rxq,
        txq,
        net,
        wire,
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn count(c: &NetCounters, f: impl Fn(&NetCounters) -> &std::sync::atomic::AtomicU64) -> u64 {
    f(c).load(Ordering::Relaxed)
}

impl Rig {
    /// Queues a frame for transmission in one buffer (header + frame).
    fn send(&mut self, f: &[u8]) -> u32 {
        let mut bytes = vec![0u8; NET_HDR_LEN];
        bytes.extend_from_slice(f);
        self.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        self.txq.publish(&[(BUF, bytes.len() as u32, 0, 0)]);
        assert_eq!(self.net.process_tx(), 1);
        let used = self.txq.take_used();
        assert_eq!(used.len(), 1, "transmit chain returned");
        used[0].1
    }

    fn sent(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.wire.from_guest.lock().unwrap())
    }

    /// Posts one receive buffer of `len` bytes at `addr`.
    fn post(&mut self, addr: u64, len: u32) {
        self.rxq.publish(&[(addr, len, DESC_F_WRITE, 0)]);
    }

    fn arrive(&self, f: Vec<u8>) {
        self.wire.to_guest.lock().unwrap().push_back(f);
    }

    fn counters(&self) -> Arc<NetCounters> {
        self.net.counters()
    }
}

#[test]
fn frames_go_out_without_the_virtio_header_and_are_counted() {
    let mut r = rig();
    let f = frame(60, 1);
    r.send(&f);
    // Header and frame in separate buffers works too.
    r.mem
        .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(BUF))
        .unwrap();
    r.mem.write_slice(&f, GuestAddress(BUF + 0x1000)).unwrap();
    r.txq.publish(&[
        (BUF, NET_HDR_LEN as u32, DESC_F_NEXT, 1),
        (BUF + 0x1000, 60, 0, 0),
    ]);
    r.net.process_tx();
    assert_eq!(r.sent(), vec![f.clone(), f]);
    let c = r.counters();
    assert_eq!(
        (count(&c, |c| &c.tx_packets), count(&c, |c| &c.tx_bytes)),
        (2, 120)
    );
}

#[test]
fn frames_come_in_behind_a_header_and_wait_for_buffers() {
    let mut r = rig();
    let f = frame(1514, 7);
    r.arrive(f.clone());
    assert_eq!(r.net.process_rx(), 0, "no buffer yet");
    assert!(r.net.rx_pending());
    r.post(BUF, 2048);
    assert_eq!(r.net.process_rx(), 1);
    assert_eq!(r.rxq.take_used(), vec![(0, (NET_HDR_LEN + 1514) as u32)]);
    let mut got = vec![0u8; NET_HDR_LEN + 1514];
    r.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(got[10], 1, "num_buffers = 1");
    assert_eq!(&got[NET_HDR_LEN..], &f[..]);
    let c = r.counters();
    assert_eq!(
        (count(&c, |c| &c.rx_packets), count(&c, |c| &c.rx_bytes)),
        (1, 1514)
    );
    assert!(!r.net.rx_pending());
}

#[test]
fn hostile_transmit_chains_are_dropped_and_counted() {
    let mut r = rig();
    let far = MEM as u64 + 0x1000;
    let bad: &[(&str, &[Desc])] = &[
        ("device-writable buffer", &[(BUF, 100, DESC_F_WRITE, 0)]),
        ("header only", &[(BUF, NET_HDR_LEN as u32, 0, 0)]),
        ("outside guest memory", &[(far, 100, 0, 0)]),
        ("zero length", &[(BUF, 0, 0, 0)]),
        (
            "descriptor loop",
            &[(BUF, 100, DESC_F_NEXT, 1), (BUF, 100, DESC_F_NEXT, 0)],
        ),
        (
            "over-long frame",
            &[(BUF, (MAX_FRAME + NET_HDR_LEN + 1) as u32, 0, 0)],
        ),
    ];
    for (i, &(what, descs)) in bad.iter().enumerate() {
        r.txq.publish(descs);
        assert_eq!(r.net.process_tx(), 1, "{what}");
        assert_eq!(r.txq.take_used().len(), 1, "{what}: chain returned");
        assert_eq!(
            count(&r.counters(), |c| &c.invalid_chains),
            i as u64 + 1,
            "{what}"
        );
        assert!(r.sent().is_empty(), "{what}: nothing sent");
        let f = frame(64, i as u8);
        r.send(&f);
        assert_eq!(r.sent(), vec![f], "{what}: a good frame still goes out");
    }
}

#[test]
fn hostile_receive_chains_are_dropped_and_the_frame_kept() {
    let mut r = rig();
    let f = frame(200, 3);
    r.arrive(f.clone());
    // A buffer the device may not write, then one outside memory: both dropped, the frame
    // waits for a good buffer.
    r.rxq.publish(&[(BUF, 2048, 0, 0)]);
    r.rxq
        .publish(&[(MEM as u64 + 0x1000, 2048, DESC_F_WRITE, 0)]);
    r.post(BUF + 0x1000, 2048);
    assert_eq!(r.net.process_rx(), 3);
    let used = r.rxq.take_used();
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![0, 0, (NET_HDR_LEN + 200) as u32]
    );
    assert_eq!(count(&r.counters(), |c| &c.invalid_chains), 2);
    let mut got = vec![0u8; 200];
    r.mem
        .read_slice(&mut got, GuestAddress(BUF + 0x1000 + NET_HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, f);
}

#[test]
fn a_frame_larger_than_the_buffer_is_dropped_and_counted() {
    let mut r = rig();
    r.arrive(frame(1500, 1));
    r.arrive(frame(100, 2));
    r.post(BUF, 512);
    r.post(BUF + 0x1000, 512);
    assert_eq!(r.net.process_rx(), 2);
    let used = r.rxq.take_used();
    assert_eq!(used[0].1, 0, "too big: dropped");
    assert_eq!(used[1].1, (NET_HDR_LEN + 100) as u32);
    let c = r.counters();
    assert_eq!(
        (count(&c, |c| &c.rx_dropped), count(&c, |c| &c.rx_packets)),
        (1, 1)
    );
}

#[test]
fn net_options_parse() {
    let c: NetConfig = "tap=ftvm0".parse().unwrap();
    assert_eq!((c.tap.as_str(), c.mac), ("ftvm0", None));
    let c: NetConfig = "tap=t1,mac=06:00:0a:0B:0c:ff".parse().unwrap();
    assert_eq!(c.mac, Some([6, 0, 0xa, 0xb, 0xc, 0xff]));
    assert!(
        "mac=06:00:00:00:00:01"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("tap=NAME")
    );
    assert!(
        "tap=t,mac=zz:00:00:00:00:01"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("Invalid MAC")
    );
    assert!("tap=t,mac=06:00:00:00:00".parse::<NetConfig>().is_err());
    assert!(
        "tap=t,speed=fast"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("'speed=fast'")
    );
}

#[test]
fn received_frames_mark_guest_pages_dirty() {
    let mut r = rig();
    let mem = r.mem.clone();
    let region = mem.iter().next().unwrap();
    let bitmap = std::ops::Deref::deref(region).bitmap();
    bitmap.reset();
    r.arrive(frame(1500, 9));
    r.post(BUF + 0xf00, 2048); // straddles a page boundary
    r.net.process_rx();
    assert!(bitmap.is_addr_set((BUF + 0xf00) as usize));
    assert!(bitmap.is_addr_set((BUF + 0x1000) as usize));
    assert!(!bitmap.is_addr_set((BUF + 0x2000) as usize));
}

impl Rig {
    /// Queues one transmit chain of `total` bytes (header included) split into `pieces`
    /// readable buffers; returns the frame the guest meant to send.
    fn send_chain(&mut self, total: usize, pieces: usize, seed: u8) -> Vec<u8> {
        let bytes = frame(total, seed);
        self.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        let step = total.div_ceil(pieces);
        let mut descs = Vec::new();
        let mut at = 0;
        while at < total {
            let len = step.min(total - at);
            let next = descs.len() as u16 + 1;
            descs.push((BUF + at as u64, len as u32, DESC_F_NEXT, next));
            at += len;
        }
        let last = descs.last_mut().unwrap();
        (last.2, last.3) = (0, 0);
        self.txq.publish(&descs);
        bytes[NET_HDR_LEN..].to_vec()
    }
}

#[test]
fn transmit_chains_between_the_frame_size_and_the_chain_limit_are_sent() {
    // The chain limit is a frame plus its header: every length in that window must fit the
    // device's frame buffer (it once panicked the device thread).
    let mut r = rig();
    for (i, total) in (MAX_FRAME + 1..=MAX_FRAME + NET_HDR_LEN).enumerate() {
        let want = r.send_chain(total, 1, i as u8);
        assert_eq!(r.net.process_tx(), 1, "{total}");
        assert_eq!(r.txq.take_used().len(), 1, "{total}: chain returned");
        assert_eq!(r.sent(), vec![want], "{total}: frame sent");
    }
    assert_eq!(count(&r.counters(), |c| &c.invalid_chains), 0);
}

#[test]
fn transmit_chain_lengths_at_the_edges() {
    let limit = MAX_FRAME + NET_HDR_LEN;
    // (chain bytes, buffers, sent?)
    let cases = [
        (NET_HDR_LEN, 1, false),
        (NET_HDR_LEN + 1, 1, true),
        (NET_HDR_LEN + 1, 2, true),
        (limit - 1, 1, true),
        (limit, 1, true),
        (limit, 3, true),
        (limit + 1, 1, false),
        (limit + 1, 3, false),
    ];
    let mut r = rig();
    let mut invalid = 0;
    for (i, &(total, pieces, ok)) in cases.iter().enumerate() {
        let what = format!("{total} bytes in {pieces} buffers");
        let want = r.send_chain(total, pieces, i as u8);
        assert_eq!(r.net.process_tx(), 1, "{what}");
        assert_eq!(r.txq.take_used(), vec![(r.last_head(), 0)], "{what}");
        let c = r.counters();
        if ok {
            assert_eq!(r.sent(), vec![want], "{what}: sent");
        } else {
            invalid += 1;
            assert!(r.sent().is_empty(), "{what}: refused");
        }
        assert_eq!(count(&c, |c| &c.invalid_chains), invalid, "{what}");
        let f = frame(64, i as u8);
        r.send(&f);
        assert_eq!(r.sent(), vec![f], "{what}: the next frame still goes out");
    }
    let c = r.counters();
    let sent = cases.iter().filter(|c| c.2).count() + cases.len();
    assert_eq!(count(&c, |c| &c.tx_packets), sent as u64);
}

impl Rig {
    /// Head index of the chain most recently published on the transmit queue.
    fn last_head(&self) -> u16 {
        self.txq.last_head()
    }
}

#[test]
fn receive_frame_lengths_at_the_edges() {
    let mut r = rig();
    // Frames up to MAX_FRAME are delivered; a longer one (which the TAP would truncate) is
    // dropped rather than delivered cut short.
    for (len, delivered) in [
        (MAX_FRAME - 1, true),
        (MAX_FRAME, true),
        (MAX_FRAME + 1, false),
    ] {
        let before = count(&r.counters(), |c| &c.rx_dropped);
        let f = frame(len, 5);
        r.arrive(f.clone());
        r.arrive(frame(60, 6));
        r.post(BUF, (NET_HDR_LEN + MAX_FRAME) as u32);
        r.post(BUF + 0x2_0000, 2048);
        r.net.process_rx();
        let used = r.rxq.take_used();
        if delivered {
            assert_eq!(used[0].1, (NET_HDR_LEN + len) as u32, "{len}");
            let mut got = vec![0u8; len];
            r.mem
                .read_slice(&mut got, GuestAddress(BUF + NET_HDR_LEN as u64))
                .unwrap();
            assert!(got == f, "{len}: frame intact");
            assert_eq!(used[1].1, (NET_HDR_LEN + 60) as u32);
        } else {
            // The over-long frame never took a buffer: the next frame got the first one.
            assert_eq!(used, vec![(used[0].0, (NET_HDR_LEN + 60) as u32)], "{len}");
            assert_eq!(count(&r.counters(), |c| &c.rx_dropped), before + 1);
            // Leave the queue as the other rounds do: the unused buffer is consumed next.
            r.arrive(frame(60, 7));
            r.net.process_rx();
            r.rxq.take_used();
        }
    }
}

#[test]
fn receive_buffer_lengths_at_the_edges() {
    let mut r = rig();
    let len = 1000;
    // (buffer bytes, delivered?)
    let cases = [
        (NET_HDR_LEN, false),
        (NET_HDR_LEN + len - 1, false),
        (NET_HDR_LEN + len, true),
        (NET_HDR_LEN + len + 1, true),
    ];
    let mut dropped = 0;
    for (i, &(buf, ok)) in cases.iter().enumerate() {
        r.arrive(frame(len, i as u8));
        r.post(BUF, buf as u32);
        assert_eq!(r.net.process_rx(), 1, "{buf}");
        let used = r.rxq.take_used();
        let want = if ok { (NET_HDR_LEN + len) as u32 } else { 0 };
        assert_eq!(used[0].1, want, "{buf}");
        dropped += u64::from(!ok);
        assert_eq!(count(&r.counters(), |c| &c.rx_dropped), dropped, "{buf}");
        assert_eq!(count(&r.counters(), |c| &c.invalid_chains), 0, "{buf}");
        assert!(!r.net.rx_pending(), "{buf}: nothing left waiting");
    }
    // Split over buffers, the same edges hold.
    r.arrive(frame(len, 9));
    r.rxq.publish(&[
        (BUF, NET_HDR_LEN as u32, DESC_F_WRITE | DESC_F_NEXT, 1),
        (BUF + 0x1000, len as u32, DESC_F_WRITE, 0),
    ]);
    r.net.process_rx();
    assert_eq!(r.rxq.take_used()[0].1, (NET_HDR_LEN + len) as u32);
}

#[test]
fn macs_must_be_a_card_s_and_strictly_written() {
    for good in [
        "06:00:00:00:00:01",
        "02:AB:cd:EF:01:23",
        "fe:ff:ff:ff:ff:ff",
    ] {
        let c: NetConfig = format!("tap=t,mac={good}").parse().unwrap();
        assert!(c.mac.is_some(), "{good}");
    }
    let bad = [
        ("00:00:00:00:00:00", "all zeros"),
        ("ff:ff:ff:ff:ff:ff", "broadcast"),
        ("01:00:5e:00:00:01", "multicast"),
        ("07:00:00:00:00:01", "multicast"),
        ("+1:+2:+3:+4:+5:+6", "Invalid MAC"),
        ("6:0:0:0:0:1", "Invalid MAC"),
        ("006:00:00:00:00:01", "Invalid MAC"),
        ("06:00:00:00:00:01:", "Invalid MAC"),
        ("06:00:00:00:00:0g", "Invalid MAC"),
        ("06-00-00-00-00-01", "Invalid MAC"),
        ("", "Invalid MAC"),
    ];
    for (mac, why) in bad {
        let e = format!("tap=t,mac={mac}").parse::<NetConfig>().unwrap_err();
        assert!(e.contains(why), "{mac}: {e}");
    }
}

#[test]
fn net_options_are_given_once_and_known() {
    for (s, why) in [
        ("tap=a,tap=b", "'tap' is given twice"),
        (
            "tap=a,mac=06:00:00:00:00:01,mac=06:00:00:00:00:02",
            "'mac' is given twice",
        ),
        ("tap=a,queues=2", "Unknown network option 'queues=2'"),
        ("tap=a,", "Unknown network option ''"),
        ("tap", "Unknown network option 'tap'"),
        ("tap=", "empty"),
        ("tap=a/b", "not a valid interface name"),
    ] {
        let e = s.parse::<NetConfig>().unwrap_err();
        assert!(e.contains(why), "{s}: {e}");
    }
    // Interface names: the kernel's limit is 15 bytes.
    let fifteen = "t".repeat(15);
    let c: NetConfig = format!("tap={fifteen}").parse().unwrap();
    assert_eq!(c.tap, fifteen);
    let e = format!("tap={fifteen}x").parse::<NetConfig>().unwrap_err();
    assert!(e.contains("longer than 15"), "{e}");
}
