//! Loopback throughput of the replication transport: frames of 64 MiB (one epoch of 16 k
//! dirty pages) from a primary to a replica over QUIC with mutual TLS, each acknowledged by a
//! one-byte frame before the next is sent, as an epoch is.
//!
//! ```text
//! cargo run -p checkpoint --release --example transport_bench [-- FRAMES [MIB]]
//! ```
//!
//! The primary and the replica each run on their own thread (a current-thread tokio runtime
//! each), so two cores carry the two ends. Prints every frame's time and the median, in MiB/s.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use checkpoint::transport::{self, Identity, recv_frame, send_frame};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let frames: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(9);
    let mib: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let len = mib << 20;

    let replica = Identity::generate()?;
    let primary = Identity::generate()?;
    let (replica_pin, primary_pin) = (replica.fingerprint(), primary.fingerprint());
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();

    let server = std::thread::spawn(move || -> Result<(), transport::Error> {
        runtime().block_on(async {
            let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
            let server = transport::listen(loopback, &replica, primary_pin).await?;
            addr_tx
                .send(server.local_addr()?)
                .expect("main thread waits");
            let conn = server.accept().await?;
            let (mut send, mut recv) = conn.accept_stream().await?;
            loop {
                match recv_frame(&mut recv, len).await {
                    Ok(_) => send_frame(&mut send, b"k").await?,
                    Err(transport::Error::StreamEnded) => break,
                    Err(e) => return Err(conn.explain(e)),
                }
            }
            let _ = send.finish();
            conn.closed().await;
            Ok(())
        })
    });

    let addr = addr_rx.recv()?;
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    let times = runtime().block_on(async {
        let conn = transport::connect(addr, &primary, replica_pin).await?;
        let (mut send, mut recv) = conn.open_stream().await?;
        let mut times = Vec::new();
        // One frame first to grow the congestion window, not counted.
        for i in 0..=frames {
            let start = Instant::now();
            send_frame(&mut send, &payload).await?;
            recv_frame(&mut recv, 1).await?;
            let took = start.elapsed();
            if i > 0 {
                println!(
                    "frame {i}: {mib} MiB in {:.1} ms = {:.0} MiB/s",
                    took.as_secs_f64() * 1e3,
                    mib as f64 / took.as_secs_f64()
                );
                times.push(took);
            }
        }
        let _ = send.finish();
        recv_frame(&mut recv, 1).await.err();
        conn.close("done");
        Ok::<_, transport::Error>(times)
    })?;
    server.join().expect("replica thread")?;

    let mut sorted: Vec<Duration> = times.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    println!(
        "median of {} frames of {mib} MiB: {:.1} ms = {:.0} MiB/s (best {:.0}, worst {:.0})",
        sorted.len(),
        median.as_secs_f64() * 1e3,
        mib as f64 / median.as_secs_f64(),
        mib as f64 / sorted[0].as_secs_f64(),
        mib as f64 / sorted[sorted.len() - 1].as_secs_f64(),
    );
    Ok(())
}
