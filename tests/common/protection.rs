//! Running `ftvm replica` and protected `ftvm run` processes in tests: certificates, logs,
//! status and the digest test mode's lines.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Console, Guarded, ftvm_ok};

const LIMIT: Duration = Duration::from_secs(60);

/// What a primary logs once its replica has committed the initial sync (not a mere mention of
/// "protected": "the guest runs unprotected" contains that word too).
pub const PROTECTED: &str = "INFO primary::protect: protected replica=";

pub fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// `ftvm cert --out DIR`; returns the fingerprint it prints.
pub fn cert(dir: &Path) -> String {
    ftvm_ok(&["cert", "--out", &s(dir)])
        .trim()
        .lines()
        .last()
        .unwrap()
        .to_string()
}

/// A replica process and its log.
pub struct Replica {
    /// The process (killed on drop).
    pub child: Guarded,
    /// Its log.
    pub log: Arc<Mutex<String>>,
    /// Where it listens.
    pub addr: String,
    /// Its stdout: the guest's console once it has taken over.
    pub console: Console,
}

/// What [`spawn_logged`] returns: the child, its log (stderr), the lines that contained the
/// word asked for, and its console (stdout).
pub type LoggedChild = (
    Guarded,
    Arc<Mutex<String>>,
    std::sync::mpsc::Receiver<String>,
    Console,
);

/// Starts `ftvm ARGS` with `env` and RUST_LOG=info; its stdout goes to the returned console,
/// its stderr lines to the returned log, and each line containing `tell` to the channel.
pub fn spawn_logged(args: &[&str], env: &[(&str, &str)], tell: &'static str) -> LoggedChild {
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let console = Console::default();
    let (mut out, mut sink) = (child.stdout.take().unwrap(), console.clone());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut out, &mut sink);
    });
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let (err, l) = (child.stderr.take().unwrap(), log.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains(tell) {
                let _ = tx.send(line.clone());
            }
            l.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    (Guarded(Some(child)), log, rx, console)
}

impl Replica {
    pub fn start(listen: &str, cert: &Path, peer: &str) -> Self {
        Self::start_with(listen, cert, peer, &[], &[])
    }

    /// A replica with more arguments (`extra`) and environment (`env`).
    pub fn start_with(
        listen: &str,
        cert: &Path,
        peer: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let cert = s(cert);
        let mut args = vec![
            "replica", "--listen", listen, "--cert", &cert, "--peer", peer,
        ];
        args.extend_from_slice(extra);
        let (child, log, listening, console) = spawn_logged(&args, env, "replica listening");
        let line = listening.recv_timeout(LIMIT).expect("the replica listens");
        let addr = field(&line, "addr")
            .expect("the replica says where")
            .to_string();
        Replica {
            child,
            log,
            addr,
            console,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the replica's log mentions `needle`; returns the first line that does.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no '{needle}' in the replica's log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The value of `key=` in a log line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// (epoch, digest) of each log line with `message` (the digest test mode's lines).
pub fn digests(log: &str, message: &str) -> Vec<(u64, String)> {
    log.lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| {
            Some((
                field(l, "epoch")?.parse().ok()?,
                field(l, "digest")?.to_string(),
            ))
        })
        .collect()
}

pub fn status(sock: &Path) -> Value {
    serde_json::from_str(&ftvm_ok(&["status", "--api", &s(sock)])).unwrap()
}

/// Waits until the primary's protection satisfies `done`.
pub fn wait_protection(sock: &Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let st = status(sock);
        if done(&st["protection"]) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `ftvm ARGS` (a protected `run`) and waits until it logs [`PROTECTED`], failing with
/// its log if it never does; returns the child, its log and its console.
pub fn protected_primary(args: &[&str]) -> (Guarded, Arc<Mutex<String>>, Console) {
    let (child, log, protected, console) = spawn_logged(args, &[], PROTECTED);
    if protected.recv_timeout(LIMIT).is_err() {
        panic!("never protected: {}", log.lock().unwrap());
    }
    (child, log, console)
}
