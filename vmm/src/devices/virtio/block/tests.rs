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

use super::{Block, BlockConfig, MAX_DATA_LEN};
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
    rig_sized(read_only, DISK_SECTORS)
}

/// The first DISK_SECTORS hold a pattern, the rest (if any) are sparse zeros.
fn image(sectors: u64) -> tempfile::NamedTempFile {
    let mut image = tempfile::NamedTempFile::new().unwrap();
    let pattern: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i % 251) as u8).collect();
    image.write_all(&pattern).unwrap();
    image.as_file().set_len(sectors * 512).unwrap();
    image
}

fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        Arc::new(|| {}),
    ))
}

fn rig_sized(read_only: bool, sectors: u64) -> Rig {
    let image = image(sectors);
    let config = BlockConfig {
        path: image.path().to_path_buf(),
        read_only,
    };
    rig_with(image, |mem, irq| Block::new(config, mem, irq).unwrap())
}

fn rig_with(
    image: tempfile::NamedTempFile,
    make: impl FnOnce(GuestMemoryMmap, Arc<Interrupt>) -> Block,
) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let irq = interrupt();
    let mut block = make(mem.clone(), irq.clone());
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

/// Where large transfers go: past the other fixed addresses, with room for 32 MiB + 1.
const BIG: u64 = 0x40_0000;

impl Rig {
    /// A read of `len` bytes in one buffer at BIG; returns (status, used length).
    fn big(&mut self, kind: u32, sector: u64, len: u32, flags: u16) -> (u8, u32) {
        self.header(kind, sector);
        let (_, used) = self.run(&[
            (HDR, 16, DESC_F_NEXT, 1),
            (BIG, len, flags | DESC_F_NEXT, 2),
            (STATUS, 1, DESC_F_WRITE, 0),
        ]);
        (self.status(), used)
    }

    fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(self._image.path()).unwrap()
    }
}

#[test]
fn transfer_lengths_at_the_request_limit() {
    let max = MAX_DATA_LEN as u32;
    let mut r = rig_sized(false, 2 * MAX_DATA_LEN / 512);
    for (len, ok) in [
        (max - 512, true),
        (max, true),
        (max + 1, false),
        (max + 512, false),
    ] {
        for (kind, flags) in [(BLK_T_IN, DESC_F_WRITE), (BLK_T_OUT, 0)] {
            let what = format!("type {kind}, {len} bytes");
            let before = (r.counter(|c| &c.errors), r.image_bytes());
            r.mem.write_slice(&[0xaa; 4096], GuestAddress(BIG)).unwrap();
            let (status, used) = r.big(kind, 0, len, flags);
            if ok {
                assert_eq!(status, BLK_S_OK, "{what}");
                let data = if kind == BLK_T_IN { len } else { 0 };
                assert_eq!(used, data + 1, "{what}");
            } else {
                assert_eq!((status, used), (BLK_S_IOERR, 1), "{what}");
                assert_eq!(r.counter(|c| &c.errors), before.0 + 1, "{what}");
                let mut mem = [0u8; 4096];
                r.mem.read_slice(&mut mem, GuestAddress(BIG)).unwrap();
                assert!(mem.iter().all(|&b| b == 0xaa), "{what}: memory untouched");
                assert!(r.image_bytes() == before.1, "{what}: image untouched");
            }
            still_works(&mut r);
        }
    }
    assert_eq!(r.counter(|c| &c.host_errors), 0);
}

#[test]
fn chain_lengths_at_the_chain_limit() {
    // Chains up to 2 * MAX_DATA_LEN + header + status are parsed and refused as too large
    // (with a status); one byte more and the chain is dropped without one.
    let limit_data = 2 * MAX_DATA_LEN as u32; // header + data + status = the chain limit
    let mut r = rig(false);
    for (len, dropped) in [
        (MAX_DATA_LEN as u32 + 1, false),
        (limit_data - 1, false),
        (limit_data, false),
        (limit_data + 1, true),
    ] {
        let before = (r.counter(|c| &c.errors), r.counter(|c| &c.invalid_chains));
        let (status, used) = r.big(BLK_T_IN, 0, len, DESC_F_WRITE);
        if dropped {
            assert_eq!((status, used), (0xff, 0), "{len}: dropped, no status");
            assert_eq!(r.counter(|c| &c.invalid_chains), before.1 + 1, "{len}");
        } else {
            assert_eq!((status, used), (BLK_S_IOERR, 1), "{len}: refused");
            assert_eq!(r.counter(|c| &c.errors), before.0 + 1, "{len}");
        }
        still_works(&mut r);
    }
}

