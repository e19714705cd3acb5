//! A polling virtio-mmio (version 2) driver: device initialisation and split virtqueues.

use core::sync::atomic::{Ordering, fence};

use ftvm_guest_abi::virtio::{self, DESC_F_NEXT, DESC_F_WRITE, F_VERSION_1, reg, status};

use crate::heap;

fn read32(addr: u64) -> u32 {
    // SAFETY: a register of a virtio-mmio window: MMIO that exits to the VMM.
    unsafe { (addr as *const u32).read_volatile() }
}

fn write32(addr: u64, v: u32) {
    // SAFETY: as for read32.
    unsafe { (addr as *mut u32).write_volatile(v) }
}

/// An initialised device.
pub struct Device {
    base: u64,
    /// Features both sides agreed on.
    pub features: u64,
}

impl Device {
    /// Resets the device at `base` and negotiates `wanted` features (plus VERSION_1).
    pub fn init(base: u64, device_type: u32, wanted: u64) -> Result<Self, &'static str> {
        if read32(base + reg::MAGIC) != virtio::MAGIC || read32(base + reg::VERSION) != 2 {
            return Err("not a virtio-mmio version 2 device");
        }
        if read32(base + reg::DEVICE_ID) != device_type {
            return Err("unexpected virtio device type");
        }
        write32(base + reg::STATUS, 0);
        write32(base + reg::STATUS, status::ACKNOWLEDGE);
        write32(base + reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(base + reg::DEVICE_FEATURES_SEL, 0);
        let mut offered = u64::from(read32(base + reg::DEVICE_FEATURES));
        write32(base + reg::DEVICE_FEATURES_SEL, 1);
        offered |= u64::from(read32(base + reg::DEVICE_FEATURES)) << 32;
        let features = offered & (wanted | F_VERSION_1);
        if features & F_VERSION_1 == 0 {
            return Err("device does not offer virtio 1.x");
        }
        write32(base + reg::DRIVER_FEATURES_SEL, 0);
        write32(base + reg::DRIVER_FEATURES, features as u32);
        write32(base + reg::DRIVER_FEATURES_SEL, 1);
        write32(base + reg::DRIVER_FEATURES, (features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        write32(base + reg::STATUS, s);
        if read32(base + reg::STATUS) & status::FEATURES_OK == 0 {
            return Err("device refused the features");
        }
        Ok(Self { base, features })
    }

    /// Sets up queue `index` with up to `size` entries.
    pub fn queue(&self, index: u16, size: u16) -> Result<Queue, &'static str> {
        write32(self.base + reg::QUEUE_SEL, u32::from(index));
        let max = read32(self.base + reg::QUEUE_NUM_MAX) as u16;
        if max == 0 {
            return Err("queue does not exist");
        }
        let size = size.min(max);
        let n = u64::from(size);
        let desc = heap::alloc(16 * n, 4096).ok_or("out of memory")?;
        let avail = heap::alloc(6 + 2 * n, 4096).ok_or("out of memory")?;
        let used = heap::alloc(6 + 8 * n, 4096).ok_or("out of memory")?;
        write32(self.base + reg::QUEUE_NUM, u32::from(size));
        for (lo, addr) in [
            (reg::QUEUE_DESC_LOW, desc),
            (reg::QUEUE_AVAIL_LOW, avail),
            (reg::QUEUE_USED_LOW, used),
        ] {
            write32(self.base + lo, addr as u32);
            write32(self.base + lo + 4, (addr >> 32) as u32);
        }
        write32(self.base + reg::QUEUE_READY, 1);
        let mut q = Queue {
            base: self.base,
            index,
            size,
            desc,
            avail,
            used,
            free: [0; 256],
            free_len: 0,
            avail_idx: 0,
            last_used: 0,
        };
        for i in (0..size).rev() {
            q.free[q.free_len] = i;
            q.free_len += 1;
        }
        Ok(q)
    }

    /// Tells the device the driver is ready.
    pub fn driver_ok(&self) {
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        write32(self.base + reg::STATUS, s);
    }

    /// Reads a 32-bit configuration field.
    pub fn config32(&self, offset: u64) -> u32 {
        read32(self.base + reg::CONFIG + offset)
    }
}

/// A split virtqueue, driver side.
pub struct Queue {
    base: u64,
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free: [u16; 256],
    free_len: usize,
    avail_idx: u16,
    last_used: u16,
}

/// A buffer handed to the device: address, length, whether the device writes it.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Queue {
    /// Makes `bufs` available as one chain; returns its head, or None if the ring is full.
    pub fn push(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free_len {
            return None;
        }
        let mut ids = [0u16; 8];
        for id in ids.iter_mut().take(bufs.len()) {
            self.free_len -= 1;
            *id = self.free[self.free_len];
        }
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            let next = if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            let d = self.desc + 16 * u64::from(ids[i]);
            // SAFETY: d is descriptor ids[i] of this queue's table (allocated for `size`
            // entries; ids come from the free list).
            unsafe {
                (d as *mut u64).write_volatile(b.addr);
                ((d + 8) as *mut u32).write_volatile(b.len);
                ((d + 12) as *mut u16).write_volatile(flags);
                ((d + 14) as *mut u16).write_volatile(next);
            }
        }
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        // SAFETY: the available ring was allocated for `size` entries.
        unsafe { (slot as *mut u16).write_volatile(ids[0]) };
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: avail + 2 is the ring's idx field.
        unsafe { ((self.avail + 2) as *mut u16).write_volatile(self.avail_idx) };
        fence(Ordering::SeqCst);
        Some(ids[0])
    }

    /// Tells the device there is work.
    pub fn notify(&self) {
        write32(self.base + reg::QUEUE_NOTIFY, u32::from(self.index));
    }

    /// Whether the device has completed a chain not yet taken.
    pub fn has_used(&self) -> bool {
        // SAFETY: used + 2 is the used ring's idx field, written by the device.
        let idx = unsafe { ((self.used + 2) as *const u16).read_volatile() };
        idx != self.last_used
    }

    /// Takes the next completed chain: (head, bytes written by the device).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: used + 2 is the used ring's idx field, written by the device.
        let idx = unsafe { ((self.used + 2) as *const u16).read_volatile() };
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let elem = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        // SAFETY: elem is an entry of the used ring, allocated for `size` entries.
        let (id, len) = unsafe {
            (
                (elem as *const u32).read_volatile(),
                ((elem + 4) as *const u32).read_volatile(),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        // Return the chain's descriptors to the free list.
        let mut i = id as u16;
        loop {
            let d = self.desc + 16 * u64::from(i % self.size);
            // SAFETY: d is a descriptor of this queue's table.
            let (flags, next) = unsafe {
                (
                    ((d + 12) as *const u16).read_volatile(),
                    ((d + 14) as *const u16).read_volatile(),
                )
            };
            self.free[self.free_len] = i;
            self.free_len += 1;
            if flags & DESC_F_NEXT == 0 || self.free_len >= usize::from(self.size) {
                break;
            }
            i = next;
        }
        Some((id as u16, len))
    }
}
