//! Where each target puts things in guest memory, shared with the seed generator so that
//! hand-made seeds match what the targets expect.

use crate::QueueLayout;

/// virtio-blk: the input is copied to guest address 0; the queue's tables live in it.
pub mod blk {
    use super::QueueLayout;

    /// Guest memory size.
    pub const MEM: usize = 1 << 20;
    /// Input bytes beyond this are ignored.
    pub const INPUT_MAX: usize = 0x1_0000;
    /// The request queue: descriptors and available ring from the input, used ring outside it.
    pub const QUEUE: QueueLayout = QueueLayout {
        desc: 0x0,
        avail: 0x100,
        used: 0xF_0000,
        size: 16,
    };
    /// Disk image size (128 sectors).
    pub const DISK_LEN: usize = 64 << 10;
}

/// virtio-net: a header (flags, lengths of the frames the host sends), then bytes copied to
/// guest address 0.
pub mod net {
    use super::QueueLayout;

    /// Guest memory size.
    pub const MEM: usize = 1 << 20;
    /// Input header: flags u8, then `MAX_RX_FRAMES` frame lengths (u16 little endian).
    pub const HEADER: usize = 1 + 2 * MAX_RX_FRAMES;
    /// Frames the backend offers at most.
    pub const MAX_RX_FRAMES: usize = 4;
    /// Flag: process the receive queue before the transmit queue.
    pub const FLAG_RX_FIRST: u8 = 1;
    /// Flag: the backend refuses every frame sent (as a TAP that is down).
    pub const FLAG_SEND_FAILS: u8 = 2;
    /// Input bytes beyond this (after the header) are ignored.
    pub const INPUT_MAX: usize = 0x1_0000;
    /// Receive queue.
    pub const RX: QueueLayout = QueueLayout {
        desc: 0x0,
        avail: 0x100,
        used: 0xF_0000,
        size: 16,
    };
    /// Transmit queue.
    pub const TX: QueueLayout = QueueLayout {
        desc: 0x200,
        avail: 0x300,
        used: 0xF_1000,
        size: 16,
    };
}

/// snapshot_reader: a control byte, then the snapshot file.
pub mod snapshot {
    /// Control bit: recompute the header's CRC so that mutations reach the state and memory.
    pub const FIX_CRC: u8 = 1;
    /// Control bit: set memory_len to what the file holds after the state.
    pub const FIX_MEMORY_LEN: u8 = 2;
    /// RAM shape the memory section is filled into: (start, bytes).
    pub const RAM: [(u64, usize); 2] = [(0, 64 << 10), (1 << 32, 16 << 10)];
}

/// kernel_loader: a control byte, then the image.
pub mod kernel {
    /// Control bits 0..1: number of vCPUs - 1.
    pub const VCPUS_MASK: u8 = 3;
    /// Control bit: pass an initrd (the image's last quarter).
    pub const WITH_INITRD: u8 = 4;
    /// Control bit: pass a long command line instead of the default.
    pub const LONG_CMDLINE: u8 = 8;
    /// Control bit: pass two virtio devices.
    pub const WITH_VIRTIO: u8 = 16;
    /// Guest RAM size (the smallest ftvm builds).
    pub const MEM: u64 = 16 << 20;
}
