//! Boot parameters, e820 map and bad kernels, byte-checked in guest memory (no KVM needed).

use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::memory::{GuestMemoryMmap, ram_ranges};

const MIB: u64 = 1 << 20;

/// A minimal x86-64 ELF "kernel": one PT_LOAD of `len` bytes at 16 MiB, entry at its start.
fn elf_kernel(machine: u16, len: u64) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000 + len as usize];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&machine.to_le_bytes());
    f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut f[64..120];
    ph[..4].copy_from_slice(&1u32.to_le_bytes());
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
    ph[16..24].copy_from_slice(&0x100_0000u64.to_le_bytes());
    ph[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
    ph[32..40].copy_from_slice(&len.to_le_bytes());
    ph[40..48].copy_from_slice(&len.to_le_bytes());
    f[0x1000..0x1010].copy_from_slice(b"kernel text here");
    f
}

/// A bzImage header claiming `syssize` paragraphs of protected-mode code, in a file of `len`.
fn bzimage(len: usize, syssize: u32) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0x1f1] = 1; // setup_sects
    f[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    f[0x211] = 1; // loadflags: LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    f
}

fn acpi(vcpus: u8) -> AcpiConfig {
    AcpiConfig {
        vcpus,
        devices: vec![acpi::MmioDevice {
            base: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        }],
        serial: Some(acpi::SerialPort::COM1),
    }
}

fn guest(mem: u64) -> (GuestMemoryMmap, Vec<(GuestAddress, u64)>) {
    let ram = ram_ranges(mem).unwrap();
    let sized: Vec<_> = ram.iter().map(|&(a, l)| (a, l as usize)).collect();
    (GuestMemoryMmap::from_ranges(&sized).unwrap(), ram)
}

#[test]
fn kernels_are_recognised() {
    assert_eq!(detect("k", &elf_kernel(62, 16)).unwrap(), Format::Elf);
    assert_eq!(detect("k", &bzimage(0x1000, 0)).unwrap(), Format::BzImage);
    assert!(matches!(
        detect("k", &bzimage(0x1000, 0x1000)),
        Err(LinuxError::Truncated { .. })
    ));
    assert!(matches!(
        detect("k", &elf_kernel(183, 16)),
        Err(LinuxError::WrongArch(_))
    ));
    assert!(matches!(
        detect("k", b"#!/bin/sh\n"),
        Err(LinuxError::NotAKernel(_))
    ));
    assert!(matches!(detect("k", &[]), Err(LinuxError::NotAKernel(_))));
}

#[test]
fn the_e820_map_reserves_the_legacy_area_and_skips_the_mmio_hole() {
    let (_, ram) = guest(512 * MIB);
    assert_eq!(
        e820_map(&ram),
        vec![
            (0, 0x9_fc00, 1),
            (0x9_fc00, 0x6_0400, 2),
            (0x10_0000, 511 * MIB, 1)
        ]
    );
    let (_, ram) = guest(4096 * MIB);
    let map = e820_map(&ram);
    assert_eq!(map[2], (0x10_0000, 0xC000_0000 - 0x10_0000, 1));
    assert_eq!(map[3], (1 << 32, 1 << 30, 1));
}

