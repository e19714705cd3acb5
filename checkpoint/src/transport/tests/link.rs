//! The link itself: frames small and large both ways, the cap checked before the body is
//! allocated, keep-alives holding an idle link, and silence detected within the idle timeout.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use super::{loopback, runtime};
use crate::transport::*;

/// A pass-through allocator that remembers, per thread, the largest single request since
/// the last [`reset_largest`]: how the tests see what a refused frame made the receiver
/// allocate.
struct Largest;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

fn reset_largest() {
    LARGEST.with(|l| l.set(0));
}

fn largest() -> usize {
    LARGEST.with(Cell::get)
}

// SAFETY: every call goes unchanged to the system allocator; the bookkeeping only touches a
// const-initialised thread-local Cell, which neither allocates nor registers a destructor.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's guarantees about `layout` are System's preconditions.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from System with this `layout` (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from System with `layout`; the caller guarantees `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

/// One epoch's worth of dirty pages: 16 k pages of 4 KiB.
const EPOCH: usize = 64 << 20;

/// `len` bytes that do not repeat (xorshift), so a misplaced chunk cannot compare equal.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn frames_small_and_of_64_mib_cross_the_link_both_ways() {
    let rt = runtime();
    let replica = Identity::generate().unwrap();
    let primary = Identity::generate().unwrap();
    rt.block_on(async {
        let server = listen(loopback(), &replica, primary.fingerprint())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let serve = async {
            let conn = server.accept().await.unwrap();
            let (mut send, mut recv) = conn.accept_stream().await.unwrap();
            loop {
                match recv_frame(&mut recv, EPOCH).await {
                    Ok(frame) => send_frame(&mut send, &frame).await.unwrap(),
                    Err(Error::StreamEnded) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            send.finish().unwrap();
            conn.closed().await;
        };
        let client = async {
            let conn = connect(addr, &primary, replica.fingerprint())
                .await
                .unwrap();
            let (mut send, mut recv) = conn.open_stream().await.unwrap();
            for body in [
                Vec::new(),
                b"x".to_vec(),
                pattern(4096, 1),
                pattern(EPOCH, 2),
                pattern(100_000, 3),
            ] {
                send_frame(&mut send, &body).await.unwrap();
                let back = recv_frame(&mut recv, EPOCH).await.unwrap();
                assert!(
                    back == body,
                    "a frame of {} bytes came back changed",
                    body.len()
                );
            }
            send.finish().unwrap();
            assert!(matches!(
                recv_frame(&mut recv, EPOCH).await,
                Err(Error::StreamEnded)
            ));
            conn.close("done");
        };
        tokio::join!(serve, client);
    });
}

#[test]
fn a_frame_over_the_cap_is_refused_before_its_body_is_allocated() {
    let rt = runtime();
    let replica = Identity::generate().unwrap();
    let primary = Identity::generate().unwrap();
    rt.block_on(async {
        let server = listen(loopback(), &replica, primary.fingerprint())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let serve = async {
            let conn = server.accept().await.unwrap();
            let (_send, mut recv) = conn.accept_stream().await.unwrap();
            reset_largest();
            drop(std::hint::black_box(vec![0u8; 3 << 20]));
            assert!(largest() >= 3 << 20, "the allocator does not count");
            reset_largest();
            let refused =
                tokio::time::timeout(Duration::from_secs(5), recv_frame(&mut recv, EPOCH))
                    .await
                    .expect("the refusal waited for the body");
            let biggest = largest();
            match refused {
                Err(Error::FrameTooLong { len, max }) => {
                    assert_eq!(len, 3 << 30);
                    assert_eq!(max, EPOCH as u64);
                }
                other => panic!("expected FrameTooLong, got {:?}", other.map(|v| v.len())),
            }
            assert!(
                biggest < 1 << 20,
                "the receiver allocated {biggest} bytes at once for a refused frame"
            );
            conn.close("refused");
        };
        let client = async {
            let conn = connect(addr, &primary, replica.fingerprint())
                .await
                .unwrap();
            let (mut send, _recv) = conn.open_stream().await.unwrap();
            // A header announcing 3 GiB, a few bytes of body, and the stream left open.
            send.write_all(&(3u32 << 30).to_be_bytes()).await.unwrap();
            send.write_all(b"abc").await.unwrap();
            conn.closed().await;
        };
        tokio::join!(serve, client);
    });
}

/// A UDP relay to `server` that drops everything, both ways, once `cut` is set: a peer that
/// goes silent without a word (power loss, cable cut).
async fn relay(server: SocketAddr, cut: Arc<AtomicBool>) -> SocketAddr {
    let front = UdpSocket::bind(loopback()).await.unwrap();
    let back = UdpSocket::bind(loopback()).await.unwrap();
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut client = None;
        let mut up = vec![0u8; 65536];
        let mut down = vec![0u8; 65536];
        loop {
            tokio::select! {
                r = front.recv_from(&mut up) => {
                    let Ok((n, from)) = r else { continue };
                    client = Some(from);
                    if !cut.load(Ordering::SeqCst) {
                        let _ = back.send(&up[..n]).await;
                    }
                }
                r = back.recv(&mut down) => {
                    let Ok(n) = r else { continue };
                    if let (Some(to), false) = (client, cut.load(Ordering::SeqCst)) {
                        let _ = front.send_to(&down[..n], to).await;
                    }
                }
            }
        }
    });
    addr
}

