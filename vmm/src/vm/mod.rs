//! The machine: KVM VM, memory, buses, devices and vCPUs, with pause/resume and dirty pages.

use std::io::Write;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_sregs};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::boot::{self, Boot, BootError, BootInput, GuestKind};
use crate::bus::{Bus, MmioAddress, PioAddress};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::devices::serial::{ConsoleOut, SerialCounters};
use crate::devices::virtio::block::{BlockConfig, BlockCounters};
use crate::devices::virtio::net::{NetConfig, NetCounters};
use crate::dirty_ring::{DirtyLog, DirtyRing};
use crate::event::{Reporter, ThreadError};
use crate::event_loop::{EventLoop, EventLoopError};
use crate::hostfile::{self, HostFileError, MappedFile};
use crate::memory::{self, DirtyPages, GuestMemoryMmap, LiveDirty, MemoryError};
use crate::vcpu::{VcpuContext, VcpuCounters, VcpuError, VcpuHandle, VcpuRunState};
use crate::x86::cpuid;

pub use crate::event::VmEvent;

mod build;
mod snapshot;

pub use snapshot::{MachineState, MemoryFiller, RestoreMemory, RestoreOptions, Standby};

/// Most vCPUs a VM may have (APIC ids must stay below the broadcast id 255).
pub const MAX_VCPUS: u8 = 254;
/// How long a pause may take before the VMM gives up on a vCPU.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The image to boot.
pub enum Kernel {
    /// An image held in memory (the embedded test guest), with a name for messages.
    Bytes {
        /// Name used in messages.
        name: String,
        /// The ELF image.
        image: Arc<[u8]>,
    },
    /// An image file.
    File(PathBuf),
}

/// Everything needed to build a VM.
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs (1 to [`MAX_VCPUS`]).
    pub vcpus: u64,
    /// The image to boot.
    pub kernel: Kernel,
    /// The guest command line; None for the guest kind's default.
    pub cmdline: Option<String>,
    /// An initrd (Linux guests only).
    pub initrd: Option<PathBuf>,
    /// Where the serial console's output goes.
    pub console: Box<dyn Write + Send>,
    /// Disks, in the order the guest sees them.
    pub disks: Vec<BlockConfig>,
    /// Network cards, in the order the guest sees them (after the disks).
    pub nets: Vec<NetConfig>,
}