#[test]
fn boot_parameters_command_line_initrd_and_acpi_are_in_guest_memory() {
    let (mem, ram) = guest(256 * MIB);
    let initrd: Vec<u8> = (0..3 * MIB as usize + 17)
        .map(|i| (i % 249) as u8)
        .collect();
    let params = LinuxParams {
        initrd: Some(&initrd),
        cmdline: "console=ttyS0 root=/dev/vda",
        acpi: acpi(2),
    };
    let layout = load(&mem, &ram, "vmlinux", &elf_kernel(62, 0x2000), &params).unwrap();
    assert_eq!(layout.entry, 0x100_0000);

    let mut text = [0u8; 16];
    mem.read_slice(&mut text, GuestAddress(0x100_0000)).unwrap();
    assert_eq!(&text, b"kernel text here");

    let bp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
    let hdr = bp.hdr;
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!(hdr.type_of_loader, 0xff);
    assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
    let mut cmdline = vec![0u8; params.cmdline.len() + 1];
    mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_ADDR))
        .unwrap();
    assert_eq!(&cmdline[..params.cmdline.len()], params.cmdline.as_bytes());
    assert_eq!(cmdline[params.cmdline.len()], 0, "NUL-terminated");

    let (addr, size) = layout.initrd.unwrap();
    assert_eq!(
        ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
        (addr as u32, size as u32)
    );
    assert_eq!(addr % 4096, 0);
    assert!(addr + size <= 256 * MIB);
    let mut back = vec![0u8; initrd.len()];
    mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
    assert_eq!(back, initrd);

    assert_eq!(bp.e820_entries as usize, layout.e820.len());
    for (i, &(a, l, t)) in layout.e820.iter().enumerate() {
        let e = bp.e820_table[i];
        assert_eq!(
            ({ e.addr }, { e.size }, { e.r#type }),
            (a, l, t),
            "e820 entry {i}"
        );
    }
    assert_eq!({ bp.acpi_rsdp_addr }, acpi::RSDP_ADDR);
    let mut sig = [0u8; 8];
    mem.read_slice(&mut sig, GuestAddress(acpi::RSDP_ADDR))
        .unwrap();
    assert_eq!(&sig, b"RSD PTR ");
}

#[test]
fn an_initrd_larger_than_memory_is_refused() {
    let (mem, ram) = guest(32 * MIB);
    let initrd = vec![0u8; 40 * MIB as usize];
    let params = LinuxParams {
        initrd: Some(&initrd),
        cmdline: "",
        acpi: acpi(1),
    };
    let err = load(&mem, &ram, "vmlinux", &elf_kernel(62, 0x2000), &params).unwrap_err();
    assert!(matches!(err, LinuxError::InitrdTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("does not fit"), "{err}");
}

/// Found by the kernel_loader fuzz target: a segment whose p_memsz takes its end to just below
/// 2^64 made the initrd placement overflow (a panic with overflow checks on).
#[test]
fn a_kernel_that_claims_to_end_near_2_64_is_refused_with_an_initrd() {
    let (mem, ram) = guest(32 * MIB);
    let mut k = elf_kernel(62, 0x2000);
    k[104..112].copy_from_slice(&(u64::MAX - 0x100_0000 - 10).to_le_bytes()); // p_memsz
    let initrd = vec![1u8; 4096];
    let params = LinuxParams {
        initrd: Some(&initrd),
        cmdline: "",
        acpi: acpi(1),
    };
    // Refused somewhere along the way, never a panic.
    assert!(load(&mem, &ram, "vmlinux", &k, &params).is_err());
}

#[test]
fn a_truncated_bzimage_is_refused() {
    let (mem, ram) = guest(64 * MIB);
    let params = LinuxParams {
        initrd: None,
        cmdline: "",
        acpi: acpi(1),
    };
    // The header announces 1024 + 0x100 * 16 bytes; the file has 2048.
    let err = load(&mem, &ram, "bzImage", &bzimage(2048, 0x100), &params).unwrap_err();
    assert!(
        matches!(
            err,
            LinuxError::Truncated {
                want: 5120,
                have: 2048,
                ..
            }
        ),
        "{err}"
    );
    let mut cut = bzimage(0x1000, 0);
    cut.truncate(0x210);
    let err = load(&mem, &ram, "bzImage", &cut, &params).unwrap_err();
    assert!(
        matches!(err, LinuxError::Truncated { .. }),
        "header cut short: {err}"
    );
    // A complete one loads, entering 0x200 past the protected-mode code.
    let layout = load(&mem, &ram, "bzImage", &bzimage(1024 + 4096, 0x100), &params).unwrap();
    assert_eq!(layout.entry, 0x10_0200);
}

#[test]
fn an_overlong_command_line_is_refused() {
    let (mem, ram) = guest(64 * MIB);
    let long = "x".repeat(CMDLINE_MAX);
    let params = LinuxParams {
        initrd: None,
        cmdline: &long,
        acpi: acpi(1),
    };
    let err = load(&mem, &ram, "vmlinux", &elf_kernel(62, 16), &params).unwrap_err();
    assert!(matches!(err, LinuxError::CmdlineTooLong(_)), "{err}");
}
