//! A driver's side of a split virtqueue for unit tests: lays out rings with virtio-queue's
//! mock once, then publishes hand-made (possibly hostile) descriptor chains.

use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// One descriptor: address, length, flags, `next` relative to the chain's first index.
pub type Desc = (u64, u32, u16, u16);

/// The driver's view of one queue at `start`.
pub struct TestQueue {
    mem: GuestMemoryMmap,
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    seen_used: u16,
    last_head: u16,
}

impl TestQueue {
    /// Lays out a queue of `size` entries at `start`; returns it and the device's `Queue`.
    pub fn new(mem: &GuestMemoryMmap, start: u64, size: u16) -> (Self, Queue) {
        let mock = MockSplitQueue::create(mem, GuestAddress(start), size);
        let q: Queue = mock.create_queue().expect("valid mock queue");
        let t = Self {
            mem: mem.clone(),
            desc: mock.desc_table_addr().0,
            avail: mock.avail_addr().0,
            used: mock.used_addr().0,
            size,
            next_desc: 0,
            seen_used: 0,
            last_head: 0,
        };
        (t, q)
    }

    /// Publishes one chain; returns its head index. Descriptor indices wrap around the table.
    pub fn publish(&mut self, descs: &[Desc]) -> u16 {
        let base = self.next_desc;
        self.last_head = base;
        self.next_desc = (self.next_desc + descs.len() as u16) % self.size;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let idx = (base + i as u16) % self.size;
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, base + next));
            self.mem
                .write_obj(d, GuestAddress(self.desc + 16 * u64::from(idx)))
                .unwrap();
        }
        let idx: u16 = self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        self.mem.write_obj(base, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
        base
    }

    /// Head index of the chain most recently published.
    pub fn last_head(&self) -> u16 {
        self.last_head
    }

    /// Used entries the device added since the last call: (head, length).
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let now: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.seen_used != now {
            let elem = self.used + 4 + 8 * u64::from(self.seen_used % self.size);
            let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            out.push((id as u16, len));
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        out
    }
}
