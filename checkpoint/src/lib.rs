//! What a checkpoint is and how it travels: the state encoding (one codec module), snapshot
//! files, the control API's HTTP server, the wire format and the replication transport.
#![warn(missing_docs)]

pub mod api;
pub mod codec;
pub mod files;
pub mod snapshot;
pub mod transport;
pub mod wire;

#[cfg(test)]
mod tests;
