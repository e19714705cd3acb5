//! ftvm's paravirtual control registers for the test guest: power off, and wait (ring 3 cannot
//! `hlt`, so an idle guest gives its vCPU back this way instead of spinning a host core).

use std::sync::mpsc::Sender;
use std::time::Duration;

use ftvm_guest_abi::{PV_POWER_OFF, PV_WAIT_US};

use crate::bus::{BusDevice, VcpuAction};
use crate::event::VmEvent;
use crate::state::{DeviceState, StateError, expect_stateless};

/// The control device.
pub struct PvControl {
    events: Sender<VmEvent>,
}

impl PvControl {
    /// A control device that reports power-off on `events`.
    pub fn new(events: Sender<VmEvent>) -> Self {
        Self { events }
    }
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl BusDevice for PvControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        match offset {
            PV_POWER_OFF => {
                // The receiver is gone only while the VM is being torn down anyway.
                let _ = self.events.send(VmEvent::PowerOff(le_u32(data)));
                VcpuAction::Halt
            }
            PV_WAIT_US => VcpuAction::Wait(Duration::from_micros(u64::from(le_u32(data)))),
            _ => VcpuAction::Continue,
        }
    }

    fn save(&self) -> Result<DeviceState, StateError> {
        Ok(DeviceState::Stateless)
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        expect_stateless(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn power_off_reports_the_status_and_halts_the_vcpu() {
        let (tx, rx) = channel();
        let mut dev = PvControl::new(tx);
        assert_eq!(dev.write(0, &7u32.to_le_bytes()), VcpuAction::Halt);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::PowerOff(7));
    }

    #[test]
    fn wait_takes_microseconds_and_short_writes_are_zero_extended() {
        let (tx, _rx) = channel();
        let mut dev = PvControl::new(tx);
        assert_eq!(
            dev.write(4, &1500u32.to_le_bytes()),
            VcpuAction::Wait(Duration::from_micros(1500))
        );
        assert_eq!(
            dev.write(4, &[2]),
            VcpuAction::Wait(Duration::from_micros(2))
        );
        assert_eq!(dev.write(8, &[1]), VcpuAction::Continue, "unused register");
    }
}
