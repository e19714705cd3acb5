//! Writes the hand-made seed inputs into fuzz/corpus/<target>/ (run from the repository root:
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds -- [GUEST_ELF]`). The seeds
//! are committed; rerun this after changing a target's input format.

use std::path::{Path, PathBuf};

use ftvm_fuzz::layout;
use ftvm_fuzz::seeds::{INDIRECT, Image, NEXT, WRITE, blk_header, fix_snapshot, zstd_raw_frame};
use ftvm_guest_abi::virtio::{BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};
use vmm::memory::GuestMemoryMmap;

fn out(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn save(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(out(target).join(name), bytes).unwrap();
}

fn blk() {
    let q = layout::blk::QUEUE;
    let (hdr, status, data) = (0x400u64, 0x600u64, 0x1000u64);
    let one = |kind: u32, sector: u64, bufs: &[(u64, u32, u16)]| {
        let mut m = Image::default();
        m.put(hdr, &blk_header(kind, sector));
        m.put(data, &ftvm_fuzz::pattern(0x1000, 7));
        let mut chain = vec![(hdr, 16, 0)];
        chain.extend_from_slice(bufs);
        chain.push((status, 1, WRITE));
        m.chains(&q, &[&chain]);
        m.0
    };
    save(
        "virtio_blk",
        "write-2-sectors",
        &one(BLK_T_OUT, 2, &[(data, 1024, 0)]),
    );
    save(
        "virtio_blk",
        "read-1-sector",
        &one(BLK_T_IN, 5, &[(data, 512, WRITE)]),
    );
    save(
        "virtio_blk",
        "read-3-buffers",
        &one(
            BLK_T_IN,
            0,
            &[
                (data, 512, WRITE),
                (data + 0x400, 1024, WRITE),
                (data + 0xc00, 512, WRITE),
            ],
        ),
    );
    save(
        "virtio_blk",
        "read-last-sector",
        &one(BLK_T_IN, 127, &[(data, 512, WRITE)]),
    );
    save(
        "virtio_blk",
        "write-past-end",
        &one(BLK_T_OUT, 127, &[(data, 1024, 0)]),
    );
    save("virtio_blk", "flush", &one(BLK_T_FLUSH, 0, &[]));
    save(
        "virtio_blk",
        "get-id",
        &one(BLK_T_GET_ID, 0, &[(data, 20, WRITE)]),
    );
    save("virtio_blk", "unsupported", &one(99, 0, &[]));
    // Status byte at the end of the data buffer (one writable buffer for both).
    let mut m = Image::default();
    m.put(hdr, &blk_header(BLK_T_IN, 1));
    m.chains(&q, &[&[(hdr, 16, 0), (data, 513, WRITE)]]);
    save("virtio_blk", "read-status-in-data", &m.0);
    // Write then read back, two chains.
    let mut m = Image::default();
    m.put(hdr, &blk_header(BLK_T_OUT, 9));
    m.put(hdr + 0x20, &blk_header(BLK_T_IN, 9));
    m.put(data, &ftvm_fuzz::pattern(512, 1));
    m.chains(
        &q,
        &[
            &[(hdr, 16, 0), (data, 512, 0), (status, 1, WRITE)],
            &[
                (hdr + 0x20, 16, 0),
                (data + 0x800, 512, WRITE),
                (status + 1, 1, WRITE),
            ],
        ],
    );
    save("virtio_blk", "write-then-read", &m.0);
    // An indirect table with header, data and status.
    let mut m = Image::default();
    let table = 0x800u64;
    m.put(hdr, &blk_header(BLK_T_IN, 3));
    m.desc(table, 0, hdr, 16, NEXT, 1);
    m.desc(table, 1, data, 512, NEXT | WRITE, 2);
    m.desc(table, 2, status, 1, WRITE, 0);
    m.desc(q.desc, 0, table, 48, INDIRECT, 0);
    m.publish(&q, &[0]);
    save("virtio_blk", "read-indirect", &m.0);
    // A read whose data lands on the descriptor table: the next chain is what the disk says.
    let mut m = Image::default();
    m.put(hdr, &blk_header(BLK_T_IN, 0));
    m.chains(
        &q,
        &[
            &[(hdr, 16, 0), (0x0, 512, WRITE), (status, 1, WRITE)],
            &[(hdr, 16, 0), (data, 512, WRITE), (status, 1, WRITE)],
        ],
    );
    save("virtio_blk", "read-over-own-ring", &m.0);
    // Malformed: no status buffer, a loop, an address outside memory.
    let mut m = Image::default();
    m.put(hdr, &blk_header(BLK_T_IN, 0));
    m.chains(&q, &[&[(hdr, 16, 0), (data, 512, 0)]]);
    save("virtio_blk", "no-status", &m.0);
    let mut m = Image::default();
    m.put(hdr, &blk_header(BLK_T_IN, 0));
    m.desc(q.desc, 0, hdr, 16, NEXT, 1);
    m.desc(q.desc, 1, data, 512, NEXT | WRITE, 0);
    m.publish(&q, &[0]);
    save("virtio_blk", "loop", &m.0);
    save(
        "virtio_blk",
        "outside-memory",
        &one(BLK_T_IN, 0, &[(0x20_0000, 512, WRITE)]),
    );
}

fn net() {
    use layout::net::{FLAG_RX_FIRST, FLAG_SEND_FAILS, RX, TX};
    let header = |flags: u8, lens: [u16; 4]| {
        let mut h = vec![flags];
        for l in lens {
            h.extend(l.to_le_bytes());
        }
        h
    };
    let buf = 0x1000u64;
    let frame = |len: usize| {
        let mut f = vec![0u8; 12];
        f.extend(ftvm_fuzz::pattern(len, 9));
        f
    };
    let with = |h: Vec<u8>, m: Image| [h, m.0].concat();

    let mut m = Image::default();
    m.put(buf, &frame(60));
    m.chains(&TX, &[&[(buf, 72, 0)]]);
    save(
        "virtio_net",
        "tx-one-buffer",
        &with(header(0, [0; 4]), m.clone()),
    );
    save(
        "virtio_net",
        "tx-send-fails",
        &with(header(FLAG_SEND_FAILS, [0; 4]), m),
    );
    let mut m = Image::default();
    m.put(buf, &frame(1514));
    m.chains(
        &TX,
        &[
            &[(buf, 12, 0), (buf + 12, 1000, 0), (buf + 1012, 514, 0)],
            &[(buf, 100, 0)],
        ],
    );
    save(
        "virtio_net",
        "tx-split-and-two",
        &with(header(0, [0; 4]), m),
    );
    let mut m = Image::default();
    m.chains(
        &RX,
        &[
            &[(0x4000, 2048, WRITE)],
            &[(0x5000, 12, WRITE), (0x6000, 1500, WRITE)],
        ],
    );
    save(
        "virtio_net",
        "rx-two-frames",
        &with(header(0, [100, 1514, 0, 0]), m),
    );
    let mut m = Image::default();
    m.chains(
        &RX,
        &[
            &[(0x4000, 512, WRITE)],
            &[(0x4000, 0, WRITE)],
            &[(0x5000, 2048, WRITE)],
        ],
    );
    save(
        "virtio_net",
        "rx-too-big-then-invalid",
        &with(header(FLAG_RX_FIRST, [1500, 60, 0, 0]), m),
    );
    let mut m = Image::default();
    m.put(buf, &frame(200));
    m.chains(&TX, &[&[(buf, 212, 0)]]);
    m.chains(&RX, &[&[(0x4000, 4096, WRITE)]]);
    save(
        "virtio_net",
        "rx-and-tx",
        &with(header(FLAG_RX_FIRST, [300, 0, 0, 0]), m),
    );
}

/// A small machine state: one vCPU with KVM's default registers, a serial and a virtio device.
fn machine_state() -> vmm::vm::MachineState {
    use vmm::state::{CountersState, DeviceState, KvmVmState, SerialState, VcpuState, VirtioState};
    let vcpu = VcpuState {
        cpuid: vec![Default::default(); 2],
        mp_state: Default::default(),
        regs: kvm_bindings::kvm_regs {
            rip: 0x10_0000,
            rsp: 0x20_0000,
            ..Default::default()
        },
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Some(Default::default()),
        debugregs: Default::default(),
        lapic: Default::default(),
        msrs: vec![kvm_bindings::kvm_msr_entry {
            index: 0x10,
            data: 12345,
            ..Default::default()
        }],
        events: Default::default(),
        tsc_khz: Some(2_000_000),
    };
    vmm::vm::MachineState {
        config: vmm::vm::SavedConfig {
            mem_size: 16 << 20,
            linux: false,
            disks: vec!["/tmp/disk.img".parse().unwrap()],
            nets: vec![],
        },
        kvm: KvmVmState {
            irqchips: vec![Default::default(); 3],
            pit: None,
            clock: Default::default(),
        },
        vcpus: vec![vcpu],
        pio: vec![(
            0x3f8,
            DeviceState::Serial(SerialState {
                in_buffer: b"hi".to_vec(),
                ..Default::default()
            }),
        )],
        mmio: vec![
            (0xc000_1000, DeviceState::Stateless),
            (
                0xd000_0000,
                DeviceState::Virtio(VirtioState {
                    device_type: 2,
                    status: 0,
                    device_features_sel: 0,
                    driver_features_sel: 0,
                    driver_features: 0,
                    queue_sel: 0,
                    interrupt_status: 0,
                    activated: true,
                    queues: vec![Default::default()],
                    device: vmm::state::VirtioDeviceState::Block {
                        sectors: 128,
                        read_only: false,
                    },
                }),
            ),
        ],
        counters: CountersState {
            vcpus: vec![vec![1, 2, 3]],
            blocks: vec![vec![0; 9]],
            nets: vec![],
            serial: vec![5, 6],
        },
    }
}

fn small_memory() -> GuestMemoryMmap {
    let ranges: Vec<_> = layout::snapshot::RAM
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l))
        .collect();
    let m = GuestMemoryMmap::from_ranges(&ranges).unwrap();
    m.write_slice(b"first page", GuestAddress(0)).unwrap();
    m.write_slice(&[0xab; 5000], GuestAddress(0x7000)).unwrap();
    m.write_slice(b"high", GuestAddress((1 << 32) + 0x1000))
        .unwrap();
    m
}

fn snapshots() {
    use checkpoint::snapshot::{self, MemoryEncoding};
    use layout::snapshot::{FIX_CRC, FIX_MEMORY_LEN};
    let dir = tempfile::tempdir().unwrap();
    let state = machine_state();
    let encoded = checkpoint::codec::encode(&state).unwrap();
    save("state_decode", "machine", &encoded);
    let mut empty = machine_state();
    empty.vcpus.clear();
    empty.pio.clear();
    empty.mmio.clear();
    save(
        "state_decode",
        "no-vcpus",
        &checkpoint::codec::encode(&empty).unwrap(),
    );

    let memory = small_memory();
    for (name, enc) in [
        ("compressed", MemoryEncoding::Compressed),
        ("raw", MemoryEncoding::Raw),
    ] {
        let path = dir.path().join(name);
        snapshot::write_with(&path, &state, &memory, enc).unwrap();
        let file = std::fs::read(&path).unwrap();
        save("snapshot_reader", name, &[&[0u8][..], &file].concat());
        save(
            "snapshot_reader",
            &format!("{name}-fixed"),
            &[&[FIX_CRC | FIX_MEMORY_LEN][..], &file].concat(),
        );
    }
    // Memory as zstd raw blocks, so that mutations reach the memory section's own format.
    let mut section = Vec::new();
    for &(start, len) in &layout::snapshot::RAM {
        let pages = (len / 4096) as u64;
        section.extend(start.to_le_bytes());
        section.extend(pages.to_le_bytes());
        section.extend(1u64.to_le_bytes());
        section.extend(ftvm_fuzz::pattern(4096, 3));
    }
    let memory = zstd_raw_frame(&section);
    let empty = checkpoint::codec::encode(&empty).unwrap();
    let mut file = checkpoint::snapshot::MAGIC.to_vec();
    file.extend(checkpoint::snapshot::FORMAT_MAJOR.to_le_bytes());
    file.extend(checkpoint::snapshot::FORMAT_MINOR.to_le_bytes());
    file.extend(0u32.to_le_bytes());
    file.extend((empty.len() as u64).to_le_bytes());
    file.extend((memory.len() as u64).to_le_bytes());
    file.extend([0u8; 8]);
    file.extend(&empty);
    file.extend(&memory);
    fix_snapshot(&mut file, FIX_CRC);
    save(
        "snapshot_reader",
        "zstd-raw-blocks",
        &[&[0u8][..], &file].concat(),
    );
    save(
        "snapshot_reader",
        "zstd-raw-blocks-fixed",
        &[&[FIX_CRC | FIX_MEMORY_LEN][..], &file].concat(),
    );
}

/// A minimal x86-64 ELF with one PT_LOAD at `addr` and, if `note`, the ftvm test-guest note.
fn elf(addr: u64, note: bool) -> Vec<u8> {
    let mut f = vec![0u8; 0x200];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&addr.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&(1 + u16::from(note)).to_le_bytes());
    let ph = |t: u32, flags: u32, off: u64, addr: u64, size: u64, mem: u64| {
        let mut p = vec![0u8; 56];
        p[..4].copy_from_slice(&t.to_le_bytes());
        p[4..8].copy_from_slice(&flags.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&addr.to_le_bytes());
        p[32..40].copy_from_slice(&size.to_le_bytes());
        p[40..48].copy_from_slice(&mem.to_le_bytes());
        p
    };
    f[64..120].copy_from_slice(&ph(1, 5, 0x100, addr, 0x40, 0x2000));
    if note {
        let mut n = Vec::new();
        n.extend((ftvm_guest_abi::ELF_NOTE_NAME.len() as u32).to_le_bytes());
        n.extend(4u32.to_le_bytes());
        n.extend(ftvm_guest_abi::ELF_NOTE_TYPE.to_le_bytes());
        n.extend(ftvm_guest_abi::ELF_NOTE_NAME);
        n.resize(
            12 + ftvm_guest_abi::ELF_NOTE_NAME.len().next_multiple_of(4),
            0,
        );
        n.extend((ftvm_guest_abi::ABI_VERSION as u32).to_le_bytes());
        f[120..176].copy_from_slice(&ph(4, 4, 0x180, 0, n.len() as u64, n.len() as u64));
        f[0x180..0x180 + n.len()].copy_from_slice(&n);
    }
    f[0x100..0x110].copy_from_slice(b"guest text here!");
    f
}

/// A bzImage header with `syssize` paragraphs of protected-mode code after one setup sector.
fn bzimage(syssize: u32) -> Vec<u8> {
    let mut f = vec![0u8; 1024 + syssize as usize * 16];
    f[0x1f1] = 1;
    f[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    f[0x211] = 1;
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    f[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    f[1024..1040].copy_from_slice(b"kernel code here");
    f
}

fn kernels(guest: Option<&Path>) {
    use layout::kernel::{LONG_CMDLINE, WITH_INITRD, WITH_VIRTIO};
    let t = "kernel_loader";
    save(
        t,
        "test-guest-elf",
        &[&[0u8][..], &elf(0x10_0000, true)].concat(),
    );
    save(
        t,
        "test-guest-elf-2vcpus-virtio",
        &[&[1 | WITH_VIRTIO][..], &elf(0x20_0000, true)].concat(),
    );
    save(
        t,
        "linux-elf",
        &[&[0u8][..], &elf(0x100_0000, false)].concat(),
    );
    save(
        t,
        "linux-elf-initrd",
        &[&[WITH_INITRD | LONG_CMDLINE][..], &elf(0x100_0000, false)].concat(),
    );
    save(t, "bzimage", &[&[0u8][..], &bzimage(4)].concat());
    save(
        t,
        "bzimage-initrd-4vcpus",
        &[&[3 | WITH_INITRD][..], &bzimage(64)].concat(),
    );
    if let Some(path) = guest {
        let image = std::fs::read(path).unwrap();
        save(t, "ftvm-guest", &[&[0u8][..], &image].concat());
        save(
            t,
            "ftvm-guest-headers",
            &[&[0u8][..], &image[..image.len().min(4096)]].concat(),
        );
    }
}

/// Requests for the API parser: a method selector (0 GET, 1 PUT, 2 POST), the path, a newline,
/// the body.
fn api() {
    let t = "api_request";
    save(t, "get-status", b"\x00/status\n");
    save(t, "put-pause", b"\x01/pause\n");
    save(t, "put-resume", b"\x01/resume\n");
    save(
        t,
        "put-snapshot",
        b"\x01/snapshot\n{\"path\": \"/tmp/vm.snap\", \"raw\": false}",
    );
    save(
        t,
        "put-snapshot-raw",
        b"\x01/snapshot\n{\"path\":\"/srv/a b.snap\",\"raw\":true}",
    );
    save(t, "post-status", b"\x02/status\n");
    save(t, "put-snapshot-bad-json", b"\x01/snapshot\n{\"path\": 5}");
}

/// Checkpoint frames (full and incremental) and a greeting for the 16 MiB test-guest shape of
/// `machine_state`, each behind a control byte (bit 0: fix CRCs; bit 1: a greeting).
fn wire() {
    use checkpoint::wire::{self, Encoder, EncoderOptions, FrameKind, Hello, MachineShape};
    let state = machine_state();
    let shape = MachineShape::of(&state).unwrap();
    let mut enc = Encoder::new(shape.clone(), EncoderOptions::default()).unwrap();
    let mut data = vec![0u8; 3 * 4096];
    data[..4096].fill(0x5a);
    data[8192..8200].copy_from_slice(b"ftvm-pg2");
    let full = enc
        .encode(0, FrameKind::Full, &[0, 1, 255], &data, &state)
        .unwrap();
    let inc = enc
        .encode(1, FrameKind::Incremental, &[7], &data[..4096], &state)
        .unwrap();
    let with = |ctl: u8, b: &[u8]| [&[ctl][..], b].concat();
    save("wire_frame", "full", &with(0, &full));
    save("wire_frame", "incremental", &with(1, &inc));
    let hello = wire::encode_hello(&Hello {
        protocol: wire::PROTOCOL,
        shape,
    })
    .unwrap();
    save("wire_frame", "hello", &with(2, &hello));
}

fn main() {
    let guest = std::env::args().nth(1).map(PathBuf::from);
    wire();
    api();
    blk();
    net();
    snapshots();
    kernels(guest.as_deref());
    eprintln!("seeds written under {}", out("").display());
}