/// Errors of building and running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A vCPU count outside 1..=max.
    #[error("Cannot run {count} vCPUs: between 1 and {max} are supported here")]
    VcpuCount {
        /// Requested count.
        count: u64,
        /// Maximum.
        max: u64,
    },
    /// Bad memory size or allocation failure.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel or initrd file cannot be used.
    #[error(transparent)]
    Input(#[from] HostFileError),
    /// The guest image could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// /dev/kvm could not be opened.
    #[error("Cannot open /dev/kvm (is KVM available, and may this user open it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Setting up a device failed.
    #[error("Cannot set up the {what}")]
    Device {
        /// Which device.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bus refused a device range.
    #[error("Cannot place a device")]
    Bus(#[from] crate::bus::BusError),
    /// A vCPU operation failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A virtio device could not be set up.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// The device event loop failed.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// Saving or restoring state failed.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The operation needs a paused machine.
    #[error("The VM must be paused first")]
    NotPaused,
    /// Guest memory could not be filled from a snapshot.
    #[error("Cannot load guest memory")]
    LoadMemory(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A disk could not be flushed.
    #[error("Cannot flush disk image {path}")]
    FlushDisk {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A VMM thread of the VM panicked or failed.
    #[error(transparent)]
    Thread(#[from] ThreadError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// What a built and a running VM share: KVM VM, memory, buses, devices and their counters.
pub struct Machine {
    devices: DeviceManager,
    reporter: Reporter,
    events: Receiver<VmEvent>,
    pio: Arc<Bus<PioAddress>>,
    mmio: Arc<Bus<MmioAddress>>,
    serial: Arc<SerialCounters>,
    console: ConsoleOut,
    /// How the guest was loaded (None for a VM restored from a snapshot).
    layout: Option<Boot>,
    saved: SavedConfig,
    /// The vCPUs' dirty rings, for a VM built with [`DirtyLog::Ring`].
    dirty_ring: Option<Arc<DirtyRing>>,
    // Field order is drop order: the VM fd closes before its memory is unmapped.
    fd: VmFd,
    memory: GuestMemoryMmap,
    kvm: Kvm,
}

/// A virtual machine that is built (guest loaded or state restored) and not started.
/// [`Vm::start`] consumes it and returns the [`RunningVm`]: a machine starts once.
pub struct Vm {
    // Field order is drop order: the vCPU fds close before the VM's.
    vcpu_fds: Vec<VcpuFd>,
    vcpu_counters: Vec<Arc<VcpuCounters>>,
    machine: Machine,
}

/// The run state that was asked for (by the API, a snapshot, the epoch loop), which is what the
/// VM reports and what an operation that pauses restores — never a thread's last report, which
/// lags behind.
#[derive(Debug)]
pub struct RunState {
    paused: AtomicBool,
    vcpus: usize,
}

impl RunState {
    /// A running VM's state with `vcpus` vCPUs (what a VM starts with; for tests of its users).
    pub fn new(vcpus: usize) -> Self {
        Self {
            paused: AtomicBool::new(false),
            vcpus,
        }
    }

    /// Whether the VM was last asked to pause (and the pause completed).
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// "running" or "paused".
    pub fn name(&self) -> &'static str {
        if self.is_paused() {
            "paused"
        } else {
            "running"
        }
    }

    /// The number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.vcpus
    }
}

/// A started virtual machine: vCPU threads and the device event loop exist until
/// [`RunningVm::stop`] (or drop).
pub struct RunningVm {
    // Field order is drop order: vCPU threads stop first, then the device thread, then the
    // machine itself.
    vcpus: Vec<VcpuHandle>,
    event_loop: EventLoop,
    run_state: Arc<RunState>,
    machine: Machine,
}

impl Deref for Vm {
    type Target = Machine;
    fn deref(&self) -> &Machine {
        &self.machine
    }
}

impl Deref for RunningVm {
    type Target = Machine;
    fn deref(&self) -> &Machine {
        &self.machine
    }
}

/// The configuration a snapshot needs to rebuild the machine.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedConfig {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// A Linux guest (with PIT, i8042, ACPI PM) rather than the test guest.
    pub linux: bool,
    /// Disks.
    pub disks: Vec<BlockConfig>,
    /// Network cards.
    pub nets: Vec<NetConfig>,
}

/// A guest image in memory: embedded bytes, or a file mapped read-only (never copied, and
/// checked for type and size before anything of it is read).
enum Image {
    Bytes(Arc<[u8]>),
    Mapped(MappedFile),
}

impl Deref for Image {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Image::Bytes(b) => b,
            Image::Mapped(m) => m,
        }
    }
}

fn read_kernel(kernel: Kernel, max_len: u64) -> Result<(String, Image), VmError> {
    match kernel {
        Kernel::Bytes { name, image } => Ok((name, Image::Bytes(image))),
        Kernel::File(path) => {
            let image = hostfile::map_input(&path, "kernel image", max_len)?;
            Ok((path.display().to_string(), Image::Mapped(image)))
        }
    }
}

impl Vm {
    /// Builds a VM from `config`: memory, image, devices and vCPUs, ready to [`Vm::start`].
    /// KVM's dirty bitmap tracks the guest's writes.
    ///
    /// Arguments are checked before /dev/kvm is opened, so bad input is reported as such on
    /// any host.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        Self::with_dirty_log(config, DirtyLog::Bitmap)
    }

    /// [`Vm::new`], with the guest's writes tracked as `log` says: with
    /// [`DirtyLog::Ring`], [`Machine::live_dirty`] harvests them while the VM runs.
    pub fn with_dirty_log(config: VmConfig, log: DirtyLog) -> Result<Self, VmError> {
        let vcpus = match u8::try_from(config.vcpus) {
            Ok(n) if (1..=MAX_VCPUS).contains(&n) => n,
            _ => {
                return Err(VmError::VcpuCount {
                    count: config.vcpus,
                    max: u64::from(MAX_VCPUS),
                });
            }
        };
        let ram = memory::ram_ranges(config.mem_size)?;
        // Neither image can be larger than the guest's memory: refused before reading a byte.
        let (name, image) = read_kernel(config.kernel, config.mem_size)?;
        let kind = boot::classify(&name, &image)?;
        let initrd = match &config.initrd {
            Some(path) => Some(hostfile::map_input(path, "initrd", config.mem_size)?),
            None => None,
        };

        let linux = matches!(kind, GuestKind::Linux(_));
        let saved = SavedConfig {
            mem_size: config.mem_size,
            linux,
            disks: config.disks.clone(),
            nets: config.nets.clone(),
        };
        let parts = build::build_with(vcpus, &ram, &saved, config.console, None, log)?;
        let supported = parts
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report its supported CPUID"))?;
        let pvm = cpuid::host_is_pvm();
        for (i, vcpu) in parts.vcpu_fds.iter().enumerate() {
            let mut c = cpuid::for_vcpu(&supported, i as u8, vcpus);
            if pvm {
                cpuid::hide_unemulated(&mut c);
            }
            vcpu.set_cpuid2(&c).map_err(kvm_err("set CPUID"))?;
            if pvm && i == 0 && linux {
                warn_if_cpuid_overridden(vcpu, &c);
            }
        }
        let tsc_khz = parts.vcpu_fds[0]
            .get_tsc_khz()
            .map_err(kvm_err("report the TSC frequency"))?;
        let layout = boot::load(
            &parts.memory,
            &ram,
            &BootInput {
                name: &name,
                image: &image,
                kind,
                initrd: initrd.as_deref(),
                cmdline: config.cmdline.as_deref(),
                vcpus,
                tsc_khz: u64::from(tsc_khz),
                virtio: &parts.devices.slots,
            },
        )?;
        for (i, vcpu) in parts.vcpu_fds.iter().enumerate() {
            boot::setup_vcpu(vcpu, &layout, i as u8).map_err(kvm_err("set up a vCPU"))?;
        }

        Ok(parts.into_vm(Some(layout), saved))
    }

    /// Starts every vCPU and the device event loop.
    pub fn start(self) -> Result<RunningVm, VmError> {
        self.spawn(false)
    }

    /// Starts the machine paused: vCPU threads and devices exist, no guest code runs until
    /// [`RunningVm::resume`]. A restored machine can be saved again this way before it runs.
    pub fn start_paused(self) -> Result<RunningVm, VmError> {
        let vm = self.spawn(true)?;
        vm.pause()?;
        Ok(vm)
    }

    fn spawn(self, paused: bool) -> Result<RunningVm, VmError> {
        let Vm {
            vcpu_fds,
            vcpu_counters,
            mut machine,
        } = self;
        let mut vcpus = Vec::with_capacity(vcpu_fds.len());
        for (i, (fd, counters)) in vcpu_fds.into_iter().zip(vcpu_counters).enumerate() {
            let ctx = VcpuContext {
                pio: machine.pio.clone(),
                mmio: machine.mmio.clone(),
                events: machine.reporter.clone(),
                dirty_ring: machine.dirty_ring.clone(),
            };
            vcpus.push(VcpuHandle::spawn(i as u8, fd, ctx, counters, paused)?);
        }
        machine
            .devices
            .wakers
            .set(vcpus.iter().map(|v| v.waker()).collect());
        let handlers = std::mem::take(&mut machine.devices.handlers);
        let event_loop = EventLoop::start(handlers, &machine.reporter)?;
        // Paused vCPU threads still count as running until `pause` has waited for them.
        let run_state = Arc::new(RunState {
            paused: AtomicBool::new(false),
            vcpus: vcpus.len(),
        });
        Ok(RunningVm {
            vcpus,
            event_loop,
            run_state,
            machine,
        })
    }

    /// Counters of each vCPU (restored ones already hold their saved values).
    pub fn vcpu_counters(&self) -> &[Arc<VcpuCounters>] {
        &self.vcpu_counters
    }
}

