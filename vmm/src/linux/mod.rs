//! Booting Linux: the kernel image (bzImage or uncompressed vmlinux), initrd, command line,
//! boot parameters with the e820 map, ACPI tables, and the 64-bit boot state.
//!
//! The 64-bit boot protocol is used for both formats: the VMM enters the kernel in long mode
//! with paging on (identity-mapped), `rsi` pointing at the boot parameters ("zero page").

pub mod regs;

use std::io::Cursor;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::acpi::{self, AcpiConfig, AcpiTables};
use crate::memory::{GuestMemoryMmap, MMIO_HOLE_END};
use crate::x86::paging;

/// Guest-physical address of the boot parameters (the "zero page").
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Guest-physical address of the command line (after the page tables' area).
pub const CMDLINE_ADDR: u64 = paging::TABLES_END;
/// Longest command line accepted, including its NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Where the kernel's protected-mode part is loaded (bzImage) and the lowest it may be (ELF).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the Extended BIOS Data Area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// The command line Linux gets when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG: u16 = 0xaa55;
const LOADER_OTHER: u8 = 0xff;
const LOADFLAG_CAN_USE_HEAP: u8 = 0x80;

/// Errors of loading a Linux kernel.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// Neither an ELF file nor a bzImage.
    #[error("{0} is neither an ELF file nor a Linux bzImage")]
    NotAKernel(String),
    /// An ELF for another architecture.
    #[error("{0} is not a 64-bit x86-64 kernel")]
    WrongArch(String),
    /// A bzImage shorter than its header says.
    #[error("{name} is truncated: its header announces {want} bytes, the file has {have}")]
    Truncated {
        /// The image.
        name: String,
        /// Bytes the header announces.
        want: u64,
        /// Bytes in the file.
        have: u64,
    },
    /// A bzImage too old for the 64-bit boot protocol.
    #[error("{0} uses boot protocol {1:#x}; at least 2.06 is needed")]
    OldProtocol(String, u16),
    /// linux-loader refused the image.
    #[error("Cannot load kernel {name}")]
    Load {
        /// The image.
        name: String,
        /// Why.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd does not fit.
    #[error(
        "The initrd ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel"
    )]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// Where it would have to end.
        limit: u64,
    },
    /// The command line is too long.
    #[error("The kernel command line is {0} bytes long; at most {max} are allowed", max = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    /// ACPI tables could not be built.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Writing into guest memory failed.
    #[error("Cannot write the boot structures into guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The two kernel formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A compressed bzImage.
    BzImage,
    /// An uncompressed ELF vmlinux.
    Elf,
}

/// Recognises a Linux kernel image.
pub fn detect(name: &str, image: &[u8]) -> Result<Format, LinuxError> {
    if image.starts_with(b"\x7fELF") {
        // 64-bit, little endian, EM_X86_64.
        if image.get(4) == Some(&2)
            && image.get(5) == Some(&1)
            && image.get(18..20) == Some(&[62, 0])
        {
            return Ok(Format::Elf);
        }
        return Err(LinuxError::WrongArch(name.to_string()));
    }
    if image.get(0x202..0x206) == Some(&HDR_MAGIC.to_le_bytes()[..]) {
        read_setup_header(name, image)?;
        return Ok(Format::BzImage);
    }
    Err(LinuxError::NotAKernel(name.to_string()))
}

/// What the guest is booted with.
pub struct LinuxParams<'a> {
    /// The initrd, if any.
    pub initrd: Option<&'a [u8]>,
    /// The command line.
    pub cmdline: &'a str,
    /// What the ACPI tables describe.
    pub acpi: AcpiConfig,
}

/// Where things went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxLayout {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The e820 map given to the kernel: (start, length, type).
    pub e820: Vec<(u64, u64, u32)>,
    /// Where the initrd is: (address, size).
    pub initrd: Option<(u64, u64)>,
    /// Address of the ACPI RSDP.
    pub rsdp: u64,
}

/// The e820 map of a guest with `ram` ranges: low RAM up to the EBDA, the legacy hole and
/// ACPI tables reserved, RAM from 1 MiB, RAM above 4 GiB.
pub fn e820_map(ram: &[(GuestAddress, u64)]) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for &(start, len) in ram {
        let (s, e) = (start.0.max(HIMEM_START), start.0 + len);
        if e > s {
            map.push((s, e - s, E820_RAM));
        }
    }
    map
}

