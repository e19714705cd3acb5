//! Port-I/O and MMIO buses: non-overlapping address ranges mapped to devices.
//!
//! One bus per address space; the address types differ so that a port can never be looked up
//! on the MMIO bus. A device sees only the offset into its own range.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::state::{DeviceState, StateError};

/// What a device asks of the vCPU that performed an access, beyond completing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuAction {
    /// Nothing: carry on running the guest.
    Continue,
    /// Give up the vCPU until the duration passes or the VMM wakes it (the guest's idle wait).
    Wait(Duration),
    /// Stop running this vCPU until the VMM resumes or ends it (the machine is powering off).
    Halt,
}

/// A device on a bus. Accesses arrive with the offset into the device's range.
///
/// Saving state is part of the same trait so that no device can be forgotten: one that does
/// not implement it makes a snapshot fail with its type's name, never save nothing.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction;
    /// The device's state (the machine is paused).
    fn save(&self) -> Result<DeviceState, StateError> {
        Err(StateError::NotSaveable(std::any::type_name::<Self>()))
    }
    /// Loads `state` (untrusted) into a device built with the same configuration.
    fn restore(&mut self, _state: &DeviceState) -> Result<(), StateError> {
        Err(StateError::NotSaveable(std::any::type_name::<Self>()))
    }
}

/// An address on one bus.
pub trait BusAddress: Copy + Ord + fmt::Display {
    /// The address as a number.
    fn raw(self) -> u64;
}

/// An I/O port number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PioAddress(pub u16);

/// A guest-physical MMIO address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MmioAddress(pub u64);

impl BusAddress for PioAddress {
    fn raw(self) -> u64 {
        u64::from(self.0)
    }
}

impl BusAddress for MmioAddress {
    fn raw(self) -> u64 {
        self.0
    }
}

impl fmt::Display for PioAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "port {:#x}", self.0)
    }
}

impl fmt::Display for MmioAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MMIO {:#x}", self.0)
    }
}

/// Errors of bus set-up and dispatch.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a registered one.
    #[error("Range {start:#x}+{len:#x} overlaps the device at {other_start:#x}+{other_len:#x}")]
    Overlap {
        /// Start of the refused range.
        start: u64,
        /// Length of the refused range.
        len: u64,
        /// Start of the range it overlaps.
        other_start: u64,
        /// Length of the range it overlaps.
        other_len: u64,
    },
    /// A zero-length range or one that wraps around the address space.
    #[error("Range {start:#x}+{len:#x} is empty or wraps around")]
    BadRange {
        /// Start of the refused range.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// No device decodes this address.
    #[error("No device at {0:#x}")]
    Unmapped(u64),
}

/// A device shared between the bus and whoever else holds it (the VM, for saving state).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A bus: ranges of addresses of type `A`, each routed to one device.
pub struct Bus<A: BusAddress> {
    ranges: BTreeMap<A, Entry>,
}

impl<A: BusAddress> Default for Bus<A> {
    fn default() -> Self {
        Self {
            ranges: BTreeMap::new(),
        }
    }
}

impl<A: BusAddress> Bus<A> {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes `[start, start + len)` to `device`. Refuses empty, wrapping and overlapping ranges.
    pub fn insert(&mut self, start: A, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let bad = BusError::BadRange {
            start: start.raw(),
            len,
        };
        let end = start.raw().checked_add(len).ok_or(bad.clone())?;
        if len == 0 {
            return Err(bad);
        }
        // The nearest range at or below `end - 1` is the only one that can overlap.
        let below_end = self.ranges.iter().take_while(|(s, _)| s.raw() < end).last();
        if let Some((s, e)) = below_end
            && s.raw() + e.len > start.raw()
        {
            return Err(BusError::Overlap {
                start: start.raw(),
                len,
                other_start: s.raw(),
                other_len: e.len,
            });
        }
        self.ranges.insert(start, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: A) -> Result<(u64, &SharedDevice), BusError> {
        let (start, entry) = self
            .ranges
            .range(..=addr)
            .next_back()
            .ok_or(BusError::Unmapped(addr.raw()))?;
        let offset = addr.raw() - start.raw();
        if offset >= entry.len {
            return Err(BusError::Unmapped(addr.raw()));
        }
        Ok((offset, &entry.device))
    }

    /// Routes a read at `addr` to its device.
    pub fn read(&self, addr: A, data: &mut [u8]) -> Result<(), BusError> {
        let (offset, device) = self.find(addr)?;
        lock(device).read(offset, data);
        Ok(())
    }

    /// Every device with its start address, in address order.
    pub fn devices(&self) -> impl Iterator<Item = (A, &SharedDevice)> {
        self.ranges.iter().map(|(a, e)| (*a, &e.device))
    }

    /// Routes a write at `addr` to its device.
    pub fn write(&self, addr: A, data: &[u8]) -> Result<VcpuAction, BusError> {
        let (offset, device) = self.find(addr)?;
        Ok(lock(device).write(offset, data))
    }
}

/// Locks a device, carrying on if a previous holder panicked: device state is plain data and a
/// panicked access must not take the whole VM down with it.
pub fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the accesses it sees.
    #[derive(Default)]
    struct Recorder {
        seen: Vec<(char, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
            self.seen.push(('r', offset, data.to_vec()));
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
            self.seen.push(('w', offset, data.to_vec()));
            VcpuAction::Continue
        }
    }

