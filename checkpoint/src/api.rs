//! The control API: HTTP/1.1 with JSON bodies on a Unix socket, as Firecracker's API is.
//!
//! | request | does |
//! |---|---|
//! | `GET /status` | `{"state": "running" \| "paused", "vcpus": N}` |
//! | `PUT /pause`, `PUT /resume` | pauses or resumes the VM |
//! | `PUT /snapshot` `{"path": "...", "raw": false}` | pauses, writes a snapshot file (raw: mappable memory), resumes if it was running |
//!
//! The server thread only parses requests; the thread that owns the VM executes them (see
//! `crate::control`), so the API never races the VM's own life cycle.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

use serde_json::{Value, json};

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Report the VM's state.
    Status,
    /// Pause the VM.
    Pause,
    /// Resume the VM.
    Resume,
    /// Write a snapshot to a path.
    Snapshot {
        /// Where.
        path: PathBuf,
        /// Raw (mappable) memory instead of compressed.
        raw: bool,
    },
}

/// A command and where its answer goes: Ok(JSON) or Err(message).
pub type Request = (Command, Sender<Result<Value, String>>);

/// Errors of the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket cannot be created.
    #[error("Cannot listen on API socket {path}")]
    Listen {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM cannot be reached.
    #[error("Cannot reach ftvm's API at {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM answered with an error.
    #[error("ftvm refused: {0}")]
    Refused(String),
    /// The answer is not HTTP/JSON.
    #[error("Malformed answer from the API: {0}")]
    Malformed(String),
}

/// The listening side; removes its socket when dropped.
pub struct ApiServer {
    path: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ApiServer {
    /// Listens on `path` (replacing a stale socket) and returns the server and the stream of
    /// requests for the VM's thread.
    pub fn start(path: &Path) -> Result<(Self, Receiver<Request>), ApiError> {
        let listen = |source| ApiError::Listen {
            path: path.to_path_buf(),
            source,
        };
        if path.exists() {
            std::fs::remove_file(path).map_err(listen)?;
        }
        let listener = UnixListener::bind(path).map_err(listen)?;
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for stream in listener.incoming().map_while(Result::ok) {
                    if let Err(e) = serve(stream, &tx) {
                        tracing::debug!("API connection: {e}");
                    }
                }
            })
            .map_err(listen)?;
        Ok((
            Self {
                path: path.to_path_buf(),
            },
            rx,
        ))
    }
}

/// Reads one HTTP request: (method, path, body).
fn read_request(stream: &UnixStream) -> std::io::Result<(String, String, Vec<u8>)> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0).min(1 << 20);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((method, path, body))
}

fn respond(mut stream: &UnixStream, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = if code == 200 { "OK" } else { "Error" };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )
}

fn serve(stream: UnixStream, tx: &Sender<Request>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (method, path, body) = read_request(&stream)?;
    let command = match (method.as_str(), path.as_str()) {
        ("GET", "/status") => Ok(Command::Status),
        ("PUT", "/pause") => Ok(Command::Pause),
        ("PUT", "/resume") => Ok(Command::Resume),
        ("PUT", "/snapshot") => serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| {
                let path = PathBuf::from(v.get("path")?.as_str()?);
                let raw = v.get("raw").and_then(Value::as_bool).unwrap_or(false);
                Some(Command::Snapshot { path, raw })
            })
            .ok_or_else(|| "PUT /snapshot wants {\"path\": \"...\", \"raw\": false}".to_string()),
        _ => Err(format!("no such request: {method} {path}")),
    };
    let command = match command {
        Ok(c) => c,
        Err(e) => return respond(&stream, 400, &json!({ "error": e })),
    };
    let (reply_tx, reply_rx) = channel();
    if tx.send((command, reply_tx)).is_err() {
        return respond(&stream, 503, &json!({ "error": "the VM is gone" }));
    }
    match reply_rx.recv() {
        Ok(Ok(v)) => respond(&stream, 200, &v),
        Ok(Err(e)) => respond(&stream, 500, &json!({ "error": e })),
        Err(_) => respond(&stream, 503, &json!({ "error": "the VM is gone" })),
    }
}

/// Sends one request to the API at `socket`; returns the JSON answer.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ApiError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ApiError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let io = |e: std::io::Error| ApiError::Malformed(e.to_string());
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: ftvm\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(io)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(io)?;
    let (head, text) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| ApiError::Malformed(answer.clone()))?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let value: Value =
        serde_json::from_str(text).map_err(|e| ApiError::Malformed(e.to_string()))?;
    if code != 200 {
        let msg = value
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or(text)
            .to_string();
        return Err(ApiError::Refused(msg));
    }
    Ok(value)
}
