//! Round trips, and every kind of damage refused before anything is written.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::memory::GuestMemoryMmap;
use vmm::state::{CountersState, KvmVmState, VcpuState};
use vmm::vm::{MachineState, SavedConfig};

use super::frame::{FLAG_DELTA, FLAG_FULL, FLAG_PRECOPY};
use super::*;
use crate::codec;

const MIB16: u64 = 16 << 20;

fn config(mem_size: u64) -> SavedConfig {
    SavedConfig {
        mem_size,
        linux: false,
        disks: vec![],
        nets: vec![],
    }
}

fn machine(mem_size: u64, vcpus: u64) -> MachineState {
    let vcpus = (0..vcpus)
        .map(|i| {
            let mut v = VcpuState {
                cpuid: vec![],
                mp_state: Default::default(),
                regs: Default::default(),
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: None,
                debugregs: Default::default(),
                lapic: Default::default(),
                msrs: vec![],
                events: Default::default(),
                tsc_khz: Some(2_000_000),
            };
            v.regs.rip = 0x40_0000 + i;
            v
        })
        .collect();
    MachineState {
        config: config(mem_size),
        kvm: KvmVmState {
            irqchips: vec![],
            pit: None,
            clock: Default::default(),
        },
        vcpus,
        pio: vec![],
        mmio: vec![],
        counters: CountersState::default(),
    }
}

fn shape() -> MachineShape {
    MachineShape::of(&machine(MIB16, 2)).unwrap()
}

/// RAM on both sides of the MMIO hole: 3 GiB at 0, 2 MiB at 4 GiB.
const HOLED: u64 = (3 << 30) + (2 << 20);
/// First page of the hole, first page above it.
const HOLE: u64 = 0xC0000;
const HIGH: u64 = 0x10_0000;

fn holed() -> MachineShape {
    MachineShape::of(&machine(HOLED, 2)).unwrap()
}

