//! The contract between ftvm and its ring-3 test guest.
//!
//! The test guest is a `no_std` program that ftvm starts directly in 64-bit mode at CPL 3. Both
//! sides compile this crate, so the boot information layout, the port numbers and the guest's
//! compute kernel can never drift apart.
//!
//! Boot state the VMM sets up for every vCPU:
//! - long mode, paging on, guest memory identity-mapped with 2 MiB user pages (accessed and
//!   dirty bits preset, so the CPU never writes page tables);
//! - CS/SS are DPL-3 flat segments, IF = 0;
//! - CR4.OSFXSR and OSXMMEXCPT set (SSE usable), MXCSR and the x87 control word at reset values;
//! - `rdi` = guest-physical address of [`BootInfo`], `rsi` = the vCPU index,
//!   `rsp` = top of that vCPU's stack minus 8 (the System V entry alignment).
#![no_std]
#![warn(missing_docs)]

pub mod virtio;

/// Guest-physical address of the [`BootInfo`] page.
pub const BOOT_INFO_ADDR: u64 = 0x8000;
/// Guest-physical address of the NUL-free command line (length in [`BootInfo::cmdline_len`]).
pub const CMDLINE_ADDR: u64 = 0x9000;
/// Longest command line the VMM accepts, in bytes.
pub const CMDLINE_MAX: u64 = 0x1000;
/// Lowest guest-physical address at which a test guest's ELF segments may be loaded.
pub const KERNEL_MIN_ADDR: u64 = 0x10_0000;
/// Bytes of stack the VMM gives each vCPU.
pub const STACK_SIZE: u64 = 0x4_0000;

/// `BootInfo::magic`: "FTVMBOOT" in little endian.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"FTVMBOOT");
/// Version of this ABI; the guest refuses to run on another one.
pub const ABI_VERSION: u64 = 2;

/// ELF note that marks a test guest: name `"FTVM"`, type [`ELF_NOTE_TYPE`], a 4-byte descriptor
/// holding [`ABI_VERSION`].
pub const ELF_NOTE_NAME: &[u8] = b"FTVM\0";
/// ELF note type of the ftvm test-guest ABI note.
pub const ELF_NOTE_TYPE: u32 = 0x4654_0001;

// The test guest reaches its devices through MMIO, not port I/O: PVM runs ring-3 guest code
// natively in host ring 3 and does not honour a guest's IOPL, so `in`/`out` at CPL 3 fault
// there. A store to an address with no RAM behind it exits to the VMM on every kind of KVM.

/// The console UART (COM1) as port I/O, for guests that run in ring 0 (Linux).
pub const SERIAL_PORT: u16 = 0x3f8;
/// The same UART's registers in MMIO space (one byte per register), for the test guest.
pub const SERIAL_MMIO: u64 = 0xC000_0000;
/// ftvm's paravirtual control registers (MMIO).
pub const PV_MMIO: u64 = 0xC000_1000;
/// Bytes of MMIO space the paravirtual device decodes.
pub const PV_MMIO_LEN: u64 = 0x10;
/// Offset of the power-off register: write a 32-bit exit status (0 = success).
pub const PV_POWER_OFF: u64 = 0;
/// Offset of the wait register: write a 32-bit number of microseconds to give up the vCPU
/// until that much time has passed or the VMM has something for the guest (ring 3 cannot
/// `hlt`). 0 yields.
pub const PV_WAIT_US: u64 = 4;

/// Maximum number of RAM ranges described in [`BootInfo`].
pub const MAX_MEM_RANGES: usize = 4;
/// Maximum number of virtio devices described in [`BootInfo`].
pub const MAX_VIRTIO: usize = 8;

/// A virtio-mmio device the guest may drive.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Base of its register window.
    pub base: u64,
    /// Device type ([`virtio::ID_BLOCK`], [`virtio::ID_NET`]).
    pub device_type: u64,
    /// Its interrupt line (unused by the polling test guest, given for completeness).
    pub irq: u64,
}

/// A range of guest RAM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRange {
    /// First guest-physical address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What the VMM tells the test guest at boot; at [`BOOT_INFO_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub version: u64,
    /// Number of vCPUs started.
    pub vcpus: u64,
    /// TSC frequency in kHz: the guest's clock.
    pub tsc_khz: u64,
    /// Length of the command line at [`CMDLINE_ADDR`].
    pub cmdline_len: u64,
    /// Base of the per-vCPU stacks; vCPU `i` owns `[stack_base + i*STACK_SIZE, +STACK_SIZE)`.
    pub stack_base: u64,
    /// First byte of RAM that nothing occupies (after the image and the stacks).
    pub free_start: u64,
    /// Number of valid entries in `mem`.
    pub mem_count: u64,
    /// RAM ranges, ascending.
    pub mem: [MemRange; MAX_MEM_RANGES],
    /// Number of valid entries in `virtio`.
    pub virtio_count: u64,
    /// The virtio devices, in the order they were configured.
    pub virtio: [VirtioSlot; MAX_VIRTIO],
}

