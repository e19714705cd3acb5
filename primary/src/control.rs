//! The thread that owns a running VM: starts it, executes API commands, waits for it to end,
//! and stops it in order — whatever ended it (the guest, a failed thread, a signal).

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmm::event::{self, ThreadError, error_chain};
use vmm::{RunningVm, Vm, VmError, VmEvent};

use checkpoint::api::{self, ApiError, Command, Request};
use checkpoint::snapshot;

use crate::protect::{ProtectConfig, Protector};

/// How often the VM's thread looks for API commands while the guest runs.
const POLL: Duration = Duration::from_millis(5);

/// How a supervised VM ended without a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The guest powered off with this status.
    PowerOff(u32),
    /// The guest reset (ftvm does not emulate reboot).
    Reset,
    /// KVM reported a system event of this type.
    SystemEvent(u32),
    /// A termination signal stopped the VM in order: vCPUs and devices paused, disks
    /// flushed, the API socket removed.
    Signal(i32),
    /// The guest was handed over to the replica (`ftvm migrate`): it runs there now.
    HandedOver,
}

/// Why a supervised VM failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The API socket could not be set up.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Starting or stopping the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU crashed.
    #[error("vCPU {vcpu} crashed: {reason}")]
    Crashed {
        /// The vCPU.
        vcpu: u8,
        /// What happened.
        reason: String,
    },
    /// A VMM thread panicked or failed.
    #[error(transparent)]
    Thread(#[from] ThreadError),
    /// The replication thread could not be started.
    #[error("Cannot start replication")]
    Replication(#[source] std::io::Error),
    /// Termination signals could not be taken over.
    #[error("Cannot handle termination signals")]
    Signals(#[source] std::io::Error),
    /// Every event source is gone without an event.
    #[error("The VM stopped without saying why")]
    Vanished,
}

/// Starts `vm` (paused if `paused`: it runs on the API's resume), serves the API on `api` if
/// given, protects it with a replica if `protect` is given, and runs until the VM ends; then
/// stops it in order. The API socket is bound (and checked) before any guest code runs.
pub fn supervise(
    vm: Vm,
    api: Option<&Path>,
    protect: Option<ProtectConfig>,
    paused: bool,
) -> Result<Ended, ControlError> {
    supervise_with_metrics(vm, api, protect, paused, None)
}

/// [`supervise`], also publishing the running VM's metrics (see [`metrics_source`]; its `vm`
/// label is the given name) on the exporter once the VM has started. The exporter is started
/// beforehand, so that a port in use fails before the guest runs.
pub fn supervise_with_metrics(
    vm: Vm,
    api: Option<&Path>,
    protect: Option<ProtectConfig>,
    paused: bool,
    metrics: Option<(&str, &metrics::Exporter)>,
) -> Result<Ended, ControlError> {
    supervise_full(vm, api, protect, paused, metrics, 0)
}

/// [`supervise_with_metrics`] of a VM that got here through `failovers` takeovers (counted in
/// `ftvm_failovers_total`).
pub fn supervise_full(
    vm: Vm,
    api: Option<&Path>,
    protect: Option<ProtectConfig>,
    paused: bool,
    metrics: Option<(&str, &metrics::Exporter)>,
    failovers: u64,
) -> Result<Ended, ControlError> {
    let bound = api.map(api::bind).transpose()?;
    vmm::signals::watch(&vm.reporter()).map_err(ControlError::Signals)?;
    let mut protector = protect
        .map(|p| Protector::start(p, &vm.reporter(), vm.output_gate().clone()))
        .transpose()
        .map_err(ControlError::Replication)?;
    let vm = if paused {
        vm.start_paused()?
    } else {
        vm.start()?
    };
    let (server, requests) = match bound {
        Some(b) => {
            let source = protector.as_ref().map(Protector::status_source);
            let (server, rx) = b.serve(vm.run_state().clone(), source, &vm.reporter())?;
            (Some(server), Some(rx))
        }
        None => (None, None),
    };
    if let Some((name, exporter)) = metrics {
        let protection = protector.as_ref().map(Protector::metrics_view);
        exporter.publish(metrics_source(&vm, name, protection, failovers));
    }
    let event = std::panic::catch_unwind(AssertUnwindSafe(|| {
        run(&vm, requests.as_ref(), protector.as_mut())
    }))
    .unwrap_or_else(|payload| VmEvent::ThreadFailed {
        thread: "control".into(),
        cause: event::panic_cause(payload.as_ref()),
    });
    let outcome = match event {
        VmEvent::PowerOff(status) => Ok(Ended::PowerOff(status)),
        VmEvent::Reset => Ok(Ended::Reset),
        VmEvent::SystemEvent(kind) => Ok(Ended::SystemEvent(kind)),
        VmEvent::Signal(sig) => {
            tracing::info!(signal = sig, "stopping the VM in order");
            match vm.pause().and_then(|()| vm.flush_disks()) {
                Ok(()) => Ok(Ended::Signal(sig)),
                Err(e) => Err(e.into()),
            }
        }
        VmEvent::Crashed { vcpu, reason } => Err(ControlError::Crashed { vcpu, reason }),
        VmEvent::ThreadFailed { thread, cause } => {
            Err(ControlError::Thread(ThreadError { thread, cause }))
        }
        VmEvent::HandedOver => Ok(Ended::HandedOver),
        // `run` handles it and never ends with it.
        VmEvent::OutputWaiting => Err(ControlError::Thread(ThreadError {
            thread: "control".into(),
            cause: "the control loop ended on an output notice".into(),
        })),
    };
    // Every thread is joined; a failure found here that was not the reason the VM ended is
    // still an error.
    let stopped = vm.stop();
    let api_stopped = server.map(api::ApiServer::stop).transpose();
    let replication_stopped = protector.map(Protector::stop).transpose();
    let outcome = outcome?;
    stopped?;
    api_stopped?;
    replication_stopped?;
    Ok(outcome)
}

/// Runs until the VM ends; returns why.
fn run(
    vm: &RunningVm,
    api: Option<&Receiver<Request>>,
    mut protector: Option<&mut Protector>,
) -> VmEvent {
    if let Err(cause) = event::check_fault("control") {
        return VmEvent::ThreadFailed {
            thread: "control".into(),
            cause,
        };
    }
    loop {
        let wait = match &protector {
            Some(p) => p
                .next_due()
                .saturating_duration_since(Instant::now())
                .min(POLL),
            None if api.is_some() => POLL,
            None => Duration::from_secs(3600),
        };
        match vm.wait_event(Some(wait)) {
            // Output waits: the checkpoint policy may start one now (tick decides).
            Some(VmEvent::OutputWaiting) => {
                if let Some(p) = protector.as_deref_mut() {
                    p.output_waiting();
                }
            }
            Some(event) => return event,
            None => {}
        }
        if let Some(p) = protector.as_deref_mut()
            && let Err(e) = p.tick(vm)
        {
            return VmEvent::ThreadFailed {
                thread: "control".into(),
                cause: format!("checkpoint capture failed: {}", error_chain(&e)),
            };
        }
        while let Some(api) = api {
            match api.try_recv() {
                Ok((Command::Migrate, reply)) => {
                    let outcome = match protector.as_deref_mut() {
                        Some(p) => p.hand_over(vm),
                        None => Err("the VM is not protected (no --replica): there is no \
                                     replica to hand it over to"
                            .into()),
                    };
                    let done = outcome.is_ok();
                    let _ = reply.send(outcome);
                    if done {
                        return VmEvent::HandedOver;
                    }
                }
                Ok((command, reply)) => {
                    let status = protector.as_deref().map(Protector::status_json);
                    // The client may have given up (timeout); the command has been done.
                    let _ = reply.send(execute_with(vm, command, status));
                }
                // Empty, or the API thread ended (its failure arrives as an event).
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
    }
}

/// Executes one API command on the VM.
pub fn execute(vm: &RunningVm, command: Command) -> Result<Value, String> {
    execute_with(vm, command, None)
}

fn execute_with(
    vm: &RunningVm,
    command: Command,
    protection: Option<Value>,
) -> Result<Value, String> {
    match command {
        Command::Migrate => Err("only the VM's owner can hand it over".into()),
        Command::Status => {
            let mut v = api::status_json(vm.run_state(), None);
            if let Some(p) = protection {
                v["protection"] = p;
            }
            Ok(v)
        }
        Command::Pause => {
            vm.pause().map_err(|e| error_chain(&e))?;
            tracing::info!("VM paused");
            Ok(json!({ "state": "paused" }))
        }
        Command::Resume => {
            vm.resume();
            tracing::info!("VM resumed");
            Ok(json!({ "state": "running" }))
        }
        Command::Snapshot { path, raw } => {
            let encoding = if raw {
                snapshot::MemoryEncoding::Raw
            } else {
                snapshot::MemoryEncoding::Compressed
            };
            let start = Instant::now();
            let mut paused_at = Duration::ZERO;
            let stats = vm
                .with_paused(|vm| {
                    paused_at = start.elapsed();
                    let state = vm.save_state().map_err(|e| error_chain(&e))?;
                    snapshot::write_with(&path, &state, vm.memory(), encoding)
                        .map_err(|e| error_chain(&e))
                })
                .map_err(|e| error_chain(&e))??;
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(path = %path.display(), ms, "snapshot written");
            Ok(json!({
                "path": path,
                "state_bytes": stats.state_bytes,
                "memory_bytes": stats.memory_bytes,
                "pages": stats.pages,
                "zero_pages": stats.zero_pages,
                "pause_ms": paused_at.as_secs_f64() * 1000.0,
                "total_ms": ms,
            }))
        }
    }
}

/// The accounting sample of a VM named `name` from its counters in saved form (live, or
/// committed on a replica). Disks and cards are labelled by their index (`--disk`/`--net`
/// order), which stays the same across restore and failover while TAP names may not.
pub fn counters_sample(name: &str, c: &vmm::state::CountersState) -> metrics::VmSample {
    use vmm::devices::serial::SerialCounters;
    use vmm::devices::virtio::block::BlockCounters;
    use vmm::devices::virtio::net::NetCounters;
    use vmm::vcpu::ExitReason;
    // Saved values are untrusted (a replica's come from the network): a missing one reads 0.
    fn get(names: &[&str], values: &[u64], name: &str) -> u64 {
        names
            .iter()
            .position(|n| *n == name)
            .and_then(|i| values.get(i))
            .copied()
            .unwrap_or(0)
    }
    let b = |v: &[u64], n: &str| get(BlockCounters::NAMES, v, n);
    let n = |v: &[u64], n: &str| get(NetCounters::NAMES, v, n);
    metrics::VmSample {
        vm: name.to_string(),
        vcpus: c
            .vcpus
            .iter()
            .map(|v| metrics::VcpuSample {
                // See vmm::vcpu::VcpuCounters::values.
                run_ns: v.get(ExitReason::ALL.len() + 2).copied().unwrap_or(0),
                kvm_run_ns: v.first().copied().unwrap_or(0),
                exits: ExitReason::ALL
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (r.name().to_string(), v.get(1 + i).copied().unwrap_or(0)))
                    .collect(),
            })
            .collect(),
        drives: c
            .blocks
            .iter()
            .enumerate()
            .map(|(i, v)| metrics::DriveSample {
                drive: i.to_string(),
                read_requests: b(v, "read_requests"),
                read_bytes: b(v, "read_bytes"),
                write_requests: b(v, "write_requests"),
                write_bytes: b(v, "write_bytes"),
                flush_requests: b(v, "flush_requests"),
                get_id_requests: b(v, "get_id_requests"),
                guest_errors: b(v, "errors"),
                host_errors: b(v, "host_errors"),
                unsupported: b(v, "unsupported"),
                invalid_chains: b(v, "invalid_chains"),
            })
            .collect(),
        ifaces: c
            .nets
            .iter()
            .enumerate()
            .map(|(i, v)| metrics::IfaceSample {
                iface: i.to_string(),
                rx_packets: n(v, "rx_packets"),
                rx_bytes: n(v, "rx_bytes"),
                tx_packets: n(v, "tx_packets"),
                tx_bytes: n(v, "tx_bytes"),
                rx_dropped: n(v, "rx_dropped"),
                tx_dropped: n(v, "tx_dropped"),
            })
            .collect(),
        console: Some(metrics::ConsoleSample {
            tx_bytes: get(SerialCounters::NAMES, &c.serial, "tx_bytes"),
            tx_errors: get(SerialCounters::NAMES, &c.serial, "tx_errors"),
        }),
        replication: None,
        output: None,
    }
}

/// What `GET /metrics` of a running VM named `name` answers: its counters, its output gate
/// and its replication figures (protected 0 without `protection`). While protected the
/// counters are those of the last acknowledged checkpoint, which a takeover continues from;
/// otherwise the live ones. `failovers`: how many times this VM was taken over to get here.
pub fn metrics_source(
    vm: &RunningVm,
    name: &str,
    protection: Option<Arc<dyn Fn() -> crate::protect::ProtectionMetrics + Send + Sync>>,
    failovers: u64,
) -> metrics::Source {
    let vcpus = vm.vcpu_counters();
    let blocks = vm.block_counters().to_vec();
    let nets = vm.net_counters().to_vec();
    let serial = vm.serial_counters().clone();
    let gate = vm.output_gate().clone();
    let name = name.to_string();
    Arc::new(move || {
        let p = protection.as_ref().map(|view| view());
        let c = match p.as_ref().and_then(|p| p.committed.as_ref()) {
            Some((committed, _)) => committed.clone(),
            None => vmm::state::CountersState {
                vcpus: vcpus.iter().map(|c| c.values()).collect(),
                blocks: blocks.iter().map(|c| c.values()).collect(),
                nets: nets.iter().map(|c| c.values()).collect(),
                serial: serial.values(),
            },
        };
        let mut s = counters_sample(&name, &c);
        let o = gate.stats();
        s.output = Some(metrics::OutputSample {
            held_bytes: o.held_bytes,
            released_items: o.released_items,
            released_bytes: o.released_bytes,
            passed_items: o.passed_items,
            write_errors: o.write_errors,
            hold: output_hold(&o),
        });
        // An unprotected VM says so (protected 0) rather than having no such series.
        let mut r = p.map(|p| p.replication).unwrap_or_default();
        r.failovers = failovers;
        s.replication = Some(r);
        metrics::render(&[s])
    })
}

/// The output gate's hold times as a histogram. The gate counts them in power-of-two buckets
/// of microseconds (bucket i holds [2^i, 2^(i+1)) µs); the bounds served are 2^k µs for k in
/// [`HOLD_BOUNDS_LOG2`] (64 µs to 16.8 s), each counting the buckets below it.
fn output_hold(o: &vmm::output::OutputStats) -> metrics::HistogramSample {
    let buckets = HOLD_BOUNDS_LOG2
        .map(|k| {
            let below = o.hold_us_log2.iter().take(k as usize).sum();
            ((1u64 << k) * 1000, below)
        })
        .collect();
    metrics::HistogramSample {
        unit: metrics::Unit::Nanoseconds,
        buckets,
        count: o.hold_us_log2.iter().sum(),
        sum: o.hold_ns_sum,
    }
}

/// See [`output_hold`].
const HOLD_BOUNDS_LOG2: std::ops::RangeInclusive<u32> = 6..=24;

/// What a replica's `/metrics` serves: the counters of its last commit, the committed epoch,
/// and protected = 1 while that commit is at most `alive` old (the replica's own test of a
/// live primary).
pub struct CommittedMetrics {
    view: Arc<std::sync::Mutex<Option<CommittedView>>>,
    name: String,
    alive: Duration,
}

/// A replica's last commit.
struct CommittedView {
    counters: vmm::state::CountersState,
    epoch: u64,
    at: Instant,
    commits: u64,
}

impl CommittedMetrics {
    /// Nothing committed yet, for a VM named `name`.
    pub fn new(name: &str, alive: Duration) -> Self {
        Self {
            view: Arc::default(),
            name: name.to_string(),
            alive,
        }
    }

    /// Checkpoint `epoch` with `counters` was committed (called under the replica's committed
    /// image's lock: it only copies the counters).
    pub fn committed(&self, counters: &vmm::state::CountersState, epoch: u64) {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let commits = v.as_ref().map_or(0, |v| v.commits) + 1;
        *v = Some(CommittedView {
            counters: counters.clone(),
            epoch,
            at: Instant::now(),
            commits,
        });
    }

    /// The `/metrics` source.
    pub fn source(&self) -> metrics::Source {
        let (view, name, alive) = (self.view.clone(), self.name.clone(), self.alive);
        Arc::new(move || {
            let v = view.lock().unwrap_or_else(|p| p.into_inner());
            let mut s = match &*v {
                Some(c) => counters_sample(&name, &c.counters),
                None => metrics::VmSample {
                    vm: name.clone(),
                    ..Default::default()
                },
            };
            s.replication = Some(metrics::ReplicationSample {
                protected: v.as_ref().is_some_and(|c| c.at.elapsed() <= alive),
                epochs: v.as_ref().map_or(0, |c| c.commits),
                committed_epoch: v.as_ref().map(|c| c.epoch),
                failovers: 0,
                checkpoints: None,
            });
            metrics::render(&[s])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::devices::serial::SerialCounters;
    use vmm::devices::virtio::block::BlockCounters;
    use vmm::devices::virtio::net::NetCounters;
    use vmm::vcpu::ExitReason;

    /// Saved counters whose every value is distinct: 100 * set + position.
    fn distinct() -> vmm::state::CountersState {
        let seq = |base: u64, n: usize| (0..n as u64).map(|i| base + i).collect::<Vec<_>>();
        vmm::state::CountersState {
            vcpus: vec![
                seq(100, vmm::vcpu::VcpuCounters::VALUES),
                seq(200, vmm::vcpu::VcpuCounters::VALUES),
            ],
            blocks: vec![seq(300, BlockCounters::NAMES.len())],
            nets: vec![seq(400, NetCounters::NAMES.len())],
            serial: seq(500, SerialCounters::NAMES.len()),
        }
    }

    #[test]
    fn every_saved_counter_lands_in_its_own_field() {
        let s = counters_sample("v", &distinct());
        let pos = |names: &[&str], n: &str| names.iter().position(|x| *x == n).unwrap() as u64;
        let b = |n| 300 + pos(BlockCounters::NAMES, n);
        let n = |x| 400 + pos(NetCounters::NAMES, x);
        assert_eq!(s.vm, "v");
        assert_eq!(s.vcpus[1].kvm_run_ns, 200);
        assert_eq!(
            s.vcpus[1].run_ns,
            200 + vmm::vcpu::VcpuCounters::VALUES as u64 - 1,
            "CPU time is the last value"
        );
        assert_eq!(
            s.vcpus[1].exits[0],
            (ExitReason::ALL[0].name().to_string(), 201)
        );
        assert_eq!(s.vcpus[0].exits.len(), ExitReason::ALL.len());
        let d = &s.drives[0];
        assert_eq!(d.drive, "0");
        assert_eq!(
            [
                d.read_requests,
                d.read_bytes,
                d.write_requests,
                d.write_bytes,
                d.flush_requests,
                d.get_id_requests,
                d.guest_errors,
                d.host_errors,
                d.unsupported,
                d.invalid_chains,
            ],
            [
                b("read_requests"),
                b("read_bytes"),
                b("write_requests"),
                b("write_bytes"),
                b("flush_requests"),
                b("get_id_requests"),
                b("errors"),
                b("host_errors"),
                b("unsupported"),
                b("invalid_chains"),
            ]
        );
        let i = &s.ifaces[0];
        assert_eq!(
            [
                i.rx_packets,
                i.rx_bytes,
                i.tx_packets,
                i.tx_bytes,
                i.rx_dropped,
                i.tx_dropped
            ],
            [
                n("rx_packets"),
                n("rx_bytes"),
                n("tx_packets"),
                n("tx_bytes"),
                n("rx_dropped"),
                n("tx_dropped"),
            ]
        );
        let c = s.console.unwrap();
        assert_eq!(
            [c.tx_bytes, c.tx_errors],
            [
                500 + pos(SerialCounters::NAMES, "tx_bytes"),
                500 + pos(SerialCounters::NAMES, "tx_errors")
            ]
        );
    }

    #[test]
    fn output_hold_times_become_cumulative_buckets_with_their_sum() {
        let mut o = vmm::output::OutputStats::default();
        // 1 µs, 70 µs (bucket 6: [64, 128)), 1 ms (bucket 9), 60 s (bucket 25: above 16.8 s).
        o.hold_us_log2[0] = 1;
        o.hold_us_log2[6] = 1;
        o.hold_us_log2[9] = 1;
        o.hold_us_log2[25] = 1;
        o.hold_ns_sum = 60_001_071_000;
        let h = output_hold(&o);
        assert_eq!(h.count, 4);
        assert_eq!(h.sum, 60_001_071_000);
        assert_eq!(h.buckets.len(), 19);
        assert_eq!(h.buckets[0], (64_000, 1), "le 64 µs: the 1 µs one");
        assert_eq!(h.buckets[1], (128_000, 2), "le 128 µs: and the 70 µs one");
        assert_eq!(
            h.buckets[4],
            (1_024_000, 3),
            "le 1.024 ms: and the 1 ms one"
        );
        assert_eq!(
            *h.buckets.last().unwrap(),
            (16_777_216_000, 3),
            "60 s is only in +Inf"
        );
    }

    #[test]
    fn short_saved_counters_read_as_zero_and_never_panic() {
        let c = vmm::state::CountersState {
            vcpus: vec![vec![]],
            blocks: vec![vec![1]],
            nets: vec![vec![]],
            serial: vec![],
        };
        let s = counters_sample("v", &c);
        assert_eq!(s.vcpus[0].run_ns, 0);
        assert_eq!(s.drives[0].read_requests, 1);
        assert_eq!(s.drives[0].write_bytes, 0);
        assert_eq!(s.ifaces[0].tx_bytes, 0);
    }

    #[test]
    fn the_replica_view_is_unprotected_until_a_commit_and_counts_commits() {
        let m = CommittedMetrics::new("r", Duration::from_secs(3600));
        let before = (m.source())();
        assert!(
            before.contains("ftvm_replication_protected{vm=\"r\"} 0"),
            "{before}"
        );
        assert!(!before.contains("ftvm_block_"), "{before}");
        m.committed(&distinct(), 7);
        m.committed(&distinct(), 8);
        let after = (m.source())();
        assert!(
            after.contains("ftvm_replication_protected{vm=\"r\"} 1"),
            "{after}"
        );
        assert!(
            after.contains("ftvm_checkpoint_epochs_total{vm=\"r\"} 2"),
            "{after}"
        );
        assert!(
            after.contains("ftvm_checkpoint_committed_epoch{vm=\"r\"} 8"),
            "{after}"
        );
        assert!(
            after.contains("ftvm_block_requests_total{vm=\"r\",drive=\"0\",op=\"read\"} 300"),
            "{after}"
        );
        let stale = CommittedMetrics::new("r", Duration::ZERO);
        stale.committed(&distinct(), 1);
        std::thread::sleep(Duration::from_millis(2));
        let s = (stale.source())();
        assert!(s.contains("ftvm_replication_protected{vm=\"r\"} 0"), "{s}");
    }
}
