//! Devices of the machine.

pub mod pvctl;
pub mod serial;
pub mod virtio;
