//! The DSDT: the devices a guest cannot discover by itself, as AML.
//!
//! ```text
//! Scope (\_SB) {
//!     Device (COM1) { _HID PNP0501, _UID 0, _CRS { IO 0x3f8/8, Interrupt 4 } }
//!     Device (V000) { _HID "LNRO0005", _UID 0, _CCA 1, _CRS { Memory32Fixed, Interrupt } }
//!     ...
//! }
//! Name (_S5_, Package { 5, 5 })
//! ```
//!
//! `LNRO0005` is the ACPI id Linux's virtio-mmio driver matches. Every interrupt is
//! edge-triggered and active high, as Firecracker declares them: the VMM raises them through
//! irqfd, which pulses the line, and ISA IRQs on the IOAPIC default to edge/high, so no
//! interrupt source override is needed. `_CCA` says the device is cache-coherent (DMA into
//! ordinary RAM), which Linux otherwise assumes only on x86.

use acpi_tables::aml::{
    self, Device, EISAName, IO, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate,
    Scope,
};
use acpi_tables::{Aml, sdt::Sdt};

use super::{AcpiConfig, MmioDevice, OEM_ID, OEM_REVISION, SerialPort, pm};

/// DSDT revision 2: integers are 64 bits.
const DSDT_REVISION: u8 = 2;
/// Bytes of the standard table header.
const HEADER_LEN: u32 = 36;
/// Bytes of port space an 8250 UART decodes.
const UART_PORTS: u8 = 8;

/// An edge-triggered, active-high, exclusive interrupt consumed by the device.
fn edge_interrupt(irq: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, irq)
}

/// The AML of the COM1 UART.
fn serial_aml(serial: SerialPort, sink: &mut Vec<u8>) {
    let io = IO::new(serial.port, serial.port, 1, UART_PORTS);
    let irq = edge_interrupt(serial.irq);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    let hid = EISAName::new("PNP0501");
    Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &hid),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

/// The AML of virtio-mmio device number `index` (its name is `V` and three hex digits, so
/// `index` must be below 0x1000; the caller checks).
fn virtio_aml(index: usize, device: &MmioDevice, sink: &mut Vec<u8>) {
    // Both fit in 32 bits: the caller checked that the range ends below 4 GiB.
    let mem = Memory32Fixed::new(true, device.base as u32, device.len as u32);
    let irq = edge_interrupt(device.irq);
    let crs = ResourceTemplate::new(vec![&mem, &irq]);
    let uid = index as u64;
    Device::new(
        Path::new(&format!("V{index:03X}")),
        vec![
            &Name::new(Path::new("_HID"), &"LNRO0005"),
            &Name::new(Path::new("_UID"), &uid),
            &Name::new(Path::new("_CCA"), &aml::ONE),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

/// The DSDT of `config` (already validated), as the bytes of a complete table.
pub(super) fn build(config: &AcpiConfig) -> Vec<u8> {
    let mut devices = Vec::new();
    if let Some(serial) = config.serial {
        serial_aml(serial, &mut devices);
    }
    for (index, device) in config.devices.iter().enumerate() {
        virtio_aml(index, device, &mut devices);
    }

    let mut body = Scope::raw(Path::new("\\_SB_"), devices);
    // \_S5_ makes S5 (soft off) available: Linux then powers off through the FADT's sleep
    // control register. SLP_TYPa and SLP_TYPb are both S5; a hardware-reduced machine uses
    // only the first.
    let s5 = u64::from(pm::S5_SLEEP_TYPE);
    Name::new(Path::new("_S5_"), &Package::new(vec![&s5, &s5])).to_aml_bytes(&mut body);

    let mut table = Sdt::new(
        *b"DSDT",
        HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        *b"FTVMDSDT",
        OEM_REVISION,
    );
    table.append_slice(&body);
    table.as_slice().to_vec()
}
