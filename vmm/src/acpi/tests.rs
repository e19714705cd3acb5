//! Byte-level checks of the tables, a walk from the RSDP through guest memory as Linux does
//! it, and Debian's `iasl` disassembling every table.

use std::path::Path;
use std::process::Command;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::memory::GuestMemoryMmap;

const VIRTIO: [MmioDevice; 3] = [
    MmioDevice {
        base: 0xD000_0000,
        len: 0x1000,
        irq: 5,
    },
    MmioDevice {
        base: 0xD000_1000,
        len: 0x1000,
        irq: 6,
    },
    MmioDevice {
        base: 0xD000_2000,
        len: 0x200,
        irq: 7,
    },
];

fn config() -> AcpiConfig {
    AcpiConfig {
        vcpus: 2,
        devices: VIRTIO.to_vec(),
        serial: Some(SerialPort::COM1),
    }
}

fn table<'a>(tables: &'a AcpiTables, name: &str) -> &'a AcpiTable {
    tables.tables.iter().find(|t| t.name == name).unwrap()
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// Memory32Fixed descriptor (read/write) of `d`.
fn memory32_fixed(d: &MmioDevice) -> Vec<u8> {
    let mut v = vec![0x86, 9, 0, 1];
    v.extend((d.base as u32).to_le_bytes());
    v.extend((d.len as u32).to_le_bytes());
    v
}

/// Extended interrupt descriptor: consumer, edge, active high, exclusive, one interrupt.
fn edge_irq(irq: u32) -> Vec<u8> {
    let mut v = vec![0x89, 6, 0, 0b0011, 1];
    v.extend(irq.to_le_bytes());
    v
}

#[test]
fn every_table_checksums_to_zero_and_its_header_length_is_its_size() {
    let tables = build(&config()).unwrap();
    let names: Vec<_> = tables.tables.iter().map(|t| t.name).collect();
    assert_eq!(names, ["RSDP", "DSDT", "APIC", "FACP", "XSDT"]);

    let rsdp = &table(&tables, "RSDP").bytes;
    assert_eq!(rsdp.len(), 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "revision 2: has the XSDT");
    assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(sum(rsdp), 0, "extended checksum");
    assert_eq!(u32_at(rsdp, 20), 36);
    assert_eq!(u32_at(rsdp, 16), 0, "no RSDT");

    for t in tables.tables.iter().filter(|t| t.name != "RSDP") {
        assert_eq!(&t.bytes[..4], t.name.as_bytes());
        assert_eq!(u32_at(&t.bytes, 4) as usize, t.bytes.len(), "{}", t.name);
        assert_eq!(sum(&t.bytes), 0, "{} checksum", t.name);
        assert_eq!(&t.bytes[10..16], b"FTVM  ", "{} OEM id", t.name);
    }
}

#[test]
fn tables_are_aligned_disjoint_and_inside_the_reserved_area() {
    let tables = build(&config()).unwrap();
    assert_eq!(tables.rsdp_addr(), 0xE_0000);
    assert_eq!(tables.tables[0].addr, RSDP_ADDR);
    let mut prev_end = ACPI_START;
    for t in &tables.tables {
        assert_eq!(t.addr % 16, 0, "{}", t.name);
        assert!(t.addr >= prev_end, "{} overlaps its predecessor", t.name);
        prev_end = t.addr + t.bytes.len() as u64;
    }
    assert_eq!(tables.end(), prev_end);
    assert!(tables.end() <= ACPI_END);
}

#[test]
fn linux_finds_every_table_from_the_rsdp_in_guest_memory() {
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    let tables = build(&config()).unwrap();
    tables.write_to(&memory).unwrap();

    let read = |addr: u64, len: usize| {
        let mut b = vec![0; len];
        memory.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    };
    let read_table = |addr: u64| {
        let len = u32_at(&read(addr, 8), 4) as usize;
        read(addr, len)
    };

    let rsdp = read(0xE_0000, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    let xsdt = read_table(u64_at(&rsdp, 24));
    assert_eq!(&xsdt[..4], b"XSDT");
    assert_eq!(xsdt.len(), 36 + 2 * 8);
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|at| u64_at(&xsdt, at))
        .collect();
    assert_eq!(
        entries,
        [table(&tables, "FACP").addr, table(&tables, "APIC").addr]
    );
    let fadt = read_table(entries[0]);
    assert_eq!(&fadt[..4], b"FACP");
    assert_eq!(&read_table(entries[1])[..4], b"APIC");

    assert_eq!(u32_at(&fadt, 40), 0, "32-bit DSDT pointer unused");
    let dsdt = read_table(u64_at(&fadt, 140));
    assert_eq!(
        dsdt,
        table(&tables, "DSDT").bytes,
        "X_DSDT points at the DSDT"
    );
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
    let tables = build(&config()).unwrap();
    let fadt = &table(&tables, "FACP").bytes;
    assert_eq!(fadt.len(), 276);
    assert_eq!((fadt[8], fadt[131]), (6, 5), "FADT 6.5");

    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_ne!(flags & (1 << 4), 0, "no fixed power button");
    assert_ne!(flags & (1 << 5), 0, "no fixed sleep button");

    // Generic address structures: I/O space, 8 bits wide, byte access.
    let gas = |at: usize, port: u64| {
        assert_eq!(fadt[at..at + 4], [1, 8, 0, 1], "GAS at {at}");
        assert_eq!(u64_at(fadt, at + 4), port, "GAS at {at}");
    };
    gas(116, 0x602);
    assert_eq!(fadt[128], pm::RESET_VALUE);
    gas(244, 0x600);
    gas(256, 0x601);

    let iapc = u16_at(fadt, 109);
    assert_eq!(iapc & 0b11, 0, "no legacy devices or 8042 declared");
    assert_ne!(iapc & (1 << 5), 0, "no CMOS RTC");
    assert_eq!(&fadt[268..276], b"FTVM\0\0\0\0");
    assert_eq!(u32_at(fadt, 36), 0, "no FACS");
    assert_eq!(u64_at(fadt, 132), 0, "no X_FACS");
}

