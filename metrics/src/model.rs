//! The accounting model: one VM's counters at one moment, as plain numbers, and their
//! Prometheus text exposition.
//!
//! Names follow DESIGN.md: base units (seconds, bytes), counters end in `_total`, labels `vm`,
//! `vcpu`, `drive`, `iface`, `op`, `direction` (plus `reason` for exits and `cause` for block
//! errors). Values are exact counts; the exposition format carries them as floats, which are
//! exact up to 2^53.

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};

use crate::histogram::HistogramSample;
use prometheus::{Encoder, TextEncoder};

/// One VM's counters at one moment. The VMM fills it from its live counters (the primary) or
/// from a committed checkpoint's saved counters (the replica).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmSample {
    /// The `vm` label.
    pub vm: String,
    /// Per vCPU, in index order.
    pub vcpus: Vec<VcpuSample>,
    /// Per disk, in configuration order.
    pub drives: Vec<DriveSample>,
    /// Per network card, in configuration order.
    pub ifaces: Vec<IfaceSample>,
    /// The serial console (None where its counters are not known, e.g. a replica that has
    /// committed nothing yet).
    pub console: Option<ConsoleSample>,
    /// Checkpointing and replication (None: the VM is not protected and this is no replica).
    pub replication: Option<ReplicationSample>,
    /// The output gate (None where there is none, e.g. the replica).
    pub output: Option<OutputSample>,
}

/// One vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuSample {
    /// CPU time of the vCPU's thread in nanoseconds (guest code, KVM on its behalf, and the
    /// VMM's handling of its exits; not the time it waits): what a customer is billed.
    pub run_ns: u64,
    /// Wall-clock nanoseconds inside KVM_RUN (counted when KVM_RUN returns).
    pub kvm_run_ns: u64,
    /// Exits by reason (the `reason` label), in a fixed order.
    pub exits: Vec<(String, u64)>,
}

/// One disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriveSample {
    /// The `drive` label.
    pub drive: String,
    /// Completed reads.
    pub read_requests: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Completed writes.
    pub write_requests: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Completed flushes.
    pub flush_requests: u64,
    /// Completed GET_ID requests.
    pub get_id_requests: u64,
    /// Requests refused because the guest asked wrongly.
    pub guest_errors: u64,
    /// Valid requests that failed on the host.
    pub host_errors: u64,
    /// Requests of a type the device does not support.
    pub unsupported: u64,
    /// Chains dropped as malformed.
    pub invalid_chains: u64,
}

/// One network card.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IfaceSample {
    /// The `iface` label.
    pub iface: String,
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes delivered to the guest (Ethernet frame bytes).
    pub rx_bytes: u64,
    /// Frames the guest sent.
    pub tx_packets: u64,
    /// Bytes the guest sent (Ethernet frame bytes).
    pub tx_bytes: u64,
    /// Frames from the host dropped (no room in the guest).
    pub rx_dropped: u64,
    /// Frames from the guest the backend refused.
    pub tx_dropped: u64,
}

/// The serial console.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleSample {
    /// Bytes the guest wrote.
    pub tx_bytes: u64,
    /// Bytes lost.
    pub tx_errors: u64,
}

/// Checkpointing (primary) or the committed image (replica).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicationSample {
    /// Protected now: the primary's replica acknowledges its checkpoints; on a replica, it
    /// holds a checkpoint committed recently enough that its primary counts as alive.
    pub protected: bool,
    /// Checkpoints acknowledged (primary) or committed (replica) so far.
    pub epochs: u64,
    /// The last committed epoch, if any.
    pub committed_epoch: Option<u64>,
    /// Times this VM was taken over by its replica (on the process that took it over).
    pub failovers: u64,
    /// The primary's figures of its acknowledged checkpoints (None on a replica).
    pub checkpoints: Option<CheckpointSample>,
}

/// The primary's figures of the checkpoints its replica acknowledged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointSample {
    /// How long the guest was paused for each capture (nanoseconds).
    pub pause: HistogramSample,
    /// Pages in each checkpoint.
    pub dirty_pages: HistogramSample,
    /// From sending each checkpoint to its acknowledgement (nanoseconds).
    pub ack: HistogramSample,
    /// Bytes of pages, machine state and disk writes before encoding.
    pub raw_bytes: u64,
    /// The same as sent (after zero-page elision and compression).
    pub wire_bytes: u64,
}

