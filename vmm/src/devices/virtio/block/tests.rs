//! virtio-blk against a mock driver: good requests, and the malformed chains a hostile guest
//! can build. Every chain must come back on the used ring (with an error status or dropped and
//! counted), the VMM must not panic, and a good request must still work afterwards.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ftvm_guest_abi::virtio::{
    BLK_S_IOERR, BLK_S_OK, BLK_S_UNSUPP, BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT,
    DESC_F_NEXT, DESC_F_WRITE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{Block, BlockConfig};
use crate::devices::virtio::test_driver::{Desc, TestQueue};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::memory::GuestMemoryMmap;

const MEM: usize = 40 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK_SECTORS: u64 = 128;

struct Rig {
    mem: GuestMemoryMmap,
    queue: TestQueue,
    block: Block,
    _image: tempfile::NamedTempFile,
    irq: Arc<Interrupt>,
}

fn rig(read_only: bool) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut image = tempfile::NamedTempFile::new().unwrap();
    let pattern: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i % 251) as u8).collect();
    image.write_all(&pattern).unwrap();
    let irq = Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        Arc::new(|| {}),
    ));
    let config = BlockConfig {
        path: image.path().to_path_buf(),
        read_only,
    };
    let mut block = Block::new(config, mem.clone(), irq.clone()).unwrap();
    let (queue, q) = TestQueue::new(&mem, 0, 64);
    block.activate(0, vec![q]).unwrap();
    Rig {
        mem,
        queue,
        block,
        _image: image,
        irq,
    }
}

impl Rig {
    /// Publishes one chain and processes the queue; returns its used entry.
    fn run(&mut self, descs: &[Desc]) -> (u16, u32) {
        let head = self.queue.publish(descs);
        assert_eq!(self.block.process_queue(), 1, "one chain processed");
        let used = self.queue.take_used();
        assert_eq!(used.len(), 1, "chain returned");
        assert_eq!(used[0].0, head);
        used[0]
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// A well-formed request: header, one data buffer, status.
    fn request(&mut self, kind: u32, sector: u64, len: u32, data_flags: u16) -> (u16, u32) {
        self.header(kind, sector);
        self.run(&[
            (HDR, 16, DESC_F_NEXT, 1),
            (DATA, len, data_flags | DESC_F_NEXT, 2),
            (STATUS, 1, DESC_F_WRITE, 0),
        ])
    }

    fn counter(&self, f: impl Fn(&super::BlockCounters) -> &std::sync::atomic::AtomicU64) -> u64 {
        f(&self.block.counters()).load(Ordering::Relaxed)
    }
}

#[test]
fn write_then_read_round_trips_and_counts() {
    let mut r = rig(false);
    let data: Vec<u8> = (0..1024).map(|i| (i * 7 % 256) as u8).collect();
    r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let (_, len) = r.request(BLK_T_OUT, 3, 1024, 0);
    assert_eq!((r.status(), len), (BLK_S_OK, 1));
    let on_disk = std::fs::read(r._image.path()).unwrap();
    assert_eq!(&on_disk[3 * 512..3 * 512 + 1024], &data[..]);

    r.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    let (_, len) = r.request(BLK_T_IN, 3, 1024, DESC_F_WRITE);
    assert_eq!((r.status(), len), (BLK_S_OK, 1025));
    let mut back = vec![0u8; 1024];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, data);
    assert_eq!(r.counter(|c| &c.write_requests), 1);
    assert_eq!(r.counter(|c| &c.write_bytes), 1024);
    assert_eq!(r.counter(|c| &c.read_requests), 1);
    assert_eq!(r.counter(|c| &c.read_bytes), 1024);
    assert_ne!(r.irq.status() & 1, 0, "used-ring interrupt raised");
}

