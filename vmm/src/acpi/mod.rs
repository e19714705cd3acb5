//! ACPI tables for Linux guests: where the vCPUs, the interrupt controllers, the console and
//! the virtio-mmio devices are, and how to power off and reset.
//!
//! Debian's kernels are built without `VIRTIO_MMIO_CMDLINE_DEVICES`, so a Linux guest can find
//! its virtio-mmio devices only as `LNRO0005` devices in the DSDT. The machine is
//! hardware-reduced ACPI (as on Firecracker): no PM1/GPE blocks, no SCI, no FACS; power-off
//! and reset go through the three registers of [`pm`].
//!
//! [`build`] turns a plain [`AcpiConfig`] into [`AcpiTables`]: each table's bytes and its
//! guest-physical address, all inside the BIOS area [`ACPI_START`]..[`ACPI_END`], with the
//! RSDP at [`RSDP_ADDR`] where Linux scans for it. [`AcpiTables::write_to`] copies them into
//! guest memory; the e820 map must mark the area reserved.
//!
//! Layout, each table 16-byte aligned, in this order:
//!
//! ```text
//! 0xE0000  RSDP  (36 bytes) -> XSDT
//!          DSDT  (devices, \_S5_)
//!          MADT  (LAPIC per vCPU, IOAPIC)
//!          FADT  (276 bytes) -> DSDT
//!          XSDT  -> FADT, MADT
//!          ... free up to 0x100000
//! ```

mod dsdt;
pub mod pm;
mod tables;

#[cfg(test)]
mod tests;

use ftvm_guest_abi::SERIAL_PORT;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::devices::serial::SERIAL_IRQ;
use crate::vm::MAX_VCPUS;

/// First byte of the guest-physical area that holds the ACPI tables (in the BIOS area, below
/// 1 MiB, which Linux scans for the RSDP).
pub const ACPI_START: u64 = 0xE_0000;
/// End (exclusive) of the ACPI area.
pub const ACPI_END: u64 = 0x10_0000;
/// Bytes of the ACPI area; mark `ACPI_START..ACPI_END` reserved in the e820 map.
pub const ACPI_SIZE: u64 = ACPI_END - ACPI_START;
/// Guest-physical address of the RSDP (16-byte aligned, as Linux's scan requires).
pub const RSDP_ADDR: u64 = ACPI_START;
/// Guest-physical address of every vCPU's local APIC.
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;
/// Guest-physical address of the IOAPIC (its GSI base is 0).
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;
/// Input pins of KVM's IOAPIC: interrupts must be below this.
pub const IOAPIC_PINS: u32 = 24;
/// Most virtio-mmio devices the DSDT can name (`V000` to `VFFF`).
pub const MAX_MMIO_DEVICES: usize = 0x1000;

/// The OEM id of every table.
const OEM_ID: [u8; 6] = *b"FTVM  ";
/// The OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// Alignment of each table in the area.
const TABLE_ALIGN: u64 = 16;

/// A virtio-mmio device: its register window and its interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical address of the registers.
    pub base: u64,
    /// Bytes of the register window.
    pub len: u64,
    /// Its GSI (= IOAPIC pin); declared edge-triggered, active high.
    pub irq: u32,
}

/// A 16550 UART in port-I/O space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SerialPort {
    /// First of its 8 ports.
    pub port: u16,
    /// Its GSI; declared edge-triggered, active high.
    pub irq: u32,
}

impl SerialPort {
    /// COM1, the console: ports 0x3f8-0x3ff, IRQ 4.
    pub const COM1: SerialPort = SerialPort {
        port: SERIAL_PORT,
        irq: SERIAL_IRQ,
    };
}

/// What the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; vCPU i has APIC id i.
    pub vcpus: u8,
    /// The virtio-mmio devices, named `V000`, `V001`, ... in this order.
    pub devices: Vec<MmioDevice>,
    /// The console UART, if the guest should see one.
    pub serial: Option<SerialPort>,
}

/// One table and where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTable {
    /// Its signature ("RSDP" for the RSDP, whose real one is "RSD PTR ").
    pub name: &'static str,
    /// Guest-physical address.
    pub addr: u64,
    /// The complete table, checksum included.
    pub bytes: Vec<u8>,
}

/// The tables of a machine, in the order they lie in the ACPI area (RSDP first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// Every table, RSDP first.
    pub tables: Vec<AcpiTable>,
}