impl RunningVm {
    /// Pauses every vCPU and the device event loop (at a request boundary), and returns once
    /// the machine is quiet: no guest code running, no I/O in flight, no device working.
    ///
    /// If the machine does not become quiet in time, it is let run again as it was and the
    /// error says which part did not stop.
    pub fn pause(&self) -> Result<(), VmError> {
        self.quiesce()?;
        self.run_state.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Stops every vCPU and the device thread and waits until they are quiet; on failure lets
    /// them run again.
    fn quiesce(&self) -> Result<(), VmError> {
        // All at once: the device thread stops between two handler calls, and a queue
        // notification a still-running vCPU makes meanwhile stays pending in its eventfd.
        for v in &self.vcpus {
            v.request_pause();
        }
        self.event_loop.request_pause();
        if let Err(e) = self.wait_quiet() {
            if !self.is_paused() {
                self.release();
            }
            return Err(e);
        }
        // Whatever the guest printed before the pause is out, even a partial line.
        self.machine.console.sync();
        Ok(())
    }

    fn wait_quiet(&self) -> Result<(), VmError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        for v in &self.vcpus {
            v.wait_paused(deadline.saturating_duration_since(Instant::now()))?;
        }
        self.event_loop
            .wait_paused(deadline.saturating_duration_since(Instant::now()))?;
        Ok(())
    }

    /// Lets the devices and then every vCPU run again.
    pub fn resume(&self) {
        self.run_state.paused.store(false, Ordering::SeqCst);
        self.release();
    }

