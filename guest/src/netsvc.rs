//! The guest's network services on smoltcp: ICMP echo (automatic), `tcp-echo`, `tcp-stream`
//! (an endless pattern stream) and `http-file` (a file of N MiB of pattern bytes).

use alloc::vec;
use alloc::vec::Vec;

use ftvm_guest_abi::virtio::ID_NET;
use ftvm_guest_abi::{BootInfo, fill_pattern};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use crate::cmdline::Services;
use crate::net::{COUNTS, Net};
use crate::{Clock, println, wait_us};

/// Listening sockets per service, so that a connection in TIME-WAIT does not block the next.
const POOL: usize = 4;
/// Seed of the tcp-stream pattern.
pub const STREAM_SEED: u64 = 19;

#[derive(Clone, Copy)]
enum Kind {
    Echo,
    Stream,
    Sink,
    Http { len: u64, seed: u64 },
}

struct Conn {
    handle: SocketHandle,
    port: u16,
    kind: Kind,
    /// Bytes of pattern (or echo) sent on this connection.
    sent: u64,
    /// HTTP: the request has ended; the header went out.
    request_seen: bool,
    header_sent: bool,
    tail: [u8; 4],
}

impl Conn {
    fn reset(&mut self) {
        self.sent = 0;
        self.request_seen = false;
        self.header_sent = false;
        self.tail = [0; 4];
    }
}

pub fn run(boot: &BootInfo, clock: Clock, svc: &Services) -> Result<(), u32> {
    let Some(slot) = boot
        .virtio_devices()
        .iter()
        .find(|d| d.device_type == u64::from(ID_NET))
    else {
        println!("ftvm-guest: error: no network card");
        return Err(2);
    };
    let mut dev = match Net::new(slot.base) {
        Ok(d) => d,
        Err(e) => {
            println!("ftvm-guest: error: network card: {}", e);
            return Err(2);
        }
    };
    let now = || Instant::from_micros((clock.now_ns() / 1000) as i64);
    let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(dev.mac)));
    let mut iface = Interface::new(config, &mut dev, now());
    let [a, b, c, d] = svc.ip;
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(IpAddress::v4(a, b, c, d), svc.prefix));
    });

    let mut sockets = SocketSet::new(Vec::new());
    let mut conns = Vec::new();
    let mut services = Vec::new();
    if let Some(p) = svc.echo {
        services.push((p, Kind::Echo));
    }
    if let Some(p) = svc.stream {
        services.push((p, Kind::Stream));
    }
    if let Some(p) = svc.sink {
        services.push((p, Kind::Sink));
    }
    if let Some((mib, seed)) = svc.http {
        services.push((
            80,
            Kind::Http {
                len: mib << 20,
                seed,
            },
        ));
    }
    for &(port, kind) in &services {
        for _ in 0..POOL {
            let buf = |n: usize| tcp::SocketBuffer::new(vec![0u8; n]);
            // What a sender keeps in flight is bounded by its send buffer; under output commit
            // every byte stays in flight for a checkpoint's round trip, so the streaming
            // services get room for several epochs' worth (a Linux guest autotunes this).
            let tx = match kind {
                Kind::Stream | Kind::Http { .. } => 1 << 20,
                Kind::Echo | Kind::Sink => 64 << 10,
            };
            let handle = sockets.add(tcp::Socket::new(buf(16 << 10), buf(tx)));
            conns.push(Conn {
                handle,
                port,
                kind,
                sent: 0,
                request_seen: false,
                header_sent: false,
                tail: [0; 4],
            });
        }
    }
    let m = dev.mac;
    println!(
        "vcpu0 workload net ip={}.{}.{}.{}/{} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} counters=0x{:x}",
        a,
        b,
        c,
        d,
        svc.prefix,
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        COUNTS.as_ptr() as u64
    );
    let mut scratch = vec![0u8; 16 << 10];
    loop {
        let t = now();
        iface.poll(t, &mut dev, &mut sockets);
        let mut progress = false;
        for conn in &mut conns {
            progress |= serve(
                conn,
                sockets.get_mut::<tcp::Socket>(conn.handle),
                &mut scratch,
            );
        }
        iface.poll(t, &mut dev, &mut sockets);
        dev.flush();
        if !progress && !dev.rx_ready() {
            let delay = iface
                .poll_delay(now(), &sockets)
                .map_or(10_000, |d| d.total_micros());
            wait_us(delay.clamp(1, 10_000) as u32);
        }
    }
}

