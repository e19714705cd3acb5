//! The block device's glue to the event loop: its queue notification.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::Block;
use crate::event_loop::{EventHandler, Interest};

/// Processes the queue whenever the guest notifies it.
pub struct BlockHandler {
    /// The device.
    pub device: Arc<Mutex<Block>>,
    /// Its queue's notification (signalled by KVM through ioeventfd).
    pub queue_evt: EventFd,
}

impl EventHandler for BlockHandler {
    fn interests(&self) -> Vec<Interest> {
        vec![Interest {
            fd: self.queue_evt.as_raw_fd(),
            tag: 0,
            edge: false,
        }]
    }

    fn handle(&mut self, _tag: u32) {
        // Non-blocking: after a pause the event may be replayed with the count already read.
        let _ = self.queue_evt.read();
        self.device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .process_queue();
    }
}