#[test]
fn block_reads_mark_guest_pages_dirty() {
    let mut r = rig(false);
    let mem = r.mem.clone();
    let region = mem.iter().next().unwrap();
    std::ops::Deref::deref(region).bitmap().reset();
    r.request(BLK_T_IN, 0, 4096 + 512, DESC_F_WRITE);
    let bits = std::ops::Deref::deref(region).bitmap();
    for page in [DATA, DATA + 4096, STATUS] {
        assert!(
            bits.is_addr_set(page as usize),
            "page {page:#x} not marked dirty"
        );
    }
    assert!(
        !bits.is_addr_set((DATA + 8192) as usize),
        "nothing past the transfer"
    );
}

#[test]
fn flush_and_get_id_work_and_unknown_types_are_unsupported() {
    let mut r = rig(false);
    r.header(BLK_T_FLUSH, 0);
    let (_, len) = r.run(&[(HDR, 16, DESC_F_NEXT, 1), (STATUS, 1, DESC_F_WRITE, 0)]);
    assert_eq!((r.status(), len), (BLK_S_OK, 1));
    let (_, len) = r.request(BLK_T_GET_ID, 0, 20, DESC_F_WRITE);
    assert_eq!(r.status(), BLK_S_OK);
    assert!(len > 1);
    r.header(99, 0);
    r.run(&[(HDR, 16, DESC_F_NEXT, 1), (STATUS, 1, DESC_F_WRITE, 0)]);
    assert_eq!(r.status(), BLK_S_UNSUPP);
    assert_eq!(r.counter(|c| &c.flush_requests), 1);
    assert_eq!(r.counter(|c| &c.get_id_requests), 1);
    assert_eq!(r.counter(|c| &c.unsupported), 1);
}

/// After each hostile chain, a good read still works.
fn still_works(r: &mut Rig) {
    let (_, len) = r.request(BLK_T_IN, 0, 512, DESC_F_WRITE);
    assert_eq!((r.status(), len), (BLK_S_OK, 513));
}

#[test]
fn bad_requests_get_ioerr() {
    let mut r = rig(false);
    let cases: &[(&str, u32, u64, u32, u16)] = &[
        ("read into a device-readable buffer", BLK_T_IN, 0, 512, 0),
        (
            "write from a device-writable buffer",
            BLK_T_OUT,
            0,
            512,
            DESC_F_WRITE,
        ),
        (
            "sector past the end",
            BLK_T_IN,
            DISK_SECTORS,
            512,
            DESC_F_WRITE,
        ),
        ("range wrapping u64", BLK_T_IN, u64::MAX, 512, DESC_F_WRITE),
        ("partial sector", BLK_T_IN, 0, 100, DESC_F_WRITE),
        (
            "oversized request",
            BLK_T_IN,
            0,
            (16 << 20) + 512,
            DESC_F_WRITE,
        ),
    ];
    for (i, &(what, kind, sector, len, flags)) in cases.iter().enumerate() {
        let (_, used) = r.request(kind, sector, len, flags);
        assert_eq!(r.status(), BLK_S_IOERR, "{what}");
        assert_eq!(used, 1, "{what}: only the status byte written");
        assert_eq!(r.counter(|c| &c.errors), i as u64 + 1, "{what}");
        still_works(&mut r);
    }
    // A header the device could write, or of the wrong size.
    r.header(BLK_T_IN, 0);
    r.run(&[
        (HDR, 16, DESC_F_WRITE | DESC_F_NEXT, 1),
        (STATUS, 1, DESC_F_WRITE, 0),
    ]);
    assert_eq!(r.status(), BLK_S_IOERR);
    r.header(BLK_T_IN, 0);
    r.run(&[
        (HDR, 8, DESC_F_NEXT, 1),
        (DATA, 512, DESC_F_WRITE | DESC_F_NEXT, 2),
        (STATUS, 1, DESC_F_WRITE, 0),
    ]);
    assert_eq!(r.status(), BLK_S_IOERR);
    assert_eq!(r.counter(|c| &c.read_requests), cases.len() as u64);
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let mut r = rig(true);
    assert_ne!(r.block.features() & ftvm_guest_abi::virtio::BLK_F_RO, 0);
    let before = std::fs::read(r._image.path()).unwrap();
    r.request(BLK_T_OUT, 0, 512, 0);
    assert_eq!(r.status(), BLK_S_IOERR);
    assert_eq!(std::fs::read(r._image.path()).unwrap(), before);
    assert_eq!(r.counter(|c| &c.write_requests), 0);
    still_works(&mut r);
}

