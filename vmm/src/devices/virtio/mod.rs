//! Virtio devices over the virtio-mmio transport (virtio 1.x).
//!
//! The transport ([`mmio::MmioTransport`]) sits on the MMIO bus and does feature negotiation
//! and queue set-up; when the driver sets DRIVER_OK it hands the queues to the device. Devices
//! process their queues on the device event-loop thread (see `crate::event_loop`), woken by
//! ioeventfds, and interrupt the guest through irqfd.

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_driver;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Interrupt status bit: a used ring was updated.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Something to call when a device has news for the guest: wakes vCPUs parked in the test
/// guest's wait.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// A device's interrupt: the status register the transport exposes, and the irqfd.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    waker: Waker,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`, also calling `waker`.
    pub fn new(irqfd: EventFd, waker: Waker) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
            waker,
        }
    }

    /// Tells the guest that a used ring changed.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
        (self.waker)();
    }

    /// Pending causes.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears acknowledged causes.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the pending causes (restoring a snapshot).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer queues than the device needs, or invalid ones.
    #[error("Queue {0} is not ready or not valid")]
    BadQueue(usize),
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device type.
    fn device_type(&self) -> u32;
    /// Largest size of each of its queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn features(&self) -> u64;
    /// Reads its configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Starts the device with the negotiated features and the queues the driver set up.
    fn activate(&mut self, features: u64, queues: Vec<Queue>) -> Result<(), ActivateError>;
    /// Stops the device and forgets its queues (the driver reset it).
    fn reset(&mut self);
    /// The device's live queues (empty before activation).
    fn queue_states(&self) -> Vec<virtio_queue::QueueState>;
    /// What the device was to the guest, saved with its transport.
    fn save_state(&self) -> crate::state::VirtioDeviceState;
    /// Checks that this device can stand in for the saved one (same kind, same capacity or
    /// address); changes nothing.
    fn check_state(
        &self,
        state: &crate::state::VirtioDeviceState,
    ) -> Result<(), crate::state::StateError>;
    /// Checks the saved state as [`Self::check_state`] does and takes what of it the device
    /// keeps itself (a card's TCP connections); by default only checks.
    fn load_state(
        &mut self,
        state: &crate::state::VirtioDeviceState,
    ) -> Result<(), crate::state::StateError> {
        self.check_state(state)
    }
}

/// Copies `src` (a device's configuration bytes) into `data` from `offset`, zero-filling what
/// lies beyond it.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(avail) = src.get(start..) {
        let n = avail.len().min(data.len());
        data[..n].copy_from_slice(&avail[..n]);
    }
}
