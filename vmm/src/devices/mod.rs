//! Devices of the machine.

pub(crate) mod counters;
pub mod legacy;
pub mod pvctl;
pub mod serial;
pub mod virtio;
