//! Memory for drivers: a bump allocator over the first `HEAP_SIZE` bytes of free RAM. Nothing
//! is ever freed; drivers allocate once at start-up.

use core::sync::atomic::{AtomicU64, Ordering};

use ftvm_guest_abi::BootInfo;

/// Bytes of free RAM the heap takes; workloads that use free RAM start after it.
pub const HEAP_SIZE: u64 = 16 << 20;

static NEXT: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);

/// Sets the heap up from the boot information (vCPU 0, before anything allocates).
pub fn init(boot: &BootInfo) {
    let start = boot.free_start.next_multiple_of(4096);
    NEXT.store(start, Ordering::SeqCst);
    END.store(start + HEAP_SIZE, Ordering::SeqCst);
}

/// First byte of free RAM after the heap.
pub fn end(boot: &BootInfo) -> u64 {
    boot.free_start.next_multiple_of(4096) + HEAP_SIZE
}

/// Allocates `len` zeroed bytes aligned to `align`; None when the heap is exhausted.
pub fn alloc(len: u64, align: u64) -> Option<u64> {
    let mut cur = NEXT.load(Ordering::SeqCst);
    loop {
        let start = cur.next_multiple_of(align.max(1));
        let end = start.checked_add(len)?;
        if end > END.load(Ordering::SeqCst) {
            return None;
        }
        match NEXT.compare_exchange(cur, end, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => {
                // SAFETY: [start, end) is inside the heap, identity-mapped RAM that only this
                // allocation owns from now on.
                unsafe { core::ptr::write_bytes(start as *mut u8, 0, len as usize) };
                return Some(start);
            }
            Err(now) => cur = now,
        }
    }
}

/// The global allocator (smoltcp's buffers): the bump heap; freeing is a no-op, so users
/// allocate once and reuse.
struct Bump;

// SAFETY: alloc returns zeroed, exclusively owned memory of the requested size and alignment,
// or null; dealloc never hands memory out again.
unsafe impl core::alloc::GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        alloc(layout.size() as u64, layout.align() as u64)
            .map_or(core::ptr::null_mut(), |a| a as *mut u8)
    }
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: core::alloc::Layout) {}
}

#[global_allocator]
static ALLOCATOR: Bump = Bump;
