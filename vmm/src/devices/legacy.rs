//! The legacy platform devices Linux uses to stop the machine: the i8042 controller's reset
//! line and the ACPI power-management registers (see `crate::acpi::pm`).

use std::sync::mpsc::Sender;

use crate::acpi::pm::{PmRequest, pm_request};
use crate::bus::{BusDevice, VcpuAction};
use crate::event::VmEvent;
use crate::state::{DeviceState, StateError, expect_stateless};

/// First port of the i8042 (data port; the command/status port is 0x64).
pub const I8042_PORT: u16 = 0x60;
/// Ports the i8042 decodes (0x60 to 0x64).
pub const I8042_PORT_LEN: u64 = 5;
const I8042_COMMAND: u64 = 4;
const I8042_RESET: u8 = 0xfe;

/// An i8042 with nothing attached, whose only function is the CPU reset command.
pub struct I8042 {
    events: Sender<VmEvent>,
}

impl I8042 {
    /// A controller that reports resets on `events`.
    pub fn new(events: Sender<VmEvent>) -> Self {
        Self { events }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: no data, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        if offset == I8042_COMMAND && data.first() == Some(&I8042_RESET) {
            let _ = self.events.send(VmEvent::Reset);
            return VcpuAction::Halt;
        }
        VcpuAction::Continue
    }

    fn save(&self) -> Result<DeviceState, StateError> {
        Ok(DeviceState::Stateless)
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        expect_stateless(state)
    }
}

/// The ACPI PM register block.
pub struct AcpiPm {
    events: Sender<VmEvent>,
}

impl AcpiPm {
    /// A block that reports power-off and reset on `events`.
    pub fn new(events: Sender<VmEvent>) -> Self {
        Self { events }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        let event = match data.first().and_then(|&v| pm_request(offset, v)) {
            Some(PmRequest::PowerOff) => VmEvent::PowerOff(0),
            Some(PmRequest::Reset) => VmEvent::Reset,
            None => return VcpuAction::Continue,
        };
        let _ = self.events.send(event);
        VcpuAction::Halt
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
    fn i8042_reset_command_resets() {
        let (tx, rx) = channel();
        let mut dev = I8042::new(tx);
        assert_eq!(
            dev.write(0, &[I8042_RESET]),
            VcpuAction::Continue,
            "data port"
        );
        assert_eq!(dev.write(I8042_COMMAND, &[0xaa]), VcpuAction::Continue);
        assert!(rx.try_recv().is_err());
        assert_eq!(dev.write(I8042_COMMAND, &[I8042_RESET]), VcpuAction::Halt);
        assert_eq!(rx.try_recv(), Ok(VmEvent::Reset));
    }

    #[test]
    fn acpi_s5_powers_off_and_the_reset_register_resets() {
        let (tx, rx) = channel();
        let mut dev = AcpiPm::new(tx);
        assert_eq!(dev.write(0, &[(5 << 2) | (1 << 5)]), VcpuAction::Halt);
        assert_eq!(rx.try_recv(), Ok(VmEvent::PowerOff(0)));
        assert_eq!(dev.write(2, &[1]), VcpuAction::Halt);
        assert_eq!(rx.try_recv(), Ok(VmEvent::Reset));
        assert_eq!(dev.write(1, &[0xff]), VcpuAction::Continue);
        assert!(rx.try_recv().is_err());
    }
}
