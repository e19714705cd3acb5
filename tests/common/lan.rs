//! A LAN for failover tests: a network namespace with a bridge (the client's side, x.y.z.1)
//! whose ports are the primary's TAP `tapP`, the replica's `tapR` and a second replica's
//! `tapS`, and a client of the
//! guest's tcp-stream service that checks every byte.

use std::io::Read;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);
/// The LAN's /24: the bridge is .1, the guest .2.
pub const SUBNET: &str = "10.77.30";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace with bridge br0 (the client's side, .1) and TAPs tapP and tapR as its ports.
pub struct Lan {
    /// The namespace.
    pub name: String,
}

impl Lan {
    /// Creates the LAN and moves the calling thread into it.
    pub fn create() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("ftvm-{}-lan{n}", std::process::id());
        ip(&["netns", "add", &name]);
        let lan = Lan { name };
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &lan.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        exec(&["link", "set", "lo", "up"]);
        exec(&["link", "add", "br0", "type", "bridge"]);
        for tap in ["tapP", "tapR", "tapS"] {
            exec(&["tuntap", "add", "dev", tap, "mode", "tap"]);
            exec(&["link", "set", tap, "master", "br0"]);
            exec(&["link", "set", tap, "up"]);
        }
        exec(&["addr", "add", &format!("{SUBNET}.1/24"), "dev", "br0"]);
        exec(&["link", "set", "br0", "up"]);
        let f = std::fs::File::open(format!("/run/netns/{}", lan.name)).unwrap();
        // SAFETY: setns with a namespace fd we opened; it affects only this thread.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        lan
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
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
