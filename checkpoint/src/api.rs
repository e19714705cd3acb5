//! The control API: HTTP/1.1 with JSON bodies on a Unix socket, as Firecracker's API is.
//!
//! | request | does |
//! |---|---|
//! | `GET /status` | `{"state": "running" \| "paused", "vcpus": N}` |
//! | `PUT /pause`, `PUT /resume` | pauses or resumes the VM |
//! | `PUT /snapshot` `{"path": "...", "raw": false}` | pauses, writes a snapshot file (raw: mappable memory), resumes if it was running |
//!
//! HTTP is hyper's, on a single-threaded tokio runtime in the `api` thread: every client is
//! served concurrently, and none can hold up another. Input is bounded: the request head
//! (request line and headers) to [`MAX_HEAD`] bytes and [`HEAD_TIMEOUT`], the body to
//! [`MAX_BODY`] bytes and [`BODY_TIMEOUT`]; errors are short and never echo the input.
//! `GET /status` is answered from the VM's [`RunState`] at once; the other commands are
//! executed by the thread that owns the VM (see `crate::control`), so the API never races the
//! VM's own life cycle.
//!
//! A replica serves the same API status-only ([`BoundApi::serve_status_only`]): `GET /status`
//! answers its own JSON, and the VM's commands are refused with 409 and a reason.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use vmm::event::{self, Reporter, ThreadError};
use vmm::vm::RunState;

/// The most bytes of a request line and headers together (hyper's smallest buffer).
pub const MAX_HEAD: usize = 8192;
/// The most bytes of a request body.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a client may take to send the request line and headers.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to send the body once the headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a command may take on the VM's thread before the client is told it timed out
/// (the command itself still completes).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

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
    /// Hand the guest over to the replica (planned switch-over): pause, send a last
    /// checkpoint, let the replica take over, end here.
    Migrate,
}

/// Where the answer to a command goes: Ok(JSON) or Err(message).
pub type Reply = tokio::sync::oneshot::Sender<Result<Value, String>>;

/// A command for the VM's thread and where its answer goes.
pub type Request = (Command, Reply);

/// Why a request was refused before it reached the VM (the HTTP status is
/// [`RequestError::status`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No such path.
    #[error("No such request (the API has GET /status, PUT /pause, PUT /resume, PUT /snapshot)")]
    NotFound,
    /// The path exists with another method.
    #[error("Wrong method for this path (GET /status; PUT /pause, /resume, /snapshot)")]
    Method,
    /// The body is not what the request takes.
    #[error("Bad request body: {0}")]
    Body(String),
    /// The body is larger than [`MAX_BODY`].
    #[error("Request body too large (at most {MAX_BODY} bytes)")]
    TooLarge,
    /// The body did not arrive within [`BODY_TIMEOUT`].
    #[error("Request body incomplete after {BODY_TIMEOUT:?}")]
    Timeout,
}

impl RequestError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound => 404,
            Self::Method => 405,
            Self::Body(_) => 400,
            Self::TooLarge => 413,
            Self::Timeout => 408,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    path: PathBuf,
    #[serde(default)]
    raw: bool,
}

/// Turns a request into a command (untrusted input: every field checked, nothing echoed).
pub fn parse_command(method: &str, path: &str, body: &[u8]) -> Result<Command, RequestError> {
    let (want, command) = match path {
        "/status" => ("GET", Command::Status),
        "/pause" => ("PUT", Command::Pause),
        "/resume" => ("PUT", Command::Resume),
        "/migrate" => ("PUT", Command::Migrate),
        "/snapshot" => {
            if method != "PUT" {
                return Err(RequestError::Method);
            }
            let b: SnapshotBody = serde_json::from_slice(body).map_err(|e| {
                RequestError::Body(format!(
                    "PUT /snapshot takes {{\"path\": \"/abs/file\", \"raw\": false}} ({})",
                    e.classify_text()
                ))
            })?;
            if !b.path.is_absolute() {
                return Err(RequestError::Body(
                    "the snapshot path must be absolute".into(),
                ));
            }
            return Ok(Command::Snapshot {
                path: b.path,
                raw: b.raw,
            });
        }
        _ => return Err(RequestError::NotFound),
    };
    if method != want {
        return Err(RequestError::Method);
    }
    Ok(command)
}

trait ClassifyText {
    fn classify_text(&self) -> &'static str;
}

