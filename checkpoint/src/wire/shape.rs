//! The machine's shape and the handshake that compares it: a replica can only hold checkpoints
//! of a machine built like its own.

use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;
use vmm::vm::{MachineState, SavedConfig};

use super::{PAGE_SIZE, WireError};
use crate::codec;

const HELLO_MAGIC: [u8; 8] = *b"FTVMHELO";
/// Largest encoded shape accepted in a hello.
const MAX_SHAPE_LEN: usize = 64 << 10;

/// A virtio device's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// virtio-blk.
    Block,
    /// virtio-net.
    Net,
}

/// What must be equal on both ends for a checkpoint of one to fit the other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    /// RAM ranges as (guest physical start, length in bytes), ascending, page-aligned.
    pub ram: Vec<(u64, u64)>,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The virtio devices in the order they are built (disks, then network cards).
    pub devices: Vec<DeviceKind>,
    /// A Linux guest (PIT, i8042, ACPI) rather than the test guest.
    pub linux: bool,
}

impl MachineShape {
    /// The shape of a machine built from `config` with `vcpus` vCPUs.
    pub fn from_config(config: &SavedConfig, vcpus: u32) -> Result<Self, WireError> {
        let ram = vmm::memory::ram_ranges(config.mem_size)
            .map_err(WireError::Layout)?
            .into_iter()
            .map(|(GuestAddress(start), len)| (start, len))
            .collect();
        let devices = config
            .disks
            .iter()
            .map(|_| DeviceKind::Block)
            .chain(config.nets.iter().map(|_| DeviceKind::Net))
            .collect();
        Ok(Self {
            ram,
            vcpus,
            devices,
            linux: config.linux,
        })
    }

    /// The shape of the machine `state` was saved from.
    pub fn of(state: &MachineState) -> Result<Self, WireError> {
        let vcpus = u32::try_from(state.vcpus.len())
            .map_err(|_| WireError::Input("too many vCPUs".into()))?;
        Self::from_config(&state.config, vcpus)
    }

    /// Bytes of RAM.
    pub fn mem_size(&self) -> u64 {
        self.ram.iter().map(|&(_, len)| len).sum()
    }

    /// Number of guest pages.
    pub fn pages(&self) -> u64 {
        self.mem_size() / PAGE_SIZE as u64
    }

    /// Index of the RAM range holding the `count` pages from `gfn`, if one holds them all.
    pub(super) fn range_of(&self, gfn: u64, count: u64) -> Option<usize> {
        let start = gfn.checked_mul(PAGE_SIZE as u64)?;
        let end = gfn.checked_add(count)?.checked_mul(PAGE_SIZE as u64)?;
        self.ram
            .iter()
            .position(|&(s, len)| s <= start && end <= s + len)
    }

    /// What differs from `theirs`, in words; empty when nothing does.
    fn differences(&self, theirs: &MachineShape) -> Vec<String> {
        let mut out = Vec::new();
        if self.ram != theirs.ram {
            out.push(format!(
                "memory {} MiB there, {} MiB here{}",
                theirs.mem_size() >> 20,
                self.mem_size() >> 20,
                if self.mem_size() == theirs.mem_size() {
                    " (laid out differently)"
                } else {
                    ""
                }
            ));
        }
        if self.vcpus != theirs.vcpus {
            out.push(format!("{} vCPUs there, {} here", theirs.vcpus, self.vcpus));
        }
        if self.devices != theirs.devices {
            out.push(format!(
                "devices {} there, {} here",
                names(&theirs.devices),
                names(&self.devices)
            ));
        }
        if self.linux != theirs.linux {
            let guest = |linux| {
                if linux {
                    "a Linux guest"
                } else {
                    "the test guest"
                }
            };
            out.push(format!(
                "{} there, {} here",
                guest(theirs.linux),
                guest(self.linux)
            ));
        }
        out
    }
}

fn names(devices: &[DeviceKind]) -> String {
    let list: Vec<&str> = devices
        .iter()
        .map(|d| match d {
            DeviceKind::Block => "block",
            DeviceKind::Net => "net",
        })
        .collect();
    format!("[{}]", list.join(", "))
}

/// The first message each side sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The sender's protocol version.
    pub protocol: u32,
    /// The sender's machine.
    pub shape: MachineShape,
}

/// Encodes a hello.
pub fn encode_hello(hello: &Hello) -> Result<Vec<u8>, WireError> {
    let shape = codec::encode(&hello.shape).map_err(WireError::Codec)?;
    if shape.len() > MAX_SHAPE_LEN {
        return Err(WireError::Hello("the machine's shape is too large"));
    }
    let mut out = Vec::with_capacity(20 + shape.len());
    out.extend_from_slice(&HELLO_MAGIC);
    out.extend_from_slice(&hello.protocol.to_le_bytes());
    out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
    out.extend_from_slice(&shape);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes a hello. A hello of another protocol version is refused as such before its shape
/// is read (its encoding may differ).
pub fn decode_hello(bytes: &[u8]) -> Result<Hello, WireError> {
    if bytes.len() < 20 {
        return Err(WireError::Hello("too short"));
    }
    if bytes[..8] != HELLO_MAGIC {
        return Err(WireError::Hello("bad magic"));
    }
    let protocol = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if protocol != super::PROTOCOL {
        return Err(WireError::Protocol {
            theirs: protocol,
            ours: super::PROTOCOL,
        });
    }
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap_or_default()) as usize;
    if len > MAX_SHAPE_LEN {
        return Err(WireError::Hello("the shape is too large"));
    }
    if bytes.len() != 16 + len + 4 {
        return Err(WireError::Hello("its length does not match its contents"));
    }
    let (body, crc) = bytes.split_at(16 + len);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(WireError::Hello("checksum mismatch"));
    }
    let shape = codec::decode(&body[16..]).map_err(WireError::Codec)?;
    Ok(Hello { protocol, shape })
}

/// Refuses a peer of another protocol version or another machine shape, saying what differs.
pub fn check_hello(ours: &Hello, theirs: &Hello) -> Result<(), WireError> {
    if ours.protocol != theirs.protocol {
        return Err(WireError::Protocol {
            theirs: theirs.protocol,
            ours: ours.protocol,
        });
    }
    let diff = ours.shape.differences(&theirs.shape);
    if !diff.is_empty() {
        return Err(WireError::Shape(diff.join("; ")));
    }
    Ok(())
}
