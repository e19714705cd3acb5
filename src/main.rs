//! `ftvm`: the command line. Parses arguments and calls the libraries; no logic lives here.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use primary::control::Ended;
use primary::protect::ProtectConfig;
use vmm::vm::RestoreOptions;
use vmm::{Kernel, Vm, VmConfig};

/// The test guest, built from guest/ by build.rs.
static TEST_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ftvm-guest.elf"));

/// A KVM virtual machine monitor whose guests survive the loss of their host.
#[derive(Parser)]
#[command(name = "ftvm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest. Its serial console goes to stdout; ftvm exits when the guest powers off,
    /// with the guest's exit status. SIGTERM or SIGINT stops the VM in order (vCPUs and
    /// devices paused, disks flushed, API socket removed) and exits with 128 + the signal
    /// (143, 130); any VMM failure exits 1 with a one-line `ftvm: error: ...`.
    Run(RunArgs),
    /// Keep a replica of a protected VM: accept checkpoints from the primary whose certificate
    /// is pinned with --peer, commit each one whole, acknowledge it; one primary at a time
    /// (another is refused while it is connected). Runs until SIGTERM or SIGINT, which stop it
    /// in order (API socket removed) and exit with 128 + the signal (143, 130).
    Replica(ReplicaArgs),
    /// Start a VM from a snapshot file and run it like `run` does (the guest continues where
    /// it was).
    Restore(RestoreArgs),
    /// Write a snapshot of a running VM (`run --api`) to a file; the VM keeps running.
    Snapshot {
        /// The VM's API socket.
        #[arg(long, value_name = "SOCKET")]
        api: PathBuf,
        /// The snapshot file to write.
        #[arg(long, value_name = "PATH")]
        to: PathBuf,
        /// Store memory raw and page-aligned (a sparse file) instead of compressed: a restore
        /// then maps it copy-on-write instead of copying it in, and starts much faster.
        #[arg(long)]
        raw: bool,
    },
    /// Pause a VM's vCPUs and devices.
    Pause {
        /// The VM's API socket.
        #[arg(long, value_name = "SOCKET")]
        api: PathBuf,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM's API socket.
        #[arg(long, value_name = "SOCKET")]
        api: PathBuf,
    },
    /// Planned switch-over (live migration to the replica): the protected VM pauses, sends a
    /// last checkpoint, and once the replica (started with --failover) has committed it and
    /// taken over, this VM's ftvm exits 0. No output is lost or sent twice. Fails, with the
    /// guest running on here, if the VM is not protected or the replica does not take over.
    Migrate {
        /// The VM's API socket.
        #[arg(long, value_name = "SOCKET")]
        api: PathBuf,
    },
    /// Print a VM's state as JSON.
    Status {
        /// The VM's API socket.
        #[arg(long, value_name = "SOCKET")]
        api: PathBuf,
    },
    /// Make this host's replication identity: a new key (DIR/key.pem, mode 0600) and
    /// self-signed certificate (DIR/cert.pem), DIR created 0700 if missing. Prints the
    /// certificate's SHA-256 fingerprint, which the other host pins with --peer.
    Cert {
        /// The directory to write to.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace an existing key and certificate.
        #[arg(long)]
        force: bool,
    },
    /// Billing records from a history store (see the README, "Accounting history").
    #[command(subcommand)]
    Accounting(AccountingCommand),
}

#[derive(Subcommand)]
enum AccountingCommand {
    /// Per VM and interval: CPU time (exact ns), block requests and bytes by op, net packets
    /// and bytes by direction, billed as the counters at the last committed epoch in the range
    /// minus those at its start; work a failover rolled back is listed apart, not billed.
    /// Times (T) are ms since 1970-01-01 UTC or YYYY-MM-DDTHH:MM:SS[.mmm]Z; `--to` is exclusive.
    Export {
        /// The history store (opened read-only).
        #[arg(long, value_name = "DIR")]
        history: PathBuf,
        /// Only this VM (default: every VM with samples in the range).
        #[arg(long, value_name = "ID")]
        vm: Option<String>,
        /// Start of the interval (inclusive).
        #[arg(long, value_name = "T")]
        from: Option<String>,
        /// End of the interval (exclusive).
        #[arg(long, value_name = "T")]
        to: Option<String>,
        /// csv: a `billed` line per VM, a `rolled_back` line per rollback; json: every counter.
        #[arg(long, value_name = "csv|json", default_value = "csv")]
        format: String,
    },
    /// The VMs in a history store and the range of their samples (CSV).
    Ls {
        /// The history store (opened read-only).
        #[arg(long, value_name = "DIR")]
        history: PathBuf,
    },
}