impl ClassifyText for serde_json::Error {
    /// What is wrong, without the input's text (serde's messages quote unknown fields).
    fn classify_text(&self) -> &'static str {
        use serde_json::error::Category;
        match self.classify() {
            Category::Io | Category::Eof => "incomplete JSON",
            Category::Syntax => "not JSON",
            Category::Data => "wrong fields or types",
        }
    }
}

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
    /// Something that is not a socket is at the path: it is left alone.
    #[error(
        "Cannot use {path} as the API socket: it exists and is not a socket (nothing was removed)"
    )]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Another process serves the socket.
    #[error("Cannot use {path} as the API socket: another process is serving it")]
    InUse {
        /// The path.
        path: PathBuf,
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

/// A socket this process created; removed on drop only if the path still is that socket.
struct OwnSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for OwnSocket {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), "cannot remove the API socket: {e}");
                }
            }
            _ => tracing::warn!(
                path = %self.path.display(),
                "the API socket was replaced by something else; left alone"
            ),
        }
    }
}

/// A socket bound (and checked) before the VM starts, served once it runs.
pub struct BoundApi {
    listener: UnixListener,
    socket: OwnSocket,
}

/// Binds the API socket at `path`. A path that exists is used only if it is a socket that no
/// process answers on (a stale one from a VMM that died): anything else is refused and left
/// as it is.
pub fn bind(path: &Path) -> Result<BoundApi, ApiError> {
    let listen = |source| ApiError::Listen {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ApiError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(ApiError::InUse {
                    path: path.to_path_buf(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing a stale API socket");
                std::fs::remove_file(path).map_err(listen)?;
            }
            Err(e) => return Err(listen(e)),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen(e)),
    }
    let listener = UnixListener::bind(path).map_err(listen)?;
    let m = std::fs::symlink_metadata(path).map_err(listen)?;
    listener.set_nonblocking(true).map_err(listen)?;
    Ok(BoundApi {
        listener,
        socket: OwnSocket {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        },
    })
}

/// The running API server: its thread, and the socket it removes when stopped.
pub struct ApiServer {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
    _socket: OwnSocket,
}

impl BoundApi {
    /// Serves the API in a thread named `api` (its failure is reported through `reporter`);
    /// returns the server and the stream of commands for the VM's thread.
    pub fn serve(
        self,
        state: Arc<RunState>,
        protection: Option<StatusSource>,
        reporter: &Reporter,
    ) -> Result<(ApiServer, Receiver<Request>), ApiError> {
        let (tx, rx) = channel();
        let (shutdown, stop) = tokio::sync::oneshot::channel();
        let listener = self.listener;
        let path = self.socket.path.clone();
        let handler = Handler::Vm {
            state,
            protection,
            tx,
        };
        let thread = reporter
            .spawn("api", move || serve_all(listener, handler, stop))
            .map_err(|source| ApiError::Listen { path, source })?;
        Ok((
            ApiServer {
                shutdown: Some(shutdown),
                thread: Some(thread),
                _socket: self.socket,
            },
            rx,
        ))
    }

    /// Serves a status-only API in a thread named `api` (its failure is reported through
    /// `reporter`): `GET /status` answers `status()`; the VM's commands (pause, resume,
    /// snapshot) are refused with 409 and `refusal`, which says why there is no VM here.
    pub fn serve_status_only(
        self,
        status: StatusSource,
        refusal: &'static str,
        reporter: &Reporter,
    ) -> Result<ApiServer, ApiError> {
        let (shutdown, stop) = tokio::sync::oneshot::channel();
        let listener = self.listener;
        let path = self.socket.path.clone();
        let handler = Handler::StatusOnly { status, refusal };
        let thread = reporter
            .spawn("api", move || serve_all(listener, handler, stop))
            .map_err(|source| ApiError::Listen { path, source })?;
        Ok(ApiServer {
            shutdown: Some(shutdown),
            thread: Some(thread),
            _socket: self.socket,
        })
    }
}

/// What a server answers requests with.
#[derive(Clone)]
enum Handler {
    /// A VM's API: status from its run state, commands to the VM's thread.
    Vm {
        state: Arc<RunState>,
        protection: Option<StatusSource>,
        tx: Sender<Request>,
    },
    /// Status only (a replica's API): the VM's commands are refused with this message.
    StatusOnly {
        status: StatusSource,
        refusal: &'static str,
    },
}

impl Handler {
    async fn answer(&self, req: HttpRequest<Incoming>) -> Response<Full<Bytes>> {
        match self {
            Handler::Vm {
                state,
                protection,
                tx,
            } => {
                let status = || status_json(state, protection.as_ref());
                answer(req, status, tx).await
            }
            Handler::StatusOnly { status, refusal } => {
                answer_status_only(req, status, refusal).await
            }
        }
    }
}

impl ApiServer {
    /// Stops serving, waits for the thread and removes the socket; a thread that had failed
    /// says so.
    pub fn stop(mut self) -> Result<(), ThreadError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), ThreadError> {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => event::join("api", t),
            None => Ok(()),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::error!("{e}");
        }
    }
}

