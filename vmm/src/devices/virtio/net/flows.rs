//! The guest's TCP connections as a card's frames show them, kept so that a takeover can make
//! each peer acknowledge again at once.
//!
//! After a failover the guest resumes from a checkpoint taken before the outage. A connection
//! that was sending has data in flight that the peer received (or not) and acknowledged to the
//! dead primary; the restored guest waits for an acknowledgement that will never come until
//! its retransmission timer fires (a second for smoltcp, 200 ms or more for Linux, doubled if
//! it already fired during the outage). Nothing the guest does can be hurried from outside,
//! but the peer can: a segment below its receive window is "not acceptable", and TCP answers
//! one with an acknowledgement of what it has (RFC 9293 3.10.7.4). So the table keeps, per
//! connection, the addresses and the last acknowledgement the peer sent, and a takeover sends
//! each peer [`PROBES`] one-byte segments of a byte it already has (one below that
//! acknowledgement) — a keep-alive probe of the kind TCP sends itself, with a byte so that
//! Linux answers each at once (it rate-limits its answers to zero-length ones, 500 ms). The
//! answers reach the guest: the first acknowledges whatever the peer has and frees the
//! guest's send buffer (or moves its window); the next three are duplicates, which make the
//! guest retransmit at once (fast retransmit) what the outage lost.
//!
//! The table is the card's state: it is saved with each checkpoint and snapshot, so the
//! replica has the connections of the committed epoch. Frames come from a hostile guest (and
//! the state from a file or the network): everything is parsed with bounds checks, the table
//! holds at most [`MAX_FLOWS`] connections (the least recently used one goes), and a saved
//! table over that is refused.

use serde::{Deserialize, Serialize};

/// Most connections a card keeps.
pub const MAX_FLOWS: usize = 64;
/// Probes per connection at a takeover: three duplicate acknowledgements trigger a fast
/// retransmit, and the first answer may not count as one (it acknowledges new data, or
/// moves the window).
pub const PROBES: usize = 4;

const ETH_HDR: usize = 14;
const ETH_IPV4: u16 = 0x0800;
const IP_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// One TCP connection of the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpFlow {
    /// The guest's MAC.
    pub guest_mac: [u8; 6],
    /// The guest's IPv4 address.
    pub guest_ip: [u8; 4],
    /// The guest's port.
    pub guest_port: u16,
    /// The peer's MAC (the next hop's).
    pub peer_mac: [u8; 6],
    /// The peer's IPv4 address.
    pub peer_ip: [u8; 4],
    /// The peer's port.
    pub peer_port: u16,
    /// The acknowledgement number of the guest's last segment (the peer's next byte).
    pub guest_ack: u32,
    /// The guest's last advertised window (as sent, unscaled).
    pub guest_window: u16,
    /// The acknowledgement number of the peer's last segment, if one arrived (the guest's
    /// bytes the peer has).
    pub peer_ack: Option<u32>,
    /// Recency (larger: used later).
    pub used: u64,
}

/// A TCP segment's addresses and header fields (IPv4 only).
struct Segment {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src_ip: [u8; 4],
    dst_ip: [u8; 4],
    src_port: u16,
    dst_port: u16,
    ack: u32,
    flags: u8,
    window: u16,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at + N)?.try_into().ok()
}

/// The TCP segment in Ethernet frame `f`, if it is one (no VLAN tag, IPv4, first fragment).
fn parse(f: &[u8]) -> Option<Segment> {
    if be16(f, 12)? != ETH_IPV4 {
        return None;
    }
    let ip = f.get(ETH_HDR..)?;
    let (version, ihl) = (ip.first()? >> 4, usize::from(ip.first()? & 0x0f) * 4);
    // Not a later fragment: those have no TCP header.
    if version != 4 || ihl < 20 || *ip.get(9)? != IP_TCP || be16(ip, 6)? & 0x1fff != 0 {
        return None;
    }
    let tcp = ip.get(ihl..)?;
    if tcp.len() < 20 {
        return None;
    }
    Some(Segment {
        dst_mac: array(f, 0)?,
        src_mac: array(f, 6)?,
        src_ip: array(ip, 12)?,
        dst_ip: array(ip, 16)?,
        src_port: be16(tcp, 0)?,
        dst_port: be16(tcp, 2)?,
        ack: be32(tcp, 8)?,
        flags: *tcp.get(13)?,
        window: be16(tcp, 14)?,
    })
}

