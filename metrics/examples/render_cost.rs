//! Time to render `/metrics` for 1 VM and for 100 VMs' worth of series (2 vCPUs, 1 disk, 1
//! card each), as median and p99 of 200 renders; the baseline, rendered in the same run, is
//! the same VMs without the checkpoint histograms and the output gate's (their ratio is what
//! those families cost).
//!
//! cargo run --release -p metrics --example render_cost

use std::time::Instant;

use metrics::{
    CheckpointSample, ConsoleSample, DriveSample, Histogram, IfaceSample, OutputSample,
    ReplicationSample, Unit, VcpuSample, VmSample, histogram,
};

fn vm(i: usize) -> VmSample {
    let reasons = [
        "io_in",
        "io_out",
        "mmio_read",
        "mmio_write",
        "interrupted",
        "hlt",
        "shutdown",
        "system_event",
        "other",
    ];
    VmSample {
        vm: format!("vm{i}"),
        vcpus: (0..2)
            .map(|v| VcpuSample {
                run_ns: 123_456_789 * (v + 1),
                kvm_run_ns: 23_456_789 * (v + 1),
                exits: reasons
                    .iter()
                    .map(|r| (r.to_string(), 1000 + i as u64))
                    .collect(),
            })
            .collect(),
        drives: vec![DriveSample {
            drive: "0".into(),
            read_requests: 10,
            read_bytes: 40960,
            write_requests: 20,
            write_bytes: 1 << 30,
            ..Default::default()
        }],
        ifaces: vec![IfaceSample {
            iface: "0".into(),
            rx_packets: 1000,
            rx_bytes: 1 << 20,
            tx_packets: 2000,
            tx_bytes: 1 << 21,
            ..Default::default()
        }],
        console: Some(ConsoleSample {
            tx_bytes: 4096,
            tx_errors: 0,
        }),
        replication: Some(ReplicationSample {
            protected: true,
            epochs: 40_000,
            committed_epoch: Some(39_999),
            failovers: 0,
            checkpoints: Some(checkpoints()),
        }),
        output: Some(OutputSample {
            hold: {
                // As many bounds as the primary serves (19).
                const HOLD: &[u64] = &[
                    1 << 6,
                    1 << 7,
                    1 << 8,
                    1 << 9,
                    1 << 10,
                    1 << 11,
                    1 << 12,
                    1 << 13,
                    1 << 14,
                    1 << 15,
                    1 << 16,
                    1 << 17,
                    1 << 18,
                    1 << 19,
                    1 << 20,
                    1 << 21,
                    1 << 22,
                    1 << 23,
                    1 << 24,
                ];
                let mut h = Histogram::new(Unit::Nanoseconds, HOLD);
                (0..1000).for_each(|k| h.observe(k * 10));
                h.sample()
            },
            ..Default::default()
        }),
    }
}

/// 40,000 checkpoints' figures (pauses, pages, acks spread over the buckets).
fn checkpoints() -> CheckpointSample {
    let mut pause = Histogram::new(Unit::Nanoseconds, histogram::PAUSE_NS);
    let mut pages = Histogram::new(Unit::Count, histogram::PAGES);
    let mut ack = Histogram::new(Unit::Nanoseconds, histogram::ACK_NS);
    for k in 0..40_000u64 {
        pause.observe(200_000 + k * 37);
        pages.observe(k % 5000);
        ack.observe(1_000_000 + k * 91);
    }
    CheckpointSample {
        pause: pause.sample(),
        dirty_pages: pages.sample(),
        ack: ack.sample(),
        raw_bytes: 1 << 40,
        wire_bytes: 1 << 36,
    }
}

fn main() {
    for n in [1usize, 100] {
        let full: Vec<VmSample> = (0..n).map(vm).collect();
        let base: Vec<VmSample> = full
            .iter()
            .cloned()
            .map(|mut v| {
                v.output = None;
                if let Some(r) = &mut v.replication {
                    r.checkpoints = None;
                }
                v
            })
            .collect();
        let mut times = [Vec::new(), Vec::new()];
        let mut bytes = [0, 0];
        // Alternate, so that both see the same machine.
        for _ in 0..200 {
            for (i, vms) in [&base, &full].into_iter().enumerate() {
                let t = Instant::now();
                bytes[i] = metrics::render(vms).len();
                times[i].push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        for t in &mut times {
            t.sort_by(f64::total_cmp);
        }
        let median = |t: &Vec<f64>| t[t.len() / 2];
        let p99 = |t: &Vec<f64>| t[t.len() * 99 / 100];
        for (i, what) in ["baseline", "with checkpoint and output histograms"]
            .iter()
            .enumerate()
        {
            println!(
                "{n} VMs, {what}: {} bytes, render median {:.0} us, p99 {:.0} us",
                bytes[i],
                median(&times[i]),
                p99(&times[i])
            );
        }
        println!(
            "{n} VMs: ratio with/baseline median {:.2}, p99 {:.2}",
            median(&times[1]) / median(&times[0]),
            p99(&times[1]) / p99(&times[0])
        );
    }
}