impl BootInfo {
    /// The configured virtio devices.
    pub fn virtio_devices(&self) -> &[VirtioSlot] {
        &self.virtio[..(self.virtio_count as usize).min(MAX_VIRTIO)]
    }

    /// The structure as bytes, to be written into guest memory.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: BootInfo is repr(C) and made only of u64 fields, so it has no padding and every
        // byte is initialised; the slice borrows `self` for its whole lifetime.
        unsafe {
            core::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                core::mem::size_of::<Self>(),
            )
        }
    }

    /// Whether `[addr, addr + len)` lies in free RAM (after `free_start`, inside one range).
    pub fn is_free(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        addr >= self.free_start
            && self.mem[..(self.mem_count as usize).min(MAX_MEM_RANGES)]
                .iter()
                .any(|r| addr >= r.start && end <= r.start + r.len)
    }

    /// The stack range `[start, end)` of vCPU `index`.
    pub fn stack(&self, index: u64) -> (u64, u64) {
        let start = self.stack_base + index * STACK_SIZE;
        (start, start + STACK_SIZE)
    }
}

/// The guest's `compute` workload: `iterations` rounds of xorshift64 folded into a sum.
///
/// The host runs the very same function to compare speeds, so the guest's rate can be checked
/// against native execution.
#[inline(never)]
pub fn compute(iterations: u64, seed: u64) -> u64 {
    let mut x = seed | 1;
    let mut acc = 0u64;
    for _ in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = acc.wrapping_add(x);
    }
    acc
}

/// The 64-bit word at `index` of the deterministic byte stream numbered `seed`: what the
/// guest's disk and network workloads write and send, so the host can check every byte.
pub fn pattern_word(seed: u64, index: u64) -> u64 {
    // splitmix64 of (seed, index).
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(index.wrapping_add(1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with bytes `offset..` of the pattern stream `seed`.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let pos = offset + i as u64;
        let word = pattern_word(seed, pos / 8).to_le_bytes();
        let k = (pos % 8) as usize;
        let n = (8 - k).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[k..k + n]);
        i += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_has_no_padding() {
        assert_eq!(
            core::mem::size_of::<BootInfo>(),
            8 * 8 + 16 * MAX_MEM_RANGES + 8 + 24 * MAX_VIRTIO
        );
        let info = BootInfo {
            magic: BOOT_MAGIC,
            ..Default::default()
        };
        assert_eq!(&info.as_bytes()[..8], b"FTVMBOOT");
    }

    #[test]
    fn free_ranges_respect_free_start_and_holes() {
        let mut info = BootInfo {
            free_start: 0x40_0000,
            mem_count: 2,
            ..Default::default()
        };
        info.mem[0] = MemRange {
            start: 0,
            len: 0xC000_0000,
        };
        info.mem[1] = MemRange {
            start: 0x1_0000_0000,
            len: 0x1000_0000,
        };
        assert!(info.is_free(0x40_0000, 0x1000));
        assert!(!info.is_free(0x3f_f000, 0x1000), "below free_start");
        assert!(!info.is_free(0xBFFF_F000, 0x2000), "crosses into the hole");
        assert!(info.is_free(0x1_0000_0000, 0x1000));
        assert!(!info.is_free(0x1_1000_0000, 1), "past the end");
        assert!(!info.is_free(u64::MAX, 2), "overflow");
    }

    #[test]
    fn the_pattern_is_a_function_of_seed_and_offset() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 32];
        fill_pattern(3, 0, &mut a);
        fill_pattern(3, 32, &mut b);
        assert_eq!(&a[32..], &b[..]);
        let mut odd = [0u8; 13];
        fill_pattern(3, 5, &mut odd);
        assert_eq!(
            &a[5..18],
            &odd[..],
            "unaligned offsets continue the same stream"
        );
        let mut c = [0u8; 64];
        fill_pattern(4, 0, &mut c);
        assert_ne!(a, c);
        assert_ne!(&a[..8], &a[8..16]);
    }

    #[test]
    fn compute_is_deterministic_and_depends_on_input() {
        assert_eq!(compute(1000, 7), compute(1000, 7));
        assert_ne!(compute(1000, 7), compute(1001, 7));
    }
}
