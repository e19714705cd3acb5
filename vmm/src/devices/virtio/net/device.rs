//! The network device: transmit and receive queues, frames to and from a backend (the TAP).

use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::devices::counters::counters;

use ftvm_guest_abi::virtio::{ID_NET, NET_F_MAC, NET_HDR_LEN};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::Bytes;

use super::flows::FlowTable;
use crate::devices::virtio::chain::{self, Chain};
use crate::devices::virtio::{ActivateError, Interrupt, VirtioDevice, read_config_bytes};
use crate::memory::GuestMemoryMmap;
use crate::output::{FRAME_ROOM, OutputGate};
use crate::state::{StateError, VirtioDeviceState};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame handled (no segmentation offloads are offered, so real frames are ≤ 1518).
pub const MAX_FRAME: usize = 65536;
/// The device's frame buffer: a header, the largest frame, and one byte more, so that a frame
/// from the backend that would not fit is seen (the TAP truncates to the buffer) and dropped.
const FRAME_BUF: usize = NET_HDR_LEN + MAX_FRAME + 1;
/// Longest transmit chain: a header and the largest frame.
const MAX_TX_CHAIN: usize = NET_HDR_LEN + MAX_FRAME;
/// Longest TAP interface name (the kernel's IFNAMSIZ less its terminating zero).
pub const MAX_TAP_NAME: usize = libc::IFNAMSIZ - 1;

/// How a network card is configured (`--net tap=NAME[,mac=MAC]`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The TAP interface.
    pub tap: String,
    /// The guest's MAC address; None picks one from the card's position.
    pub mac: Option<[u8; 6]>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// Parses `tap=NAME[,mac=AA:BB:CC:DD:EE:FF]`; each key at most once.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        let mut seen = Vec::new();
        for part in s.split(',') {
            let unknown = || format!("Unknown network option '{part}' (expected tap=NAME,mac=MAC)");
            let (key, value) = part.split_once('=').ok_or_else(unknown)?;
            if seen.contains(&key) {
                return Err(format!("Network option '{key}' is given twice"));
            }
            seen.push(key);
            match key {
                "tap" => tap = Some(parse_tap(value)?),
                "mac" => mac = Some(parse_mac(value)?),
                _ => return Err(unknown()),
            }
        }
        Ok(Self {
            tap: tap.ok_or("A network card needs tap=NAME")?,
            mac,
        })
    }
}

fn parse_tap(name: &str) -> Result<String, String> {
    if name.is_empty() || name.len() > MAX_TAP_NAME {
        return Err(format!(
            "TAP name '{name}' is empty or longer than {MAX_TAP_NAME} bytes"
        ));
    }
    if name.contains(['/', ' ', '\0']) || name == "." || name == ".." {
        return Err(format!("TAP name '{name}' is not a valid interface name"));
    }
    Ok(name.to_string())
}

/// Parses six groups of exactly two hex digits; refuses addresses a card cannot have.
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("Invalid MAC address '{s}' (expected six hex pairs, 06:00:00:00:00:01)");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac == [0; 6] {
        return Err(format!("MAC address '{s}' is all zeros"));
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "MAC address '{s}' is a multicast or broadcast address, not a card's"
        ));
    }
    Ok(mac)
}

/// Where frames go and come from.
pub trait NetBackend: Send {
    /// Reads one frame; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Sends one frame.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<usize>;
}

impl NetBackend for super::Tap {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.read_frame(buf)
    }
    fn send(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.write_frame(frame)
    }
}

counters!(
    /// Network counters: monotonic, never reset on read. Bytes are Ethernet frame bytes (the
    /// virtio-net header is not counted), as the TAP's own statistics count them.
    pub struct NetCounters {
        /// Frames delivered to the guest.
        rx_packets,
        /// Bytes delivered to the guest.
        rx_bytes,
        /// Frames the guest sent out.
        tx_packets,
        /// Bytes the guest sent out.
        tx_bytes,
        /// Frames from the host that did not fit the guest's buffer (or the device's) and were
        /// dropped.
        rx_dropped,
        /// Frames from the guest the backend refused.
        tx_dropped,
        /// Chains dropped as malformed.
        invalid_chains,
    }
);

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A virtio-net device over backend `B`.
pub struct Net<B: NetBackend> {
    backend: B,
    mac: [u8; 6],
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    rx: Option<Queue>,
    tx: Option<Queue>,
    /// A frame read from the backend that waits for a receive buffer.
    pending: Option<usize>,
    frame: Vec<u8>,
    counters: Arc<NetCounters>,
    /// Where frames go instead of the backend: the output gate and this card's sink in it.
    output: Option<(Arc<OutputGate>, usize)>,
    /// The guest's TCP connections, as its frames show them.
    flows: Arc<Mutex<FlowTable>>,
}