#[derive(clap::Args)]
struct ReplicaArgs {
    /// Address to listen on for the primary (UDP), e.g. 0.0.0.0:7480 or [::]:7480.
    #[arg(long, value_name = "ADDR")]
    listen: std::net::SocketAddr,
    /// This host's key and certificate (made with `ftvm cert --out DIR`).
    #[arg(long, value_name = "DIR")]
    cert: PathBuf,
    /// The primary's certificate SHA-256 fingerprint (printed by its `ftvm cert`).
    #[arg(long, value_name = "FINGERPRINT")]
    peer: String,
    /// Serve a status-only API (HTTP/JSON) on this Unix socket: `ftvm status --api SOCKET`
    /// shows what the replica holds (state, primary, committed epoch, sync progress).
    #[arg(long, value_name = "SOCKET")]
    api: Option<PathBuf>,
    /// Keep the copies of the primary's disks in this directory (`disk<N>.img`, as of the
    /// committed epoch). Needed when the primary's VM has disks.
    #[arg(long, value_name = "DIR")]
    disk_dir: Option<PathBuf>,
    /// Take over when the primary is lost: run the guest here from the committed epoch (with
    /// this host's --net cards and the disk copies), after --fence if given. Without it the
    /// replica only keeps the image.
    #[arg(long)]
    failover: bool,
    /// Milliseconds of silence (no checkpoint data at all) from a protected primary before it
    /// is taken for lost (1 to 60000; the default is ten 25 ms epochs). Shorter means less
    /// downtime but a primary stalled by its host may be taken for dead (then, without
    /// --fence, two guests run): 100-150 suits hosts whose VMM threads are not starved.
    #[arg(long, value_name = "MS", default_value = "250")]
    failover_timeout: u64,
    /// Command (run with `sh -c`, the lost primary's address in FTVM_PRIMARY) that makes sure
    /// the old primary is dead before the takeover; the takeover happens only if it exits 0,
    /// else the replica keeps waiting. Without it, a network partition can leave two guests
    /// running.
    #[arg(long, value_name = "CMD", requires = "failover")]
    fence: Option<String>,
    /// Seconds the fence command may take (killed after).
    #[arg(long, value_name = "S", default_value = "10")]
    fence_timeout: u64,
    /// Network cards of the guest once it runs here (as for `ftvm run`, same number as the
    /// primary's), e.g. a TAP on the same LAN.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", requires = "failover")]
    nets: Vec<String>,
    /// Once it has taken over, protect the guest with this replica (HOST[:PORT]), as
    /// `ftvm run --replica` does: this host's --cert is the identity, --then-peer the new
    /// replica's fingerprint. A second failover then works.
    #[arg(long, value_name = "HOST[:PORT]", requires_all = ["failover", "then_peer"])]
    then_replica: Option<String>,
    /// The fingerprint of the --then-replica's certificate.
    #[arg(long, value_name = "FINGERPRINT", requires = "then_replica")]
    then_peer: Option<String>,
    /// Record each committed epoch's counters in this accounting history (created if
    /// missing; see `ftvm accounting`; it keeps the last epoch of each second), under
    /// --vm-name. A
    /// history that cannot be written (full or read-only disk) does not stop the replica: it is
    /// *behind* (the status's `history` object, `ftvm_history_behind` on --metrics, one log
    /// line), failures are counted, and the latest commit is written once it can be.
    #[arg(long, value_name = "DIR")]
    history: Option<PathBuf>,
    /// `--metrics`: the committed counters and the replica's health (the guest's live
    /// counters once it has taken over).
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// Prometheus metrics.
#[derive(clap::Args)]
struct MetricsArgs {
    /// Serve Prometheus metrics (`GET /metrics`, text format) on this TCP address, e.g.
    /// 127.0.0.1:9464. A port in use is an error before anything runs.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// The `vm` label of the metrics (give the replica its primary's name).
    #[arg(long, value_name = "NAME", default_value = "vm0")]
    vm_name: String,
}

impl MetricsArgs {
    /// Serves `--metrics` (if given) from `initial` until replaced.
    fn serve(&self, initial: metrics::Source) -> anyhow::Result<Option<metrics::Exporter>> {
        let Some(addr) = &self.metrics else {
            return Ok(None);
        };
        let e = metrics::Exporter::start(addr, initial)?;
        tracing::info!(addr = ?e.local_addr(), "serving metrics");
        Ok(Some(e))
    }
}

/// Replication options of `run` and `restore`.
#[derive(clap::Args)]
struct ProtectArgs {
    /// Protect the VM with the replica at HOST[:PORT] (default port 7480): checkpoints every
    /// --epoch-ms over QUIC with mutual TLS. Needs --cert and --peer.
    #[arg(long, value_name = "HOST[:PORT]", requires_all = ["cert", "peer"])]
    replica: Option<String>,
    /// This host's key and certificate (made with `ftvm cert --out DIR`).
    #[arg(long, value_name = "DIR")]
    cert: Option<PathBuf>,
    /// The replica's certificate SHA-256 fingerprint (printed by its `ftvm cert`).
    #[arg(long, value_name = "FINGERPRINT")]
    peer: Option<String>,
    /// Epoch length in milliseconds (1 to 10000).
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_EPOCH_MS)]
    epoch_ms: u64,
    /// Most pre-copy rounds of an initial sync (memory sent while the guest runs, before
    /// one short pause); 0 copies all of memory in one pause instead.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PRECOPY_ROUNDS)]
    precopy_rounds: u32,
    /// When checkpoints are taken: `early` every epoch and also as soon as the guest's output
    /// waits and none is in flight (so a quiet guest's replies are not held for an epoch);
    /// `fixed` every epoch only.
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = PolicyArg::Early)]
    checkpoint_policy: PolicyArg,
}

