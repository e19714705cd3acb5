//! Fencing: before a replica takes over, an operator's command makes sure the old primary is
//! dead (powers its host off, cuts it from the network), as HA clusters do with STONITH. The
//! takeover goes ahead only if the command exits 0 within its time.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` with `sh -c`, the lost primary's address in `FTVM_PRIMARY` (and its epoch in
/// `FTVM_EPOCH`); Ok if it exits 0 within `timeout`, else why not (a command still running
/// at the timeout is killed).
pub fn fence(cmd: &str, primary: SocketAddr, epoch: u64, timeout: Duration) -> Result<(), String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("FTVM_PRIMARY", primary.to_string())
        .env("FTVM_EPOCH", epoch.to_string())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run the fence command: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("the fence command failed ({status})")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the fence command did not finish within {} s (killed)",
                    timeout.as_secs_f64()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("cannot wait for the fence command: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: &str = "127.0.0.1:7480";

    #[test]
    fn a_fence_that_succeeds_lets_the_takeover_go_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let cmd = format!("echo \"$FTVM_PRIMARY $FTVM_EPOCH\" > {}", out.display());
        fence(&cmd, ADDR.parse().unwrap(), 42, Duration::from_secs(10)).unwrap();
        assert_eq!(std::fs::read_to_string(out).unwrap(), "127.0.0.1:7480 42\n");
    }

    #[test]
    fn a_failing_or_hanging_fence_stops_it() {
        let e = fence("exit 3", ADDR.parse().unwrap(), 1, Duration::from_secs(10)).unwrap_err();
        assert!(e.contains("failed") && e.contains('3'), "{e}");
        let started = Instant::now();
        let e = fence(
            "sleep 30",
            ADDR.parse().unwrap(),
            1,
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the hung command was killed"
        );
    }
}