/// Moves one connection forward; returns whether anything happened.
fn serve(conn: &mut Conn, s: &mut tcp::Socket, scratch: &mut [u8]) -> bool {
    if !s.is_open() {
        conn.reset();
        let _ = s.listen(conn.port);
        return false;
    }
    let mut progress = false;
    match conn.kind {
        Kind::Echo => {
            while s.can_recv() && s.can_send() {
                let room = (s.send_capacity() - s.send_queue()).min(scratch.len());
                let n = s.recv_slice(&mut scratch[..room]).unwrap_or(0);
                if n == 0 {
                    break;
                }
                let _ = s.send_slice(&scratch[..n]);
                conn.sent += n as u64;
                progress = true;
            }
        }
        Kind::Sink => {
            progress |= discard_input(s, scratch);
        }
        Kind::Stream => {
            progress |= discard_input(s, scratch);
            while s.can_send() {
                let sent = conn.sent;
                let n = s
                    .send(|buf| {
                        fill_pattern(STREAM_SEED, sent, buf);
                        (buf.len(), buf.len())
                    })
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                conn.sent += n as u64;
                progress = true;
            }
        }
        Kind::Http { len, seed } => {
            while !conn.request_seen && s.can_recv() {
                let n = s.recv_slice(scratch).unwrap_or(0);
                if n == 0 {
                    break;
                }
                for &byte in &scratch[..n] {
                    conn.tail = [conn.tail[1], conn.tail[2], conn.tail[3], byte];
                    if &conn.tail == b"\r\n\r\n" {
                        conn.request_seen = true;
                    }
                }
                progress = true;
            }
            if conn.request_seen && !conn.header_sent && s.can_send() {
                let mut header = [0u8; 128];
                let h = format_header(&mut header, len);
                if s.send_capacity() - s.send_queue() >= h {
                    let _ = s.send_slice(&header[..h]);
                    conn.header_sent = true;
                    progress = true;
                }
            }
            while conn.header_sent && conn.sent < len && s.can_send() {
                let sent = conn.sent;
                let n = s
                    .send(|buf| {
                        let n = buf.len().min((len - sent) as usize);
                        fill_pattern(seed, sent, &mut buf[..n]);
                        (n, n)
                    })
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                conn.sent += n as u64;
                progress = true;
            }
            if conn.header_sent && conn.sent == len && s.may_send() {
                s.close();
                progress = true;
            }
        }
    }
    // The peer is done sending: finish our side too.
    if !s.may_recv() && s.may_send() && !matches!(conn.kind, Kind::Http { .. }) {
        s.close();
        progress = true;
    }
    progress
}

fn discard_input(s: &mut tcp::Socket, scratch: &mut [u8]) -> bool {
    let mut any = false;
    while s.can_recv() {
        match s.recv_slice(scratch) {
            Ok(n) if n > 0 => any = true,
            _ => break,
        }
    }
    any
}

/// Writes the HTTP response header for a body of `len` bytes; returns its length.
fn format_header(out: &mut [u8], len: u64) -> usize {
    use core::fmt::Write;
    struct Cursor<'a>(&'a mut [u8], usize);
    impl Write for Cursor<'_> {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let end = self.1 + s.len();
            self.0
                .get_mut(self.1..end)
                .ok_or(core::fmt::Error)?
                .copy_from_slice(s.as_bytes());
            self.1 = end;
            Ok(())
        }
    }
    let mut c = Cursor(out, 0);
    let _ = write!(
        c,
        "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        len
    );
    c.1
}
