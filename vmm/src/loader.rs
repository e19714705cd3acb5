//! Loading the ring-3 test guest: recognise its ELF, load it with linux-loader, and lay out the
//! boot state (GDT, page tables, per-vCPU stacks, boot information, command line).

use std::io::Cursor;

use ftvm_guest_abi::{
    ABI_VERSION, BOOT_INFO_ADDR, BOOT_MAGIC, BootInfo, CMDLINE_ADDR, CMDLINE_MAX, ELF_NOTE_NAME,
    ELF_NOTE_TYPE, KERNEL_MIN_ADDR, MAX_MEM_RANGES, MAX_VIRTIO, MemRange, STACK_SIZE, VirtioSlot,
};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestMemoryMmap, PAGE_SIZE};
use crate::x86::{gdt, paging};

/// Errors of loading a guest image.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is not an ELF image at all.
    #[error("{0} is not an ELF file (bad magic)")]
    NotElf(String),
    /// The ELF image is malformed.
    #[error("{name} is not a valid ELF image: {what}")]
    Malformed {
        /// The image's name.
        name: String,
        /// What is wrong with it.
        what: &'static str,
    },
    /// An ELF file for another architecture or class.
    #[error("{0} is not a 64-bit x86-64 ELF image")]
    WrongArch(String),
    /// A 64-bit ELF that is not an ftvm test guest.
    #[error(
        "{0} has no ftvm test-guest note; only ftvm test guests can be booted from an ELF file so far"
    )]
    NotTestGuest(String),
    /// A test guest built for another version of the ABI.
    #[error("{name} speaks test-guest ABI version {found}, this ftvm speaks {ABI_VERSION}")]
    AbiVersion {
        /// The image's name.
        name: String,
        /// Version in its note.
        found: u32,
    },
    /// A segment lies outside the RAM the image may use.
    #[error(
        "{name}: segment at {start:#x}+{len:#x} does not fit in guest RAM ({min:#x}..{max:#x})"
    )]
    DoesNotFit {
        /// The image's name.
        name: String,
        /// Segment address.
        start: u64,
        /// Segment size in memory.
        len: u64,
        /// Lowest allowed address.
        min: u64,
        /// Highest allowed end.
        max: u64,
    },
    /// Not enough RAM left for the stacks.
    #[error("Guest memory is too small for the image and {vcpus} vCPU stacks")]
    NoRoomForStacks {
        /// Number of vCPUs.
        vcpus: u8,
    },
    /// More virtio devices than the boot information can list.
    #[error("{0} virtio devices configured; the test guest supports at most {MAX_VIRTIO}")]
    TooManyDevices(usize),
    /// The command line is too long.
    #[error("The guest command line is {0} bytes long; at most {CMDLINE_MAX} are allowed")]
    CmdlineTooLong(usize),
    /// linux-loader failed.
    #[error("Cannot load {name}")]
    Load {
        /// The image's name.
        name: String,
        /// linux-loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// Writing boot structures into guest memory failed.
    #[error("Cannot write boot structures into guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What the ELF header and program headers of a test guest say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// Entry point (identity-mapped, so also a physical address).
    pub entry: u64,
    /// First byte after the highest loaded segment, page-aligned.
    pub image_end: u64,
    /// Loadable segments: (physical address, size in memory, writable).
    pub segments: Vec<(u64, u64, bool)>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_W: u32 = 2;
const EM_X86_64: u16 = 62;

/// Reads the headers of `elf` (untrusted) and checks that it is an ftvm test guest.
pub fn inspect(name: &str, elf: &[u8]) -> Result<GuestImage, LoadError> {
    let bad = |what| LoadError::Malformed {
        name: name.to_string(),
        what,
    };
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(LoadError::NotElf(name.to_string()));
    }
    // Class 2 = 64-bit, data 1 = little endian.
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) || u16_at(elf, 18) != Some(EM_X86_64) {
        return Err(LoadError::WrongArch(name.to_string()));
    }
    let entry = u64_at(elf, 24).ok_or(bad("truncated ELF header"))?;
    let phoff = u64_at(elf, 32).ok_or(bad("truncated ELF header"))?;
    let phentsize = u16_at(elf, 54).ok_or(bad("truncated ELF header"))?;
    let phnum = u16_at(elf, 56).ok_or(bad("truncated ELF header"))?;
    if phentsize != 56 {
        return Err(bad("unexpected program header size"));
    }
    let mut segments = Vec::new();
    let mut version = None;
    for i in 0..u64::from(phnum) {
        let off = phoff
            .checked_add(i * 56)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or(bad("program header offset overflows"))?;
        let ph = elf
            .get(
                off..off
                    .checked_add(56)
                    .ok_or(bad("program header offset overflows"))?,
            )
            .ok_or(bad("program headers lie past the end of the file"))?;
        let p_type = u32_at(ph, 0).unwrap_or(0);
        let p_flags = u32_at(ph, 4).unwrap_or(0);
        let p_offset = u64_at(ph, 8).unwrap_or(0);
        let p_paddr = u64_at(ph, 24).unwrap_or(0);
        let p_filesz = u64_at(ph, 32).unwrap_or(0);
        let p_memsz = u64_at(ph, 40).unwrap_or(0);
        let file_range = usize::try_from(p_offset)
            .ok()
            .and_then(|s| Some(s..s.checked_add(usize::try_from(p_filesz).ok()?)?))
            .filter(|r| r.end <= elf.len())
            .ok_or(bad("a segment lies past the end of the file"))?;
        match p_type {
            PT_LOAD if p_filesz > 0 => {
                if p_memsz < p_filesz {
                    return Err(bad("a segment is smaller in memory than in the file"));
                }
                segments.push((p_paddr, p_memsz, p_flags & PF_W != 0));
            }
            PT_NOTE => {
                if let Some(v) = find_abi_note(&elf[file_range]) {
                    version = Some(v);
                }
            }
            _ => {}
        }
    }
    let version = version.ok_or(LoadError::NotTestGuest(name.to_string()))?;
    if u64::from(version) != ABI_VERSION {
        return Err(LoadError::AbiVersion {
            name: name.to_string(),
            found: version,
        });
    }
    if segments.is_empty() {
        return Err(bad("no loadable segment"));
    }
    let mut image_end = 0u64;
    for &(start, len, _) in &segments {
        let end = start
            .checked_add(len)
            .ok_or(bad("a segment wraps around"))?;
        image_end = image_end.max(end);
    }
    if !segments
        .iter()
        .any(|&(s, l, _)| entry >= s && entry < s.saturating_add(l))
    {
        return Err(bad("the entry point is outside every segment"));
    }
    Ok(GuestImage {
        entry,
        // A segment ending in the last page below 2^64 has no page-aligned end.
        image_end: image_end
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(bad("a segment ends at the top of the address space"))?,
        segments,
    })
}