#[test]
fn madt_has_one_enabled_local_apic_per_vcpu_and_the_ioapic() {
    let tables = build(&config()).unwrap();
    let madt = &table(&tables, "APIC").bytes;
    assert_eq!(u32_at(madt, 36), 0xFEE0_0000, "local APIC address");

    let (mut lapics, mut ioapics, mut others) = (Vec::new(), Vec::new(), 0);
    let mut at = 44;
    while at < madt.len() {
        let (kind, len) = (madt[at], madt[at + 1] as usize);
        match kind {
            0 => {
                assert_eq!(len, 8);
                assert_eq!(u32_at(madt, at + 4), 1, "enabled");
                assert_eq!(madt[at + 2], madt[at + 3], "processor uid = APIC id");
                lapics.push(madt[at + 3]);
            }
            1 => {
                assert_eq!(len, 12);
                ioapics.push((madt[at + 2], u32_at(madt, at + 4), u32_at(madt, at + 8)));
            }
            _ => others += 1,
        }
        at += len;
    }
    assert_eq!(at, madt.len(), "structures fill the table exactly");
    assert_eq!(lapics, [0, 1]);
    assert_eq!(ioapics, [(0, 0xFEC0_0000, 0)], "(id, address, GSI base)");
    assert_eq!(others, 0, "no overrides: KVM routes GSI n to pin n");
}

#[test]
fn dsdt_declares_each_virtio_device_the_console_and_s5() {
    let tables = build(&config()).unwrap();
    let dsdt = &table(&tables, "DSDT").bytes;
    assert_eq!(count(dsdt, b"LNRO0005\0"), VIRTIO.len());
    for d in &VIRTIO {
        assert_eq!(count(dsdt, &memory32_fixed(d)), 1, "{d:?}");
        assert_eq!(count(dsdt, &edge_irq(d.irq)), 1, "{d:?}");
    }
    for name in [b"V000", b"V001", b"V002", b"COM1", b"_S5_"] {
        assert_eq!(count(dsdt, name), 1, "{}", String::from_utf8_lossy(name));
    }
    // COM1: IO (Decode16, 0x3F8, 0x3F8, 1, 8) and IRQ 4; _HID EisaId ("PNP0501").
    assert_eq!(count(dsdt, &[0x47, 1, 0xF8, 3, 0xF8, 3, 1, 8]), 1);
    assert_eq!(count(dsdt, &edge_irq(4)), 1);
    assert_eq!(count(dsdt, &[0x0C, 0x41, 0xD0, 0x05, 0x01]), 1);
}

#[test]
fn a_machine_without_serial_or_devices_has_an_empty_bus() {
    let tables = build(&AcpiConfig {
        vcpus: 1,
        devices: Vec::new(),
        serial: None,
    })
    .unwrap();
    let dsdt = &table(&tables, "DSDT").bytes;
    assert_eq!(count(dsdt, b"COM1"), 0);
    assert_eq!(count(dsdt, b"LNRO"), 0);
    assert_eq!(sum(dsdt), 0);
    assert_eq!(table(&tables, "APIC").bytes.len(), 44 + 8 + 12);
}

#[test]
fn bad_configurations_are_refused() {
    let with = |f: &dyn Fn(&mut AcpiConfig)| {
        let mut c = config();
        f(&mut c);
        build(&c).unwrap_err()
    };
    assert!(matches!(with(&|c| c.vcpus = 0), AcpiError::Vcpus(0)));
    assert!(matches!(with(&|c| c.vcpus = 255), AcpiError::Vcpus(255)));
    assert!(matches!(
        with(&|c| c.devices[1].base = 0xFFFF_F800),
        AcpiError::DeviceRange { index: 1, .. }
    ));
    assert!(matches!(
        with(&|c| c.devices[0].len = 0),
        AcpiError::DeviceRange { index: 0, .. }
    ));
    assert!(matches!(
        with(&|c| c.devices[2].irq = 24),
        AcpiError::Irq { irq: 24, .. }
    ));
    assert!(matches!(
        with(&|c| c.serial = Some(SerialPort {
            port: 0x2f8,
            irq: 99
        })),
        AcpiError::Irq { irq: 99, .. }
    ));
    assert!(matches!(
        with(&|c| c.devices = vec![VIRTIO[0]; MAX_MMIO_DEVICES + 1]),
        AcpiError::TooManyDevices(4097)
    ));
    let err = with(&|c| c.devices = vec![VIRTIO[0]; 3000]);
    assert!(
        matches!(err, AcpiError::TooLarge(n) if n > ACPI_SIZE),
        "{err}"
    );
}