#[test]
fn header_status_and_sector_edges() {
    let mut r = rig(false);
    let errors = std::cell::Cell::new(0);
    let check = |r: &mut Rig, what: &str, descs: &[Desc], want: (u8, u32)| {
        r.header(BLK_T_IN, 0);
        let (_, used) = r.run(descs);
        assert_eq!((r.status(), used), want, "{what}");
        errors.set(errors.get() + u64::from(want.0 == BLK_S_IOERR));
        assert_eq!(r.counter(|c| &c.errors), errors.get(), "{what}");
        still_works(r);
    };
    let data = |len| (DATA, len, DESC_F_WRITE | DESC_F_NEXT, 2);
    for (hdr, ok) in [(15, false), (16, true), (17, false)] {
        let want = if ok {
            (BLK_S_OK, 513)
        } else {
            (BLK_S_IOERR, 1)
        };
        let descs = [
            (HDR, hdr, DESC_F_NEXT, 1),
            data(512),
            (STATUS, 1, DESC_F_WRITE, 0),
        ];
        check(&mut r, &format!("{hdr}-byte header"), &descs, want);
    }
    // The status is the last byte of the last buffer; the data is what precedes it.
    let hdr = (HDR, 16, DESC_F_NEXT, 1);
    check(
        &mut r,
        "header and status only",
        &[hdr, (STATUS, 1, DESC_F_WRITE, 0)],
        (BLK_S_IOERR, 1),
    );
    check(
        &mut r,
        "data and status in one 513-byte buffer",
        &[hdr, (STATUS, 513, DESC_F_WRITE, 0)],
        (BLK_S_OK, 513),
    );
    r.header(BLK_T_IN, 0);
    let (_, used) = r.run(&[hdr, (DATA, 513, DESC_F_WRITE, 0)]);
    let status: u8 = r.mem.read_obj(GuestAddress(DATA + 512)).unwrap();
    assert_eq!((status, used), (BLK_S_OK, 513), "status after the data");
    for (len, what) in [(512, "511 bytes of data"), (514, "513 bytes of data")] {
        r.header(BLK_T_IN, 0);
        let (_, used) = r.run(&[hdr, (DATA, len, DESC_F_WRITE, 0)]);
        let status: u8 = r
            .mem
            .read_obj(GuestAddress(DATA + u64::from(len) - 1))
            .unwrap();
        assert_eq!((status, used), (BLK_S_IOERR, 1), "{what}");
        errors.set(errors.get() + 1);
    }
    // A 2-byte status buffer: its first byte is data, making 513 bytes.
    r.header(BLK_T_IN, 0);
    let (_, used) = r.run(&[hdr, data(512), (STATUS, 2, DESC_F_WRITE, 0)]);
    let status: u8 = r.mem.read_obj(GuestAddress(STATUS + 1)).unwrap();
    assert_eq!((status, used), (BLK_S_IOERR, 1), "2-byte status buffer");
    errors.set(errors.get() + 1);
    // The last sector, and one past it.
    let last = DISK_SECTORS - 1;
    for (sector, len, ok) in [
        (last - 1, 1024, true),
        (last, 512, true),
        (last, 1024, false),
        (DISK_SECTORS, 512, false),
    ] {
        r.header(BLK_T_IN, sector);
        let (_, used) = r.run(&[hdr, data(len), (STATUS, 1, DESC_F_WRITE, 0)]);
        let want = if ok {
            (BLK_S_OK, len + 1)
        } else {
            (BLK_S_IOERR, 1)
        };
        assert_eq!((r.status(), used), want, "sector {sector}, {len} bytes");
        errors.set(errors.get() + u64::from(!ok));
        assert_eq!(r.counter(|c| &c.errors), errors.get());
    }
    // GET_ID: the id is at most 20 bytes, whatever the buffer.
    for (len, data_written) in [(19, 19), (20, 20), (21, 20)] {
        let (_, used) = r.request(BLK_T_GET_ID, 0, len, DESC_F_WRITE);
        assert_eq!((r.status(), used), (BLK_S_OK, data_written + 1), "{len}");
    }
}

/// Records the messages of warnings logged on this thread.
#[derive(Clone, Default)]
struct Warnings(Arc<std::sync::Mutex<Vec<String>>>);

