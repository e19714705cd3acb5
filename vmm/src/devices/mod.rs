//! Devices of the machine.

pub mod legacy;
pub mod pvctl;
pub mod serial;
pub mod virtio;