/// A state of the machine `shape` describes.
fn state_of(shape: &MachineShape) -> MachineState {
    machine(shape.mem_size(), u64::from(shape.vcpus))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Pages for `gfns`: random, except every third one is zero.
fn pages(gfns: &[u64], seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut data = vec![0u8; gfns.len() * PAGE_SIZE];
    for (i, page) in data.chunks_mut(PAGE_SIZE).enumerate() {
        if i % 3 != 2 {
            rng.fill(page);
        }
    }
    data
}

fn same_state(a: &MachineState, b: &MachineState) -> bool {
    codec::encode(a).unwrap() == codec::encode(b).unwrap()
}

fn memory(shape: &MachineShape) -> GuestMemoryMmap {
    let ranges: Vec<_> = shape
        .ram
        .iter()
        .map(|&(s, l)| (GuestAddress(s), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

fn contents(m: &GuestMemoryMmap) -> Vec<u8> {
    let mut out = Vec::new();
    for r in m.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        m.read_slice(&mut buf, r.start_addr()).unwrap();
        out.extend(buf);
    }
    out
}

fn encode(shape: &MachineShape, epoch: u64, kind: FrameKind, gfns: &[u64], data: &[u8]) -> Vec<u8> {
    let mut enc = Encoder::new(shape.clone(), EncoderOptions::default()).unwrap();
    enc.encode(epoch, kind, gfns, data, &state_of(shape))
        .unwrap()
}

fn decode(shape: &MachineShape, frame: &[u8]) -> Result<DecodedEpoch, WireError> {
    Decoder::new(shape.clone()).unwrap().decode(frame, None)
}

/// A small valid frame: runs with holes, zero and non-zero pages.
fn small() -> Vec<u8> {
    let gfns = [1, 2, 3, 7, 9, 10];
    encode(&shape(), 5, FrameKind::Incremental, &gfns, &pages(&gfns, 3))
}

#[test]
fn frames_round_trip() {
    let all: Vec<u64> = (0..MIB16 / 4096).collect();
    let cases: Vec<(&str, MachineShape, Vec<u64>, Vec<u8>)> = vec![
        ("empty", shape(), vec![], vec![]),
        ("one page", shape(), vec![42], pages(&[42], 1)),
        (
            "zero pages",
            shape(),
            vec![0, 1, 2, 100],
            vec![0; 4 * PAGE_SIZE],
        ),
        (
            "runs with holes",
            shape(),
            vec![0, 1, 2, 5, 6, 9, 4000, 4095],
            pages(&[0; 8], 2),
        ),
        // 255 pages below the hole end a run at 1 MiB; the next run starts at 4 GiB.
        (
            "both sides of the hole",
            holed(),
            (HOLE - 255..HOLE).chain(HIGH..HIGH + 64).collect(),
            pages(&[0; 319], 4),
        ),
        ("16 MiB", shape(), all.clone(), pages(&all, 5)),
    ];
    for (name, shape, gfns, data) in cases {
        for kind in [FrameKind::Full, FrameKind::Incremental] {
            let frame = encode(&shape, 7, kind, &gfns, &data);
            let d = decode(&shape, &frame).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(d.epoch, 7, "{name}");
            assert_eq!(d.kind, kind, "{name}");
            assert_eq!(d.pages.gfns, gfns, "{name}");
            assert!(d.pages.data == data, "{name}: page contents differ");
            assert!(
                same_state(d.state.as_ref().unwrap(), &state_of(&shape)),
                "{name}"
            );
            let header = FrameHeader::parse(&frame, &shape).unwrap();
            assert_eq!(header.frame_len(), frame.len() as u64, "{name}");
        }
    }
}

#[test]
fn applied_pages_land_where_they_belong() {
    let shape = holed();
    let gfns: Vec<u64> = (HOLE - 6..HOLE).chain(HIGH + 508..HIGH + 512).collect();
    let data = pages(&gfns, 9);
    let d = decode(&shape, &encode(&shape, 1, FrameKind::Full, &gfns, &data)).unwrap();
    let m = memory(&shape);
    m.write_slice(&[0xee; PAGE_SIZE], GuestAddress((HOLE - 3) * 4096))
        .unwrap();
    apply(&d, &m).unwrap();
    for (i, &gfn) in gfns.iter().enumerate() {
        let mut page = vec![0u8; PAGE_SIZE];
        m.read_slice(&mut page, GuestAddress(gfn * 4096)).unwrap();
        assert!(
            page == data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            "page {gfn:#x}"
        );
    }
}

#[test]
fn delta_frames_round_trip_against_the_replica_memory() {
    let shape = shape();
    let mut enc = Encoder::new(
        shape.clone(),
        EncoderOptions {
            level: 1,
            delta: true,
        },
    )
    .unwrap();
    let mut dec = Decoder::new(shape.clone()).unwrap();
    let mut replica = memory(&shape);
    let mut primary = vec![0u8; MIB16 as usize];
    let mut rng = Rng(77);
    let state = machine(MIB16, 2);
    let mut committed = None;
    for epoch in 0..20u64 {
        let kind = if epoch == 0 || epoch == 11 {
            FrameKind::Full
        } else {
            FrameKind::Incremental
        };
        // A full frame (first sync, re-protection) carries every page, onto fresh memory.
        let gfns: Vec<u64> = if kind == FrameKind::Full {
            replica = memory(&shape);
            (0..4096).collect()
        } else {
            let mut g: Vec<u64> = (0..50).map(|_| rng.next() % 4096).collect();
            g.sort();
            g.dedup();
            g
        };
        for &gfn in &gfns {
            let page = &mut primary[gfn as usize * PAGE_SIZE..][..PAGE_SIZE];
            match rng.next() % 4 {
                0 => page.fill(0),
                1 => rng.fill(page),
                _ => page[(rng.next() % 512) as usize * 8] ^= 0x5a,
            }
        }
        let data: Vec<u8> = gfns
            .iter()
            .flat_map(|&g| primary[g as usize * PAGE_SIZE..][..PAGE_SIZE].to_vec())
            .collect();
        let frame = enc.encode(epoch, kind, &gfns, &data, &state).unwrap();
        let header = FrameHeader::parse(&frame, &shape).unwrap();
        assert_eq!(header.delta, kind == FrameKind::Incremental);
        assert!(matches!(dec.decode(&frame, None), Err(WireError::NoBase)) || !header.delta);
        let d = dec.decode(&frame, Some(&replica)).unwrap();
        assert!(d.pages.data == data, "epoch {epoch}: staged pages differ");
        check_order(committed, d.epoch, d.kind).unwrap();
        apply(&d, &replica).unwrap();
        committed = Some(d.epoch);
        assert!(
            contents(&replica) == primary,
            "epoch {epoch}: memory differs"
        );
    }
}

#[test]
fn precopy_frames_round_trip_without_state() {
    let shape = holed();
    let gfns: Vec<u64> = (HOLE - 3..HOLE).chain(HIGH..HIGH + 2).collect();
    let data = pages(&gfns, 6);
    let mut enc = Encoder::new(shape.clone(), EncoderOptions::default()).unwrap();
    let mut frame = Vec::new();
    let stats = enc
        .encode_precopy_into(2, &gfns, &data, &mut frame)
        .unwrap();
    assert_eq!(stats.raw_bytes, data.len() as u64, "no state bytes");
    let header = FrameHeader::parse(&frame, &shape).unwrap();
    assert_eq!((header.kind, header.state_len), (FrameKind::Precopy, 0));
    let d = decode(&shape, &frame).unwrap();
    assert_eq!((d.epoch, d.kind), (2, FrameKind::Precopy));
    assert!(d.state.is_none());
    assert!(d.pages.gfns == gfns && d.pages.data == data);
    check_order(Some(40), 2, FrameKind::Precopy).unwrap();
    check_order(None, 0, FrameKind::Precopy).unwrap();
    // A checkpoint kind cannot be encoded without state, nor a pre-copy one with it.
    let e = enc
        .encode_into(
            3,
            FrameKind::Precopy,
            &gfns,
            &data,
            &state_of(&shape),
            &mut frame,
        )
        .unwrap_err();
    assert!(matches!(e, WireError::Input(_)), "{e}");
}

#[test]
fn precopy_flags_and_state_must_agree() {
    let (raw, counts) = body(&[(3, 2)]);
    // Pre-copy with full or delta is no kind of frame.
    for flags in [
        FLAG_PRECOPY | FLAG_FULL,
        FLAG_PRECOPY | FLAG_DELTA,
        8,
        1 << 31,
    ] {
        let e = decode(&shape(), &sealed(flags, counts, &raw)).unwrap_err();
        assert!(
            matches!(e, WireError::Flags(f) if f == flags),
            "{flags:#x}: {e}"
        );
    }
    // A pre-copy frame with state, and a checkpoint frame without.
    let e = decode(&shape(), &sealed(FLAG_PRECOPY, counts, &raw)).unwrap_err();
    assert!(e.to_string().contains("pre-copy frame with"), "{e}");
    let stateless: Vec<u8> = raw[..12 + 1]
        .iter()
        .chain(&raw[raw.len() - 2 * PAGE_SIZE..])
        .copied()
        .collect();
    let no_state = [counts[0], counts[1], counts[2], 0];
    for flags in [0, FLAG_FULL] {
        let e = decode(&shape(), &sealed(flags, no_state, &stateless)).unwrap_err();
        assert!(
            e.to_string().contains("checkpoint frame with 0 bytes"),
            "{e}"
        );
    }
    let d = decode(&shape(), &sealed(FLAG_PRECOPY, no_state, &stateless)).unwrap();
    assert_eq!(d.pages.gfns, [3, 4]);
}

/// With delta on, the full frame that ends a sync lands on the image the pre-copy rounds
/// built: later deltas are against that image, not against zeroed memory.
#[test]
fn deltas_after_a_precopy_sync_are_against_the_synced_image() {
    let shape = shape();
    let mut enc = Encoder::new(
        shape.clone(),
        EncoderOptions {
            level: 1,
            delta: true,
        },
    )
    .unwrap();
    let mut dec = Decoder::new(shape.clone()).unwrap();
    let state = machine(MIB16, 2);
    let mut primary = vec![0u8; MIB16 as usize];
    let mut rng = Rng(5);
    let mut frame = Vec::new();
    for sync in 0..2 {
        // Each sync builds a fresh image; the second one after a chain of deltas.
        let image = memory(&shape);
        let rounds: [Vec<u64>; 3] = [(0..4096).collect(), vec![1, 2, 900], vec![2, 7]];
        for (round, gfns) in rounds.iter().enumerate() {
            for &g in gfns {
                rng.fill(&mut primary[g as usize * PAGE_SIZE..][..PAGE_SIZE]);
            }
            let data: Vec<u8> = gfns
                .iter()
                .flat_map(|&g| primary[g as usize * PAGE_SIZE..][..PAGE_SIZE].to_vec())
                .collect();
            if round < 2 {
                enc.encode_precopy_into(round as u64, gfns, &data, &mut frame)
                    .unwrap();
            } else {
                enc.encode_into(10 * sync, FrameKind::Full, gfns, &data, &state, &mut frame)
                    .unwrap();
            }
            let d = dec.decode(&frame, Some(&image)).unwrap();
            apply(&d, &image).unwrap();
        }
        assert!(contents(&image) == primary, "sync {sync}: image differs");
        for epoch in 1..4 {
            let gfns = vec![1, 3, 900 + epoch];
            for &g in &gfns {
                primary[g as usize * PAGE_SIZE + 8 * epoch as usize] ^= 0x77;
            }
            let data: Vec<u8> = gfns
                .iter()
                .flat_map(|&g| primary[g as usize * PAGE_SIZE..][..PAGE_SIZE].to_vec())
                .collect();
            let f = enc
                .encode(
                    10 * sync + epoch,
                    FrameKind::Incremental,
                    &gfns,
                    &data,
                    &state,
                )
                .unwrap();
            assert!(FrameHeader::parse(&f, &shape).unwrap().delta);
            apply(&dec.decode(&f, Some(&image)).unwrap(), &image).unwrap();
            assert!(contents(&image) == primary, "sync {sync} epoch {epoch}");
        }
    }
}

#[test]
fn every_flipped_header_bit_is_refused() {
    let frame = small();
    for byte in 0..HEADER_LEN {
        for bit in 0..8 {
            let mut bad = frame.clone();
            bad[byte] ^= 1 << bit;
            assert!(decode(&shape(), &bad).is_err(), "byte {byte} bit {bit}");
        }
        let mut bad = frame.clone();
        bad[byte] ^= 0xff;
        assert!(decode(&shape(), &bad).is_err(), "byte {byte}");
    }
    let mut bad = frame.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert!(matches!(
        decode(&shape(), &bad),
        Err(WireError::BodyChecksum)
    ));
}

#[test]
fn truncated_and_trailing_frames_are_refused() {
    let frame = small();
    for len in 0..frame.len() {
        let e = decode(&shape(), &frame[..len]).unwrap_err();
        assert!(
            matches!(e, WireError::Truncated { .. }),
            "length {len}: {e}"
        );
    }
    let mut longer = frame.clone();
    longer.push(0);
    assert!(matches!(
        decode(&shape(), &longer),
        Err(WireError::Trailing(1))
    ));
}

/// A frame with a hand-made body and a valid header and checksums.
fn sealed(flags: u32, counts: [u32; 4], raw: &[u8]) -> Vec<u8> {
    let body = zstd::bulk::compress(raw, 1).unwrap();
    let header = FrameHeader {
        epoch: 3,
        kind: FrameKind::Incremental,
        delta: false,
        page_count: counts[0],
        data_pages: counts[1],
        run_count: counts[2],
        state_len: counts[3],
        body_len: body.len() as u64,
        body_crc: crc32fast::hash(&body),
    };
    let mut out = header.to_bytes().to_vec();
    // Any flags, meaningful or not, with a valid header checksum.
    patch_header(&mut out, 12, &flags.to_le_bytes());
    out.extend(body);
    out
}

/// The raw body of `runs` of non-zero pages, with a valid state.
fn body(runs: &[(u64, u32)]) -> (Vec<u8>, [u32; 4]) {
    body_of(&shape(), runs)
}

fn body_of(shape: &MachineShape, runs: &[(u64, u32)]) -> (Vec<u8>, [u32; 4]) {
    let pages: u32 = runs.iter().map(|r| r.1).sum();
    let state = codec::encode(&state_of(shape)).unwrap();
    let mut raw = Vec::new();
    for &(first, count) in runs {
        raw.extend(first.to_le_bytes());
        raw.extend(count.to_le_bytes());
    }
    raw.extend(vec![0u8; (pages as usize).div_ceil(8)]);
    raw.extend(&state);
    raw.extend(vec![0xa5u8; pages as usize * PAGE_SIZE]);
    let counts = [pages, pages, runs.len() as u32, state.len() as u32];
    (raw, counts)
}

fn malformed(runs: &[(u64, u32)]) -> WireError {
    let (raw, counts) = body(runs);
    decode(&shape(), &sealed(0, counts, &raw)).unwrap_err()
}

#[test]
fn hand_made_frames_decode_and_bad_runs_are_refused() {
    let (raw, counts) = body(&[(3, 2), (10, 1)]);
    let d = decode(&shape(), &sealed(0, counts, &raw)).unwrap();
    assert_eq!(d.pages.gfns, [3, 4, 10]);

    for (runs, what) in [
        (&[(4096u64, 1u32)][..], "outside guest RAM"),
        (&[(4095, 2)], "outside guest RAM"),
        (&[(u64::MAX / 4096, 1)], "outside guest RAM"),
        (&[(10, 4), (12, 1)], "overlaps"),
        (&[(10, 1), (3, 1)], "precedes"),
        (&[(10, 1), (10, 1)], "overlaps"),
        (&[(10, 0), (11, 2)], "empty"),
    ] {
        let e = malformed(runs);
        assert!(e.to_string().contains(what), "{runs:?}: {e}");
    }
    // Between the two RAM ranges of a machine with a hole.
    for runs in [
        &[(HOLE, 1u32)][..],
        &[(HOLE - 1, 2)],
        &[(HIGH - 1, 2)],
        &[(HIGH + 511, 2)],
    ] {
        let (raw, counts) = body_of(&holed(), runs);
        let e = decode(&holed(), &sealed(0, counts, &raw)).unwrap_err();
        assert!(e.to_string().contains("outside guest RAM"), "{runs:?}: {e}");
    }
    let (raw, counts) = body_of(&holed(), &[(HOLE - 1, 1), (HIGH, 512)]);
    decode(&holed(), &sealed(0, counts, &raw)).unwrap();
    // A state of another machine than the one agreed on.
    let (raw, counts) = body_of(&holed(), &[(3, 1)]);
    let e = decode(&shape(), &sealed(0, counts, &raw)).unwrap_err();
    assert!(e.to_string().contains("another machine"), "{e}");
}

#[test]
fn inconsistent_counts_are_refused() {
    let (raw, [pages, data, runs, state]) = body(&[(3, 2), (10, 1)]);
    // The runs hold 3 pages; the header says otherwise.
    for counts in [
        [pages + 1, data + 1, runs, state],
        [pages - 1, data - 1, runs, state],
    ] {
        assert!(
            decode(&shape(), &sealed(0, counts, &raw)).is_err(),
            "{counts:?}"
        );
    }
    // One page claimed zero that the bitmap says is not, and the reverse.
    assert!(decode(&shape(), &sealed(0, [pages, data - 1, runs, state], &raw)).is_err());
    let mut zeroed = raw.clone();
    zeroed[runs as usize * 12] = 0b1000; // bit 3: past the 3 pages
    assert!(decode(&shape(), &sealed(0, [pages, data, runs, state], &zeroed)).is_err());
    // Pages but no runs.
    assert!(decode(&shape(), &sealed(0, [pages, data, 0, state], &raw)).is_err());
    // The state is shorter or longer than announced.
    assert!(decode(&shape(), &sealed(0, [pages, data, runs, state - 1], &raw)).is_err());
    assert!(decode(&shape(), &sealed(0, [pages, data, runs, state + 1], &raw)).is_err());
    // Unknown flags, and a full frame that claims to be a delta.
    for flags in [8, 1 << 31, FLAG_FULL | FLAG_DELTA] {
        let mut frame = sealed(0, [pages, data, runs, state], &raw);
        patch_header(&mut frame, 12, &flags.to_le_bytes());
        let e = decode(&shape(), &frame).unwrap_err();
        assert!(
            matches!(e, WireError::Flags(f) if f == flags),
            "{flags:#x}: {e}"
        );
    }
}

/// Overwrites header bytes at `at` and fixes the header's checksum.
fn patch_header(frame: &mut [u8], at: usize, bytes: &[u8]) {
    frame[at..at + bytes.len()].copy_from_slice(bytes);
    let crc = crc32fast::hash(&frame[..52]);
    frame[52..56].copy_from_slice(&crc.to_le_bytes());
}

/// A header alone, its checksum valid, announcing `counts` and `body_len`.
fn header_only(counts: [u32; 4], body_len: u64) -> Vec<u8> {
    FrameHeader {
        epoch: 1,
        kind: FrameKind::Incremental,
        delta: false,
        page_count: counts[0],
        data_pages: counts[1],
        run_count: counts[2],
        state_len: counts[3],
        body_len,
        body_crc: 0,
    }
    .to_bytes()
    .to_vec()
}

#[test]
fn oversized_lengths_are_refused_from_the_header_alone() {
    let pages = (MIB16 / 4096) as u32;
    for (counts, body_len) in [
        ([1, 1, 1, 10], 1 << 40),
        ([pages, pages, 1, 10], 1 << 40),
        ([pages + 1, pages + 1, 1, 10], 100),
        ([u32::MAX, u32::MAX, u32::MAX, 10], 100),
        ([2, 3, 1, 10], 100),
        ([2, 2, 3, 10], 100),
        ([1, 1, 1, u32::MAX], 100),
    ] {
        let h = header_only(counts, body_len);
        // Only the 56 header bytes are present: refused for its lengths, not for truncation.
        let e = decode(&shape(), &h).unwrap_err();
        assert!(matches!(e, WireError::TooLong { .. }), "{counts:?}: {e}");
        assert!(FrameHeader::parse(&h, &shape()).is_err());
    }
    let e = decode(&shape(), &header_only([1, 1, 1, 10], 1 << 40)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Checkpoint frame announces 1099511627776 bytes of body, more than the limit of 4196"
    );
}

#[test]
fn a_body_that_expands_beyond_its_announced_size_is_refused() {
    let (raw, counts) = body(&[(3, 2)]);
    // Valid prefix, then 64 MiB of zeros: a few KiB compressed.
    let mut bomb = raw.clone();
    bomb.resize(raw.len() + (64 << 20), 0);
    let frame = sealed(0, counts, &bomb);
    assert!(frame.len() < 16 << 10, "{} bytes", frame.len());
    let e = decode(&shape(), &frame).unwrap_err();
    assert!(e.to_string().contains("more than announced"), "{e}");
    // Shorter than announced.
    let frame = sealed(0, counts, &raw[..raw.len() - 1]);
    assert!(matches!(
        decode(&shape(), &frame),
        Err(WireError::Decompress(_))
    ));
    // A second zstd frame after the first.
    let mut frame = sealed(0, counts, &raw);
    let extra = zstd::bulk::compress(b"more", 1).unwrap();
    frame.extend(&extra);
    let body_len = (frame.len() - HEADER_LEN) as u64;
    let body_crc = crc32fast::hash(&frame[HEADER_LEN..]);
    let mut h = FrameHeader::parse(&frame, &shape()).unwrap();
    h.body_len = body_len;
    h.body_crc = body_crc;
    frame[..HEADER_LEN].copy_from_slice(&h.to_bytes());
    let e = decode(&shape(), &frame).unwrap_err();
    assert!(
        e.to_string().contains("bytes follow the compressed body"),
        "{e}"
    );
    // Not zstd at all.
    let mut frame = header_only(counts, 64);
    frame.extend([0x55; 64]);
    let mut h = FrameHeader::parse(&frame, &shape()).unwrap();
    h.body_crc = crc32fast::hash(&frame[HEADER_LEN..]);
    frame[..HEADER_LEN].copy_from_slice(&h.to_bytes());
    assert!(matches!(
        decode(&shape(), &frame),
        Err(WireError::Decompress(_))
    ));
}

#[test]
fn another_protocol_version_is_refused() {
    let mut frame = small();
    patch_header(&mut frame, 8, &(PROTOCOL + 1).to_le_bytes());
    let e = decode(&shape(), &frame).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "Peer speaks checkpoint protocol {}, this ftvm speaks {PROTOCOL}",
            PROTOCOL + 1
        )
    );
}

#[test]
fn a_refused_frame_writes_nothing() {
    let shape = shape();
    let m = memory(&shape);
    m.write_slice(&[7u8; 3 * PAGE_SIZE], GuestAddress(4096))
        .unwrap();
    let before = contents(&m);
    let mut dec = Decoder::new(shape.clone()).unwrap();
    let frame = small();
    for len in 0..frame.len() {
        assert!(dec.decode(&frame[..len], Some(&m)).is_err());
    }
    for byte in 0..frame.len() {
        let mut bad = frame.clone();
        bad[byte] ^= 0x10;
        assert!(dec.decode(&bad, Some(&m)).is_err());
    }
    assert!(contents(&m) == before);
    // A decoded epoch that does not fit the memory is refused before any page is written.
    let gfns = [1, 4095];
    let d = decode(
        &shape,
        &encode(&shape, 1, FrameKind::Full, &gfns, &pages(&gfns, 1)),
    )
    .unwrap();
    let small_memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    small_memory
        .write_slice(&[9u8; PAGE_SIZE], GuestAddress(4096))
        .unwrap();
    let before = contents(&small_memory);
    assert!(matches!(
        apply(&d, &small_memory),
        Err(WireError::Memory { .. })
    ));
    assert!(contents(&small_memory) == before);
}

#[test]
fn the_encoder_refuses_inconsistent_input() {
    let mut enc = Encoder::new(shape(), EncoderOptions::default()).unwrap();
    let s = machine(MIB16, 2);
    let page = vec![1u8; PAGE_SIZE];
    let two = vec![1u8; 2 * PAGE_SIZE];
    let inc = FrameKind::Incremental;
    assert!(enc.encode(1, inc, &[2, 1], &two, &s).is_err());
    assert!(enc.encode(1, inc, &[1, 1], &two, &s).is_err());
    assert!(enc.encode(1, inc, &[1, 2], &page, &s).is_err());
    assert!(enc.encode(1, inc, &[4096], &page, &s).is_err());
    assert!(enc.encode(1, inc, &[u64::MAX], &page, &s).is_err());
    assert!(enc.encode(1, inc, &[4095], &page, &s).is_ok());
    let e = enc
        .encode(1, inc, &[4095], &page, &machine(MIB16, 1))
        .unwrap_err();
    assert!(e.to_string().contains("another machine"), "{e}");
}

#[test]
fn epochs_follow_the_committed_one() {
    let inc = FrameKind::Incremental;
    check_order(Some(4), 5, inc).unwrap();
    check_order(Some(4), 9, FrameKind::Full).unwrap();
    check_order(None, 0, FrameKind::Full).unwrap();
    for (committed, epoch) in [
        (Some(4), 4),
        (Some(4), 6),
        (Some(4), 3),
        (Some(u64::MAX), 0),
    ] {
        let e = check_order(committed, epoch, inc).unwrap_err();
        assert!(matches!(e, WireError::OutOfOrder { .. }), "{e}");
    }
    assert_eq!(
        check_order(Some(4), 6, inc).unwrap_err().to_string(),
        "Epoch 6 does not follow the committed epoch 4"
    );
    assert!(matches!(
        check_order(None, 1, inc),
        Err(WireError::NoFullCheckpoint(1))
    ));
}

#[test]
fn hellos_round_trip_and_mismatches_say_what_differs() {
    let ours = Hello {
        protocol: PROTOCOL,
        shape: shape(),
    };
    let bytes = encode_hello(&ours).unwrap();
    assert_eq!(decode_hello(&bytes).unwrap(), ours);
    check_hello(&ours, &decode_hello(&bytes).unwrap()).unwrap();
    for len in 0..bytes.len() {
        assert!(decode_hello(&bytes[..len]).is_err(), "length {len}");
    }
    for byte in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[byte] ^= 1;
        assert!(decode_hello(&bad).is_err(), "byte {byte}");
    }

    let mut other = ours.clone();
    other.protocol = 7;
    let expected = format!("Peer speaks checkpoint protocol 7, this ftvm speaks {PROTOCOL}");
    assert_eq!(
        check_hello(&ours, &other).unwrap_err().to_string(),
        expected
    );
    let e = decode_hello(&encode_hello(&other).unwrap()).unwrap_err();
    assert_eq!(e.to_string(), expected);

    let mut cfg = config(1 << 30);
    cfg.disks.push(vmm::devices::virtio::block::BlockConfig {
        path: "disk.img".into(),
        read_only: false,
    });
    cfg.nets.push(vmm::devices::virtio::net::NetConfig {
        tap: "tap0".into(),
        mac: None,
    });
    cfg.linux = true;
    let theirs = Hello {
        protocol: PROTOCOL,
        shape: MachineShape::from_config(&cfg, 4).unwrap(),
    };
    assert_eq!(theirs.shape.devices, [DeviceKind::Block, DeviceKind::Net]);
    assert_eq!(
        check_hello(&ours, &theirs).unwrap_err().to_string(),
        "Peer's machine differs from this one: memory 1024 MiB there, 16 MiB here; \
         4 vCPUs there, 2 here; devices [block, net] there, [] here; \
         a Linux guest there, the test guest here"
    );
    let mut theirs = ours.clone();
    theirs.shape.vcpus = 1;
    assert_eq!(
        check_hello(&ours, &theirs).unwrap_err().to_string(),
        "Peer's machine differs from this one: 1 vCPUs there, 2 here"
    );
    // The same size laid out differently (RAM above the hole).
    let big = MachineShape::from_config(&config(4 << 30), 2).unwrap();
    assert_eq!(big.ram.len(), 2);
    let mut moved = big.clone();
    moved.ram = vec![(0, 4 << 30)];
    let e = check_hello(
        &Hello {
            protocol: PROTOCOL,
            shape: big,
        },
        &Hello {
            protocol: PROTOCOL,
            shape: moved,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("(laid out differently)"), "{e}");
}
