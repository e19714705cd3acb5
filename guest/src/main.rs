//! ftvm's test guest.
//!
//! Started by the VMM on every vCPU at once, in 64-bit mode at CPL 3 (see `ftvm_guest_abi`), it
//! reads its workload from the command line, runs it on each vCPU, prints markers and its own
//! counts on the serial console, and powers the machine off through a VMM port. It never enters
//! ring 0, so it runs at native speed on PVM and on hardware KVM alike.
#![no_std]
#![no_main]

extern crate alloc;

mod blk;
mod cmdline;
mod console;
mod heap;
mod net;
mod netsvc;
mod rt;
mod virtio;
mod workloads;

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ftvm_guest_abi::{
    ABI_VERSION, BOOT_MAGIC, BootInfo, CMDLINE_ADDR, PV_MMIO, PV_POWER_OFF, PV_WAIT_US,
};

/// Set by vCPU 0 once it has checked the boot information and printed the boot line.
static STARTED: AtomicBool = AtomicBool::new(false);
/// Number of vCPUs whose workload has finished.
static DONE: AtomicU64 = AtomicU64::new(0);

/// Writes one byte to a device register.
pub fn mmio_write8(addr: u64, value: u8) {
    // SAFETY: addr is a device register in the MMIO hole, identity-mapped by the VMM with no RAM
    // behind it: the store exits to the VMM and touches no memory.
    unsafe { (addr as *mut u8).write_volatile(value) };
}

fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: as for mmio_write8.
    unsafe { (addr as *mut u32).write_volatile(value) };
}

/// Powers the machine off with `status` (0 = success). Never returns.
pub fn power_off(status: u32) -> ! {
    loop {
        mmio_write32(PV_MMIO + PV_POWER_OFF, status);
    }
}

/// Gives the vCPU back to the VMM for up to `us` microseconds (ring 3 cannot `hlt`).
pub fn wait_us(us: u32) {
    mmio_write32(PV_MMIO + PV_WAIT_US, us);
}

/// The guest clock: nanoseconds from the TSC.
#[derive(Clone, Copy)]
pub struct Clock {
    tsc_khz: u64,
}

impl Clock {
    pub fn now_ns(&self) -> u64 {
        // SAFETY: rdtsc is allowed at CPL 3 (the VMM leaves CR4.TSD clear).
        let tsc = unsafe { core::arch::x86_64::_rdtsc() };
        (u128::from(tsc) * 1_000_000 / u128::from(self.tsc_khz.max(1))) as u64
    }

    /// Sleeps for `ms` milliseconds of real time, giving the vCPU back in between.
    pub fn sleep_ms(&self, ms: u64) {
        let deadline = self.now_ns() + ms * 1_000_000;
        loop {
            let now = self.now_ns();
            if now >= deadline {
                return;
            }
            wait_us((((deadline - now) / 1000).max(1)).min(u64::from(u32::MAX)) as u32);
        }
    }
}

/// Entry point of every vCPU: `boot` in rdi, the vCPU index in rsi.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub extern "C" fn _start(boot: &'static BootInfo, vcpu: u64) -> ! {
    if vcpu == 0 {
        if boot.magic != BOOT_MAGIC || boot.version != ABI_VERSION {
            println!("ftvm-guest: error: boot information has the wrong magic or version");
            power_off(3);
        }
    } else {
        while !STARTED.load(Ordering::Acquire) {
            wait_us(100);
        }
    }
    // SAFETY: the VMM wrote cmdline_len (at most CMDLINE_MAX) bytes at CMDLINE_ADDR, which is
    // identity-mapped guest memory that nothing writes after boot.
    let cmdline = unsafe {
        core::slice::from_raw_parts(CMDLINE_ADDR as *const u8, boot.cmdline_len as usize)
    };
    let cmdline = core::str::from_utf8(cmdline).unwrap_or("");
    if vcpu == 0 {
        let mem: u64 = boot.mem[..boot.mem_count as usize]
            .iter()
            .map(|r| r.len)
            .sum();
        println!(
            "ftvm-guest: boot abi={} vcpus={} tsc-khz={} mem-mib={} free=0x{:x} console-lock=0x{:x} cmdline=\"{}\"",
            boot.version,
            boot.vcpus,
            boot.tsc_khz,
            mem >> 20,
            boot.free_start,
            console::lock_addr(),
            cmdline
        );
        heap::init(boot);
        STARTED.store(true, Ordering::Release);
    }
    let clock = Clock {
        tsc_khz: boot.tsc_khz,
    };
    let status = match cmdline::parse(cmdline, vcpu) {
        Ok(work) => workloads::run(&work, boot, vcpu, clock),
        Err(e) => {
            if vcpu == 0 {
                println!("ftvm-guest: error: {}", e);
            }
            Err(2)
        }
    };
    if let Err(code) = status {
        power_off(code);
    }
    println!("vcpu{} done", vcpu);
    DONE.fetch_add(1, Ordering::AcqRel);
    if vcpu == 0 {
        while DONE.load(Ordering::Acquire) < boot.vcpus {
            wait_us(1000);
        }
        println!("ftvm-guest: all {} vcpus done", boot.vcpus);
        power_off(0);
    }
    loop {
        wait_us(u32::MAX);
    }
}
