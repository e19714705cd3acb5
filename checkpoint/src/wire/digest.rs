//! A test mode that proves replication exact: with `FTVM_TEST_EPOCH_DIGESTS=1` in its
//! environment, the primary logs a digest of memory and machine state as captured in each
//! epoch's pause, and the replica logs one of what it committed for that epoch; a test
//! compares the two logs epoch by epoch. Reading all of memory in every pause is slow: never
//! for production.

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vmm::memory::GuestMemoryMmap;
use vmm::vm::MachineState;

use super::WireError;
use crate::codec;

/// The environment variable that turns the digests on.
pub const DIGEST_ENV: &str = "FTVM_TEST_EPOCH_DIGESTS";

/// Whether this process logs epoch digests.
pub fn digests_enabled() -> bool {
    std::env::var_os(DIGEST_ENV).is_some_and(|v| v == "1")
}

/// CRC-32 of every byte of `memory`, region by region.
pub fn memory_digest(memory: &GuestMemoryMmap) -> Result<u32, WireError> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for region in memory.iter() {
        let mut at = region.start_addr();
        let end = at.0 + region.len();
        while at.0 < end {
            let n = buf.len().min((end - at.0) as usize);
            memory
                .read_slice(&mut buf[..n], at)
                .map_err(|source| WireError::Memory { addr: at.0, source })?;
            crc.update(&buf[..n]);
            at = vm_memory::GuestAddress(at.0 + n as u64);
        }
    }
    Ok(crc.finalize())
}

/// The digest of an image: memory's CRC (see [`memory_digest`]) and the CRC of the state's
/// encoding, as `mmmmmmmm-ssssssss`.
pub fn image_digest(memory_crc: u32, state: &MachineState) -> Result<String, WireError> {
    let state = codec::encode(state).map_err(WireError::Codec)?;
    Ok(format!("{memory_crc:08x}-{:08x}", crc32fast::hash(&state)))
}