/// Loads `image` and writes everything the 64-bit boot protocol needs.
pub fn load(
    memory: &GuestMemoryMmap,
    ram: &[(GuestAddress, u64)],
    name: &str,
    image: &[u8],
    params: &LinuxParams,
) -> Result<LinuxLayout, LinuxError> {
    let load_err = |source| LinuxError::Load {
        name: name.to_string(),
        source,
    };
    let format = detect(name, image)?;
    let mut bp = boot_params::default();
    let (entry, kernel_end) = match format {
        Format::BzImage => {
            let hdr = read_setup_header(name, image)?;
            let r = BzImage::load(
                memory,
                None,
                &mut Cursor::new(image),
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(load_err)?;
            bp.hdr = r.setup_header.unwrap_or(hdr);
            // The 64-bit entry point is 0x200 past the protected-mode code.
            (r.kernel_load.0 + 0x200, r.kernel_end)
        }
        Format::Elf => {
            let r = Elf::load(
                memory,
                None,
                &mut Cursor::new(image),
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(load_err)?;
            bp.hdr = setup_header {
                boot_flag: BOOT_FLAG,
                header: HDR_MAGIC,
                kernel_alignment: 0x100_0000,
                ..Default::default()
            };
            (r.kernel_load.0, r.kernel_end)
        }
    };
    bp.hdr.type_of_loader = LOADER_OTHER;
    bp.hdr.loadflags |= LOADFLAG_CAN_USE_HEAP;
    bp.hdr.heap_end_ptr = 0xfe00;

    let cmdline = params.cmdline.as_bytes();
    if cmdline.len() >= CMDLINE_MAX {
        return Err(LinuxError::CmdlineTooLong(cmdline.len()));
    }
    memory.write_slice(cmdline, GuestAddress(CMDLINE_ADDR))?;
    memory.write_obj(0u8, GuestAddress(CMDLINE_ADDR + cmdline.len() as u64))?;
    bp.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    bp.hdr.cmdline_size = cmdline.len() as u32 + 1;

    let low_end = ram[0].0.0 + ram[0].1;
    let initrd = match params.initrd {
        Some(data) => {
            let size = data.len() as u64;
            // Highest page-aligned place below the end of low RAM (and the kernel's limit).
            let max = match format {
                Format::BzImage if bp.hdr.initrd_addr_max != 0 => {
                    u64::from(bp.hdr.initrd_addr_max) + 1
                }
                _ => low_end,
            }
            .min(low_end);
            let addr = max
                .checked_sub(size)
                .map(|a| a & !0xfff)
                // A kernel that claims to end near 2^64 leaves no room (and must not overflow).
                .filter(|&a| {
                    kernel_end
                        .checked_next_multiple_of(0x1000)
                        .is_some_and(|end| a >= end)
                })
                .ok_or(LinuxError::InitrdTooLarge { size, limit: max })?;
            memory.write_slice(data, GuestAddress(addr))?;
            bp.hdr.ramdisk_image = addr as u32;
            bp.hdr.ramdisk_size = size as u32;
            Some((addr, size))
        }
        None => None,
    };

    let e820 = e820_map(ram);
    for (slot, &(addr, size, type_)) in bp.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    bp.e820_entries = e820.len() as u8;

    let tables: AcpiTables = acpi::build(&params.acpi)?;
    tables.write_to(memory)?;
    bp.acpi_rsdp_addr = tables.rsdp_addr();

    memory.write_obj(bp, GuestAddress(ZERO_PAGE))?;
    regs::write_boot_tables(
        memory,
        ram.iter()
            .map(|(a, l)| a.0 + l)
            .max()
            .unwrap_or(0)
            .max(MMIO_HOLE_END),
    )?;
    Ok(LinuxLayout {
        entry,
        e820,
        initrd,
        rsdp: tables.rsdp_addr(),
    })
}

/// The bzImage's setup header, after checking the file is as long as it says.
fn read_setup_header(name: &str, image: &[u8]) -> Result<setup_header, LinuxError> {
    let mut hdr = setup_header::default();
    let size = std::mem::size_of::<setup_header>();
    let raw = image
        .get(0x1f1..0x1f1 + size)
        .ok_or(LinuxError::Truncated {
            name: name.to_string(),
            want: (0x1f1 + size) as u64,
            have: image.len() as u64,
        })?;
    vm_memory::ByteValued::as_mut_slice(&mut hdr).copy_from_slice(raw);
    if hdr.version < 0x0206 {
        return Err(LinuxError::OldProtocol(name.to_string(), hdr.version));
    }
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        u64::from(hdr.setup_sects)
    };
    let want = (setup_sects + 1) * 512 + u64::from(hdr.syssize) * 16;
    if (image.len() as u64) < want {
        return Err(LinuxError::Truncated {
            name: name.to_string(),
            want,
            have: image.len() as u64,
        });
    }
    Ok(hdr)
}

#[cfg(test)]
mod tests;
