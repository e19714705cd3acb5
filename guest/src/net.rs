//! The test guest's virtio-net driver, as a smoltcp device, with its own counts.

use core::sync::atomic::{AtomicU64, Ordering};

use ftvm_guest_abi::virtio::{ID_NET, NET_F_MAC, NET_HDR_LEN, NET_RX_QUEUE, NET_TX_QUEUE};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::heap;
use crate::virtio::{Buf, Device, Queue};

const QUEUE: u16 = 128;
const BUF: u64 = 2048;

/// What the guest itself counted: rx packets, rx bytes, tx packets, tx bytes (Ethernet frame
/// bytes, as the VMM and the TAP count them). Read by tests from guest memory.
pub static COUNTS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

fn count(i: usize, bytes: usize) {
    COUNTS[i].fetch_add(1, Ordering::Relaxed);
    COUNTS[i + 1].fetch_add(bytes as u64, Ordering::Relaxed);
}

/// The receive side: its queue and which buffer each descriptor holds.
struct Rx {
    q: Queue,
    addr: [u64; 256],
    posted: bool,
}

/// The transmit side: its queue, which buffer each descriptor holds, and the free buffers.
struct Tx {
    q: Queue,
    addr: [u64; 256],
    pool: [u64; QUEUE as usize],
    free: usize,
    posted: bool,
}

pub struct Net {
    rx: Rx,
    tx: Tx,
    pub mac: [u8; 6],
}

impl Rx {
    fn post(&mut self, addr: u64) {
        if let Some(id) = self.q.push(&[Buf {
            addr,
            len: BUF as u32,
            writable: true,
        }]) {
            self.addr[usize::from(id)] = addr;
            self.posted = true;
        }
    }
}

impl Tx {
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.q.pop_used() {
            self.pool[self.free] = self.addr[usize::from(id)];
            self.free += 1;
        }
    }
}

impl Net {
    pub fn new(base: u64) -> Result<Self, &'static str> {
        let dev = Device::init(base, ID_NET, NET_F_MAC)?;
        let rxq = dev.queue(NET_RX_QUEUE, QUEUE)?;
        let txq = dev.queue(NET_TX_QUEUE, QUEUE)?;
        let (lo, hi) = (dev.config32(0).to_le_bytes(), dev.config32(4).to_le_bytes());
        let mac = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1]];
        let rx_bufs = heap::alloc(BUF * u64::from(QUEUE), 4096).ok_or("out of memory")?;
        let tx_bufs = heap::alloc(BUF * u64::from(QUEUE), 4096).ok_or("out of memory")?;
        let mut net = Self {
            rx: Rx {
                q: rxq,
                addr: [0; 256],
                posted: false,
            },
            tx: Tx {
                q: txq,
                addr: [0; 256],
                pool: [0; QUEUE as usize],
                free: 0,
                posted: false,
            },
            mac,
        };
        for i in 0..u64::from(QUEUE) {
            net.rx.post(rx_bufs + i * BUF);
            net.tx.pool[net.tx.free] = tx_bufs + i * BUF;
            net.tx.free += 1;
        }
        dev.driver_ok();
        net.flush();
        Ok(net)
    }

    /// Notifies the device of buffers posted since the last call (one exit per batch).
    pub fn flush(&mut self) {
        if self.rx.posted {
            self.rx.q.notify();
            self.rx.posted = false;
        }
        if self.tx.posted {
            self.tx.q.notify();
            self.tx.posted = false;
        }
    }
}

pub struct RxToken<'a> {
    rx: &'a mut Rx,
    addr: u64,
    len: usize,
}

pub struct TxToken<'a> {
    tx: &'a mut Tx,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // SAFETY: the device wrote `len` bytes (header + frame) into this receive buffer,
        // which is the driver's again until it is re-posted below.
        let frame = unsafe {
            core::slice::from_raw_parts(
                (self.addr + NET_HDR_LEN as u64) as *const u8,
                self.len - NET_HDR_LEN,
            )
        };
        count(0, frame.len());
        let r = f(frame);
        self.rx.post(self.addr);
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let tx = self.tx;
        tx.free -= 1;
        let addr = tx.pool[tx.free];
        let len = len.min(BUF as usize - NET_HDR_LEN);
        // SAFETY: addr is a free transmit buffer of BUF bytes owned by the driver.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, NET_HDR_LEN + len) };
        buf[..NET_HDR_LEN].fill(0);
        let r = f(&mut buf[NET_HDR_LEN..]);
        let bufs = [Buf {
            addr,
            len: (NET_HDR_LEN + len) as u32,
            writable: false,
        }];
        match tx.q.push(&bufs) {
            Some(id) => {
                tx.addr[usize::from(id)] = addr;
                tx.posted = true;
                count(2, len);
            }
            None => {
                tx.pool[tx.free] = addr;
                tx.free += 1;
            }
        }
        r
    }
}

impl phy::Device for Net {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        self.tx.reclaim();
        if self.tx.free == 0 {
            return None;
        }
        let (id, len) = self.rx.q.pop_used()?;
        let addr = self.rx.addr[usize::from(id)];
        let len = (len as usize).clamp(NET_HDR_LEN, BUF as usize);
        Some((
            RxToken {
                rx: &mut self.rx,
                addr,
                len,
            },
            TxToken { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        self.tx.reclaim();
        (self.tx.free > 0).then_some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps.max_burst_size = Some(32);
        caps
    }
}

impl Net {
    /// Whether a received frame is waiting.
    pub fn rx_ready(&mut self) -> bool {
        self.rx.q.has_used()
    }
}
