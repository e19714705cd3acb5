//! x86-64 machine set-up: segments, page tables, registers and CPUID for the ring-3 test guest.

pub mod cpuid;
pub mod gdt;
pub mod paging;
pub mod regs;
