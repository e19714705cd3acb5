//! The fixed-format tables: RSDP, XSDT, FADT and MADT.

use acpi_tables::Aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;

use super::{IOAPIC_ADDR, LAPIC_ADDR, OEM_ID, OEM_REVISION, pm};

/// The FADT's hypervisor vendor identity.
const HYPERVISOR_VENDOR_ID: u64 = u64::from_le_bytes(*b"FTVM\0\0\0\0");

/// IA-PC boot architecture flags (FADT `IAPC_BOOT_ARCH`). Not set, deliberately: LEGACY_DEVICES
/// (bit 0; our legacy devices are in the DSDT) and 8042 (bit 1; Linux then leaves port 0x60/0x64
/// alone, and still falls back to it to reset).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
/// There is no CMOS RTC at ports 0x70/0x71: Linux must not probe one (it takes the wall clock
/// from kvmclock instead).
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

fn io_byte_register(port: u16, offset: u64) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port) + offset,
    )
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// The RSDP (ACPI 2.0+, 36 bytes), pointing at the XSDT only (no RSDT).
pub(super) fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    bytes(&Rsdp::new(OEM_ID, xsdt_addr))
}

/// The XSDT, listing `entries` (addresses of the other tables but the DSDT).
pub(super) fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut table = XSDT::new(OEM_ID, *b"FTVMXSDT", OEM_REVISION);
    for &entry in entries {
        table.add_entry(entry);
    }
    bytes(&table)
}

/// The FADT of a hardware-reduced machine whose DSDT is at `dsdt_addr`.
///
/// Hardware-reduced ACPI has no PM1 event/control blocks, no GPEs, no SCI and no fixed
/// power or sleep button (PWR_BUTTON and SLP_BUTTON set mean "none, or a control method
/// device"): only the sleep control/status registers (for S5) and the reset register of
/// [`pm`]. Linux, seeing HW_REDUCED_ACPI, also drops the legacy PIC and PIT and runs on the
/// local APIC timer.
pub(super) fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, *b"FTVMFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    builder.reset_reg = io_byte_register(pm::PM_PORT, pm::RESET_OFFSET);
    builder.reset_value = pm::RESET_VALUE;
    builder.sleep_control_reg = io_byte_register(pm::PM_PORT, pm::SLEEP_CONTROL_OFFSET);
    builder.sleep_status_reg = io_byte_register(pm::PM_PORT, pm::SLEEP_STATUS_OFFSET);
    builder.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT
        | IAPC_MSI_NOT_SUPPORTED
        | IAPC_PCIE_ASPM_CONTROLS
        | IAPC_CMOS_RTC_NOT_PRESENT)
        .into();
    builder.hypervisor_vendor_identity = HYPERVISOR_VENDOR_ID.into();
    bytes(&builder.finalize())
}

/// The MADT: the local APIC of each of `vcpus` vCPUs (processor uid = APIC id = index,
/// enabled) and one IOAPIC (id 0, GSI base 0).
///
/// No interrupt source overrides: KVM's default routing sends GSI n to IOAPIC pin n, ISA IRQ0
/// included, so the identity mapping the MADT implies without overrides is the true one (QEMU
/// declares IRQ0 -> GSI 2 because it reroutes the PIT to pin 2; we do not, and a
/// hardware-reduced Linux does not use the PIT anyway). Flags are 0 (no PCAT_COMPAT): KVM's
/// 8259s exist, but a hardware-reduced guest does not use them.
pub(super) fn madt(vcpus: u8) -> Vec<u8> {
    let mut table = MADT::new(
        OEM_ID,
        *b"FTVMAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        table.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    table.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    bytes(&table)
}