/// Errors of building or writing ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The number of vCPUs is outside 1 to [`MAX_VCPUS`].
    #[error("Cannot describe {0} vCPUs: a machine has 1 to {MAX_VCPUS}")]
    Vcpus(u8),
    /// A device's window is empty or does not end below 4 GiB (the DSDT declares it with a
    /// 32-bit descriptor).
    #[error(
        "virtio-mmio device {index} at {base:#x} (length {len:#x}) must be non-empty and below 4 GiB"
    )]
    DeviceRange {
        /// Position of the device in [`AcpiConfig::devices`].
        index: usize,
        /// Its base.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// An interrupt is beyond the IOAPIC's pins.
    #[error("IRQ {irq} of {device} is beyond the IOAPIC's {IOAPIC_PINS} pins")]
    Irq {
        /// Which device.
        device: String,
        /// The interrupt.
        irq: u32,
    },
    /// More devices than the DSDT can name.
    #[error("Too many virtio-mmio devices: {0}, at most {MAX_MMIO_DEVICES}")]
    TooManyDevices(usize),
    /// The tables do not fit in the ACPI area.
    #[error("ACPI tables need {0} bytes, more than the {ACPI_SIZE} reserved for them")]
    TooLarge(u64),
    /// Guest memory does not cover a table's place.
    #[error("Cannot write the ACPI {table} at {addr:#x} into guest memory")]
    Write {
        /// The table's signature.
        table: &'static str,
        /// Where it goes.
        addr: u64,
        /// What vm-memory said.
        #[source]
        source: GuestMemoryError,
    },
}

fn validate(config: &AcpiConfig) -> Result<(), AcpiError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(AcpiError::Vcpus(config.vcpus));
    }
    if config.devices.len() > MAX_MMIO_DEVICES {
        return Err(AcpiError::TooManyDevices(config.devices.len()));
    }
    for (index, d) in config.devices.iter().enumerate() {
        let end = d.base.checked_add(d.len);
        if d.len == 0 || end.is_none_or(|end| end > 1 << 32) {
            return Err(AcpiError::DeviceRange {
                index,
                base: d.base,
                len: d.len,
            });
        }
        if d.irq >= IOAPIC_PINS {
            return Err(AcpiError::Irq {
                device: format!("virtio-mmio device {index}"),
                irq: d.irq,
            });
        }
    }
    if let Some(serial) = config.serial
        && serial.irq >= IOAPIC_PINS
    {
        return Err(AcpiError::Irq {
            device: "the serial port".into(),
            irq: serial.irq,
        });
    }
    Ok(())
}

/// Places tables one after the other in the ACPI area.
struct Placer {
    tables: Vec<AcpiTable>,
    next: u64,
}

impl Placer {
    /// The address the next table will get.
    fn next_addr(&self) -> u64 {
        self.next.next_multiple_of(TABLE_ALIGN)
    }

    fn place(&mut self, name: &'static str, bytes: Vec<u8>) -> u64 {
        let addr = self.next_addr();
        self.next = addr + bytes.len() as u64;
        self.tables.push(AcpiTable { name, addr, bytes });
        addr
    }
}

/// Builds the tables that describe `config`, laid out in the ACPI area.
pub fn build(config: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    validate(config)?;
    let mut placer = Placer {
        tables: Vec::new(),
        next: RSDP_ADDR,
    };
    // The RSDP's only content that depends on the layout is the XSDT's address, known last:
    // reserve its place now and fill it in at the end.
    let rsdp_len = tables::rsdp(0).len();
    placer.place("RSDP", vec![0; rsdp_len]);
    let dsdt_addr = placer.place("DSDT", dsdt::build(config));
    let madt_addr = placer.place("APIC", tables::madt(config.vcpus));
    let fadt_addr = placer.place("FACP", tables::fadt(dsdt_addr));
    let xsdt_addr = placer.place("XSDT", tables::xsdt(&[fadt_addr, madt_addr]));
    placer.tables[0].bytes = tables::rsdp(xsdt_addr);

    if placer.next > ACPI_END {
        return Err(AcpiError::TooLarge(placer.next - ACPI_START));
    }
    Ok(AcpiTables {
        tables: placer.tables,
    })
}

impl AcpiTables {
    /// Guest-physical address of the RSDP (for `boot_params.acpi_rsdp_addr`, if the loader
    /// wants to spare Linux the scan).
    pub fn rsdp_addr(&self) -> u64 {
        RSDP_ADDR
    }

    /// End (exclusive) of the bytes the tables use in the ACPI area.
    pub fn end(&self) -> u64 {
        self.tables
            .iter()
            .map(|t| t.addr + t.bytes.len() as u64)
            .max()
            .unwrap_or(ACPI_START)
    }

    /// Copies every table to its address in `memory`. The writes go through vm-memory, so the
    /// pages are marked dirty in its bitmap like any other VMM write.
    pub fn write_to<M: GuestMemory + ?Sized>(&self, memory: &M) -> Result<(), AcpiError> {
        for table in &self.tables {
            memory
                .write_slice(&table.bytes, GuestAddress(table.addr))
                .map_err(|source| AcpiError::Write {
                    table: table.name,
                    addr: table.addr,
                    source,
                })?;
        }
        Ok(())
    }
}