/// The output gate (what the guest sends is held until its checkpoint is acknowledged).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputSample {
    /// Bytes held now.
    pub held_bytes: u64,
    /// Items written after being held.
    pub released_items: u64,
    /// Bytes written after being held.
    pub released_bytes: u64,
    /// Items that went out at once (the gate was open).
    pub passed_items: u64,
    /// Writes that failed at release.
    pub write_errors: u64,
    /// How long released items were held (nanoseconds).
    pub hold: HistogramSample,
}

/// Metric families under construction, in first-use order.
struct Families(Vec<MetricFamily>);

impl Families {
    fn add(&mut self, name: &str, help: &str, kind: MetricType, labels: &[(&str, &str)], v: f64) {
        let idx = match self.0.iter().position(|f| f.name() == name) {
            Some(i) => i,
            None => {
                let mut f = MetricFamily::default();
                f.set_name(name.to_string());
                f.set_help(help.to_string());
                f.set_field_type(kind);
                self.0.push(f);
                self.0.len() - 1
            }
        };
        let mut m = Metric::default();
        m.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name(k.to_string());
                    l.set_value(v.to_string());
                    l
                })
                .collect(),
        );
        match kind {
            MetricType::HISTOGRAM => {}
            MetricType::GAUGE => {
                let mut g = Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
            }
            _ => {
                let mut c = Counter::default();
                c.set_value(v);
                m.set_counter(c);
            }
        }
        self.0[idx].mut_metric().push(m);
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: u64) {
        self.add(name, help, MetricType::COUNTER, labels, v as f64);
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        self.add(name, help, MetricType::GAUGE, labels, v);
    }

    fn histogram(&mut self, name: &str, help: &str, labels: &[(&str, &str)], h: &HistogramSample) {
        self.add(name, help, MetricType::HISTOGRAM, labels, 0.0);
        let mut p = Histogram::default();
        p.set_sample_count(h.count);
        p.set_sample_sum(h.unit.to_base(h.sum));
        p.set_bucket(
            h.buckets
                .iter()
                .map(|&(bound, n)| {
                    let mut b = Bucket::default();
                    b.set_upper_bound(h.unit.to_base(bound));
                    b.set_cumulative_count(n);
                    b
                })
                .collect(),
        );
        if let Some(m) = self
            .0
            .iter_mut()
            .find(|f| f.name() == name)
            .and_then(|f| f.mut_metric().last_mut())
        {
            m.set_histogram(p);
        }
    }
}

const RUN_SECONDS: &str = "CPU time of the vCPU's thread (guest code, KVM on the guest's behalf, \
the VMM's handling of its exits; not time spent waiting), in seconds.";

const KVM_RUN_SECONDS: &str = "Wall-clock time the vCPU spent inside KVM_RUN (counted when \
KVM_RUN returns; includes time KVM waits on the guest's behalf), in seconds.";

