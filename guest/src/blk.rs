//! The test guest's virtio-blk driver: one request at a time, polled, with its own counts.

use ftvm_guest_abi::virtio::{BLK_F_FLUSH, BLK_S_OK, BLK_T_FLUSH, BLK_T_IN, BLK_T_OUT, ID_BLOCK};

use crate::virtio::{Buf, Device, Queue};
use crate::{heap, wait_us};

/// What the guest itself counted, to compare with the VMM's counters.
#[derive(Default, Clone, Copy)]
pub struct Counts {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
}

/// Polls of the used ring before waiting (roughly 50 µs).
const SPIN_POLLS: u32 = 20_000;

pub struct Blk {
    queue: Queue,
    header: u64,
    status: u64,
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// Whether the device accepted flush requests.
    can_flush: bool,
    pub counts: Counts,
}

impl Blk {
    pub fn new(base: u64) -> Result<Self, &'static str> {
        let dev = Device::init(base, ID_BLOCK, BLK_F_FLUSH)?;
        let queue = dev.queue(0, 64)?;
        let sectors = u64::from(dev.config32(0)) | (u64::from(dev.config32(4)) << 32);
        dev.driver_ok();
        let header = heap::alloc(16, 16).ok_or("out of memory")?;
        let status = heap::alloc(1, 16).ok_or("out of memory")?;
        Ok(Self {
            queue,
            header,
            status,
            sectors,
            can_flush: dev.features & BLK_F_FLUSH != 0,
            counts: Counts::default(),
        })
    }

    /// Runs one request and waits for it; returns the device's status byte.
    fn request(&mut self, kind: u32, sector: u64, data: Option<Buf>) -> u8 {
        // SAFETY: header and status are heap allocations owned by this driver.
        unsafe {
            (self.header as *mut u32).write_volatile(kind);
            ((self.header + 4) as *mut u32).write_volatile(0);
            ((self.header + 8) as *mut u64).write_volatile(sector);
            (self.status as *mut u8).write_volatile(0xff);
        }
        let head = Buf {
            addr: self.header,
            len: 16,
            writable: false,
        };
        let status = Buf {
            addr: self.status,
            len: 1,
            writable: true,
        };
        let pushed = match data {
            Some(d) => self.queue.push(&[head, d, status]),
            None => self.queue.push(&[head, status]),
        };
        if pushed.is_none() {
            return 0xfe;
        }
        self.queue.notify();
        // Spin briefly (a fast request completes in tens of microseconds), then give the vCPU
        // back; the VMM wakes it early when the device completes.
        let mut spins = 0u32;
        while !self.queue.has_used() {
            if spins < SPIN_POLLS {
                spins += 1;
                core::hint::spin_loop();
            } else {
                wait_us(1000);
            }
        }
        self.queue.pop_used();
        // SAFETY: as above.
        unsafe { (self.status as *const u8).read_volatile() }
    }

    /// Reads `len` bytes at `sector` into `addr`.
    pub fn read(&mut self, sector: u64, addr: u64, len: u32) -> u8 {
        let s = self.request(
            BLK_T_IN,
            sector,
            Some(Buf {
                addr,
                len,
                writable: true,
            }),
        );
        if s == BLK_S_OK {
            self.counts.reads += 1;
            self.counts.read_bytes += u64::from(len);
        }
        s
    }

    /// Writes `len` bytes from `addr` at `sector`.
    pub fn write(&mut self, sector: u64, addr: u64, len: u32) -> u8 {
        let s = self.request(
            BLK_T_OUT,
            sector,
            Some(Buf {
                addr,
                len,
                writable: false,
            }),
        );
        if s == BLK_S_OK {
            self.counts.writes += 1;
            self.counts.write_bytes += u64::from(len);
        }
        s
    }

    pub fn flush(&mut self) -> u8 {
        if !self.can_flush {
            return ftvm_guest_abi::virtio::BLK_S_UNSUPP;
        }
        let s = self.request(BLK_T_FLUSH, 0, None);
        if s == BLK_S_OK {
            self.counts.flushes += 1;
        }
        s
    }
}