    fn recorder() -> (Arc<Mutex<Recorder>>, SharedDevice) {
        let r = Arc::new(Mutex::new(Recorder::default()));
        let d: SharedDevice = r.clone();
        (r, d)
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(PioAddress(0x3f8), 8, recorder().1).unwrap();
        for (start, len) in [
            (0x3f8, 8),
            (0x3f0, 9),
            (0x3ff, 1),
            (0x3fa, 2),
            (0x3f0, 0x20),
        ] {
            let err = bus
                .insert(PioAddress(start), len, recorder().1)
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    BusError::Overlap {
                        other_start: 0x3f8,
                        other_len: 8,
                        ..
                    }
                ),
                "{start:#x}+{len} gave {err:?}"
            );
        }
        // Adjacent ranges on both sides are fine.
        bus.insert(PioAddress(0x3f0), 8, recorder().1).unwrap();
        bus.insert(PioAddress(0x400), 1, recorder().1).unwrap();
    }

    #[test]
    fn empty_and_wrapping_ranges_are_refused() {
        let mut bus = Bus::new();
        assert!(matches!(
            bus.insert(MmioAddress(0x1000), 0, recorder().1),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(MmioAddress(u64::MAX - 1), 4, recorder().1),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(MmioAddress(u64::MAX - 4), 4, recorder().1)
            .unwrap();
    }

    #[test]
    fn accesses_are_routed_by_offset() {
        let mut bus = Bus::new();
        let (a, da) = recorder();
        let (b, db) = recorder();
        bus.insert(MmioAddress(0xd000_0000), 0x1000, da).unwrap();
        bus.insert(MmioAddress(0xd000_1000), 0x1000, db).unwrap();

        let mut buf = [0u8; 4];
        bus.read(MmioAddress(0xd000_0010), &mut buf).unwrap();
        assert_eq!(buf, [0x10; 4]);
        assert_eq!(
            bus.write(MmioAddress(0xd000_1ffc), &[1, 2]).unwrap(),
            VcpuAction::Continue
        );
        bus.write(MmioAddress(0xd000_1000), &[3]).unwrap();

        assert_eq!(a.lock().unwrap().seen, vec![('r', 0x10, vec![0x10; 4])]);
        assert_eq!(
            b.lock().unwrap().seen,
            vec![('w', 0xffc, vec![1, 2]), ('w', 0, vec![3])]
        );
    }

    #[test]
    fn a_device_without_save_support_fails_loudly_with_its_name() {
        let (_, device) = recorder();
        let err = lock(&device).save().unwrap_err();
        assert!(err.to_string().contains("Recorder"), "{err}");
        let err = lock(&device).restore(&DeviceState::Stateless).unwrap_err();
        assert!(matches!(err, StateError::NotSaveable(name) if name.ends_with("Recorder")));
    }

    #[test]
    fn unmapped_addresses_are_reported() {
        let mut bus = Bus::new();
        bus.insert(PioAddress(0x500), 0x10, recorder().1).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            bus.read(PioAddress(0x4ff), &mut buf),
            Err(BusError::Unmapped(0x4ff))
        );
        assert_eq!(
            bus.write(PioAddress(0x510), &[0]),
            Err(BusError::Unmapped(0x510))
        );
        assert!(bus.write(PioAddress(0x50f), &[0]).is_ok());
    }
}