impl<B: NetBackend> Net<B> {
    /// A card with address `mac` over `backend`.
    pub fn new(backend: B, mac: [u8; 6], mem: GuestMemoryMmap, interrupt: Arc<Interrupt>) -> Self {
        Self {
            backend,
            mac,
            mem,
            interrupt,
            rx: None,
            tx: None,
            pending: None,
            frame: vec![0; FRAME_BUF],
            counters: Arc::new(NetCounters::default()),
            output: None,
            flows: Arc::default(),
        }
    }

    /// The guest's TCP connections on this card (see [`super::flows`]).
    pub fn flows(&self) -> Arc<Mutex<FlowTable>> {
        self.flows.clone()
    }

    fn flow_table(&self) -> std::sync::MutexGuard<'_, FlowTable> {
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends frames through `gate` (sink `sink`, which writes them to this card's TAP) rather
    /// than the backend: when the gate is full, frames stay in the transmit ring.
    pub fn set_output(&mut self, gate: Arc<OutputGate>, sink: usize) {
        self.output = Some((gate, sink));
    }

    /// The card's counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// Whether a frame waits for a receive buffer.
    pub fn rx_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Sends every frame the guest queued; returns how many chains were consumed.
    pub fn process_tx(&mut self) -> usize {
        let Some(mut q) = self.tx.take() else {
            return 0;
        };
        let mem = self.mem.clone();
        let mut done = 0;
        loop {
            // Backpressure: a full output gate leaves the guest's frames in its ring; the
            // gate's waiter brings the device back here when there is room.
            if let Some((gate, _)) = &self.output
                && !gate.has_room(FRAME_ROOM)
            {
                break;
            }
            let Some(head) = q.pop_descriptor_chain(&mem) else {
                break;
            };
            let index = head.head_index();
            self.transmit(head);
            if let Err(e) = q.add_used(&mem, index, 0) {
                tracing::warn!("virtio-net: cannot complete a transmit: {e}");
            }
            done += 1;
        }
        if done > 0 && q.needs_notification(&mem).unwrap_or(true) {
            self.interrupt.signal_used();
        }
        self.tx = Some(q);
        done
    }

    fn transmit(&mut self, head: DescriptorChain<&GuestMemoryMmap>) {
        // A chain of at most MAX_TX_CHAIN bytes fits the frame buffer (FRAME_BUF is larger).
        let c = match chain::collect(head, MAX_TX_CHAIN as u64) {
            Ok(c) if c.writable_len() == 0 && c.readable_len() > NET_HDR_LEN as u64 => c,
            _ => return add(&self.counters.invalid_chains, 1),
        };
        let mut at = 0;
        for b in &c.buffers {
            let end = at + b.len as usize;
            let Some(dst) = self.frame.get_mut(at..end) else {
                return add(&self.counters.invalid_chains, 1);
            };
            if self.mem.read_slice(dst, b.addr).is_err() {
                return add(&self.counters.invalid_chains, 1);
            }
            at = end;
        }
        let frame = &self.frame[NET_HDR_LEN..at];
        self.flow_table().guest_sent(frame);
        let sent = match &self.output {
            Some((gate, sink)) => gate.emit(*sink, frame).map(|()| frame.len()),
            None => self.backend.send(frame),
        };
        match sent {
            Ok(_) => {
                add(&self.counters.tx_packets, 1);
                add(&self.counters.tx_bytes, frame.len() as u64);
            }
            Err(e) => {
                tracing::debug!("virtio-net: frame not sent: {e}");
                add(&self.counters.tx_dropped, 1);
            }
        }
    }

    /// Moves frames from the backend into the guest's receive buffers until either runs out;
    /// returns how many chains were used.
    pub fn process_rx(&mut self) -> usize {
        let Some(mut q) = self.rx.take() else {
            return 0;
        };
        let mem = self.mem.clone();
        let mut done = 0;
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => match self.backend.recv(&mut self.frame[NET_HDR_LEN..]) {
                    Ok(0) => break,
                    Ok(n) if n > MAX_FRAME => {
                        // Filled the spare byte: longer than a frame, possibly truncated.
                        add(&self.counters.rx_dropped, 1);
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!("virtio-net: cannot read from the backend: {e}");
                        break;
                    }
                },
            };
            self.pending = Some(len);
            let Some(head) = q.pop_descriptor_chain(&mem) else {
                break; // No buffer: the frame waits for the guest to post one.
            };
            let index = head.head_index();
            let used = match chain::collect(head, u64::MAX) {
                Ok(c) if c.readable_len() == 0 => self.receive(&c, len),
                _ => {
                    add(&self.counters.invalid_chains, 1);
                    0
                }
            };
            if let Err(e) = q.add_used(&mem, index, used) {
                tracing::warn!("virtio-net: cannot complete a receive: {e}");
            }
            done += 1;
        }
        if done > 0 && q.needs_notification(&mem).unwrap_or(true) {
            self.interrupt.signal_used();
        }
        self.rx = Some(q);
        done
    }

    /// Writes header + pending frame into `c`; returns the bytes written (0 if dropped).
    fn receive(&mut self, c: &Chain, len: usize) -> u32 {
        self.pending = None;
        let total = NET_HDR_LEN + len;
        if (total as u64) > c.writable_len() {
            add(&self.counters.rx_dropped, 1);
            return 0;
        }
        // virtio 1.x header: no offloads, num_buffers = 1.
        self.frame[..NET_HDR_LEN].fill(0);
        self.frame[10] = 1;
        let mut at = 0;
        for b in &c.buffers {
            let n = (b.len as usize).min(total - at);
            // Through vm-memory, so the pages are marked in the dirty bitmap.
            if self
                .mem
                .write_slice(&self.frame[at..at + n], b.addr)
                .is_err()
            {
                add(&self.counters.invalid_chains, 1);
                return 0;
            }
            at += n;
            if at == total {
                break;
            }
        }
        add(&self.counters.rx_packets, 1);
        add(&self.counters.rx_bytes, len as u64);
        self.flow_table()
            .guest_received(&self.frame[NET_HDR_LEN..total]);
        total as u32
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self, _features: u64, queues: Vec<Queue>) -> Result<(), ActivateError> {
        let mut it = queues.into_iter();
        self.rx = Some(it.next().ok_or(ActivateError::BadQueue(0))?);
        self.tx = Some(it.next().ok_or(ActivateError::BadQueue(1))?);
        Ok(())
    }

    fn reset(&mut self) {
        self.rx = None;
        self.tx = None;
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.rx
            .iter()
            .chain(self.tx.iter())
            .map(|q| q.state())
            .collect()
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net {
            mac: self.mac,
            flows: self.flow_table().flows(),
        }
    }

    fn check_state(&self, state: &VirtioDeviceState) -> Result<(), StateError> {
        match *state {
            VirtioDeviceState::Net { mac, .. } if mac == self.mac => Ok(()),
            VirtioDeviceState::Net { .. } => Err(StateError::Invalid(
                "a network card's MAC address differs from the snapshot's (give the same mac=)",
            )),
            _ => Err(StateError::Invalid(
                "a network card was given another device's state",
            )),
        }
    }

    fn load_state(&mut self, state: &VirtioDeviceState) -> Result<(), StateError> {
        self.check_state(state)?;
        if let VirtioDeviceState::Net { flows, .. } = state {
            self.flow_table().load(flows).map_err(StateError::Invalid)?;
        }
        Ok(())
    }
}

/// A locally administered MAC for card `index` when none is configured.
pub fn default_mac(index: usize) -> [u8; 6] {
    [0x06, 0x66, 0x74, 0x76, 0x6d, index as u8]
}
