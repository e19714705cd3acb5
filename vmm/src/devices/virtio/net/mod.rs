//! virtio-net backed by a TAP device.

mod device;
mod event_handler;
pub mod flows;
mod tap;
#[cfg(test)]
mod tests;

pub use device::{Net, NetBackend, NetConfig, NetCounters, default_mac};
pub use event_handler::NetHandler;
pub use tap::{Tap, TapError};