fn serve_all(
    listener: UnixListener,
    handler: Handler,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), String> {
    event::check_fault("api")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the API runtime: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(|e| format!("cannot serve the API socket: {e}"))?;
        let mut connections = tokio::task::JoinSet::new();
        // A connection's task that panicked is a bug in answering: said with its cause.
        let report = |done: Result<(), tokio::task::JoinError>| {
            if let Err(e) = done {
                tracing::error!("an API connection failed: {e}");
            }
        };
        loop {
            while let Some(done) = connections.try_join_next() {
                report(done);
            }
            let stream = tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    // Out of descriptors and the like: this client is lost, the next may not be.
                    Err(e) => {
                        tracing::warn!("API accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let handler = handler.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, std::convert::Infallible>(handler.answer(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .max_buf_size(MAX_HEAD)
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!("API connection: {e}");
                }
            });
        }
        // Answers under way still go out (a migrate's: its VM ends right after answering),
        // within a bound: a client that never sends its request is not waited for.
        let drained = tokio::time::timeout(DRAIN, async {
            while let Some(done) = connections.join_next().await {
                report(done);
            }
        })
        .await;
        if drained.is_err() {
            tracing::debug!("API stopped with connections still open");
        }
        Ok(())
    })
}

/// How long a stopping API server lets the answers under way finish.
const DRAIN: Duration = Duration::from_secs(1);

