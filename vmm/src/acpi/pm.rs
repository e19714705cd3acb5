//! ACPI power management of a hardware-reduced machine: the sleep control, sleep status and
//! reset registers the FADT points at, and what a guest's write to them means.
//!
//! The three registers are consecutive bytes in port-I/O space at [`PM_PORT`] (0x600, where
//! PC chipsets conventionally put their ACPI PM block; nothing else of ours lives there). Port
//! I/O rather than MMIO because Linux, the only guest that uses them, runs in ring 0 where
//! `in`/`out` exit to the VMM on every kind of KVM, and a port block needs no address in the
//! 32-bit MMIO hole. The device that decodes them (later, on the port-I/O bus) should:
//!
//! - on a write, call [`pm_request`] and power off or reset the machine when it says so;
//! - on a read, return zeros (the wake status bit is never set: the machine never sleeps,
//!   and Linux spins on it only after asking for a sleep state, which we never return from).
//!
//! Linux powers off by writing `SLP_TYP(S5) << 2 | SLP_EN` to the sleep control register,
//! with SLP_TYP taken from the DSDT's `\_S5_` package ([`S5_SLEEP_TYPE`]); it resets by writing
//! the FADT's reset value ([`RESET_VALUE`]) to the reset register, which it tries first when
//! rebooting.

/// First port of the power-management register block.
pub const PM_PORT: u16 = 0x600;
/// Number of ports the block decodes.
pub const PM_PORT_LEN: u64 = 3;
/// Offset of the sleep control register (FADT `SLEEP_CONTROL_REG`), one byte.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register (FADT `SLEEP_STATUS_REG`), one byte; reads as 0.
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register (FADT `RESET_REG`), one byte.
pub const RESET_OFFSET: u64 = 2;
/// The value a guest writes to the reset register to reset the machine.
pub const RESET_VALUE: u8 = 1;
/// The sleep type of S5 (soft off), as the DSDT's `\_S5_` package declares it.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Sleep control register: SLP_EN, "enter the sleep state in SLP_TYP now".
const SLP_EN: u8 = 1 << 5;
/// Sleep control register: position of the 3-bit SLP_TYP field.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// What a guest asked for by writing a power-management register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmRequest {
    /// Enter S5: power the machine off.
    PowerOff,
    /// Reset the machine.
    Reset,
}

/// What a one-byte write of `value` at `offset` into the block at [`PM_PORT`] asks for, if
/// anything. Writes that request no change (SLP_EN clear, clearing status bits, any other
/// value or register) give `None`.
pub fn pm_request(offset: u64, value: u8) -> Option<PmRequest> {
    match offset {
        SLEEP_CONTROL_OFFSET
            if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE =>
        {
            Some(PmRequest::PowerOff)
        }
        RESET_OFFSET if value == RESET_VALUE => Some(PmRequest::Reset),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_s5_write_powers_off() {
        // What ACPICA's acpi_hw_extended_sleep() writes for S5: (5 << 2) | SLP_EN.
        assert_eq!(
            pm_request(SLEEP_CONTROL_OFFSET, 0x34),
            Some(PmRequest::PowerOff)
        );
        assert_eq!(
            pm_request(SLEEP_CONTROL_OFFSET, 5 << 2),
            None,
            "SLP_EN clear: no transition"
        );
        assert_eq!(
            pm_request(SLEEP_CONTROL_OFFSET, (3 << 2) | SLP_EN),
            None,
            "S3 is not offered"
        );
    }

    #[test]
    fn reset_needs_the_reset_value_on_the_reset_register() {
        assert_eq!(
            pm_request(RESET_OFFSET, RESET_VALUE),
            Some(PmRequest::Reset)
        );
        assert_eq!(pm_request(RESET_OFFSET, 0), None);
        assert_eq!(
            pm_request(SLEEP_STATUS_OFFSET, 0x80),
            None,
            "clearing WAK_STS"
        );
        assert_eq!(pm_request(SLEEP_CONTROL_OFFSET, RESET_VALUE), None);
    }
}