/// `--epoch-ms`'s default (also what a replica that took over protects with).
const DEFAULT_EPOCH_MS: u64 = 25;
/// `--precopy-rounds`'s default (likewise).
const DEFAULT_PRECOPY_ROUNDS: u32 = 5;

/// `--checkpoint-policy`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum PolicyArg {
    Early,
    Fixed,
}

impl ProtectArgs {
    fn config(self) -> anyhow::Result<Option<ProtectConfig>> {
        let Some(replica) = self.replica else {
            return Ok(None);
        };
        if !(1..=10_000).contains(&self.epoch_ms) {
            anyhow::bail!("--epoch-ms {} is out of range (1 to 10000)", self.epoch_ms);
        }
        let (cert, peer) = (
            self.cert.expect("clap requires it"),
            self.peer.expect("clap requires it"),
        );
        Ok(Some(ProtectConfig {
            replica: replica
                .parse()
                .with_context(|| format!("Invalid --replica '{replica}'"))?,
            identity: checkpoint::transport::Identity::load(&cert)?,
            peer: peer
                .parse()
                .with_context(|| format!("Invalid --peer fingerprint '{peer}'"))?,
            epoch: std::time::Duration::from_millis(self.epoch_ms),
            precopy_rounds: self.precopy_rounds,
            policy: match self.checkpoint_policy {
                PolicyArg::Fixed => primary::protect::Policy::Fixed,
                PolicyArg::Early => primary::protect::Policy::Early,
            },
            on_commit: None,
            first_epoch: 0,
        }))
    }
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The snapshot file.
    #[arg(long, value_name = "PATH")]
    from: PathBuf,
    /// Network cards to attach instead of the saved ones (as many as the snapshot has), e.g.
    /// another TAP on another host.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    nets: Vec<String>,
    /// Serve the control API (HTTP/JSON) on this Unix socket.
    #[arg(long, value_name = "SOCKET")]
    api: Option<PathBuf>,
    /// `--metrics`: the restored VM's counters, continued from the snapshot's.
    #[command(flatten)]
    metrics: MetricsArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest image to boot: a Linux bzImage or uncompressed vmlinux, or an ftvm test-guest
    /// ELF. Without it, the test guest embedded in this binary runs.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// An initrd (initramfs) for a Linux kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Guest command line. For Linux the default is "console=ttyS0 reboot=k panic=1". The test
    /// guest reads its workload from it (default "count=5 interval-ms=200"): `count=N` (print
    /// a counter N times, 0 = forever), `compute=N` (a timed compute loop), `dirty=MIB_PER_S,MIB`
    /// (write a word per page at that rate), `randpages=MIB_PER_S,MIB` (whole pages of random
    /// bytes; `randpages-fill=PERCENT`), `touch=ADDR,...`, `disk-write=MIB[,SEED]`,
    /// `disk-verify=MIB[,SEED]`, `disk-randread=MIB,COUNT`, `tcp-echo`, `tcp-stream`,
    /// `tcp-sink`, `http-file=MIB[,SEED]` with `ip=A.B.C.D/P`; modifiers `interval-ms=MS`,
    /// `rounds=N`, `secs=S`, `disk=N`, `chunk-kib=K`. See README.md.
    #[arg(long, value_name = "STRING")]
    cmdline: Option<String>,
    /// Guest memory: MiB, or a size with a K, M or G suffix (16M to 64G, a multiple of 2M).
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    mem: String,
    /// Number of vCPUs (1 to 254, and no more than KVM allows).
    #[arg(long, value_name = "N", default_value = "2")]
    vcpus: String,
    /// A raw disk image as a virtio-blk device; `,readonly` refuses writes. Repeat for more
    /// disks (the guest sees them in this order).
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    disks: Vec<String>,
    /// A virtio-net card on an existing TAP interface (or one ftvm may create), with an
    /// optional MAC address. Repeat for more cards.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    nets: Vec<String>,
    /// Serve the control API (HTTP/JSON: status, pause, resume, snapshot) on this Unix
    /// socket; `ftvm pause|resume|status|snapshot --api SOCKET` are its clients.
    #[arg(long, value_name = "SOCKET")]
    api: Option<PathBuf>,
    /// Start with the vCPUs paused (the guest runs on `ftvm resume --api SOCKET`); with
    /// --replica, the guest can be protected before it runs a single instruction.
    #[arg(long, requires = "api")]
    paused: bool,
    #[command(flatten)]
    protect: ProtectArgs,
    /// `--metrics`: the running VM's counters (while protected, those of the last
    /// acknowledged checkpoint, which a takeover continues from).
    #[command(flatten)]
    metrics: MetricsArgs,
    /// Record the counters of each checkpoint the replica acknowledges in this accounting
    /// history (created if missing; see `ftvm accounting`), under --vm-name. Needs --replica.
    /// A history that cannot be written does not stop the VM: the failure is logged once and
    /// counted, and recording goes on when it can.
    #[arg(long, value_name = "DIR", requires = "replica")]
    history: Option<PathBuf>,
}