/// A card's TCP connections (see the module).
#[derive(Debug, Default)]
pub struct FlowTable {
    flows: Vec<TcpFlow>,
    clock: u64,
}

impl FlowTable {
    fn find(&mut self, guest: ([u8; 4], u16), peer: ([u8; 4], u16)) -> Option<usize> {
        self.flows
            .iter()
            .position(|f| (f.guest_ip, f.guest_port) == guest && (f.peer_ip, f.peer_port) == peer)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Sees a frame the guest sent.
    pub fn guest_sent(&mut self, frame: &[u8]) {
        let Some(s) = parse(frame) else { return };
        let (guest, peer) = ((s.src_ip, s.src_port), (s.dst_ip, s.dst_port));
        let found = self.find(guest, peer);
        if s.flags & (TCP_RST | TCP_FIN) != 0 {
            // Closing: nothing to hurry any more.
            if let Some(i) = found {
                self.flows.swap_remove(i);
            }
            return;
        }
        if s.flags & TCP_ACK == 0 {
            return; // A SYN: the connection exists once the guest acknowledges.
        }
        let used = self.tick();
        let i = match found {
            Some(i) => i,
            None => {
                if self.flows.len() == MAX_FLOWS {
                    let oldest = (0..self.flows.len())
                        .min_by_key(|&i| self.flows[i].used)
                        .unwrap_or(0);
                    self.flows.swap_remove(oldest);
                }
                self.flows.push(TcpFlow {
                    guest_ip: s.src_ip,
                    guest_port: s.src_port,
                    peer_ip: s.dst_ip,
                    peer_port: s.dst_port,
                    ..TcpFlow::default()
                });
                self.flows.len() - 1
            }
        };
        let f = &mut self.flows[i];
        f.guest_mac = s.src_mac;
        f.peer_mac = s.dst_mac;
        f.guest_ack = s.ack;
        f.guest_window = s.window;
        f.used = used;
    }

    /// Sees a frame that arrived for the guest.
    pub fn guest_received(&mut self, frame: &[u8]) {
        let Some(s) = parse(frame) else { return };
        let Some(i) = self.find((s.dst_ip, s.dst_port), (s.src_ip, s.src_port)) else {
            return;
        };
        if s.flags & TCP_RST != 0 {
            self.flows.swap_remove(i);
        } else if s.flags & TCP_ACK != 0 && s.flags & TCP_SYN == 0 {
            self.flows[i].peer_ack = Some(s.ack);
        }
    }

    /// The connections, least recently used first.
    pub fn flows(&self) -> Vec<TcpFlow> {
        let mut v = self.flows.clone();
        v.sort_by_key(|f| f.used);
        v
    }

    /// Replaces the table with saved connections (untrusted: at most [`MAX_FLOWS`]).
    pub fn load(&mut self, flows: &[TcpFlow]) -> Result<(), &'static str> {
        if flows.len() > MAX_FLOWS {
            return Err("a network card's saved state has too many TCP connections");
        }
        self.flows = flows.to_vec();
        self.clock = flows.iter().map(|f| f.used).max().unwrap_or(0);
        Ok(())
    }

    /// [`PROBES`] probe frames per connection whose peer has acknowledged something: a
    /// segment from the guest with one byte the peer already has (the byte below what it
    /// acknowledged), which the peer answers with an acknowledgement of its own.
    pub fn probes(&self) -> Vec<Vec<u8>> {
        self.flows
            .iter()
            .filter_map(|f| Some(probe(f, f.peer_ack?.wrapping_sub(1))))
            .flat_map(|frame| std::iter::repeat_n(frame, PROBES))
            .collect()
    }
}

