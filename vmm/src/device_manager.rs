//! Builds the virtio devices of a VM: MMIO windows, interrupts (irqfd), queue notifications
//! (ioeventfd), the transports on the MMIO bus and the devices' event-loop handlers.

use std::sync::{Arc, Mutex, RwLock};

use ftvm_guest_abi::VirtioSlot;
use ftvm_guest_abi::virtio::{FIRST_IRQ, MMIO_BASE, MMIO_STRIDE, reg};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Bus, MmioAddress};
use crate::devices::virtio::block::{Block, BlockConfig, BlockCounters, BlockError, BlockHandler};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{
    Net, NetConfig, NetCounters, NetHandler, Tap, TapError, default_mac,
};
use crate::devices::virtio::{Interrupt, VirtioDevice, Waker};
use crate::disk_track::DiskTracker;
use crate::event_loop::EventHandler;
use crate::memory::GuestMemoryMmap;
use crate::output::OutputGate;
use crate::vcpu::VcpuWaker;

/// Errors of setting up devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd for a device")]
    EventFd(#[source] std::io::Error),
    /// KVM refused an irqfd or ioeventfd.
    #[error("KVM refused to {what} for virtio device {index}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The device's index.
        index: usize,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The device window is already taken.
    #[error("Cannot place virtio device {0} on the MMIO bus")]
    Bus(usize, #[source] crate::bus::BusError),
    /// A disk could not be opened.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A TAP device could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// The vCPUs a device interrupt should wake (filled in when the vCPUs start).
#[derive(Default)]
pub struct Wakers(RwLock<Vec<VcpuWaker>>);

impl Wakers {
    /// Sets the vCPUs to wake.
    pub fn set(&self, wakers: Vec<VcpuWaker>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = wakers;
    }

    fn wake_all(&self) {
        for w in self.0.read().unwrap_or_else(|p| p.into_inner()).iter() {
            w.wake();
        }
    }
}

/// The virtio devices of a VM, before and after start.
#[derive(Default)]
pub struct DeviceManager {
    /// What the test guest is told about each device.
    pub slots: Vec<VirtioSlot>,
    /// Event-loop handlers, taken when the loop starts.
    pub handlers: Vec<Box<dyn EventHandler>>,
    /// Counters of each disk, in `--disk` order.
    pub block_counters: Vec<Arc<BlockCounters>>,
    /// Counters of each network card, in `--net` order.
    pub net_counters: Vec<Arc<NetCounters>>,
    /// Who device interrupts wake.
    pub wakers: Arc<Wakers>,
    /// What every output of the guest (network frames, console bytes) goes through.
    pub output: Arc<OutputGate>,
    /// Which blocks the guest wrote, per disk in `--disk` order.
    pub disk_trackers: Vec<Arc<DiskTracker>>,
    /// Each network card's sink in the output gate, in `--net` order.
    pub net_sinks: Vec<usize>,
    /// Each network card's TCP connections, in `--net` order.
    pub net_flows: Vec<Arc<Mutex<crate::devices::virtio::net::flows::FlowTable>>>,
}

impl DeviceManager {
    /// Window, interrupt line and notification eventfds for the next device.
    fn wire(
        &self,
        vm: &VmFd,
        queues: usize,
    ) -> Result<(u64, u32, Interrupt, Vec<EventFd>), DeviceError> {
        let index = self.slots.len();
        let base = MMIO_BASE + MMIO_STRIDE * index as u64;
        let irq = FIRST_IRQ + index as u32;
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd);
        let irqfd = evt()?;
        vm.register_irqfd(&irqfd, irq)
            .map_err(|source| DeviceError::Kvm {
                what: "connect the interrupt",
                index,
                source,
            })?;
        let mut notify = Vec::new();
        for q in 0..queues {
            let e = evt()?;
            let addr = IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY);
            vm.register_ioevent(&e, &addr, q as u32)
                .map_err(|source| DeviceError::Kvm {
                    what: "register a queue notification",
                    index,
                    source,
                })?;
            notify.push(e);
        }
        let wakers = self.wakers.clone();
        let waker: Waker = Arc::new(move || wakers.wake_all());
        Ok((base, irq, Interrupt::new(irqfd, waker), notify))
    }

    fn place(
        &mut self,
        mmio: &mut Bus<MmioAddress>,
        mem: &GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        wiring: (u64, u32, Arc<Interrupt>, Vec<EventFd>),
    ) -> Result<(), DeviceError> {
        let (base, irq, interrupt, notify) = wiring;
        let index = self.slots.len();
        let device_type = device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .device_type();
        let transport = MmioTransport::new(device, interrupt, mem.clone(), notify);
        mmio.insert(
            MmioAddress(base),
            MMIO_STRIDE,
            Arc::new(Mutex::new(transport)),
        )
        .map_err(|e| DeviceError::Bus(index, e))?;
        self.slots.push(VirtioSlot {
            base,
            device_type: u64::from(device_type),
            irq: u64::from(irq),
        });
        Ok(())
    }

    /// Adds a virtio-blk device for `config`.
    pub fn add_block(
        &mut self,
        vm: &VmFd,
        mmio: &mut Bus<MmioAddress>,
        mem: &GuestMemoryMmap,
        config: BlockConfig,
    ) -> Result<(), DeviceError> {
        let (base, irq, interrupt, notify) = self.wire(vm, 1)?;
        let interrupt = Arc::new(interrupt);
        let block = Block::new(config, mem.clone(), interrupt.clone())?;
        self.block_counters.push(block.counters());
        self.disk_trackers.push(block.tracker());
        let block = Arc::new(Mutex::new(block));
        let queue_evt = notify[0].try_clone().map_err(DeviceError::EventFd)?;
        self.handlers.push(Box::new(BlockHandler {
            device: block.clone(),
            queue_evt,
        }));
        self.place(mmio, mem, block, (base, irq, interrupt, notify))
    }

    /// Adds a virtio-net device for `config`, attached to its TAP.
    pub fn add_net(
        &mut self,
        vm: &VmFd,
        mmio: &mut Bus<MmioAddress>,
        mem: &GuestMemoryMmap,
        config: NetConfig,
    ) -> Result<(), DeviceError> {
        let tap = Tap::open(&config.tap)?;
        let tap_fd = std::os::fd::AsRawFd::as_raw_fd(&tap);
        let mac = config
            .mac
            .unwrap_or_else(|| default_mac(self.net_counters.len()));
        let (base, irq, interrupt, notify) = self.wire(vm, 2)?;
        let interrupt = Arc::new(interrupt);
        // Frames leave through the output gate, on a descriptor of their own.
        let writer = tap.writer().map_err(DeviceError::EventFd)?;
        let name = format!("TAP {}", tap.name());
        let sink = self.output.add_sink(&name, Box::new(writer), false);
        self.net_sinks.push(sink);
        let room = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        self.output
            .add_waiter(room.try_clone().map_err(DeviceError::EventFd)?);
        let mut net = Net::new(tap, mac, mem.clone(), interrupt.clone());
        net.set_output(self.output.clone(), sink);
        self.net_counters.push(net.counters());
        self.net_flows.push(net.flows());
        let net = Arc::new(Mutex::new(net));
        let clone = |i: usize| notify[i].try_clone().map_err(DeviceError::EventFd);
        self.handlers.push(Box::new(NetHandler {
            device: net.clone(),
            rx_evt: clone(0)?,
            tx_evt: clone(1)?,
            tap_fd,
            room,
        }));
        self.place(mmio, mem, net, (base, irq, interrupt, notify))
    }
}