/// Parses `512`, `512M`, `2G`, `65536K` into bytes (a bare number is MiB).
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (digits, shift) = match s.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&s[..s.len() - 1], 10),
        Some(b'M') => (&s[..s.len() - 1], 20),
        Some(b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 20),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("Invalid memory size '{s}': expected e.g. 512M or 2G"))?;
    n.checked_mul(1 << shift)
        .with_context(|| format!("Memory size '{s}' is too large"))
}

/// Parses every value of a repeated option.
fn parse_all<T: std::str::FromStr<Err = String>>(values: &[String]) -> anyhow::Result<Vec<T>> {
    values
        .iter()
        .map(|v| v.parse().map_err(|e: String| anyhow::anyhow!("{e}")))
        .collect()
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut protect = args.protect.config()?;
    let mem_size = parse_size(&args.mem)?;
    let vcpus: u64 = args
        .vcpus
        .parse()
        .with_context(|| format!("Invalid vCPU count '{}'", args.vcpus))?;
    let disks = parse_all(&args.disks)?;
    let nets = parse_all(&args.nets)?;
    // Before the guest exists: a port in use ends ftvm here.
    let metrics = args.metrics.serve(Arc::new(String::new))?;
    // Once every argument is known good, so that a bad one leaves no history behind.
    if let (Some(dir), Some(p)) = (&args.history, &mut protect) {
        let recorder = HistoryRecorder::open(dir, &args.metrics.vm_name)?;
        if let Some(e) = &metrics {
            e.append(recorder.history_metrics());
        }
        p.on_commit = Some(Arc::new(move |c: &vmm::state::CountersState, epoch| {
            recorder.record(c, epoch)
        }));
    }
    let kernel = match args.kernel {
        Some(path) => Kernel::File(path),
        None => Kernel::Bytes {
            name: "the embedded test guest".into(),
            image: Arc::from(TEST_GUEST),
        },
    };
    let vm = Vm::new(VmConfig {
        mem_size,
        vcpus,
        kernel,
        cmdline: args.cmdline,
        initrd: args.initrd,
        console: Box::new(std::io::stdout()),
        disks,
        nets,
    })?;
    tracing::info!(
        vcpus,
        mem_mib = mem_size >> 20,
        paused = args.paused,
        "guest started"
    );
    let metrics = metrics.as_ref().map(|e| (args.metrics.vm_name.as_str(), e));
    supervise(vm, args.api, protect, args.paused, metrics, 0)
}