/// The metric families of `vms`, every sample of a family together (as the format requires).
pub fn families(vms: &[VmSample]) -> Vec<MetricFamily> {
    let mut f = Families(Vec::new());
    for s in vms {
        let vm = s.vm.as_str();
        for (i, c) in s.vcpus.iter().enumerate() {
            let vcpu = i.to_string();
            let l = [("vm", vm), ("vcpu", vcpu.as_str())];
            f.add(
                "ftvm_vcpu_run_seconds_total",
                RUN_SECONDS,
                MetricType::COUNTER,
                &l,
                c.run_ns as f64 / 1e9,
            );
            f.add(
                "ftvm_vcpu_kvm_run_seconds_total",
                KVM_RUN_SECONDS,
                MetricType::COUNTER,
                &l,
                c.kvm_run_ns as f64 / 1e9,
            );
            for (reason, n) in &c.exits {
                f.counter(
                    "ftvm_vcpu_exits_total",
                    "Exits from KVM_RUN to the VMM, by reason.",
                    &[
                        ("vm", vm),
                        ("vcpu", vcpu.as_str()),
                        ("reason", reason.as_str()),
                    ],
                    *n,
                );
            }
        }
        for d in &s.drives {
            let drive = d.drive.as_str();
            for (op, n) in [
                ("read", d.read_requests),
                ("write", d.write_requests),
                ("flush", d.flush_requests),
                ("get_id", d.get_id_requests),
            ] {
                f.counter(
                    "ftvm_block_requests_total",
                    "Completed block requests, by operation.",
                    &[("vm", vm), ("drive", drive), ("op", op)],
                    n,
                );
            }
            for (op, n) in [("read", d.read_bytes), ("write", d.write_bytes)] {
                f.counter(
                    "ftvm_block_bytes_total",
                    "Bytes read from or written to the disk by the guest, by operation.",
                    &[("vm", vm), ("drive", drive), ("op", op)],
                    n,
                );
            }
            for (cause, n) in [
                ("guest", d.guest_errors),
                ("host", d.host_errors),
                ("unsupported", d.unsupported),
                ("invalid_chain", d.invalid_chains),
            ] {
                f.counter(
                    "ftvm_block_errors_total",
                    "Block requests that failed, by cause: guest (a bad request), host (the \
                     image's I/O failed), unsupported (request type), invalid_chain (dropped \
                     without a status).",
                    &[("vm", vm), ("drive", drive), ("cause", cause)],
                    n,
                );
            }
        }
        for n in &s.ifaces {
            let iface = n.iface.as_str();
            for (dir, packets, bytes, dropped) in [
                ("rx", n.rx_packets, n.rx_bytes, n.rx_dropped),
                ("tx", n.tx_packets, n.tx_bytes, n.tx_dropped),
            ] {
                let l = [("vm", vm), ("iface", iface), ("direction", dir)];
                f.counter(
                    "ftvm_net_packets_total",
                    "Ethernet frames delivered to (rx) or sent by (tx) the guest.",
                    &l,
                    packets,
                );
                f.counter(
                    "ftvm_net_bytes_total",
                    "Ethernet frame bytes delivered to (rx) or sent by (tx) the guest (the \
                     virtio-net header is not counted; the TAP's statistics count the same).",
                    &l,
                    bytes,
                );
                f.counter(
                    "ftvm_net_dropped_total",
                    "Frames dropped: from the host with no room in the guest (rx), from the \
                     guest refused by the backend (tx).",
                    &l,
                    dropped,
                );
            }
        }
        if let Some(c) = &s.console {
            f.counter(
                "ftvm_console_bytes_total",
                "Bytes the guest wrote to its serial console.",
                &[("vm", vm)],
                c.tx_bytes,
            );
            f.counter(
                "ftvm_console_errors_total",
                "Console bytes that could not be written to the host.",
                &[("vm", vm)],
                c.tx_errors,
            );
        }
        if let Some(r) = &s.replication {
            f.gauge(
                "ftvm_replication_protected",
                "1 while the VM is protected by a replica (on a replica: while it holds a \
                 recently committed checkpoint of a live primary), else 0.",
                &[("vm", vm)],
                if r.protected { 1.0 } else { 0.0 },
            );
            f.counter(
                "ftvm_checkpoint_epochs_total",
                "Checkpoints acknowledged by the replica (on a replica: committed).",
                &[("vm", vm)],
                r.epochs,
            );
            if let Some(e) = r.committed_epoch {
                f.gauge(
                    "ftvm_checkpoint_committed_epoch",
                    "The last epoch the replica committed.",
                    &[("vm", vm)],
                    e as f64,
                );
            }
            f.counter(
                "ftvm_failovers_total",
                "Times this VM was taken over by its replica, counted by the process that \
                 took it over.",
                &[("vm", vm)],
                r.failovers,
            );
            if let Some(c) = &r.checkpoints {
                let l = [("vm", vm)];
                f.histogram(
                    "ftvm_checkpoint_pause_seconds",
                    "How long the guest was paused to capture each acknowledged checkpoint.",
                    &l,
                    &c.pause,
                );
                f.histogram(
                    "ftvm_checkpoint_dirty_pages",
                    "Guest pages in each acknowledged checkpoint.",
                    &l,
                    &c.dirty_pages,
                );
                f.histogram(
                    "ftvm_checkpoint_ack_seconds",
                    "From sending each checkpoint (with its disk writes) to its \
                     acknowledgement.",
                    &l,
                    &c.ack,
                );
                for (stage, n) in [("raw", c.raw_bytes), ("wire", c.wire_bytes)] {
                    f.counter(
                        "ftvm_checkpoint_bytes_total",
                        "Bytes of acknowledged checkpoints (pages, machine state, disk writes): \
                         raw before encoding, wire as sent (zero pages elided, compressed).",
                        &[("vm", vm), ("stage", stage)],
                        n,
                    );
                }
            }
        }
        if let Some(o) = &s.output {
            let l = [("vm", vm)];
            f.gauge(
                "ftvm_output_held_bytes",
                "Guest output (frames, console bytes) held until its checkpoint is \
                 acknowledged.",
                &l,
                o.held_bytes as f64,
            );
            f.counter(
                "ftvm_output_released_bytes_total",
                "Output bytes written after being held.",
                &l,
                o.released_bytes,
            );
            f.counter(
                "ftvm_output_released_items_total",
                "Output items (frames, console writes) written after being held.",
                &l,
                o.released_items,
            );
            f.counter(
                "ftvm_output_passed_items_total",
                "Output items written at once (the gate was open).",
                &l,
                o.passed_items,
            );
            f.counter(
                "ftvm_output_write_errors_total",
                "Held output that could not be written at release (dropped).",
                &l,
                o.write_errors,
            );
            f.histogram(
                "ftvm_output_delay_seconds",
                "How long each released output item (frame, console write) was held for its \
                 checkpoint's acknowledgement (bucket bounds are powers of two of microseconds).",
                &l,
                &o.hold,
            );
        }
    }
    f.0
}

