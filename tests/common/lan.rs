//! Hosts for failover tests, each a network namespace: the primary's (`P`), the replica's (`R`)
//! and a second replica's (`S`). Each host has its guest's TAP (`tapP`, `tapR`, `tapS`) on a
//! bridge with a veth to the LAN — a namespace with bridge br0, where the test is the client
//! (x.y.z.1; the guest is .2) — and its own veth to the replication network, a separate
//! switch, where it is 10.77.31.N ([`Lan::rep_addr`]). Replication therefore never shares the
//! guest's LAN, nor loopback. A process runs on the host whose namespace the spawning thread
//! is in ([`Lan::enter`]); [`Lan::create`] leaves the thread on the LAN, as the client.

use std::io::Read;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);
/// The LAN's /24: the bridge is .1, the guest .2.
pub const SUBNET: &str = "10.77.30";
/// The replication network's /24: host P is .1, R .2, S .3.
pub const REP_SUBNET: &str = "10.77.31";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The hosts: (name, address on the replication network).
const HOSTS: [(&str, u8); 3] = [("P", 1), ("R", 2), ("S", 3)];

/// The LAN, the replication network and the hosts P, R and S (see the module).
pub struct Lan {
    /// The LAN's namespace (the client's).
    pub name: String,
}

impl Lan {
    /// Creates the namespaces and links and moves the calling thread onto the LAN.
    pub fn create() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("ftvm-{}-lan{n}", std::process::id());
        let lan = Lan { name };
        let rep = lan.ns("rep");
        for ns in [lan.name.clone(), rep.clone()]
            .into_iter()
            .chain(HOSTS.iter().map(|(h, _)| lan.ns(h)))
        {
            ip(&["netns", "add", &ns]);
        }
        let exec = |ns: &str, args: &[&str]| {
            let mut all = vec!["-n", ns];
            all.extend_from_slice(args);
            ip(&all);
        };
        for ns in [&lan.name, &rep] {
            exec(ns, &["link", "set", "lo", "up"]);
            exec(ns, &["link", "add", "br0", "type", "bridge"]);
            exec(ns, &["link", "set", "br0", "up"]);
        }
        exec(
            &lan.name,
            &["addr", "add", &format!("{SUBNET}.1/24"), "dev", "br0"],
        );
        for (host, addr) in HOSTS {
            let ns = lan.ns(host);
            exec(&ns, &["link", "set", "lo", "up"]);
            // The guest's side: tapX and a veth to the LAN on the host's bridge.
            exec(&ns, &["link", "add", "br0", "type", "bridge"]);
            let tap = format!("tap{host}");
            exec(&ns, &["tuntap", "add", "dev", &tap, "mode", "tap"]);
            let (up, down) = (format!("lan{host}"), format!("to{host}"));
            exec(
                &ns,
                &["link", "add", &up, "type", "veth", "peer", "name", &down],
            );
            exec(&ns, &["link", "set", &down, "netns", &lan.name]);
            exec(&lan.name, &["link", "set", &down, "master", "br0"]);
            exec(&lan.name, &["link", "set", &down, "up"]);
            for port in [&tap, &up] {
                exec(&ns, &["link", "set", port, "master", "br0"]);
                exec(&ns, &["link", "set", port, "up"]);
            }
            exec(&ns, &["link", "set", "br0", "up"]);
            // The replication side: its own veth to the replication switch.
            let (up, down) = (format!("rep{host}"), format!("rep{host}sw"));
            exec(
                &ns,
                &["link", "add", &up, "type", "veth", "peer", "name", &down],
            );
            exec(&ns, &["link", "set", &down, "netns", &rep]);
            exec(&rep, &["link", "set", &down, "master", "br0"]);
            exec(&rep, &["link", "set", &down, "up"]);
            exec(
                &ns,
                &[
                    "addr",
                    "add",
                    &format!("{REP_SUBNET}.{addr}/24"),
                    "dev",
                    &up,
                ],
            );
            exec(&ns, &["link", "set", &up, "up"]);
        }
        lan.enter_lan();
        lan
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.name)
    }

    fn set_ns(ns: &str) {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        // SAFETY: setns with a namespace fd we opened; it affects only this thread.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
    }

    /// Moves the calling thread onto host `host` ("P", "R" or "S"): what it spawns runs there.
    pub fn enter(&self, host: &str) {
        assert!(HOSTS.iter().any(|(h, _)| *h == host), "no host {host}");
        Self::set_ns(&self.ns(host));
    }

    /// Moves the calling thread back onto the LAN, as the client.
    pub fn enter_lan(&self) {
        Self::set_ns(&self.name);
    }

    /// Where host `host` listens for replication (port chosen by the system).
    pub fn rep_addr(host: &str) -> String {
        let (_, n) = HOSTS.iter().find(|(h, _)| *h == host).expect("a host");
        format!("{REP_SUBNET}.{n}:0")
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in [self.name.clone(), self.ns("rep")]
            .into_iter()
            .chain(HOSTS.iter().map(|(h, _)| self.ns(h)))
        {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

/// Reads the guest's tcp-stream on its own thread, checking every byte against the pattern.
pub struct Client {
    read: Arc<AtomicU64>,
    failed: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    /// Connects to the guest's tcp-stream service (port 19).
    pub fn connect() -> Self {
        // A new guest: the client asks for its MAC afresh (an earlier test's guest had the same
        // address, and the LAN's bridge may still send that MAC to the earlier host).
        ip(&["neigh", "flush", "dev", "br0"]);
        let addr: std::net::SocketAddr = format!("{SUBNET}.2:19").parse().unwrap();
        let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .expect("connects to the guest");
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let (read, failed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(Mutex::new(None)),
            Arc::new(AtomicBool::new(false)),
        );
        let (r, f, st) = (read.clone(), failed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let (mut at, mut buf, mut want) = (0u64, vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
            while !st.load(Ordering::SeqCst) {
                match tcp.read(&mut buf) {
                    Ok(0) => {
                        *f.lock().unwrap() = Some(format!("the stream ended at byte {at}"));
                        return;
                    }
                    Ok(n) => {
                        ftvm_guest_abi::fill_pattern(19, at, &mut want[..n]);
                        if buf[..n] != want[..n] {
                            *f.lock().unwrap() =
                                Some(format!("the stream differs from byte {at} on"));
                            return;
                        }
                        at += n as u64;
                        r.store(at, Ordering::SeqCst);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => {
                        *f.lock().unwrap() = Some(format!("the stream failed at byte {at}: {e}"));
                        return;
                    }
                }
            }
        });
        Client {
            read,
            failed,
            stop,
            thread: Some(thread),
        }
    }

    /// Bytes read so far, all checked.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::SeqCst)
    }

    /// Panics with what went wrong on the stream, if anything did.
    pub fn check(&self) {
        if let Some(e) = self.failed.lock().unwrap().clone() {
            panic!("{e}");
        }
    }

    /// Waits until `n` more bytes than now have arrived.
    pub fn wait_more(&self, n: u64, what: &str) {
        let (from, deadline) = (self.read(), Instant::now() + LIMIT);
        while self.read() < from + n {
            self.check();
            assert!(
                Instant::now() < deadline,
                "{what}: stuck at byte {}",
                self.read()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