/// Runs `vm` until it ends and maps how it ended to ftvm's exit status: the guest's status on
/// power-off, 128 + the signal's number after an orderly stop on SIGTERM/SIGINT.
fn supervise(
    vm: Vm,
    api: Option<PathBuf>,
    protect: Option<ProtectConfig>,
    paused: bool,
    metrics: Option<(&str, &metrics::Exporter)>,
    failovers: u64,
) -> anyhow::Result<ExitCode> {
    // A failed `metrics` thread ends the VM with its cause, like any other VMM thread.
    if let Some((_, exporter)) = metrics {
        let reporter = vm.reporter();
        exporter.on_failure(Box::new(move |cause| {
            reporter.send(vmm::event::VmEvent::ThreadFailed {
                thread: "metrics".into(),
                cause,
            })
        }));
    }
    let ended =
        primary::control::supervise_full(vm, api.as_deref(), protect, paused, metrics, failovers);
    std::io::stdout().flush().ok();
    match ended? {
        Ended::PowerOff(status) => {
            tracing::info!(status, "guest powered off");
            Ok(ExitCode::from(u8::try_from(status).unwrap_or(1)))
        }
        Ended::Reset => {
            tracing::info!("guest reset; ftvm ends the VM (reboot is not emulated)");
            Ok(ExitCode::SUCCESS)
        }
        Ended::SystemEvent(kind) => {
            tracing::info!(kind, "guest stopped (KVM system event)");
            Ok(ExitCode::SUCCESS)
        }
        Ended::HandedOver => {
            tracing::info!("the guest was handed over to the replica; this VM ends");
            Ok(ExitCode::SUCCESS)
        }
        Ended::Signal(sig) => {
            tracing::info!(
                signal = sig,
                "VM stopped in order after a termination signal"
            );
            Ok(ExitCode::from(128 + sig as u8))
        }
    }
}

fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let nets = parse_all(&args.nets)?;
    let metrics = args.metrics.serve(Arc::new(String::new))?;
    let opts = RestoreOptions {
        console: Box::new(std::io::stdout()),
        nets: (!nets.is_empty()).then_some(nets),
        disks: None,
    };
    let vm = checkpoint::snapshot::restore(&args.from, opts)?;
    tracing::info!(from = %args.from.display(), "guest restored");
    let metrics = metrics.as_ref().map(|e| (args.metrics.vm_name.as_str(), e));
    supervise(vm, args.api, None, false, metrics, 0)
}

