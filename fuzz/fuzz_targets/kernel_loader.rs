//! Image classification and loading (`vmm::boot::classify` and `vmm::boot::load`: the test
//! guest's ELF loader and Linux's bzImage/ELF loader) into a 16 MiB guest, without KVM.
//!
//! Input: a control byte (vCPUs, initrd, command line, virtio devices: see
//! `ftvm_fuzz::layout::kernel`), then the image. With an initrd, the input's last quarter is
//! the initrd and the rest the image.
//!
//! Invariants: no panic; an image `classify` refuses is an error, and so is anything `load`
//! refuses; an accepted image's layout lies inside guest RAM, and every byte the loader wrote
//! lies in the boot-structure area below 1 MiB, a loaded segment, or the initrd; the boot
//! information, command line and initrd read back as the layout says.
#![no_main]

use ftvm_fuzz::layout::kernel::{LONG_CMDLINE, MEM, VCPUS_MASK, WITH_INITRD, WITH_VIRTIO};
use ftvm_fuzz::{PAGE, Ranges};
use ftvm_guest_abi::{BOOT_INFO_ADDR, CMDLINE_ADDR, KERNEL_MIN_ADDR, VirtioSlot};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::boot::{self, Boot, BootInput, GuestKind};
use vmm::linux::{self, Format};
use vmm::memory::GuestMemoryMmap;

/// Control bit: a command line one byte longer than Linux accepts.
const CMDLINE_4096: u8 = 32;

fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// PT_LOAD segments with file bytes, as linux-loader loads them: (address, file size).
fn elf_loads(image: &[u8]) -> Vec<(u64, u64)> {
    let (Some(phoff), Some(phnum)) = (u64_at(image, 32), image.get(56..58)) else {
        return Vec::new();
    };
    let phnum = u16::from_le_bytes([phnum[0], phnum[1]]);
    let mut out = Vec::new();
    for i in 0..u64::from(phnum) {
        let Some(ph) = usize::try_from(phoff + i * 56)
            .ok()
            .and_then(|o| image.get(o..o.checked_add(56)?))
        else {
            break;
        };
        let p_type = u32::from_le_bytes(ph[0..4].try_into().unwrap());
        let (paddr, filesz) = (u64_at(ph, 24).unwrap(), u64_at(ph, 32).unwrap());
        if p_type == 1 && filesz > 0 {
            out.push((paddr, filesz));
        }
    }
    out
}

fn dirty_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
    let region = mem.iter().next().expect("one region");
    let bits = std::ops::Deref::deref(region).bitmap();
    (0..MEM / PAGE as u64)
        .filter(|p| bits.is_addr_set((p * PAGE as u64) as usize))
        .collect()
}