/// Scans a note segment for the FTVM ABI note; returns its version.
fn find_abi_note(mut notes: &[u8]) -> Option<u32> {
    while notes.len() >= 12 {
        let namesz = u32_at(notes, 0)? as usize;
        let descsz = u32_at(notes, 4)? as usize;
        let kind = u32_at(notes, 8)?;
        let name_end = 12usize.checked_add(namesz.checked_next_multiple_of(4)?)?;
        let desc_end = name_end.checked_add(descsz.checked_next_multiple_of(4)?)?;
        let name = notes.get(12..12 + namesz)?;
        if name == ELF_NOTE_NAME && kind == ELF_NOTE_TYPE && descsz >= 4 {
            return u32_at(notes, name_end);
        }
        notes = notes.get(desc_end..)?;
    }
    None
}

/// Where things went in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The loaded image.
    pub image: GuestImage,
    /// The boot information handed to the guest.
    pub boot_info: BootInfo,
}

impl Layout {
    /// Top of vCPU `index`'s stack.
    pub fn stack_top(&self, index: u8) -> u64 {
        self.boot_info.stack(u64::from(index)).1
    }
}

/// What the test guest is told at boot besides its memory.
#[derive(Clone, Debug, Default)]
pub struct BootParams<'a> {
    /// The command line (its workload).
    pub cmdline: &'a str,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// The virtio devices.
    pub virtio: &'a [VirtioSlot],
}

