//! ftvm's machine: a KVM VM with its vCPUs, guest memory with dirty tracking, the port-I/O and
//! MMIO buses, devices, and the loader of the ring-3 test guest.
//!
//! This crate knows nothing of replication. It offers what checkpointing needs: pause and
//! resume of every vCPU, the pages dirtied since the last look (KVM's log OR-ed with the VMM's
//! own writes), and counters.
#![warn(missing_docs)]

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod device_manager;
pub mod devices;
pub mod dirty_ring;
pub mod disk_track;
pub mod event;
pub mod event_loop;
pub mod hostfile;
pub mod linux;
pub mod loader;
pub mod memory;
pub mod output;
pub mod signals;
pub mod state;
pub mod vcpu;
pub mod vm;
pub mod x86;

pub use event::{Reporter, VmEvent};
pub use vm::{Kernel, RunState, RunningVm, Vm, VmConfig, VmError};