impl tracing::Subscriber for Warnings {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={v:?} ", f.name()));
            }
        }
        let mut t = Text(String::new());
        e.record(&mut t);
        self.0.lock().unwrap().push(t.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn a_failing_image_is_a_host_error_logged_with_its_cause() {
    // The device believes the disk writable; the host's descriptor is read-only, so every
    // write fails (EBADF) while reads still work.
    let img = image(DISK_SECTORS);
    let path = img.path().to_path_buf();
    let mut r = rig_with(img, |mem, irq| {
        let file = std::fs::File::open(&path).unwrap();
        let config = BlockConfig {
            path: path.clone(),
            read_only: false,
        };
        Block::with_file(config, file, mem, irq).unwrap()
    });
    let warnings = Warnings::default();
    let before = r.image_bytes();
    tracing::subscriber::with_default(warnings.clone(), || {
        for _ in 0..3 {
            r.mem.write_slice(&[1u8; 1024], GuestAddress(DATA)).unwrap();
            let (_, used) = r.request(BLK_T_OUT, 3, 1024, 0);
            assert_eq!((r.status(), used), (BLK_S_IOERR, 1));
        }
    });
    assert_eq!(r.counter(|c| &c.host_errors), 3);
    assert_eq!(r.counter(|c| &c.errors), 0, "not the guest's fault");
    assert_eq!(r.counter(|c| &c.write_requests), 0);
    assert!(r.image_bytes() == before);
    let logged = warnings.0.lock().unwrap().clone();
    assert_eq!(
        logged.len(),
        2,
        "the 1st and 2nd failures, not the 3rd: {logged:?}"
    );
    let want = format!(
        "Cannot write disk image {} at byte 1536: Bad file descriptor",
        path.display()
    );
    assert!(logged[0].contains(&want), "{logged:?}");
    assert!(logged[0].contains("host_errors=1"), "{logged:?}");
    still_works(&mut r);

    // A read the image can no longer satisfy (it shrank under the device) is a host error
    // too; when the image is whole again, reads work.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(512).unwrap();
    let (_, used) = r.request(BLK_T_IN, 8, 512, DESC_F_WRITE);
    assert_eq!((r.status(), used), (BLK_S_IOERR, 1));
    assert_eq!(r.counter(|c| &c.host_errors), 4);
    assert_eq!(r.counter(|c| &c.errors), 0);
    file.set_len(DISK_SECTORS * 512).unwrap();
    let (_, used) = r.request(BLK_T_IN, 8, 512, DESC_F_WRITE);
    assert_eq!((r.status(), used), (BLK_S_OK, 513));
}

#[test]
fn disk_options_are_given_once() {
    for (s, why) in [
        ("/a,readonly,readonly", "'readonly' is given twice"),
        ("/a,ro,readonly", "'readonly' is given twice"),
        ("/a,readonly,ro", "'ro' is given twice"),
        ("/a,", "Unknown disk option ''"),
        ("/a,readonly=yes", "Unknown disk option 'readonly=yes'"),
        (",readonly", "A disk needs a path"),
    ] {
        let e = s.parse::<BlockConfig>().unwrap_err();
        assert!(e.contains(why), "{s}: {e}");
    }
    assert!("/a,ro".parse::<BlockConfig>().unwrap().read_only);
}

#[test]
fn disks_are_locked_one_writer_or_many_readers() {
    let img = image(DISK_SECTORS);
    let open = |read_only| {
        let config = BlockConfig {
            path: img.path().to_path_buf(),
            read_only,
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Block::new(config, mem, interrupt())
    };
    let r1 = open(true).unwrap();
    let r2 = open(true).unwrap();
    let e = open(false)
        .err()
        .expect("a writer is refused while readers hold the image");
    assert_eq!(
        e.to_string(),
        format!(
            "Disk image {} is in use by another process",
            img.path().display()
        )
    );
    drop((r1, r2));
    let w = open(false).unwrap();
    assert!(
        open(true).is_err(),
        "a reader is refused while a writer holds it"
    );
    assert!(open(false).is_err(), "a second writer is refused");
    drop(w);
    open(false).unwrap();
}

#[test]
fn what_is_not_a_disk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    for read_only in [true, false] {
        let config = BlockConfig {
            path: dir.path().to_path_buf(),
            read_only,
        };
        let e = Block::new(config, mem.clone(), interrupt()).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "Disk image {} is a directory, not a regular file or a block device",
                dir.path().display()
            )
        );
    }
    // Smaller than a sector: 511 bytes are refused, 512 are one sector.
    for (len, ok) in [(0, false), (511, false), (512, true), (1023, true)] {
        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(len).unwrap();
        let config = BlockConfig {
            path: img.path().to_path_buf(),
            read_only: true,
        };
        let b = Block::new(config, mem.clone(), interrupt());
        assert_eq!(
            b.as_ref().map(|b| b.sectors()).ok(),
            ok.then_some(len / 512),
            "{len}"
        );
    }
}

#[test]
fn a_restore_onto_a_disk_of_another_size_is_refused() {
    use crate::bus::BusDevice;
    use crate::devices::virtio::mmio::MmioTransport;

    let img = image(DISK_SECTORS);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let transport = |read_only| {
        let config = BlockConfig {
            path: img.path().to_path_buf(),
            read_only,
        };
        let block = Block::new(config, mem.clone(), interrupt()).unwrap();
        let notify = vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()];
        MmioTransport::new(
            Arc::new(std::sync::Mutex::new(block)),
            interrupt(),
            mem.clone(),
            notify,
        )
    };
    let saved = transport(false).save().unwrap();
    // A tail shorter than a sector is not part of the disk; a sector more or less is.
    for (len, ok) in [
        (DISK_SECTORS * 512 + 511, true),
        (DISK_SECTORS * 512 + 512, false),
        (DISK_SECTORS * 512 - 1, false),
        (DISK_SECTORS * 512, true),
    ] {
        img.as_file().set_len(len).unwrap();
        let mut t = transport(false);
        let before = t.save().unwrap();
        let result = t.restore(&saved);
        assert_eq!(result.is_ok(), ok, "{len} bytes: {result:?}");
        if !ok {
            let e = result.unwrap_err().to_string();
            assert!(e.contains("size differs"), "{e}");
            assert_eq!(
                t.save().unwrap(),
                before,
                "{len}: a refused restore changes nothing"
            );
        }
    }
    let e = transport(true).restore(&saved).unwrap_err().to_string();
    assert!(e.contains("read-only"), "{e}");
}