#[test]
fn keep_alives_hold_an_idle_link_and_silence_is_detected_within_the_idle_timeout() {
    let rt = runtime();
    let replica = Identity::generate().unwrap();
    let primary = Identity::generate().unwrap();
    let options = Options {
        idle_timeout: Duration::from_secs(1),
        keep_alive: Duration::from_millis(100),
        ..Options::default()
    };
    rt.block_on(async {
        let server = listen_with(loopback(), &replica, primary.fingerprint(), &options)
            .await
            .unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let front = relay(server.local_addr().unwrap(), cut.clone()).await;
        let (s, c) = tokio::join!(
            server.accept(),
            connect_with(front, &primary, replica.fingerprint(), &options)
        );
        let (s, c) = (s.unwrap(), c.unwrap());

        // Three idle timeouts with no application traffic: the keep-alives hold it.
        let early = tokio::time::timeout(3 * options.idle_timeout, async {
            tokio::select! {
                e = s.closed() => e,
                e = c.closed() => e,
            }
        })
        .await;
        if let Ok(e) = early {
            panic!("an idle link with keep-alives closed: {e}");
        }

        cut.store(true, Ordering::SeqCst);
        let start = Instant::now();
        let timed = |conn| async move {
            let e: Error = Connection::closed(conn).await;
            (e, start.elapsed())
        };
        let deadline = options.idle_timeout + Duration::from_secs(1);
        let ((se, st), (ce, ct)) =
            tokio::time::timeout(deadline, async { tokio::join!(timed(&s), timed(&c)) })
                .await
                .expect("silence not detected within the idle timeout and a second");
        assert!(
            matches!(
                se,
                Error::Silent {
                    peer: Role::Primary,
                    ..
                }
            ),
            "{se}"
        );
        assert!(
            matches!(
                ce,
                Error::Silent {
                    peer: Role::Replica,
                    ..
                }
            ),
            "{ce}"
        );
        assert!(se.to_string().starts_with("Primary went silent"), "{se}");
        // The last packet before the cut was at most one keep-alive interval earlier.
        let floor = options.idle_timeout - options.keep_alive - Duration::from_millis(50);
        assert!(
            st >= floor && ct >= floor,
            "detected too early: {st:?} {ct:?}"
        );
    });
}

#[test]
fn a_primary_gives_up_on_a_replica_that_never_answers() {
    let rt = runtime();
    let primary = Identity::generate().unwrap();
    let options = Options {
        idle_timeout: Duration::from_millis(500),
        keep_alive: Duration::from_millis(100),
        ..Options::default()
    };
    rt.block_on(async {
        // Bound, so that nothing else answers on this port; never read.
        let mute = UdpSocket::bind(loopback()).await.unwrap();
        let addr = mute.local_addr().unwrap();
        let start = Instant::now();
        // The handshake's idle timer is at least three probe timeouts, computed from QUIC's
        // initial RTT guess of 333 ms: about 3 s, whatever the configured idle timeout.
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            connect_with(addr, &primary, primary.fingerprint(), &options),
        )
        .await
        .expect("connect did not give up")
        .err()
        .expect("connected to nothing");
        assert!(
            matches!(
                e,
                Error::Handshake {
                    source: quinn::ConnectionError::TimedOut,
                    ..
                }
            ),
            "{e}"
        );
        assert!(start.elapsed() >= Duration::from_millis(400));
    });
}
