//! virtio-blk backed by a raw image file.

mod device;
mod event_handler;
mod request;
#[cfg(test)]
mod tests;

pub use device::{Block, BlockConfig, BlockCounters, BlockError, HostIoError, QUEUE_SIZE};
pub use event_handler::BlockHandler;
pub use request::{MAX_DATA_LEN, Op, RequestError};
