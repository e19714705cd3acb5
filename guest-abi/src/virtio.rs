//! The virtio-mmio (virtio 1.x, "modern") numbers both sides use: register offsets, status and
//! feature bits, device types, and the block and network request formats.

/// First device window; device `i` is at `MMIO_BASE + i * MMIO_STRIDE`.
pub const MMIO_BASE: u64 = 0xD000_0000;
/// Size of one device window.
pub const MMIO_STRIDE: u64 = 0x1000;
/// Interrupt line (GSI) of device 0; device `i` uses `FIRST_IRQ + i`.
pub const FIRST_IRQ: u32 = 5;

/// Register offsets.
pub mod reg {
    /// "virt" in little endian.
    pub const MAGIC: u64 = 0x000;
    /// 2 for virtio 1.x.
    pub const VERSION: u64 = 0x004;
    /// Device type.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// Device features, 32 bits selected by `DEVICE_FEATURES_SEL`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Selects the word of `DEVICE_FEATURES`.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver features, 32 bits selected by `DRIVER_FEATURES_SEL`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Selects the word of `DRIVER_FEATURES`.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selects the queue the queue registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest size of the selected queue.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size the driver chose for the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Whether the selected queue is ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Write a queue index to notify the device.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt causes.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Write to acknowledge interrupt causes.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low word.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high word.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low word.
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// Available ring address, high word.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Used ring address, low word.
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Used ring address, high word.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Changes whenever the configuration space changes.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// `reg::MAGIC` value.
pub const MAGIC: u32 = 0x7472_6976;
/// `reg::VERSION` value for modern devices.
pub const VERSION: u32 = 2;
/// `reg::VENDOR_ID` of ftvm's devices ("FTVM" would not fit the convention; any value works).
pub const VENDOR_ID: u32 = 0x4654_564d;

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from.
    pub const NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// Feature bit: virtio 1.x.
pub const F_VERSION_1: u64 = 1 << 32;
/// Block feature bit: the device is read-only.
pub const BLK_F_RO: u64 = 1 << 5;
/// Block feature bit: flush is supported.
pub const BLK_F_FLUSH: u64 = 1 << 9;
/// Network feature bit: the device has a MAC address in its configuration.
pub const NET_F_MAC: u64 = 1 << 5;

/// Device type of a network card.
pub const ID_NET: u32 = 1;
/// Device type of a block device.
pub const ID_BLOCK: u32 = 2;

/// Block request: read.
pub const BLK_T_IN: u32 = 0;
/// Block request: write.
pub const BLK_T_OUT: u32 = 1;
/// Block request: flush.
pub const BLK_T_FLUSH: u32 = 4;
/// Block request: device id string.
pub const BLK_T_GET_ID: u32 = 8;
/// Block status: done.
pub const BLK_S_OK: u8 = 0;
/// Block status: I/O error or invalid request.
pub const BLK_S_IOERR: u8 = 1;
/// Block status: unsupported request.
pub const BLK_S_UNSUPP: u8 = 2;
/// Size of a block request header (type, reserved, sector).
pub const BLK_HEADER_LEN: u32 = 16;
/// Length of the id string a GET_ID request returns.
pub const BLK_ID_LEN: usize = 20;
/// Sector size of the block protocol.
pub const SECTOR_SIZE: u64 = 512;

/// Size of the virtio-net header in front of every frame (virtio 1.x, with num_buffers).
pub const NET_HDR_LEN: usize = 12;
/// Queue index of the receive queue.
pub const NET_RX_QUEUE: u16 = 0;
/// Queue index of the transmit queue.
pub const NET_TX_QUEUE: u16 = 1;

/// Descriptor flag: the buffer continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