    fn release(&self) {
        self.event_loop.resume();
        for v in &self.vcpus {
            v.resume();
        }
    }

    /// The run state that was asked for; shared, so that other threads (the API) can read it.
    pub fn run_state(&self) -> &Arc<RunState> {
        &self.run_state
    }

    /// Runs `f` on the quiesced machine — paused if it was running, as it was if it was
    /// paused — and then leaves the machine exactly as it found it. The run state that the
    /// API reports does not change.
    pub fn with_paused<R>(&self, f: impl FnOnce(&Self) -> R) -> Result<R, VmError> {
        let was_paused = self.is_paused();
        if !was_paused {
            self.quiesce()?;
        }
        let result = f(self);
        if !was_paused {
            self.release();
        }
        Ok(result)
    }

    /// Writes every writable disk's data to stable storage (`fsync`); call it paused.
    pub fn flush_disks(&self) -> Result<(), VmError> {
        for disk in self.machine.saved.disks.iter().filter(|d| !d.read_only) {
            let flush = |source| VmError::FlushDisk {
                path: disk.path.clone(),
                source,
            };
            // fsync flushes the file, whichever descriptor asks.
            std::fs::File::open(&disk.path)
                .and_then(|f| f.sync_all())
                .map_err(flush)?;
        }
        Ok(())
    }

    /// Whether the VM was last asked to pause (see [`RunState`]).
    pub fn is_paused(&self) -> bool {
        self.run_state.is_paused()
    }

    /// Where each vCPU thread is now (it lags [`RunningVm::is_paused`] after a request).
    pub fn vcpu_states(&self) -> Vec<VcpuRunState> {
        self.vcpus.iter().map(|v| v.state()).collect()
    }

    /// Waits up to `timeout` (forever if `None`) for the next VM event.
    pub fn wait_event(&self, timeout: Option<Duration>) -> Option<VmEvent> {
        match timeout {
            None => self.machine.events.recv().ok(),
            Some(t) => self.machine.events.recv_timeout(t).ok(),
        }
    }

    /// Stops every vCPU thread and the device thread and waits for them; the first thread that
    /// had panicked or failed is the error (each was also reported as a [`VmEvent`]).
    pub fn stop(mut self) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.request_pause();
        }
        let mut first = Ok(());
        for v in &mut self.vcpus {
            if let Err(e) = v.exit() {
                tracing::debug!("{e}");
                first = first.and(Err(e));
            }
        }
        if let Err(e) = self.event_loop.stop() {
            tracing::debug!("{e}");
            first = first.and(Err(e));
        }
        Ok(first?)
    }

    /// Special registers of a paused vCPU.
    pub fn vcpu_sregs(&self, index: u8) -> Result<kvm_sregs, VmError> {
        let vcpu = self.vcpu(index)?;
        vcpu.with_fd(|fd| fd.get_sregs())?
            .map_err(kvm_err("read special registers"))
    }

    fn vcpu(&self, index: u8) -> Result<&VcpuHandle, VmError> {
        self.vcpus
            .get(usize::from(index))
            .ok_or(VmError::Vcpu(VcpuError::Exited(index)))
    }

    /// Counters of each vCPU.
    pub fn vcpu_counters(&self) -> Vec<Arc<VcpuCounters>> {
        self.vcpus.iter().map(|v| v.counters().clone()).collect()
    }
}

impl Machine {
    /// Sends events to the VM's owner and starts threads whose failure ends the VM (the API
    /// server, the epoch loop, signal handling).
    pub fn reporter(&self) -> Reporter {
        self.reporter.clone()
    }

    /// Counters of each disk, in configuration order.
    pub fn block_counters(&self) -> &[Arc<BlockCounters>] {
        &self.devices.block_counters
    }

    /// Counters of each network card, in configuration order.
    pub fn net_counters(&self) -> &[Arc<NetCounters>] {
        &self.devices.net_counters
    }

    /// Pages written since the previous call (KVM's log OR the VMM's own writes), clearing both.
    /// KVM's log is its bitmap, or what the dirty ring logged since the last harvest.
    pub fn take_dirty_pages(&self) -> Result<DirtyPages, VmError> {
        match self.live_dirty() {
            Some(live) => Ok(live.take()?),
            None => Ok(memory::take_dirty(&self.fd, &self.memory)?),
        }
    }

    /// How the guest's writes are tracked.
    pub fn dirty_log(&self) -> DirtyLog {
        match &self.dirty_ring {
            Some(r) => DirtyLog::Ring {
                entries: r.entries(),
            },
            None => DirtyLog::Bitmap,
        }
    }