/// The Internet checksum of `parts` (one's complement of the one's-complement sum).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame with a TCP ACK segment of `f` from the guest carrying one (zero) byte at
/// sequence `seq`.
fn probe(f: &TcpFlow, seq: u32) -> Vec<u8> {
    let mut tcp = [0u8; 21];
    tcp[0..2].copy_from_slice(&f.guest_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&f.peer_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&f.guest_ack.to_be_bytes());
    tcp[12] = 5 << 4; // header length: 5 words
    tcp[13] = TCP_ACK;
    tcp[14..16].copy_from_slice(&f.guest_window.to_be_bytes());
    let pseudo = [
        &f.guest_ip[..],
        &f.peer_ip[..],
        &[0, IP_TCP],
        &(tcp.len() as u16).to_be_bytes(),
    ]
    .concat();
    let sum = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());

    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20 + tcp.len() as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = IP_TCP;
    ip[12..16].copy_from_slice(&f.guest_ip);
    ip[16..20].copy_from_slice(&f.peer_ip);
    let sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());

    let mut frame = Vec::with_capacity(60);
    frame.extend_from_slice(&f.peer_mac);
    frame.extend_from_slice(&f.guest_mac);
    frame.extend_from_slice(&ETH_IPV4.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&tcp);
    frame.resize(60, 0); // the Ethernet minimum
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: [u8; 6] = [6, 0, 0, 0, 0, 2];
    const PEER: [u8; 6] = [6, 0, 0, 0, 0, 1];

    /// A TCP segment from (src ip .sip, port sport) to (.dip, dport).
    fn segment(
        from_guest: bool,
        port: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        payload: usize,
    ) -> Vec<u8> {
        let (smac, dmac) = if from_guest {
            (GUEST, PEER)
        } else {
            (PEER, GUEST)
        };
        let (sip, dip) = if from_guest {
            ([10, 0, 0, 2], [10, 0, 0, 1])
        } else {
            ([10, 0, 0, 1], [10, 0, 0, 2])
        };
        let (sport, dport) = if from_guest { (19, port) } else { (port, 19) };
        let mut f = Vec::new();
        f.extend_from_slice(&dmac);
        f.extend_from_slice(&smac);
        f.extend_from_slice(&ETH_IPV4.to_be_bytes());
        let total = (40 + payload) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, IP_TCP, 0, 0]);
        ip.extend_from_slice(&sip);
        ip.extend_from_slice(&dip);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&ack.to_be_bytes());
        f.extend_from_slice(&[5 << 4, flags]);
        f.extend_from_slice(&4096u16.to_be_bytes());
        f.extend_from_slice(&[0; 4]);
        f.extend(std::iter::repeat_n(0xab, payload));
        f
    }

    #[test]
    fn a_probe_is_one_byte_below_the_peer_s_last_ack_with_valid_checksums() {
        let mut t = FlowTable::default();
        t.guest_sent(&segment(true, 40000, TCP_ACK, 1000, 555, 100));
        assert!(
            t.probes().is_empty(),
            "no acknowledgement from the peer yet"
        );
        t.guest_received(&segment(false, 40000, TCP_ACK, 555, 1050, 0));
        let probes = t.probes();
        assert_eq!(probes.len(), PROBES, "one answer and three duplicates");
        assert!(probes.iter().all(|p| *p == probes[0]));
        let p = &probes[0];
        assert_eq!(p.len(), 60);
        assert_eq!(&p[0..6], &PEER);
        assert_eq!(&p[6..12], &GUEST);
        let s = parse(p).expect("a TCP segment");
        assert_eq!((s.src_port, s.dst_port), (19, 40000));
        assert_eq!((s.src_ip, s.dst_ip), ([10, 0, 0, 2], [10, 0, 0, 1]));
        assert_eq!(
            be32(&p[ETH_HDR + 20..], 4),
            Some(1049),
            "sequence: peer's ack - 1"
        );
        assert_eq!(s.ack, 555, "acknowledges what the guest acknowledged");
        assert_eq!((s.flags, s.window), (TCP_ACK, 4096));
        // Checksums: a header summed with its checksum in place gives zero.
        let ip = &p[ETH_HDR..ETH_HDR + 20];
        assert_eq!(checksum(&[ip]), 0);
        assert_eq!(be16(ip, 2), Some(41), "one byte of data");
        let tcp = &p[ETH_HDR + 20..ETH_HDR + 41];
        let pseudo = [&ip[12..20], &[0, IP_TCP], &21u16.to_be_bytes()[..]].concat();
        assert_eq!(checksum(&[&pseudo, tcp]), 0);
    }

    #[test]
    fn the_sequence_wraps_around() {
        let mut t = FlowTable::default();
        t.guest_sent(&segment(true, 1, TCP_ACK, 0, 0, 0));
        t.guest_received(&segment(false, 1, TCP_ACK, 0, 0, 0));
        assert_eq!(be32(&t.probes()[0][ETH_HDR + 20..], 4), Some(u32::MAX));
    }

    #[test]
    fn closed_connections_and_other_frames_leave_no_flow() {
        let mut t = FlowTable::default();
        t.guest_sent(&segment(true, 1, TCP_SYN, 0, 0, 0));
        assert!(t.flows().is_empty(), "a SYN alone");
        t.guest_sent(&segment(true, 1, TCP_ACK, 0, 0, 0));
        t.guest_sent(&segment(true, 2, TCP_ACK, 0, 0, 0));
        t.guest_sent(&segment(true, 3, TCP_ACK, 0, 0, 0));
        t.guest_sent(&segment(true, 1, TCP_ACK | TCP_FIN, 0, 0, 0));
        t.guest_received(&segment(false, 2, TCP_RST, 0, 0, 0));
        let ports: Vec<u16> = t.flows().iter().map(|f| f.peer_port).collect();
        assert_eq!(ports, vec![3]);
        // Not TCP, not IPv4, cut short, a later fragment: ignored.
        let mut udp = segment(true, 9, TCP_ACK, 0, 0, 0);
        udp[ETH_HDR + 9] = 17;
        let mut arp = segment(true, 9, TCP_ACK, 0, 0, 0);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        let mut fragment = segment(true, 9, TCP_ACK, 0, 0, 0);
        fragment[ETH_HDR + 7] = 1;
        let mut short_ihl = segment(true, 9, TCP_ACK, 0, 0, 0);
        short_ihl[ETH_HDR] = 0x44;
        let full = segment(true, 9, TCP_ACK, 0, 0, 0);
        for f in [&udp, &arp, &fragment, &short_ihl] {
            t.guest_sent(f);
        }
        for n in 0..full.len() {
            t.guest_sent(&full[..n]);
            t.guest_received(&full[..n]);
        }
        assert_eq!(t.flows().len(), 1, "only port 3");
        t.guest_sent(&full);
        assert_eq!(t.flows().len(), 2, "the whole frame counts");
    }

    #[test]
    fn the_table_keeps_the_most_recent_connections_at_its_limit() {
        let mut t = FlowTable::default();
        for port in 1..=MAX_FLOWS as u16 - 1 {
            t.guest_sent(&segment(true, port, TCP_ACK, 0, 0, 0));
        }
        assert_eq!(t.flows().len(), MAX_FLOWS - 1);
        t.guest_sent(&segment(true, MAX_FLOWS as u16, TCP_ACK, 0, 0, 0));
        assert_eq!(t.flows().len(), MAX_FLOWS);
        // Port 1 is used again: port 2 is the oldest when one more comes.
        t.guest_sent(&segment(true, 1, TCP_ACK, 0, 0, 0));
        t.guest_sent(&segment(true, 1000, TCP_ACK, 0, 0, 0));
        let ports: Vec<u16> = t.flows().iter().map(|f| f.peer_port).collect();
        assert_eq!(ports.len(), MAX_FLOWS);
        assert!(!ports.contains(&2) && ports.contains(&1) && ports.contains(&1000));
    }

    #[test]
    fn a_saved_table_is_loaded_up_to_the_limit() {
        let flows: Vec<TcpFlow> = (0..=MAX_FLOWS as u64)
            .map(|i| TcpFlow {
                used: i,
                peer_ack: Some(7),
                ..TcpFlow::default()
            })
            .collect();
        let mut t = FlowTable::default();
        assert!(t.load(&flows[..MAX_FLOWS - 1]).is_ok());
        assert!(t.load(&flows[..MAX_FLOWS]).is_ok());
        assert_eq!(t.probes().len(), MAX_FLOWS * PROBES);
        assert!(t.load(&flows).is_err());
        assert_eq!(
            t.flows().len(),
            MAX_FLOWS,
            "a refused table changes nothing"
        );
        // The next connection is more recent than every loaded one.
        t.guest_sent(&segment(true, 5, TCP_ACK, 0, 0, 0));
        assert_eq!(t.flows().last().unwrap().peer_port, 5);
    }
}