#[test]
fn writing_needs_guest_memory_under_the_area() {
    let tables = build(&config()).unwrap();
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0xE_0000)]).unwrap();
    let err = tables.write_to(&memory).unwrap_err();
    assert!(
        matches!(
            err,
            AcpiError::Write {
                table: "RSDP",
                addr: 0xE_0000,
                ..
            }
        ),
        "{err}"
    );
}

/// Runs `iasl` with `args` in `dir`; fails the test if it is missing or reports an error.
fn iasl(dir: &Path, args: &[&str]) -> String {
    let out = match Command::new("iasl").args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) => {
            panic!("cannot run iasl ({e}): install Debian's acpica-tools (scripts/setup.sh does)")
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl {args:?} failed:\n{text}");
    text
}

#[test]
fn iasl_disassembles_every_table_and_compiles_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let tables = build(&config()).unwrap();
    let mut dsl = std::collections::HashMap::new();
    // iasl cannot load a bare RSDP from a file ("does not contain a valid ACPI table"); the
    // byte checks above cover it.
    for t in tables.tables.iter().filter(|t| t.name != "RSDP") {
        let name = t.name.to_lowercase();
        std::fs::write(dir.path().join(format!("{name}.dat")), &t.bytes).unwrap();
        let log = iasl(dir.path(), &["-d", &format!("{name}.dat")]);
        for bad in ["Error", "Warning", "Invalid", "Incorrect"] {
            assert!(!log.contains(bad), "iasl -d {name}.dat says {bad}:\n{log}");
        }
        let text = std::fs::read_to_string(dir.path().join(format!("{name}.dsl")))
            .unwrap_or_else(|e| panic!("iasl wrote no {name}.dsl ({e}):\n{log}"));
        // The disassembly compiles back cleanly: the table is well formed.
        let log = iasl(
            dir.path(),
            &["-p", &format!("{name}-again"), &format!("{name}.dsl")],
        );
        assert!(log.contains("0 Errors, 0 Warnings"), "{name}.dsl:\n{log}");
        dsl.insert(t.name, text);
    }

    let dsdt = &dsl["DSDT"];
    assert_eq!(
        dsdt.matches("Name (_HID, \"LNRO0005\")").count(),
        3,
        "{dsdt}"
    );
    for d in &VIRTIO {
        let base = format!("{:#010X},         // Address Base", d.base).replace("0X", "0x");
        let len = format!("{:#010X},         // Address Length", d.len).replace("0X", "0x");
        assert!(dsdt.contains(&base), "{base} in {dsdt}");
        assert!(dsdt.contains(&len), "{len} in {dsdt}");
        assert!(
            dsdt.contains(&format!("0x{:08X},", d.irq)),
            "IRQ {} in {dsdt}",
            d.irq
        );
    }
    assert_eq!(
        dsdt.matches("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )")
            .count(),
        4,
        "{dsdt}"
    );
    assert!(dsdt.contains("EisaId (\"PNP0501\")"), "{dsdt}");
    assert!(
        dsdt.contains("0x03F8,             // Range Minimum"),
        "{dsdt}"
    );
    assert!(dsdt.contains("Name (_S5, Package (0x02)"), "{dsdt}");

    let fadt = &dsl["FACP"];
    assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
    assert!(fadt.contains("Reset Register Supported (V2) : 1"), "{fadt}");
    let x_dsdt = format!("DSDT Address : {:016X}", table(&tables, "DSDT").addr);
    assert!(fadt.contains(&x_dsdt), "{x_dsdt} in {fadt}");
    for port in ["0000000000000600", "0000000000000601", "0000000000000602"] {
        assert!(
            fadt.contains(&format!("Address : {port}")),
            "{port} in {fadt}"
        );
    }

    let madt = &dsl["APIC"];
    assert!(madt.contains("Local Apic Address : FEE00000"), "{madt}");
    assert_eq!(madt.matches("Processor Enabled : 1").count(), 2, "{madt}");
    assert!(madt.contains("Address : FEC00000"), "{madt}");

    let xsdt = &dsl["XSDT"];
    for name in ["FACP", "APIC"] {
        let addr = format!("{:016X}", table(&tables, name).addr);
        assert!(xsdt.contains(&addr), "{name} at {addr} in {xsdt}");
    }
}