/// Keeps a replica until a termination signal; with --failover, takes over when the primary
/// is lost and runs the guest until it ends.
fn replica(args: ReplicaArgs) -> anyhow::Result<ExitCode> {
    // Before any thread starts, so that every thread inherits the mask.
    vmm::signals::block_termination().context("Cannot block termination signals")?;
    if !(1..=60_000).contains(&args.failover_timeout) {
        anyhow::bail!(
            "--failover-timeout {} is out of range (1 to 60000)",
            args.failover_timeout
        );
    }
    let nets = parse_all(&args.nets)?;
    let committed = replica::Shared::default();
    let committed_metrics = Arc::new(primary::control::CommittedMetrics::new(
        &args.metrics.vm_name,
        std::time::Duration::from_millis(args.failover_timeout),
    ));
    let metrics = args.metrics.serve(committed_metrics.source())?;
    let recorder = args
        .history
        .as_ref()
        .map(|dir| HistoryRecorder::open(dir, &args.metrics.vm_name))
        .transpose()?
        .map(Arc::new);
    let history_status = recorder.as_deref().map(HistoryRecorder::status_source);
    // Served after the committed counters, and after the guest's own once it took over.
    if let (Some(exporter), Some(r)) = (&metrics, &recorder) {
        exporter.append(r.history_metrics());
    }
    // A machine built ahead of a takeover on each new committed image (--failover only).
    let standby = args
        .failover
        .then(|| {
            replica::standby::HotStandby::start(replica::standby::HostDevices {
                nets: nets.clone(),
                disk_dir: args.disk_dir.clone(),
            })
            .context("Cannot start the standby thread")
        })
        .transpose()?
        .map(Arc::new);
    let local = Local {
        standby: standby.clone(),
        recorder: recorder.clone(),
    };
    let on_commit: replica::OnCommit = Arc::new(move |c: &replica::Committed| {
        if let Some(s) = &standby {
            s.observe(c);
        }
        committed_metrics.committed(&c.state.counters, c.epoch);
        if let Some(r) = &recorder {
            r.record(&c.state.counters, c.epoch);
        }
    });
    let mut warned = false;
    loop {
        let config = replica::ReplicaConfig {
            listen: args.listen,
            identity: checkpoint::transport::Identity::load(&args.cert)?,
            peer: args
                .peer
                .parse()
                .with_context(|| format!("Invalid --peer fingerprint '{}'", args.peer))?,
            on_commit: Some(on_commit.clone()),
            disk_dir: args.disk_dir.clone(),
            failover_timeout: args
                .failover
                .then(|| std::time::Duration::from_millis(args.failover_timeout)),
            history_status: history_status.clone(),
        };
        if args.failover && args.fence.is_none() && !warned {
            tracing::warn!(
                "--failover without --fence: if the primary is only cut off (a partition), \
                 taking over leaves two copies of the guest running"
            );
            warned = true;
        }
        let end = replica::supervise(config, committed.clone(), args.api.as_deref(), |addr| {
            tracing::info!(%addr, "replica listening");
        })?;
        let (primary, epoch, silent) = match end {
            replica::ReplicaEnd::Signal(sig) => {
                tracing::info!(
                    signal = sig,
                    "replica stopped in order after a termination signal"
                );
                return Ok(ExitCode::from(128u8.wrapping_add(sig as u8)));
            }
            replica::ReplicaEnd::TakeOver {
                primary,
                epoch,
                silent,
                planned,
            } => {
                if planned {
                    // The primary asked: it has paused its guest and ends.
                    return take_over(
                        &args,
                        &local,
                        &committed,
                        epoch,
                        silent,
                        Default::default(),
                        metrics.as_ref(),
                    );
                }
                (primary, epoch, silent)
            }
        };
        let fenced = std::time::Instant::now();
        if let Some(cmd) = &args.fence {
            let timeout = std::time::Duration::from_secs(args.fence_timeout);
            if let Err(e) = replica::fence(cmd, primary, epoch, timeout) {
                tracing::error!(
                    %primary,
                    "not taking over: {e}; waiting for a primary again with the committed image"
                );
                continue;
            }
        }
        return take_over(
            &args,
            &local,
            &committed,
            epoch,
            silent,
            fenced.elapsed(),
            metrics.as_ref(),
        );
    }
}