/// Asserts every dirty page overlaps `allowed` (page granularity: the bitmap's).
fn assert_writes_within(mem: &GuestMemoryMmap, allowed: &Ranges, what: &str) {
    for page in dirty_pages(mem) {
        let (s, e) = (page * PAGE as u64, (page + 1) * PAGE as u64);
        assert!(
            allowed.0.iter().any(|r| r.start < e && s < r.end),
            "{what}: the loader wrote page {s:#x}, outside {allowed:x?}"
        );
    }
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr))
        .expect("inside RAM");
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctrl, rest)) = data.split_first() else {
        return;
    };
    let (image, initrd) = if ctrl & WITH_INITRD != 0 {
        let (i, r) = rest.split_at(rest.len() - rest.len() / 4);
        (i, Some(r))
    } else {
        (rest, None)
    };
    let cmdline = if ctrl & CMDLINE_4096 != 0 {
        Some("y".repeat(4096))
    } else if ctrl & LONG_CMDLINE != 0 {
        Some("x".repeat(4095))
    } else {
        None
    };
    let virtio = [
        VirtioSlot {
            base: 0xd000_0000,
            device_type: 2,
            irq: 5,
        },
        VirtioSlot {
            base: 0xd000_1000,
            device_type: 1,
            irq: 6,
        },
    ];

    let Ok(kind) = boot::classify("fuzz", image) else {
        return;
    };
    let ram = vmm::memory::ram_ranges(MEM).expect("16 MiB is a valid size");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("memory");
    let input = BootInput {
        name: "fuzz",
        image,
        kind,
        initrd,
        cmdline: cmdline.as_deref(),
        vcpus: (ctrl & VCPUS_MASK) + 1,
        tsc_khz: 1_000_000,
        virtio: if ctrl & WITH_VIRTIO != 0 {
            &virtio
        } else {
            &[]
        },
    };
    let Ok(boot) = boot::load(&mem, &ram, &input) else {
        return;
    };
    let mut allowed = Ranges::default();
    match (kind, &boot) {
        (GuestKind::TestGuest, Boot::TestGuest(layout)) => {
            let img = &layout.image;
            for &(start, len, _) in &img.segments {
                assert!(
                    start >= KERNEL_MIN_ADDR && start + len <= MEM,
                    "segment {start:#x}+{len:#x} outside RAM"
                );
                allowed.add(start, len);
            }
            assert!(
                img.segments
                    .iter()
                    .any(|&(s, l, _)| img.entry >= s && img.entry < s + l),
                "entry {:#x} outside every segment",
                img.entry
            );
            let info = &layout.boot_info;
            assert!(info.stack_base >= img.image_end, "stacks overlap the image");
            assert!(info.free_start <= MEM, "stacks beyond RAM");
            assert_eq!(info.vcpus, u64::from(input.vcpus));
            allowed.add(0, KERNEL_MIN_ADDR);
            assert_writes_within(&mem, &allowed, "test guest");
            assert_eq!(
                read(&mem, BOOT_INFO_ADDR, info.as_bytes().len()),
                info.as_bytes(),
                "boot information in memory differs from the layout's"
            );
            let cl = input.cmdline.unwrap_or(boot::TEST_GUEST_CMDLINE);
            assert_eq!(read(&mem, CMDLINE_ADDR, cl.len()), cl.as_bytes());
        }
        (GuestKind::Linux(format), Boot::Linux(layout)) => {
            allowed.add(0, linux::HIMEM_START);
            match format {
                Format::BzImage => {
                    let setup_sects = match image[0x1f1] {
                        0 => 4,
                        n => u64::from(n),
                    };
                    let size = image.len() as u64 - (setup_sects + 1) * 512;
                    allowed.add(layout.entry - 0x200, size);
                }
                Format::Elf => {
                    for (addr, len) in elf_loads(image) {
                        allowed.add(addr, len);
                    }
                }
            }
            if let Some((addr, size)) = layout.initrd {
                let data = initrd.expect("an initrd was given");
                assert_eq!(size, data.len() as u64);
                assert!(
                    addr >= linux::HIMEM_START && addr % 4096 == 0 && addr + size <= MEM,
                    "initrd at {addr:#x}+{size:#x}"
                );
                assert!(read(&mem, addr, data.len()) == data, "initrd bytes differ");
                allowed.add(addr, size);
            } else {
                assert!(initrd.is_none(), "initrd given but not placed");
            }
            for &(start, len, kind) in &layout.e820 {
                if kind == 1 {
                    assert!(
                        start + len <= MEM,
                        "e820 RAM {start:#x}+{len:#x} beyond RAM"
                    );
                }
            }
            assert!(
                layout.rsdp < linux::HIMEM_START,
                "RSDP at {:#x}",
                layout.rsdp
            );
            assert_writes_within(&mem, &allowed, "linux");
            let cl = input.cmdline.unwrap_or(linux::DEFAULT_CMDLINE);
            let mut expect = cl.as_bytes().to_vec();
            expect.push(0);
            assert_eq!(read(&mem, linux::CMDLINE_ADDR, expect.len()), expect);
        }
        (k, b) => panic!("classified {k:?}, loaded as {b:?}"),
    }
});
