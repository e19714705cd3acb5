//! A packet capture on an interface of the calling thread's network namespace: an AF_PACKET
//! socket that records, for every frame the host receives on it (what the guest sent, on a
//! TAP), the kernel's receive timestamp, which is when the frame left the VMM.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One captured frame.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    /// Kernel timestamp, nanoseconds since the Unix epoch.
    pub at_ns: u64,
    /// Bytes.
    pub len: usize,
    /// Its first bytes (zero beyond `len`).
    pub head: [u8; 64],
    /// The host sent it on the interface (only with [`Capture::start_both`]).
    pub outgoing: bool,
}

/// A capture running on its own thread until [`Capture::stop`].
pub struct Capture {
    frames: Arc<Mutex<Vec<Frame>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn check(r: libc::c_int, what: &str) {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
}

impl Capture {
    /// Starts capturing frames arriving on `iface` (not those the host sends on it).
    pub fn start(iface: &str) -> Self {
        Self::start_with(iface, false)
    }

    /// Starts capturing frames arriving on `iface` and those the host sends on it.
    pub fn start_both(iface: &str) -> Self {
        Self::start_with(iface, true)
    }

    fn start_with(iface: &str, both: bool) -> Self {
        let name = std::ffi::CString::new(iface).unwrap();
        // SAFETY: plain system calls on a socket this function owns; every struct passed is
        // initialised and of the size given.
        let fd = unsafe {
            let index = libc::if_nametoindex(name.as_ptr());
            assert!(index > 0, "no interface {iface}");
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
            check(fd, "AF_PACKET socket");
            let fd = OwnedFd::from_raw_fd(fd);
            let one: libc::c_int = 1;
            check(
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_TIMESTAMPNS,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                ),
                "SO_TIMESTAMPNS",
            );
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            check(
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                ),
                "SO_RCVTIMEO",
            );
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = index as i32;
            check(
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ),
                "bind to the interface",
            );
            fd
        };
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (frames.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            let mut control = [0u64; 16];
            while !s.load(Ordering::SeqCst) {
                // SAFETY: recvmsg into buffers owned here, sizes as given; the control data is
                // read only through the CMSG macros within its length.
                unsafe {
                    let mut from: libc::sockaddr_ll = std::mem::zeroed();
                    let mut iov = libc::iovec {
                        iov_base: buf.as_mut_ptr().cast(),
                        iov_len: buf.len(),
                    };
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
                    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                    msg.msg_iov = &mut iov;
                    msg.msg_iovlen = 1;
                    msg.msg_control = control.as_mut_ptr().cast();
                    msg.msg_controllen = std::mem::size_of_val(&control);
                    let n = libc::recvmsg(fd.as_raw_fd(), &mut msg, 0);
                    if n < 0 {
                        continue; // the timeout: look at the stop flag
                    }
                    let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
                    if outgoing && !both {
                        continue;
                    }
                    let mut at_ns = None;
                    let mut c = libc::CMSG_FIRSTHDR(&msg);
                    while !c.is_null() {
                        if (*c).cmsg_level == libc::SOL_SOCKET
                            && (*c).cmsg_type == libc::SO_TIMESTAMPNS
                        {
                            let ts = (libc::CMSG_DATA(c) as *const libc::timespec).read_unaligned();
                            at_ns = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
                        }
                        c = libc::CMSG_NXTHDR(&msg, c);
                    }
                    let at_ns = at_ns.expect("the kernel timestamps every frame");
                    let mut head = [0u8; 64];
                    let kept = (n as usize).min(64);
                    head[..kept].copy_from_slice(&buf[..kept]);
                    f.lock().unwrap().push(Frame {
                        at_ns,
                        len: n as usize,
                        head,
                        outgoing,
                    });
                }
            }
        });
        Self {
            frames,
            stop,
            thread: Some(thread),
        }
    }

    /// The frames captured so far.
    pub fn frames(&self) -> Vec<Frame> {
        self.frames.lock().unwrap().clone()
    }

    /// Stops the capture; returns every frame.
    pub fn stop(mut self) -> Vec<Frame> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("the capture thread");
        }
        self.frames()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