/// Records committed counters in the accounting history (about 10 µs a commit; the store
/// keeps the last epoch of each second): the adapter from the VMM's counters to
/// [`history::Recorder`], which keeps the VM running when the history cannot be written (full
/// or read-only disk), says so (status, metrics, one log line when it falls behind and one
/// when it catches up) and writes the latest commit at the next commit or within a second.
struct HistoryRecorder {
    recorder: Arc<history::Recorder>,
    _timer: history::Timer,
}

impl HistoryRecorder {
    /// How often a recorder that is behind tries again when no commit comes (and, once a
    /// minute, packs the history).
    const TICK: std::time::Duration = std::time::Duration::from_secs(1);

    /// Opens (or creates) the history in `dir` and records VM `vm` there; a name the history
    /// refuses is refused before the directory is made.
    fn open(dir: &std::path::Path, vm: &str) -> anyhow::Result<Self> {
        history::check_vm_id(vm).context("Invalid --vm-name for --history")?;
        let h = history::History::create(dir, history::Options::default())
            .with_context(|| format!("Cannot open the history {}", dir.display()))?;
        Self::new(h, vm)
    }

    fn new(history: history::History, vm: &str) -> anyhow::Result<Self> {
        let recorder = Arc::new(
            history::Recorder::new(history, vm)
                .with_context(|| format!("Cannot record the history of VM '{vm}'"))?,
        );
        let timer = recorder
            .tick_every(Self::TICK)
            .context("Cannot start the history thread")?;
        Ok(Self {
            recorder,
            _timer: timer,
        })
    }

    fn record(&self, counters: &vmm::state::CountersState, epoch: u64) {
        let s = primary::control::counters_sample(self.recorder.vm(), counters);
        let mut map = std::collections::BTreeMap::new();
        for (i, v) in s.vcpus.iter().enumerate() {
            map.insert(history::names::vcpu_run_ns(i), v.run_ns);
        }
        for d in &s.drives {
            for (op, requests, bytes) in [
                ("read", d.read_requests, d.read_bytes),
                ("write", d.write_requests, d.write_bytes),
                ("flush", d.flush_requests, 0),
            ] {
                map.insert(history::names::block_requests(&d.drive, op), requests);
                if op != "flush" {
                    map.insert(history::names::block_bytes(&d.drive, op), bytes);
                }
            }
        }
        for n in &s.ifaces {
            for (dir, packets, bytes) in [
                ("rx", n.rx_packets, n.rx_bytes),
                ("tx", n.tx_packets, n.tx_bytes),
            ] {
                map.insert(history::names::net_packets(&n.iface, dir), packets);
                map.insert(history::names::net_bytes(&n.iface, dir), bytes);
            }
        }
        // A failure is the recorder's to report: the VM goes on.
        self.recorder.record(epoch, map);
    }

    /// The `history` object of the replica's status.
    fn status_source(&self) -> checkpoint::api::StatusSource {
        let r = self.recorder.clone();
        Arc::new(move || r.status_json())
    }

    /// The recorder's metrics (`ftvm_history_behind`, ...).
    fn history_metrics(&self) -> metrics::Source {
        let r = self.recorder.clone();
        Arc::new(move || {
            let s = r.status();
            metrics::model::render_history(&metrics::model::HistorySample {
                vm: r.vm().to_string(),
                behind: s.behind,
                write_failures: s.failures,
                recorded_epoch: s.recorded_epoch,
            })
        })
    }
}

/// What a replica keeps for a takeover.
struct Local {
    /// The machine built ahead (--failover).
    standby: Option<Arc<replica::standby::HotStandby>>,
    /// The accounting history (--history): the new primary records its acknowledged
    /// checkpoints there once protected again.
    recorder: Option<Arc<HistoryRecorder>>,
}

