//! The network device's glue to the event loop: queue notifications and the TAP.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{Net, Tap};
use crate::event_loop::{EventHandler, Interest};

const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;
const TAP: u32 = 2;
const ROOM: u32 = 3;

/// Moves frames when the guest posts buffers, queues frames, or the TAP has frames.
pub struct NetHandler {
    /// The device.
    pub device: Arc<Mutex<Net<Tap>>>,
    /// Receive queue notification.
    pub rx_evt: EventFd,
    /// Transmit queue notification.
    pub tx_evt: EventFd,
    /// The TAP's descriptor.
    pub tap_fd: std::os::fd::RawFd,
    /// Written when the output gate has room again after it was full.
    pub room: EventFd,
}

impl EventHandler for NetHandler {
    fn interests(&self) -> Vec<Interest> {
        vec![
            Interest {
                fd: self.rx_evt.as_raw_fd(),
                tag: RX_QUEUE,
                edge: false,
            },
            Interest {
                fd: self.tx_evt.as_raw_fd(),
                tag: TX_QUEUE,
                edge: false,
            },
            // Edge-triggered: frames may stay unread while the guest has no buffers.
            Interest {
                fd: self.tap_fd,
                tag: TAP,
                edge: true,
            },
            Interest {
                fd: self.room.as_raw_fd(),
                tag: ROOM,
                edge: false,
            },
        ]
    }

    fn handle(&mut self, tag: u32) {
        let mut dev = self.device.lock().unwrap_or_else(|p| p.into_inner());
        match tag {
            RX_QUEUE => {
                let _ = self.rx_evt.read();
                dev.process_rx();
            }
            TX_QUEUE => {
                let _ = self.tx_evt.read();
                dev.process_tx();
            }
            ROOM => {
                let _ = self.room.read();
                dev.process_tx();
            }
            _ => {
                dev.process_rx();
            }
        }
    }
}