    /// For a VM built with the dirty ring: a handle that harvests dirty pages while the VM
    /// runs, from any thread (None with the dirty bitmap, which is read paused).
    pub fn live_dirty(&self) -> Option<LiveDirty> {
        let ring = self.dirty_ring.clone()?;
        Some(LiveDirty::new(ring, self.memory.clone()))
    }

    /// Counters of the serial console.
    pub fn serial_counters(&self) -> &Arc<SerialCounters> {
        &self.serial
    }

    /// How the guest was loaded (None for a VM restored from a snapshot).
    pub fn boot(&self) -> Option<&Boot> {
        self.layout.as_ref()
    }

    /// Which blocks of each disk the guest wrote (see [`crate::disk_track`]), in `--disk`
    /// order.
    pub fn disk_trackers(&self) -> &[Arc<crate::disk_track::DiskTracker>] {
        &self.devices.disk_trackers
    }

    /// Tells the network where each of the guest's cards now is, as live migration does:
    /// broadcasts a RARP request from the card's MAC on its TAP (so that bridges and switches
    /// learn the new port); then sends each TCP peer of the guest a probe that it answers
    /// with an acknowledgement, so that connections waiting for one go on at once (see
    /// [`crate::devices::virtio::net::flows`]). Sent through the output gate, which is open on
    /// a VM that has just taken over. Returns how many cards and probes went out.
    pub fn announce(&self) -> std::io::Result<(usize, usize)> {
        let mut probes = 0;
        for (i, ((&sink, net), flows)) in self
            .devices
            .net_sinks
            .iter()
            .zip(&self.saved.nets)
            .zip(&self.devices.net_flows)
            .enumerate()
        {
            let mac = net
                .mac
                .unwrap_or_else(|| crate::devices::virtio::net::default_mac(i));
            self.devices.output.emit(sink, &rarp(mac))?;
            let frames = flows.lock().unwrap_or_else(|p| p.into_inner()).probes();
            for frame in frames {
                self.devices.output.emit(sink, &frame)?;
                probes += 1;
            }
        }
        Ok((self.devices.net_sinks.len(), probes))
    }

    /// What every output of the guest goes through (see [`crate::output`]).
    pub fn output_gate(&self) -> &Arc<crate::output::OutputGate> {
        &self.devices.output
    }

    /// The configuration a snapshot records (memory size, devices), as built.
    pub fn saved_config(&self) -> &SavedConfig {
        &self.saved
    }

    /// The test guest's boot information, read from guest memory (None for other guests).
    pub fn boot_info(&self) -> Option<ftvm_guest_abi::BootInfo> {
        let mut info = ftvm_guest_abi::BootInfo::default();
        // SAFETY: BootInfo is repr(C) plain data made of u64s: every bit pattern is valid.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                (&mut info as *mut ftvm_guest_abi::BootInfo).cast::<u8>(),
                std::mem::size_of::<ftvm_guest_abi::BootInfo>(),
            )
        };
        vm_memory::Bytes::read_slice(
            &self.memory,
            bytes,
            vm_memory::GuestAddress(ftvm_guest_abi::BOOT_INFO_ADDR),
        )
        .ok()?;
        (info.magic == ftvm_guest_abi::BOOT_MAGIC).then_some(info)
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

/// PVM replaces the CPUID a VMM sets with the host's: say so once, since a Linux guest then
/// uses instructions PVM's emulator lacks unless its command line hides them.
fn warn_if_cpuid_overridden(vcpu: &VcpuFd, wanted: &kvm_bindings::CpuId) {
    let Ok(actual) = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES) else {
        return;
    };
    let leaf1 =
        |c: &kvm_bindings::CpuId| c.as_slice().iter().find(|e| e.function == 1).map(|e| e.ecx);
    if let (Some(w), Some(a)) = (leaf1(wanted), leaf1(&actual))
        && a & !w != 0
    {
        tracing::info!(
            wanted = format_args!("{w:#x}"),
            actual = format_args!("{a:#x}"),
            "this KVM (PVM) overrides the guest's CPUID leaf 1 ECX; hidden features stay visible"
        );
    }
}

/// A RARP request ("who is MAC?") broadcast from `mac`: the frame live migration uses to
/// announce a moved card (it needs no IP address).
fn rarp(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]); // to everyone
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0); // the shortest Ethernet frame
    f
}

#[cfg(test)]
mod announce_tests {
    #[test]
    fn a_rarp_request_names_the_card_twice() {
        let mac = [0x06, 1, 2, 3, 4, 5];
        let f = super::rarp(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!((&f[22..28], &f[32..38]), (&mac[..], &mac[..]));
    }
}