#[test]
fn malformed_chains_are_dropped_and_counted() {
    let mut r = rig(false);
    let far = (MEM as u64) + 0x1000;
    let chains: &[(&str, &[Desc])] = &[
        (
            "data outside guest memory",
            &[
                (HDR, 16, DESC_F_NEXT, 1),
                (far, 512, DESC_F_WRITE | DESC_F_NEXT, 2),
                (STATUS, 1, DESC_F_WRITE, 0),
            ],
        ),
        (
            "buffer wrapping the address space",
            &[
                (HDR, 16, DESC_F_NEXT, 1),
                (u64::MAX - 10, 512, DESC_F_WRITE | DESC_F_NEXT, 2),
                (STATUS, 1, DESC_F_WRITE, 0),
            ],
        ),
        (
            "descriptor loop",
            &[
                (HDR, 16, DESC_F_NEXT, 1),
                (DATA, 512, DESC_F_WRITE | DESC_F_NEXT, 0),
            ],
        ),
        ("next index past the table", &[(HDR, 16, DESC_F_NEXT, 200)]),
        (
            "zero-length buffer",
            &[
                (HDR, 16, DESC_F_NEXT, 1),
                (DATA, 0, DESC_F_WRITE | DESC_F_NEXT, 2),
                (STATUS, 1, DESC_F_WRITE, 0),
            ],
        ),
        (
            "readable after writable",
            &[
                (HDR, 16, DESC_F_NEXT, 1),
                (DATA, 512, DESC_F_WRITE | DESC_F_NEXT, 2),
                (STATUS, 1, DESC_F_NEXT, 3),
                (STATUS + 8, 1, DESC_F_WRITE, 0),
            ],
        ),
        (
            "no status buffer",
            &[(HDR, 16, DESC_F_NEXT, 1), (DATA, 512, 0, 0)],
        ),
        (
            "over-long chain",
            &[
                (HDR, 16, DESC_F_NEXT, 1),
                (DATA, 33 << 20, DESC_F_WRITE | DESC_F_NEXT, 2),
                (STATUS, 1, DESC_F_WRITE, 0),
            ],
        ),
    ];
    for (i, &(what, descs)) in chains.iter().enumerate() {
        r.header(BLK_T_IN, 0);
        let (_, used) = r.run(descs);
        assert_eq!(used, 0, "{what}: dropped");
        assert_eq!(r.status(), 0xff, "{what}: no status written");
        assert_eq!(r.counter(|c| &c.invalid_chains), i as u64 + 1, "{what}");
        still_works(&mut r);
    }
}

#[test]
fn disk_options_parse() {
    let c: BlockConfig = "/tmp/a.img".parse().unwrap();
    assert_eq!(
        (c.path.to_str().unwrap(), c.read_only),
        ("/tmp/a.img", false)
    );
    let c: BlockConfig = "/tmp/b.img,readonly".parse().unwrap();
    assert!(c.read_only);
    assert!("".parse::<BlockConfig>().is_err());
    let e = "/tmp/c.img,fast".parse::<BlockConfig>().unwrap_err();
    assert!(e.contains("'fast'"), "{e}");
}

#[test]
fn a_missing_image_is_a_clear_error() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap(), Arc::new(|| {})));
    let config = BlockConfig {
        path: "/nonexistent/disk.img".into(),
        read_only: false,
    };
    let err = Block::new(config, mem, irq).err().expect("refused");
    assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
}