/// The Prometheus text exposition (format 0.0.4) of `vms`.
pub fn render(vms: &[VmSample]) -> String {
    let mut out = Vec::new();
    // Only an empty family or a failed write can fail: neither happens here.
    if let Err(e) = TextEncoder::new().encode(&families(vms), &mut out) {
        tracing::error!("cannot encode metrics: {e}");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// The accounting history's recorder of a VM (a replica's `--history`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistorySample {
    /// The `vm` label.
    pub vm: String,
    /// A commit is not recorded yet: the history cannot be written.
    pub behind: bool,
    /// Writes to the history that failed.
    pub write_failures: u64,
    /// The last epoch recorded, if any.
    pub recorded_epoch: Option<u64>,
}

/// The metric families of a history recorder (`ftvm_history_behind`,
/// `ftvm_history_write_failures_total`, `ftvm_history_recorded_epoch`).
pub fn history_families(h: &HistorySample) -> Vec<MetricFamily> {
    let mut f = Families(Vec::new());
    let l = [("vm", h.vm.as_str())];
    f.gauge(
        "ftvm_history_behind",
        "1 while the accounting history is behind the committed counters (its last write \
         failed: full or read-only disk; the VM runs on and the latest commit is retried), \
         else 0.",
        &l,
        if h.behind { 1.0 } else { 0.0 },
    );
    f.counter(
        "ftvm_history_write_failures_total",
        "Writes to the accounting history that failed.",
        &l,
        h.write_failures,
    );
    if let Some(e) = h.recorded_epoch {
        f.gauge(
            "ftvm_history_recorded_epoch",
            "The last committed epoch recorded in the accounting history.",
            &l,
            e as f64,
        );
    }
    f.0
}

/// The text exposition of [`history_families`], to append to [`render`]'s.
pub fn render_history(h: &HistorySample) -> String {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&history_families(h), &mut out) {
        tracing::error!("cannot encode metrics: {e}");
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod history_tests {
    use super::*;

    #[test]
    fn a_history_behind_reads_1_with_its_failures_and_0_once_caught_up() {
        let mut h = HistorySample {
            vm: "v".into(),
            behind: true,
            write_failures: 7,
            recorded_epoch: None,
        };
        let text = render_history(&h);
        assert!(text.contains("ftvm_history_behind{vm=\"v\"} 1\n"), "{text}");
        assert!(
            text.contains("ftvm_history_write_failures_total{vm=\"v\"} 7\n"),
            "{text}"
        );
        assert!(!text.contains("ftvm_history_recorded_epoch"), "{text}");
        assert!(text.contains("# TYPE ftvm_history_behind gauge"), "{text}");
        h.behind = false;
        h.recorded_epoch = Some(42);
        let text = render_history(&h);
        assert!(text.contains("ftvm_history_behind{vm=\"v\"} 0\n"), "{text}");
        assert!(
            text.contains("ftvm_history_recorded_epoch{vm=\"v\"} 42\n"),
            "{text}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::Unit;

    fn sample(vm: &str) -> VmSample {
        VmSample {
            vm: vm.into(),
            vcpus: vec![
                VcpuSample {
                    run_ns: 1_500_000_000,
                    kvm_run_ns: 250_000_000,
                    exits: vec![("mmio_read".into(), 7), ("io_out".into(), 0)],
                },
                VcpuSample {
                    run_ns: 3,
                    kvm_run_ns: 0,
                    exits: vec![("mmio_read".into(), 1), ("io_out".into(), 2)],
                },
            ],
            drives: vec![DriveSample {
                drive: "0".into(),
                read_requests: 4,
                read_bytes: 2048,
                write_requests: 16,
                write_bytes: 16 << 20,
                flush_requests: 1,
                host_errors: 2,
                ..Default::default()
            }],
            ifaces: vec![IfaceSample {
                iface: "0".into(),
                rx_packets: 10,
                rx_bytes: 980,
                tx_packets: 11,
                tx_bytes: 1078,
                rx_dropped: 1,
                tx_dropped: 0,
            }],
            console: Some(ConsoleSample {
                tx_bytes: 123,
                tx_errors: 0,
            }),
            replication: Some(ReplicationSample {
                protected: true,
                epochs: 42,
                committed_epoch: Some(41),
                failovers: 1,
                checkpoints: Some(CheckpointSample {
                    pause: HistogramSample {
                        unit: Unit::Nanoseconds,
                        buckets: vec![(500_000, 30), (1_000_000, 41)],
                        count: 42,
                        sum: 21_000_000,
                    },
                    dirty_pages: HistogramSample {
                        unit: Unit::Count,
                        buckets: vec![(16, 2), (64, 42)],
                        count: 42,
                        sum: 1234,
                    },
                    ack: HistogramSample::default(),
                    raw_bytes: 5_054_464,
                    wire_bytes: 99_999,
                }),
            }),
            output: Some(OutputSample {
                held_bytes: 5,
                hold: HistogramSample {
                    unit: Unit::Nanoseconds,
                    buckets: vec![(2_000, 1), (4_000, 3)],
                    count: 3,
                    sum: 7_000,
                },
                ..Default::default()
            }),
        }
    }

    /// The value of the one sample line `series` (name and labels as rendered).
    fn value(text: &str, series: &str) -> String {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.split(' ').next() == Some(series))
            .collect();
        assert_eq!(lines.len(), 1, "{series} in\n{text}");
        lines[0].rsplit(' ').next().unwrap().to_string()
    }

    #[test]
    fn renders_every_counter_under_its_design_name_with_exact_values() {
        let t = render(&[sample("a")]);
        assert_eq!(
            value(&t, r#"ftvm_vcpu_run_seconds_total{vm="a",vcpu="0"}"#),
            "1.5"
        );
        assert_eq!(
            value(&t, r#"ftvm_vcpu_run_seconds_total{vm="a",vcpu="1"}"#),
            "0.000000003"
        );
        assert_eq!(
            value(
                &t,
                r#"ftvm_vcpu_exits_total{vm="a",vcpu="1",reason="io_out"}"#
            ),
            "2"
        );
        assert_eq!(
            value(
                &t,
                r#"ftvm_block_requests_total{vm="a",drive="0",op="write"}"#
            ),
            "16"
        );
        assert_eq!(
            value(&t, r#"ftvm_block_bytes_total{vm="a",drive="0",op="write"}"#),
            "16777216"
        );
        assert_eq!(
            value(
                &t,
                r#"ftvm_block_errors_total{vm="a",drive="0",cause="host"}"#
            ),
            "2"
        );
        assert_eq!(
            value(
                &t,
                r#"ftvm_net_bytes_total{vm="a",iface="0",direction="tx"}"#
            ),
            "1078"
        );
        assert_eq!(
            value(
                &t,
                r#"ftvm_net_dropped_total{vm="a",iface="0",direction="rx"}"#
            ),
            "1"
        );
        assert_eq!(value(&t, r#"ftvm_console_bytes_total{vm="a"}"#), "123");
        assert_eq!(value(&t, r#"ftvm_replication_protected{vm="a"}"#), "1");
        assert_eq!(value(&t, r#"ftvm_checkpoint_epochs_total{vm="a"}"#), "42");
        assert_eq!(
            value(&t, r#"ftvm_checkpoint_committed_epoch{vm="a"}"#),
            "41"
        );
        assert_eq!(value(&t, r#"ftvm_output_held_bytes{vm="a"}"#), "5");
        assert_eq!(
            value(&t, r#"ftvm_vcpu_kvm_run_seconds_total{vm="a",vcpu="0"}"#),
            "0.25"
        );
        assert_eq!(value(&t, r#"ftvm_failovers_total{vm="a"}"#), "1");
        // Histograms: cumulative buckets in base units, +Inf = count, the exact sum.
        for (series, v) in [
            (
                r#"ftvm_checkpoint_pause_seconds_bucket{vm="a",le="0.0005"}"#,
                "30",
            ),
            (
                r#"ftvm_checkpoint_pause_seconds_bucket{vm="a",le="0.001"}"#,
                "41",
            ),
            (
                r#"ftvm_checkpoint_pause_seconds_bucket{vm="a",le="+Inf"}"#,
                "42",
            ),
            (r#"ftvm_checkpoint_pause_seconds_sum{vm="a"}"#, "0.021"),
            (r#"ftvm_checkpoint_pause_seconds_count{vm="a"}"#, "42"),
            (
                r#"ftvm_checkpoint_dirty_pages_bucket{vm="a",le="64"}"#,
                "42",
            ),
            (r#"ftvm_checkpoint_dirty_pages_sum{vm="a"}"#, "1234"),
            (r#"ftvm_checkpoint_ack_seconds_count{vm="a"}"#, "0"),
            (
                r#"ftvm_checkpoint_bytes_total{vm="a",stage="raw"}"#,
                "5054464",
            ),
            (
                r#"ftvm_checkpoint_bytes_total{vm="a",stage="wire"}"#,
                "99999",
            ),
            (
                r#"ftvm_output_delay_seconds_bucket{vm="a",le="0.000002"}"#,
                "1",
            ),
            (r#"ftvm_output_delay_seconds_sum{vm="a"}"#, "0.000007"),
            (r#"ftvm_output_delay_seconds_count{vm="a"}"#, "3"),
        ] {
            assert_eq!(value(&t, series), v, "{series}");
        }
        assert!(
            t.contains("# TYPE ftvm_checkpoint_pause_seconds histogram\n"),
            "{t}"
        );
        assert!(t.contains("# TYPE ftvm_net_bytes_total counter\n"), "{t}");
        assert!(
            t.contains("# TYPE ftvm_replication_protected gauge\n"),
            "{t}"
        );
    }

    #[test]
    fn counters_are_exact_up_to_2_pow_53_and_labels_are_escaped() {
        let mut s = sample("we\"ird\\vm\n");
        s.drives[0].write_bytes = (1 << 53) - 1;
        let t = render(&[s]);
        assert_eq!(
            value(
                &t,
                r#"ftvm_block_bytes_total{vm="we\"ird\\vm\n",drive="0",op="write"}"#
            ),
            "9007199254740991"
        );
    }

    #[test]
    fn samples_of_several_vms_are_grouped_by_family() {
        let t = render(&[sample("a"), sample("b")]);
        // Each family's TYPE line appears once, and its samples follow it without another
        // family in between.
        let mut seen = Vec::new();
        let mut current = String::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(!seen.contains(&name), "{name} twice in\n{t}");
                seen.push(name.clone());
                current = name;
            } else if !line.starts_with('#') {
                assert!(line.starts_with(&current), "{line} outside {current}");
            }
        }
        assert_eq!(
            t.matches("ftvm_console_bytes_total{").count(),
            2,
            "one per VM"
        );
    }

    #[test]
    fn a_vm_without_devices_or_replication_renders_only_what_it_has() {
        let t = render(&[VmSample {
            vm: "x".into(),
            ..Default::default()
        }]);
        assert_eq!(t, "", "nothing known, nothing rendered");
        let t = render(&[VmSample {
            vm: "x".into(),
            console: Some(ConsoleSample::default()),
            ..Default::default()
        }]);
        assert!(t.contains(r#"ftvm_console_bytes_total{vm="x"} 0"#), "{t}");
        assert!(!t.contains("ftvm_block_"), "{t}");
        assert!(!t.contains("ftvm_replication_protected"), "{t}");
        assert_eq!(render(&[]), "");
    }
}
