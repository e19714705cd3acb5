//! The serial console: whole lines under a spinlock so that vCPUs do not interleave.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use ftvm_guest_abi::SERIAL_MMIO;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Address of the console lock: the one static the guest writes while printing.
pub fn lock_addr() -> u64 {
    &LOCK as *const AtomicBool as u64
}

/// Releases the lock whoever holds it (the panic path must be able to print).
pub fn force_unlock() {
    LOCK.store(false, Ordering::Release);
}

struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            crate::mmio_write8(SERIAL_MMIO, b);
        }
        Ok(())
    }
}

/// Prints one line atomically with respect to the other vCPUs.
pub fn print_line(args: fmt::Arguments) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let _ = Serial.write_fmt(args);
    let _ = Serial.write_str("\n");
    LOCK.store(false, Ordering::Release);
}

/// `println!` for the guest: one console line.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::print_line(format_args!($($arg)*)) };
}