/// Runs the committed image here — its state loaded into the hot standby built on it, or a
/// machine built cold on the replica's memory (no copy) — with this host's cards and the disk
/// copies, announced on the network, then supervised like `ftvm run`.
fn take_over(
    args: &ReplicaArgs,
    local: &Local,
    committed: &replica::Shared,
    epoch: u64,
    silent: std::time::Duration,
    fencing: std::time::Duration,
    metrics: Option<&metrics::Exporter>,
) -> anyhow::Result<ExitCode> {
    let c = committed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .context("Nothing committed to take over")?;
    let standby = local
        .standby
        .as_deref()
        .context("A takeover without --failover")?;
    let (vm, how, activation) = standby
        .activate(c)
        .map_err(|e| anyhow::anyhow!(e))
        .context("Cannot take over the committed image")?;
    let (cards, probes) = vm.announce().context("Cannot announce the guest's cards")?;
    tracing::info!(
        epoch,
        detection_ms = silent.as_millis() as u64,
        fencing_ms = fencing.as_millis() as u64,
        activation_us = activation.as_micros() as u64,
        standby = how.as_str(),
        cards,
        tcp_probes = probes,
        at_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        "took over: the guest runs here from the committed epoch"
    );
    // Protected again by the next replica, if one was named.
    let mut protect = ProtectArgs {
        replica: args.then_replica.clone(),
        cert: Some(args.cert.clone()),
        peer: args.then_peer.clone(),
        epoch_ms: DEFAULT_EPOCH_MS,
        precopy_rounds: DEFAULT_PRECOPY_ROUNDS,
        checkpoint_policy: PolicyArg::Early,
    }
    .config()?;
    if let Some(p) = &mut protect {
        // The guest's epochs go on from the committed one, and so does its history.
        p.first_epoch = epoch + 1;
        if let Some(r) = &local.recorder {
            let r = r.clone();
            p.on_commit = Some(Arc::new(move |c: &vmm::state::CountersState, e| {
                r.record(c, e)
            }));
        }
    }
    let metrics = metrics.map(|e| (args.metrics.vm_name.as_str(), e));
    supervise(vm, args.api.clone(), protect, false, metrics, 1)
}

/// Sends one API request and prints the answer.
fn client(
    api: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<ExitCode> {
    let answer = checkpoint::api::call(api, method, path, body)?;
    println!("{answer}");
    Ok(ExitCode::SUCCESS)
}

/// `ftvm accounting`: reads the history read-only and prints the whole answer at once, so a
/// failure prints nothing but its error.
fn accounting(command: AccountingCommand) -> anyhow::Result<ExitCode> {
    use history::export;
    let text = match command {
        AccountingCommand::Export {
            history: dir,
            vm,
            from,
            to,
            format,
        } => {
            let format = match format.as_str() {
                "csv" => export::Format::Csv,
                "json" => export::Format::Json,
                other => anyhow::bail!("unknown --format {other:?}: use csv or json"),
            };
            let query = export::Query {
                vm,
                from_ms: from.as_deref().map(export::parse_time).transpose()?,
                to_ms: to.as_deref().map(export::parse_time).transpose()?,
            };
            export::check_range(query.from_ms, query.to_ms)?;
            let store = history::History::open_read_only(&dir)?;
            let usages = export::export(&store, &query)?;
            export::render(&store, &usages, format)
        }
        AccountingCommand::Ls { history: dir } => {
            export::render_ls(&history::History::open_read_only(&dir)?.vms()?)
        }
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    vmm::event::install_panic_hook();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run(_) | Command::Restore(_)) {
        // Before any thread starts, so that every thread inherits the mask: the signals are
        // taken by one thread and stop the VM in order.
        if let Err(e) = vmm::signals::block_termination() {
            eprintln!("ftvm: error: Cannot block termination signals: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => restore(args),
        Command::Replica(args) => replica(args),
        Command::Snapshot { api, to, raw } => {
            // The VMM may run in another directory: give it an absolute path.
            let to = std::path::absolute(&to).unwrap_or(to);
            let body = serde_json::json!({ "path": to, "raw": raw });
            client(&api, "PUT", "/snapshot", Some(body))
        }
        Command::Pause { api } => client(&api, "PUT", "/pause", None),
        Command::Resume { api } => client(&api, "PUT", "/resume", None),
        Command::Migrate { api } => client(&api, "PUT", "/migrate", None),
        Command::Status { api } => client(&api, "GET", "/status", None),
        Command::Accounting(command) => accounting(command),
        Command::Cert { out, force } => checkpoint::transport::generate_into(&out, force)
            .map(|fingerprint| {
                println!("{fingerprint}");
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ftvm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
