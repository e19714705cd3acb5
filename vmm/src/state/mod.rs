//! The machine's state as plain data: vCPUs, the in-kernel devices (PIC, IOAPIC, PIT, clock),
//! the VMM's devices and counters. Loaded state is untrusted and validated before use.

pub mod counters;
pub mod devices;
pub mod vcpu;

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

pub use counters::CountersState;
pub use devices::{DeviceState, QueueState, SerialState, VirtioDeviceState, VirtioState};
pub use vcpu::VcpuState;

/// Errors of saving and restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM call failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An MSR list could not be built.
    #[error("Too many MSRs")]
    Msrs,
    /// KVM refused to restore an MSR.
    #[error("KVM refused to restore MSR {0:#x}")]
    MsrRejected(u32),
    /// The state is inconsistent.
    #[error("Invalid state: {0}")]
    Invalid(&'static str),
    /// A device has no snapshot support.
    #[error("Device {0} cannot be saved")]
    NotSaveable(&'static str),
}

/// Checks that a stateless device is given a stateless state.
pub fn expect_stateless(state: &DeviceState) -> Result<(), StateError> {
    match state {
        DeviceState::Stateless => Ok(()),
        _ => Err(StateError::Invalid("a stateless device was given state")),
    }
}

/// The in-kernel devices of the VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct KvmVmState {
    /// Master PIC, slave PIC, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT, where one was created.
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl KvmVmState {
    /// Saves the in-kernel devices (vCPUs paused first).
    pub fn save(fd: &VmFd, has_pit: bool) -> Result<Self, StateError> {
        let mut irqchips = Vec::new();
        for chip_id in CHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            fd.get_irqchip(&mut chip)
                .map_err(|source| StateError::Kvm {
                    what: "read the interrupt controller",
                    source,
                })?;
            irqchips.push(chip);
        }
        let pit = if has_pit {
            Some(fd.get_pit2().map_err(|source| StateError::Kvm {
                what: "read the PIT",
                source,
            })?)
        } else {
            None
        };
        let mut clock = fd.get_clock().map_err(|source| StateError::Kvm {
            what: "read the clock",
            source,
        })?;
        // Only the clock value is restorable; the other fields describe the reading.
        clock.flags = 0;
        Ok(Self {
            irqchips,
            pit,
            clock,
        })
    }

    /// Loads this state into a fresh VM with an irqchip (and a PIT, if one is saved).
    pub fn restore(&self, fd: &VmFd) -> Result<(), StateError> {
        if self.irqchips.len() != CHIPS.len()
            || self
                .irqchips
                .iter()
                .zip(CHIPS)
                .any(|(c, id)| c.chip_id != id)
        {
            return Err(StateError::Invalid(
                "interrupt controller state is incomplete",
            ));
        }
        if let Some(pit) = &self.pit {
            fd.set_pit2(pit).map_err(|source| StateError::Kvm {
                what: "set the PIT",
                source,
            })?;
        }
        for chip in &self.irqchips {
            fd.set_irqchip(chip).map_err(|source| StateError::Kvm {
                what: "set the interrupt controller",
                source,
            })?;
        }
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        fd.set_clock(&clock).map_err(|source| StateError::Kvm {
            what: "set the clock",
            source,
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
    use kvm_ioctls::Kvm;

    fn vm_with_pit(kvm: &Kvm) -> VmFd {
        let fd = kvm.create_vm().expect("a VM (needs /dev/kvm)");
        fd.create_irq_chip().unwrap();
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .unwrap();
        fd
    }

    #[test]
    fn interrupt_controllers_pit_and_clock_round_trip() {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let a = vm_with_pit(&kvm);
        // A programmed PIT channel 0 (mode 2, count 0x1234), and pending interrupts: IRQ 3 on
        // the PIC and GSI 10 raised on the IOAPIC, level held.
        let mut pit = a.get_pit2().unwrap();
        pit.channels[0].count = 0x1234;
        pit.channels[0].mode = 2;
        pit.channels[0].rw_mode = 3;
        a.set_pit2(&pit).unwrap();
        a.set_irq_line(3, true).unwrap();
        a.set_irq_line(10, true).unwrap();
        let saved = KvmVmState::save(&a, true).unwrap();
        assert_eq!(saved.pit.as_ref().unwrap().channels[0].count, 0x1234);

        let b = vm_with_pit(&kvm);
        saved.restore(&b).unwrap();
        let again = KvmVmState::save(&b, true).unwrap();
        // Everything but the clock reading (which moves between the two saves) is identical.
        assert_eq!(
            format!("{:?}", saved.irqchips),
            format!("{:?}", again.irqchips)
        );
        let channels = |s: &KvmVmState| {
            s.pit.as_ref().unwrap().channels.map(|c| {
                (
                    c.count,
                    c.mode,
                    c.rw_mode,
                    c.latched_count,
                    c.status,
                    c.gate,
                )
            })
        };
        assert_eq!(channels(&saved), channels(&again));
        assert!(
            again.clock.clock >= saved.clock.clock,
            "the clock does not go back"
        );
    }

    #[test]
    fn incomplete_interrupt_controller_state_is_refused() {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let a = vm_with_pit(&kvm);
        let mut saved = KvmVmState::save(&a, true).unwrap();
        saved.irqchips.pop();
        let b = vm_with_pit(&kvm);
        assert!(matches!(saved.restore(&b), Err(StateError::Invalid(_))));
    }
}
