//! Assembling a machine: KVM VM, irqchip (and PIT), memory, vCPUs, buses and devices. Shared by
//! a fresh boot and a restore, so both build the same machine.

use std::io::Write;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use ftvm_guest_abi::{PV_MMIO, PV_MMIO_LEN, SERIAL_MMIO, SERIAL_PORT};
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{Machine, SavedConfig, Vm, VmError, VmEvent, kvm_err};
use crate::acpi::pm;
use crate::boot::Boot;
use crate::bus::{Bus, MmioAddress, PioAddress, SharedDevice};
use crate::device_manager::DeviceManager;
use crate::devices::legacy::{AcpiPm, I8042, I8042_PORT, I8042_PORT_LEN};
use crate::devices::pvctl::PvControl;
use crate::devices::serial::{
    ConsoleOut, SERIAL_IRQ, SERIAL_PORT_LEN, SerialConsole, SerialCounters,
};
use crate::dirty_ring::{self, DirtyLog, DirtyRing};
use crate::event::Reporter;
use crate::memory::{self, GuestMemoryMmap};
use crate::vcpu::VcpuCounters;

/// The pieces of a machine before its guest is loaded or restored.
pub(super) struct Parts {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub memory: GuestMemoryMmap,
    pub vcpu_fds: Vec<VcpuFd>,
    pub dirty_ring: Option<Arc<DirtyRing>>,
    pub pio: Bus<PioAddress>,
    pub mmio: Bus<MmioAddress>,
    pub devices: DeviceManager,
    pub serial: Arc<SerialCounters>,
    pub console: ConsoleOut,
    pub events_tx: Sender<VmEvent>,
    pub events: Receiver<VmEvent>,
}

impl Parts {
    /// The finished VM, not started.
    pub(super) fn into_vm(self, layout: Option<Boot>, saved: SavedConfig) -> Vm {
        Vm {
            vcpu_counters: self
                .vcpu_fds
                .iter()
                .map(|_| Arc::new(VcpuCounters::default()))
                .collect(),
            vcpu_fds: self.vcpu_fds,
            machine: Machine {
                devices: self.devices,
                reporter: Reporter::new(self.events_tx),
                events: self.events,
                pio: Arc::new(self.pio),
                mmio: Arc::new(self.mmio),
                serial: self.serial,
                console: self.console,
                layout,
                saved,
                dirty_ring: self.dirty_ring,
                fd: self.fd,
                memory: self.memory,
                kvm: self.kvm,
            },
        }
    }
}

/// Builds the machine `config` describes: a Linux guest also gets the PIT and the legacy
/// devices Linux uses. KVM's dirty bitmap tracks the guest's writes.
pub(super) fn build(
    vcpus: u8,
    ram: &[(GuestAddress, u64)],
    config: &SavedConfig,
    console: Box<dyn Write + Send>,
    mapped: Option<GuestMemoryMmap>,
) -> Result<Parts, VmError> {
    build_with(vcpus, ram, config, console, mapped, DirtyLog::Bitmap)
}

/// [`build`], with the guest's writes tracked as `log` says.
pub(super) fn build_with(
    vcpus: u8,
    ram: &[(GuestAddress, u64)],
    config: &SavedConfig,
    console: Box<dyn Write + Send>,
    mapped: Option<GuestMemoryMmap>,
    log: DirtyLog,
) -> Result<Parts, VmError> {
    let linux = config.linux;
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let max = kvm.get_max_vcpus();
    if usize::from(vcpus) > max {
        return Err(VmError::VcpuCount {
            count: u64::from(vcpus),
            max: max as u64,
        });
    }
    let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    // The ring can only be turned on before any vCPU exists.
    if let DirtyLog::Ring { entries } = log {
        dirty_ring::enable(&fd, entries).map_err(memory::MemoryError::from)?;
    }
    fd.create_irq_chip()
        .map_err(kvm_err("create the interrupt controller"))?;
    if linux {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
    }
    let memory = match mapped {
        Some(m) => {
            let ranges: Vec<_> = m.iter().map(|r| (r.start_addr(), r.len())).collect();
            if ranges != ram {
                return Err(VmError::LoadMemory(
                    "the mapped memory differs from the machine's RAM".into(),
                ));
            }
            memory::register(&fd, m)?
        }
        None => memory::create(&fd, ram)?,
    };
    let mut vcpu_fds = Vec::new();
    for i in 0..vcpus {
        vcpu_fds.push(
            fd.create_vcpu(u64::from(i))
                .map_err(kvm_err("create a vCPU"))?,
        );
    }
    let dirty_ring = match log {
        DirtyLog::Bitmap => None,
        DirtyLog::Ring { entries } => {
            let pages = memory.iter().map(|r| r.len() / memory::PAGE_SIZE).collect();
            let ring = DirtyRing::new(&fd, &vcpu_fds, entries, pages)
                .map_err(memory::MemoryError::from)?;
            Some(Arc::new(ring))
        }
    };

    let mut mmio = Bus::new();
    let mut devices = DeviceManager::default();
    for disk in &config.disks {
        devices.add_block(&fd, &mut mmio, &memory, disk.clone())?;
    }
    for net in &config.nets {
        devices.add_net(&fd, &mut mmio, &memory, net.clone())?;
    }

    let (events_tx, events) = channel();
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Device {
        what: "serial console interrupt",
        source,
    })?;
    fd.register_irqfd(&irq, SERIAL_IRQ)
        .map_err(kvm_err("connect the serial interrupt"))?;
    let console = SerialConsole::new(irq, console, &devices.output);
    let serial = console.counters();
    let console_out = console.output();
    // One UART, reachable both as COM1 (ring-0 guests) and through MMIO (the test guest).
    let console: SharedDevice = Arc::new(Mutex::new(console));
    let mut pio = Bus::new();
    pio.insert(PioAddress(SERIAL_PORT), SERIAL_PORT_LEN, console.clone())?;
    mmio.insert(MmioAddress(SERIAL_MMIO), SERIAL_PORT_LEN, console)?;
    mmio.insert(
        MmioAddress(PV_MMIO),
        PV_MMIO_LEN,
        Arc::new(Mutex::new(PvControl::new(events_tx.clone()))),
    )?;
    if linux {
        pio.insert(
            PioAddress(I8042_PORT),
            I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
        )?;
        pio.insert(
            PioAddress(pm::PM_PORT),
            pm::PM_PORT_LEN,
            Arc::new(Mutex::new(AcpiPm::new(events_tx.clone()))),
        )?;
    }
    Ok(Parts {
        kvm,
        fd,
        memory,
        vcpu_fds,
        dirty_ring,
        pio,
        mmio,
        devices,
        serial,
        console: console_out,
        events_tx,
        events,
    })
}
