//! Checkpoint frame encoding and decoding speed, and bytes on the wire, for three page
//! workloads and three dirty-set sizes, with and without XOR-delta.
//!
//! ```text
//! cargo run --release -p checkpoint --example wire_bench [-- REPEATS]
//! ```
//!
//! Workloads, each epoch dirtying a random set of pages of a 256 MiB guest:
//! - random: every dirty page rewritten with fresh pseudo-random bytes;
//! - word: every dirty page (pseudo-random content, already sent) has one 8-byte word changed;
//! - zero-heavy: 7 of 8 dirty pages are all zero, the others zero but for 64 random bytes.
//!
//! Throughput is over the raw page bytes; the decode column includes resolving deltas
//! against the replica's memory but not applying. p99 of few repeats is their slowest.

use std::time::Instant;

use checkpoint::wire::{Decoder, Encoder, EncoderOptions, FrameKind, MachineShape, apply};
use vm_memory::GuestAddress;
use vmm::memory::GuestMemoryMmap;
use vmm::state::{CountersState, KvmVmState, VcpuState};
use vmm::vm::{MachineState, SavedConfig};

const PAGE: usize = 4096;
const MEM: u64 = 256 << 20;

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

fn state() -> MachineState {
    let vcpu = || VcpuState {
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
        tsc_khz: None,
    };
    MachineState {
        config: SavedConfig {
            mem_size: MEM,
            linux: false,
            disks: vec![],
            nets: vec![],
        },
        kvm: KvmVmState {
            irqchips: vec![],
            pit: None,
            clock: Default::default(),
        },
        vcpus: vec![vcpu(), vcpu()],
        pio: vec![],
        mmio: vec![],
        counters: CountersState::default(),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Random,
    Word,
    ZeroHeavy,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

#[allow(clippy::too_many_arguments)]
fn run(
    workload: Workload,
    mib: usize,
    level: i32,
    delta: bool,
    repeats: usize,
    shape: &MachineShape,
    state: &MachineState,
) {
    let total_pages = (MEM as usize) / PAGE;
    let dirty = mib * 256;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut primary = vec![0u8; MEM as usize];
    let mut enc = Encoder::new(shape.clone(), EncoderOptions { level, delta }).unwrap();
    let mut dec = Decoder::new(shape.clone()).unwrap();
    let replica = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();

    // Epoch 0: the whole guest, pseudo-random where the word workload will edit it.
    if workload == Workload::Word {
        rng.fill(&mut primary);
    }
    let all: Vec<u64> = (0..total_pages as u64).collect();
    let frame = enc
        .encode(0, FrameKind::Full, &all, &primary, state)
        .unwrap();
    apply(&dec.decode(&frame, None).unwrap(), &replica).unwrap();

    let (mut enc_s, mut dec_s, mut wire) = (Vec::new(), Vec::new(), Vec::new());
    let mut raw = 0;
    let mut out = Vec::new();
    let mut data = vec![0u8; dirty * PAGE];
    for epoch in 1..=repeats as u64 {
        let mut gfns: Vec<u64> = (0..dirty * 11 / 10)
            .map(|_| rng.next() % total_pages as u64)
            .collect();
        gfns.sort_unstable();
        gfns.dedup();
        gfns.truncate(dirty);
        for (i, &g) in gfns.iter().enumerate() {
            let page = &mut primary[g as usize * PAGE..][..PAGE];
            match workload {
                Workload::Random => rng.fill(page),
                Workload::Word => {
                    let w = (rng.next() % 512) as usize * 8;
                    page[w..w + 8].copy_from_slice(&rng.next().to_le_bytes());
                }
                Workload::ZeroHeavy => {
                    page.fill(0);
                    if i % 8 == 0 {
                        let at = (rng.next() % 63) as usize * 64;
                        rng.fill(&mut page[at..at + 64]);
                    }
                }
            }
            data[i * PAGE..(i + 1) * PAGE].copy_from_slice(page);
        }
        let data = &data[..gfns.len() * PAGE];
        let t = Instant::now();
        let stats = enc
            .encode_into(epoch, FrameKind::Incremental, &gfns, data, state, &mut out)
            .unwrap();
        enc_s.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let d = dec.decode(&out, Some(&replica)).unwrap();
        dec_s.push(t.elapsed().as_secs_f64());
        assert!(d.pages.data == data, "round trip differs");
        apply(&d, &replica).unwrap();
        raw = stats.raw_bytes;
        wire.push(stats.wire_bytes as f64);
    }
    let mb = (dirty * PAGE) as f64 / (1 << 20) as f64;
    let name = match workload {
        Workload::Random => "random",
        Workload::Word => "word",
        Workload::ZeroHeavy => "zero-heavy",
    };
    let wire_p50 = percentile(&mut wire, 0.5);
    let (e50, e99) = (percentile(&mut enc_s, 0.5), percentile(&mut enc_s, 0.99));
    let (d50, d99) = (percentile(&mut dec_s, 0.5), percentile(&mut dec_s, 0.99));
    println!(
        "{name:<10} {mib:>3} MiB  zstd {level}  delta {:<3}  raw {:>9}  wire {:>9} ({:>5.1} %)  \
         encode {:>6.0} MiB/s (p99 {:>6.0})  {:>6.2} ms  decode {:>6.0} MiB/s (p99 {:>6.0})  {:>6.2} ms",
        if delta { "on" } else { "off" },
        raw,
        wire_p50 as u64,
        100.0 * wire_p50 / raw as f64,
        mb / e50,
        mb / e99,
        e50 * 1e3,
        mb / d50,
        mb / d99,
        d50 * 1e3,
    );
}

fn main() {
    let repeats: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("REPEATS is a number"))
        .unwrap_or(0);
    let state = state();
    let shape = MachineShape::of(&state).unwrap();
    for workload in [Workload::Random, Workload::Word, Workload::ZeroHeavy] {
        for mib in [1, 16, 64] {
            let repeats = if repeats > 0 {
                repeats
            } else {
                match mib {
                    1 => 100,
                    16 => 20,
                    _ => 10,
                }
            };
            for level in [1, 3] {
                for delta in [false, true] {
                    run(workload, mib, level, delta, repeats, &shape, &state);
                }
            }
        }
    }
}
