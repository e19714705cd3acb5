//! The primary's side of protection: each epoch, pause the running VM, capture what changed
//! (dirty pages and the whole machine state) into a staging buffer, and resume — the pause never
//! includes encoding, compression or the network. Encoding is `checkpoint::wire`.
#![warn(missing_docs)]

pub mod capture;
pub mod control;
mod precopy;
pub mod protect;