fn json_response(code: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn refuse(e: &RequestError) -> Response<Full<Bytes>> {
    json_response(e.status(), &json!({ "error": e.to_string() }))
}

/// Where `GET /status` finds the protection state (the primary's replication).
pub type StatusSource = Arc<dyn Fn() -> Value + Send + Sync>;

/// The JSON of `GET /status`: the run state that was asked for and, for a protected VM, its
/// protection.
pub fn status_json(state: &RunState, protection: Option<&StatusSource>) -> Value {
    let mut v = json!({ "state": state.name(), "vcpus": state.vcpus() });
    if let Some(p) = protection {
        v["protection"] = p();
    }
    v
}

async fn read_body(body: Incoming, declared: Option<u64>) -> Result<Bytes, RequestError> {
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(RequestError::TooLarge);
    }
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Err(_) => Err(RequestError::Timeout),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(RequestError::TooLarge),
        Ok(Err(_)) => Err(RequestError::Body("the body could not be read".into())),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Answers one request; `status` is only built for `GET /status` (it reads the replication
/// thread's status under its lock).
async fn answer(
    req: HttpRequest<Incoming>,
    status: impl FnOnce() -> Value,
    tx: &Sender<Request>,
) -> Response<Full<Bytes>> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    if method == Method::GET && path == "/status" {
        return json_response(200, &status());
    }
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = match read_body(req.into_body(), declared).await {
        Ok(b) => b,
        Err(e) => return refuse(&e),
    };
    let command = match parse_command(method.as_str(), &path, &body) {
        Ok(c) => c,
        Err(e) => return refuse(&e),
    };
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    if tx.send((command, reply_tx)).is_err() {
        return json_response(503, &json!({ "error": "The VM is gone" }));
    }
    match tokio::time::timeout(COMMAND_TIMEOUT, reply_rx).await {
        Ok(Ok(Ok(v))) => json_response(200, &v),
        Ok(Ok(Err(e))) => json_response(500, &json!({ "error": e })),
        Ok(Err(_)) => json_response(503, &json!({ "error": "The VM is gone" })),
        Err(_) => json_response(
            504,
            &json!({ "error": format!("No answer from the VM within {COMMAND_TIMEOUT:?}") }),
        ),
    }
}

/// Answers one request to a status-only API: `GET /status`, or why not.
async fn answer_status_only(
    req: HttpRequest<Incoming>,
    status: &StatusSource,
    refusal: &str,
) -> Response<Full<Bytes>> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    if method == Method::GET && path == "/status" {
        return json_response(200, &status());
    }
    // Read (a bounded) body before answering, so that a client still writing it is not cut off.
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Err(e) = read_body(req.into_body(), declared).await {
        return refuse(&e);
    }
    match path.as_str() {
        "/status" => json_response(
            405,
            &json!({ "error": "Wrong method for this path (this API has GET /status only)" }),
        ),
        "/pause" | "/resume" | "/snapshot" | "/migrate" => {
            json_response(409, &json!({ "error": refusal }))
        }
        _ => json_response(
            404,
            &json!({ "error": "No such request (this API has GET /status only)" }),
        ),
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
    let mut answer = Vec::new();
    // A well-behaved server answers in a few hundred bytes; never hold more than that cap.
    s.take(1 << 20).read_to_end(&mut answer).map_err(io)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, text) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| ApiError::Malformed("no HTTP header".into()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_methods() {
        assert_eq!(parse_command("GET", "/status", b""), Ok(Command::Status));
        assert_eq!(parse_command("PUT", "/pause", b""), Ok(Command::Pause));
        assert_eq!(parse_command("PUT", "/resume", b""), Ok(Command::Resume));
        assert_eq!(parse_command("PUT", "/migrate", b""), Ok(Command::Migrate));
        assert!(parse_command("GET", "/migrate", b"").is_err());
        assert_eq!(
            parse_command("PUT", "/status", b""),
            Err(RequestError::Method)
        );
        assert_eq!(
            parse_command("GET", "/snapshot", b""),
            Err(RequestError::Method)
        );
        assert_eq!(
            parse_command("GET", "/nope", b""),
            Err(RequestError::NotFound)
        );
    }

    #[test]
    fn snapshot_bodies_are_strict() {
        assert_eq!(
            parse_command("PUT", "/snapshot", br#"{"path":"/a/b"}"#),
            Ok(Command::Snapshot {
                path: "/a/b".into(),
                raw: false
            })
        );
        assert_eq!(
            parse_command("PUT", "/snapshot", br#"{"path":"/a/b","raw":true}"#),
            Ok(Command::Snapshot {
                path: "/a/b".into(),
                raw: true
            })
        );
        for bad in [
            &br#"{"path":"/a/b","raw":"yes"}"#[..],
            br#"{"path":"/a/b","raw":1}"#,
            br#"{"path":"/a/b","compress":true}"#,
            br#"{"path":"relative"}"#,
            br#"{"path":""}"#,
            br#"{"raw":true}"#,
            br#"{"path":"/a/b""#,
            b"\xff\xfe",
            b"",
        ] {
            let e = parse_command("PUT", "/snapshot", bad).unwrap_err();
            assert_eq!(e.status(), 400, "{bad:?}");
        }
    }

    /// An answer the VM's thread gave just before the server stops (as a migrate's is) still
    /// reaches the client.
    #[test]
    fn an_answer_under_way_goes_out_when_the_server_stops() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let (tx, events) = channel();
        let reporter = Reporter::new(tx);
        for _ in 0..20 {
            let (server, requests) = bind(&sock)
                .unwrap()
                .serve(Arc::new(vmm::vm::RunState::new(1)), None, &reporter)
                .unwrap();
            let path = sock.clone();
            let client = std::thread::spawn(move || call(&path, "PUT", "/migrate", None));
            let (command, reply) = requests.recv().unwrap();
            assert_eq!(command, Command::Migrate);
            reply.send(Ok(json!({ "handed_over": true }))).unwrap();
            server.stop().unwrap();
            assert_eq!(
                client.join().unwrap().unwrap(),
                json!({ "handed_over": true })
            );
        }
        assert!(events.try_recv().is_err(), "no thread failed");
    }

    #[test]
    fn errors_do_not_echo_the_input() {
        let e = parse_command("PUT", "/snapshot", br#"{"secretfield":1}"#).unwrap_err();
        assert!(!e.to_string().contains("secretfield"), "{e}");
    }

    #[test]
    fn a_status_only_api_answers_status_and_refuses_the_vm_commands() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let (tx, events) = channel();
        let reporter = Reporter::new(tx);
        let status: StatusSource = Arc::new(|| json!({ "role": "test" }));
        let server = bind(&sock)
            .unwrap()
            .serve_status_only(status, "no VM here", &reporter)
            .unwrap();
        assert_eq!(
            call(&sock, "GET", "/status", None).unwrap(),
            json!({ "role": "test" })
        );
        for (method, path, body) in [
            ("PUT", "/pause", None),
            ("PUT", "/resume", None),
            ("PUT", "/snapshot", Some(json!({ "path": "/tmp/x" }))),
        ] {
            match call(&sock, method, path, body) {
                Err(ApiError::Refused(m)) => assert_eq!(m, "no VM here", "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
        for (method, path, want) in [
            ("PUT", "/status", "Wrong method"),
            ("GET", "/nope", "No such request"),
        ] {
            match call(&sock, method, path, None) {
                Err(ApiError::Refused(m)) => assert!(m.starts_with(want), "{path}: {m}"),
                other => panic!("{path}: {other:?}"),
            }
        }
        server.stop().unwrap();
        assert!(!sock.exists(), "the socket is removed");
        assert!(events.try_recv().is_err(), "no thread failed");
    }
}
