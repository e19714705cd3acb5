//! Saved state of the VMM's own devices.

use serde::{Deserialize, Serialize};

/// A device's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// A device with nothing to save (the paravirtual control block, i8042, ACPI PM).
    Stateless,
    /// The 16550 UART.
    Serial(SerialState),
    /// A virtio-mmio transport and its device.
    Virtio(VirtioState),
}

/// The UART's registers (vm-superio's `SerialState`, as plain serialisable data).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not read by the guest.
    pub in_buffer: Vec<u8>,
}

/// One split virtqueue (virtio-queue's `QueueState`, as plain serialisable data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Largest size.
    pub max_size: u16,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// Ready bit.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(q: virtio_queue::QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueState> for virtio_queue::QueueState {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// What a virtio device itself was to the guest (its transport and queues are saved in
/// [`VirtioState`]); checked against the device it is restored into.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// A disk.
    Block {
        /// Capacity in sectors, as the guest was told.
        sectors: u64,
        /// Whether the guest was told it is read-only.
        read_only: bool,
    },
    /// A network card.
    Net {
        /// Its MAC address, as the guest was told.
        mac: [u8; 6],
        /// The guest's TCP connections on it (see [`crate::devices::virtio::net::flows`]).
        flows: Vec<crate::devices::virtio::net::flows::TcpFlow>,
    },
}

/// A virtio-mmio transport: its registers, its device's queues and the device's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// Device type (checked against the device being restored).
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Feature word selectors and the driver's features.
    pub device_features_sel: u32,
    /// Driver feature word selector.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Selected queue.
    pub queue_sel: u32,
    /// Pending interrupt causes.
    pub interrupt_status: u32,
    /// Whether the device was started.
    pub activated: bool,
    /// The queues as the transport holds them (before activation) or the device uses them.
    pub queues: Vec<QueueState>,
    /// The device's own state.
    pub device: VirtioDeviceState,
}
