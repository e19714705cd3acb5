//! What kind of guest an image is, and how each kind is loaded and its vCPUs set up: the
//! ring-3 test guest (ELF with the FTVM note) or Linux (bzImage or vmlinux).

use ftvm_guest_abi::VirtioSlot;
use ftvm_guest_abi::virtio::MMIO_STRIDE;
use kvm_bindings::{KVM_MP_STATE_RUNNABLE, kvm_mp_state};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestAddress;

use crate::acpi::{AcpiConfig, MmioDevice, SerialPort};
use crate::linux::{self, LinuxError, LinuxLayout, LinuxParams};
use crate::loader::{self, BootParams, Layout, LoadError};
use crate::memory::GuestMemoryMmap;
use crate::x86::regs;

/// The test guest's command line when none is given.
pub const TEST_GUEST_CMDLINE: &str = "count=5 interval-ms=200";

/// Errors of recognising and loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A test-guest image problem.
    #[error(transparent)]
    TestGuest(#[from] LoadError),
    /// A Linux image problem.
    #[error(transparent)]
    Linux(#[from] LinuxError),
    /// An initrd for a guest that has no use for one.
    #[error("--initrd applies to Linux kernels only; {0} is an ftvm test guest")]
    InitrdForTestGuest(String),
}

/// The two kinds of guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestKind {
    /// The ring-3 test guest.
    TestGuest,
    /// A Linux kernel.
    Linux(linux::Format),
}

/// Recognises `image` (untrusted).
pub fn classify(name: &str, image: &[u8]) -> Result<GuestKind, BootError> {
    match loader::inspect(name, image) {
        Ok(_) => Ok(GuestKind::TestGuest),
        Err(LoadError::NotTestGuest(_) | LoadError::NotElf(_)) => {
            Ok(GuestKind::Linux(linux::detect(name, image)?))
        }
        Err(e) => Err(e.into()),
    }
}

/// How the guest was laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// The test guest.
    TestGuest(Box<Layout>),
    /// Linux.
    Linux(LinuxLayout),
}

/// Everything loading needs besides memory.
pub struct BootInput<'a> {
    /// The image's name, for messages.
    pub name: &'a str,
    /// The image.
    pub image: &'a [u8],
    /// Its kind.
    pub kind: GuestKind,
    /// The initrd (Linux only).
    pub initrd: Option<&'a [u8]>,
    /// The command line; None for the kind's default.
    pub cmdline: Option<&'a str>,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// The virtio devices.
    pub virtio: &'a [VirtioSlot],
}

/// Loads the guest into `memory`.
pub fn load(
    memory: &GuestMemoryMmap,
    ram: &[(GuestAddress, u64)],
    input: &BootInput,
) -> Result<Boot, BootError> {
    match input.kind {
        GuestKind::TestGuest => {
            if input.initrd.is_some() {
                return Err(BootError::InitrdForTestGuest(input.name.to_string()));
            }
            let params = BootParams {
                cmdline: input.cmdline.unwrap_or(TEST_GUEST_CMDLINE),
                vcpus: input.vcpus,
                tsc_khz: input.tsc_khz,
                virtio: input.virtio,
            };
            Ok(Boot::TestGuest(Box::new(loader::load_test_guest(
                memory,
                ram,
                input.name,
                input.image,
                &params,
            )?)))
        }
        GuestKind::Linux(_) => {
            let devices = input
                .virtio
                .iter()
                .map(|s| MmioDevice {
                    base: s.base,
                    len: MMIO_STRIDE,
                    irq: s.irq as u32,
                })
                .collect();
            let params = LinuxParams {
                initrd: input.initrd,
                cmdline: input.cmdline.unwrap_or(linux::DEFAULT_CMDLINE),
                acpi: AcpiConfig {
                    vcpus: input.vcpus,
                    devices,
                    serial: Some(SerialPort::COM1),
                },
            };
            Ok(Boot::Linux(linux::load(
                memory,
                ram,
                input.name,
                input.image,
                &params,
            )?))
        }
    }
}

/// Sets up vCPU `index` for `boot`.
pub fn setup_vcpu(vcpu: &VcpuFd, boot: &Boot, index: u8) -> Result<(), kvm_ioctls::Error> {
    match boot {
        Boot::TestGuest(layout) => {
            vcpu.set_sregs(&regs::sregs(vcpu.get_sregs()?))?;
            vcpu.set_fpu(&regs::fpu())?;
            let r = regs::regs(
                layout.image.entry,
                layout.stack_top(index),
                ftvm_guest_abi::BOOT_INFO_ADDR,
                u64::from(index),
            );
            vcpu.set_regs(&r)?;
            // With an in-kernel irqchip, application processors wait for a startup IPI; the
            // test guest starts all vCPUs directly.
            vcpu.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
        }
        Boot::Linux(layout) => {
            vcpu.set_lapic(&linux::regs::lapic(vcpu.get_lapic()?))?;
            if index == 0 {
                vcpu.set_sregs(&linux::regs::sregs(vcpu.get_sregs()?))?;
                vcpu.set_fpu(&regs::fpu())?;
                vcpu.set_regs(&linux::regs::regs(layout.entry))?;
            }
            // Application processors stay waiting for the boot CPU's INIT/SIPI.
            Ok(())
        }
    }
}
