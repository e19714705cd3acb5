//! What a checkpoint is and how it travels: the state encoding (one codec module), snapshot
//! files, and the control API over a Unix socket.
#![warn(missing_docs)]

pub mod api;
pub mod codec;
pub mod control;
pub mod files;
pub mod snapshot;
pub mod transport;
pub mod wire;

#[cfg(test)]
mod tests;