/// Loads the test guest `elf` into `memory` and writes the boot structures.
pub fn load_test_guest(
    memory: &GuestMemoryMmap,
    ram: &[(GuestAddress, u64)],
    name: &str,
    elf: &[u8],
    params: &BootParams,
) -> Result<Layout, LoadError> {
    let BootParams {
        cmdline,
        vcpus,
        tsc_khz,
        virtio,
    } = *params;
    if virtio.len() > MAX_VIRTIO {
        return Err(LoadError::TooManyDevices(virtio.len()));
    }
    let image = inspect(name, elf)?;
    let low_end = ram[0].0.0 + ram[0].1;
    for &(start, len, _) in &image.segments {
        if start < KERNEL_MIN_ADDR || start + len > low_end {
            return Err(LoadError::DoesNotFit {
                name: name.to_string(),
                start,
                len,
                min: KERNEL_MIN_ADDR,
                max: low_end,
            });
        }
    }
    if cmdline.len() as u64 > CMDLINE_MAX {
        return Err(LoadError::CmdlineTooLong(cmdline.len()));
    }
    Elf::load(
        memory,
        None,
        &mut Cursor::new(elf),
        Some(GuestAddress(KERNEL_MIN_ADDR)),
    )
    .map_err(|source| LoadError::Load {
        name: name.to_string(),
        source,
    })?;

    let stack_base = image.image_end.next_multiple_of(0x1_0000);
    let free_start = stack_base + u64::from(vcpus) * STACK_SIZE;
    if free_start > low_end {
        return Err(LoadError::NoRoomForStacks { vcpus });
    }
    let mut boot_info = BootInfo {
        magic: BOOT_MAGIC,
        version: ABI_VERSION,
        vcpus: u64::from(vcpus),
        tsc_khz,
        cmdline_len: cmdline.len() as u64,
        stack_base,
        free_start,
        mem_count: ram.len().min(MAX_MEM_RANGES) as u64,
        virtio_count: virtio.len() as u64,
        ..Default::default()
    };
    boot_info.virtio[..virtio.len()].copy_from_slice(virtio);
    for (slot, &(start, len)) in boot_info.mem.iter_mut().zip(ram) {
        *slot = MemRange {
            start: start.0,
            len,
        };
    }

    for (i, word) in gdt::table().iter().enumerate() {
        memory.write_obj(*word, GuestAddress(gdt::GDT_ADDR + 8 * i as u64))?;
    }
    // Map the MMIO hole too, so that device drivers in the guest can reach MMIO devices.
    let top = ram
        .iter()
        .map(|(a, l)| a.0 + l)
        .max()
        .unwrap_or(0)
        .max(crate::memory::MMIO_HOLE_END);
    // Read-only for the guest: everything below the image (boot structures, GDT, page
    // tables) and its read-only segments.
    let mut read_only = vec![(0, KERNEL_MIN_ADDR)];
    read_only.extend(
        image
            .segments
            .iter()
            .filter(|s| !s.2)
            .map(|&(s, l, _)| (s, s + l)),
    );
    for (addr, table) in paging::identity_tables(top, &read_only) {
        for (i, entry) in table.iter().enumerate() {
            memory.write_obj(*entry, GuestAddress(addr + 8 * i as u64))?;
        }
    }
    memory.write_slice(boot_info.as_bytes(), GuestAddress(BOOT_INFO_ADDR))?;
    memory.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_ADDR))?;
    Ok(Layout { image, boot_info })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF: header, one PT_LOAD and one PT_NOTE with `note`.
    fn elf(machine: u16, note: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x200];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[18..20].copy_from_slice(&machine.to_le_bytes());
        f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&2u16.to_le_bytes());
        let ph = |t: u32, off: u64, addr: u64, size: u64| {
            let mut p = vec![0u8; 56];
            p[..4].copy_from_slice(&t.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[24..32].copy_from_slice(&addr.to_le_bytes());
            p[32..40].copy_from_slice(&size.to_le_bytes());
            p[40..48].copy_from_slice(&(size + 0x800).to_le_bytes());
            p
        };
        f[64..120].copy_from_slice(&ph(PT_LOAD, 0x100, 0x10_0000, 0x10));
        f[120..176].copy_from_slice(&ph(PT_NOTE, 0x180, 0, note.len() as u64));
        f[0x180..0x180 + note.len()].copy_from_slice(note);
        f
    }

    fn note(name: &[u8], kind: u32, version: u32) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend((name.len() as u32).to_le_bytes());
        n.extend(4u32.to_le_bytes());
        n.extend(kind.to_le_bytes());
        n.extend(name);
        n.resize(12 + name.len().next_multiple_of(4), 0);
        n.extend(version.to_le_bytes());
        n
    }

    #[test]
    fn a_test_guest_is_recognised() {
        let mut notes = note(b"GNU\0", 3, 0);
        notes.extend(note(ELF_NOTE_NAME, ELF_NOTE_TYPE, ABI_VERSION as u32));
        let image = inspect("g", &elf(EM_X86_64, &notes)).unwrap();
        assert_eq!(image.entry, 0x10_0000);
        assert_eq!(image.segments, vec![(0x10_0000, 0x810, false)]);
        assert_eq!(image.image_end, 0x10_1000);
    }

    #[test]
    fn other_files_are_refused_clearly() {
        let ok = note(ELF_NOTE_NAME, ELF_NOTE_TYPE, ABI_VERSION as u32);
        assert!(matches!(
            inspect("k", b"MZ\x90\0 not an elf"),
            Err(LoadError::NotElf(_))
        ));
        assert!(matches!(inspect("k", b""), Err(LoadError::NotElf(_))));
        assert!(matches!(
            inspect("k", &elf(183, &ok)),
            Err(LoadError::WrongArch(_))
        ));
        assert!(matches!(
            inspect("k", &elf(EM_X86_64, &note(b"Xen\0", 18, 1))),
            Err(LoadError::NotTestGuest(_))
        ));
        assert!(matches!(
            inspect(
                "k",
                &elf(EM_X86_64, &note(ELF_NOTE_NAME, ELF_NOTE_TYPE, 99))
            ),
            Err(LoadError::AbiVersion { found: 99, .. })
        ));
        let mut truncated = elf(EM_X86_64, &ok);
        truncated.truncate(100);
        assert!(matches!(
            inspect("k", &truncated),
            Err(LoadError::Malformed { .. })
        ));
    }

    /// Found by the kernel_loader fuzz target: a segment that ends inside the last page below
    /// 2^64 overflowed the page-aligned image end.
    #[test]
    fn a_segment_ending_at_the_top_of_the_address_space_is_refused() {
        let ok = note(ELF_NOTE_NAME, ELF_NOTE_TYPE, ABI_VERSION as u32);
        let mut f = elf(EM_X86_64, &ok);
        let start = u64::MAX - 0x900;
        f[24..32].copy_from_slice(&start.to_le_bytes()); // entry
        f[88..96].copy_from_slice(&start.to_le_bytes()); // p_paddr of the PT_LOAD
        assert!(matches!(inspect("k", &f), Err(LoadError::Malformed { .. })));
    }

    #[test]
    fn hostile_note_sizes_do_not_panic() {
        let mut n = note(ELF_NOTE_NAME, ELF_NOTE_TYPE, 1);
        n[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(find_abi_note(&n), None);
        n[0..4].copy_from_slice(&5u32.to_le_bytes());
        n[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            find_abi_note(&n),
            Some(1),
            "desc is read before its size matters"
        );
        assert_eq!(find_abi_note(&[0xff; 11]), None);
    }
}
