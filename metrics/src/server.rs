//! `GET /metrics` over HTTP/1 on TCP: hyper on a single-threaded tokio runtime in a thread
//! named `metrics`. Each scrape calls the source, which reads the counters at that moment.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};

/// Renders the exposition for one scrape.
pub type Source = Arc<dyn Fn() -> String + Send + Sync>;

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the metrics server.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound (in use, not local, no permission).
    #[error("Cannot listen for metrics on {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The address is not HOST:PORT.
    #[error("Invalid --metrics address '{0}': expected HOST:PORT, e.g. 127.0.0.1:9464")]
    Address(String),
    /// The server thread could not start.
    #[error("Cannot start the metrics thread")]
    Spawn(#[source] std::io::Error),
}

/// A bound metrics address, not yet served: bind first (so that a port in use is an error
/// before the guest runs), serve once the VM's counters exist.
pub struct Bound {
    listener: TcpListener,
}

/// Binds `addr` (HOST:PORT; a name is resolved, the first address that binds is taken).
pub fn bind(addr: &str) -> Result<Bound, MetricsError> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|_| MetricsError::Address(addr.to_string()))?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpListener::bind(a) {
            Ok(listener) => return Ok(Bound { listener }),
            Err(e) => last = Some(e),
        }
    }
    Err(MetricsError::Bind {
        addr: addr.to_string(),
        source: last.unwrap_or_else(|| std::io::Error::other("the name has no address")),
    })
}

impl Bound {
    /// The bound address (with the port the system chose for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `GET /metrics` from `source` in a thread named `metrics` until the server is
    /// stopped or dropped.
    pub fn serve(self, source: Source) -> Result<MetricsServer, MetricsError> {
        self.listener
            .set_nonblocking(true)
            .map_err(MetricsError::Spawn)?;
        let (shutdown, stop) = tokio::sync::oneshot::channel();
        let listener = self.listener;
        let failed: FailureSlot = FailureSlot::default();
        let thread = spawn_reported(failed.clone(), move || serve_all(listener, source, stop))
            .map_err(MetricsError::Spawn)?;
        Ok(MetricsServer {
            shutdown: Some(shutdown),
            thread: Some(thread),
            failed,
        })
    }
}

/// The running server.
pub struct MetricsServer {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
    failed: FailureSlot,
}

/// Who is told why the `metrics` thread failed (a panic or an error), once; and the cause,
/// kept for whoever asks after the failure.
#[derive(Default)]
struct Failure {
    tell: Option<Box<dyn FnOnce(String) + Send>>,
    cause: Option<String>,
}

type FailureSlot = Arc<Mutex<Failure>>;

fn lock_failure(failed: &FailureSlot) -> std::sync::MutexGuard<'_, Failure> {
    failed.lock().unwrap_or_else(|p| p.into_inner())
}

/// Has `tell` told why the thread failed: when it fails, or at once if it has already.
fn register(failed: &FailureSlot, tell: Box<dyn FnOnce(String) + Send>) {
    let mut f = lock_failure(failed);
    match f.cause.clone() {
        None => f.tell = Some(tell),
        Some(cause) => {
            drop(f);
            tell(cause);
        }
    }
}

/// Runs `body` in a thread named `metrics`; its panic or error is its result, and is also
/// handed to whoever `failed` holds by then.
fn spawn_reported(
    failed: FailureSlot,
    body: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> std::io::Result<JoinHandle<Result<(), String>>> {
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body))
                .unwrap_or_else(|payload| Err(panic_text(payload.as_ref())));
            // The owner hears of a failure while it runs, not only when it stops us; with no
            // owner yet (a replica before a takeover), the log says it now and the owner
            // hears it when it asks.
            if let Err(cause) = &outcome {
                let tell = {
                    let mut f = lock_failure(&failed);
                    f.cause = Some(cause.clone());
                    f.tell.take()
                };
                match tell {
                    Some(tell) => tell(cause.clone()),
                    None => tracing::error!("VMM thread metrics failed: {cause}"),
                }
            }
            outcome
        })
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    match (
        payload.downcast_ref::<&str>(),
        payload.downcast_ref::<String>(),
    ) {
        (Some(s), _) => format!("panicked: {s}"),
        (_, Some(s)) => format!("panicked: {s}"),
        _ => "panicked".to_string(),
    }
}

impl MetricsServer {
    /// Tells `tell` why the thread failed: when it fails, or at once if it already has.
    pub fn on_failure(&self, tell: Box<dyn FnOnce(String) + Send>) {
        register(&self.failed, tell);
    }

    /// Stops serving and waits for the thread; says why it had failed, if it had.
    pub fn stop(mut self) -> Result<(), String> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), String> {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| "the metrics thread panicked".to_string())?,
            None => Ok(()),
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::error!("metrics server: {e}");
        }
    }
}

/// A running `/metrics` server whose source can be replaced while it serves (a replica serves
/// its committed view, then the guest's live counters once it has taken over).
pub struct Exporter {
    _server: MetricsServer,
    slot: Arc<Mutex<Source>>,
    /// Served after the source, whatever source is published (e.g. the history's figures,
    /// which outlive a takeover).
    extra: Arc<Mutex<Option<Source>>>,
    addr: Option<SocketAddr>,
}

impl Exporter {
    /// Binds `addr` and serves `initial` until [`Exporter::publish`] replaces it.
    pub fn start(addr: &str, initial: Source) -> Result<Self, MetricsError> {
        let bound = bind(addr)?;
        let local = bound.local_addr().ok();
        let slot = Arc::new(Mutex::new(initial));
        let extra: Arc<Mutex<Option<Source>>> = Arc::default();
        let (current, appended) = (slot.clone(), extra.clone());
        let server = bound.serve(Arc::new(move || {
            let source = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let extra = appended.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut text = source();
            if let Some(extra) = extra {
                text.push_str(&extra());
            }
            text
        }))?;
        Ok(Self {
            _server: server,
            slot,
            extra,
            addr: local,
        })
    }

    /// Tells `tell` (e.g. the VM's owner) why the `metrics` thread failed, if it does.
    pub fn on_failure(&self, tell: Box<dyn FnOnce(String) + Send>) {
        self._server.on_failure(tell);
    }

    /// Serves `source` from the next scrape on.
    pub fn publish(&self, source: Source) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = source;
    }

    /// Serves `extra` after whatever source is published, from the next scrape on.
    pub fn append(&self, extra: Source) {
        *self.extra.lock().unwrap_or_else(|p| p.into_inner()) = Some(extra);
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }
}

fn serve_all(
    listener: TcpListener,
    source: Source,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the metrics runtime: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| format!("cannot serve metrics: {e}"))?;
        loop {
            let stream = tokio::select! {
                _ = &mut stop => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    // Out of descriptors and the like: this client is lost, the next may not be.
                    Err(e) => {
                        tracing::warn!("metrics accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let source = source.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let source = source.clone();
                    async move { Ok::<_, Infallible>(answer(&req, &source)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!("metrics connection: {e}");
                }
            });
        }
    })
}

fn answer(req: &Request<Incoming>, source: &Source) -> Response<Full<Bytes>> {
    let (code, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (200, crate::CONTENT_TYPE, source()),
        (_, "/metrics") => (405, "text/plain", "only GET /metrics\n".to_string()),
        _ => (
            404,
            "text/plain",
            "not found: try GET /metrics\n".to_string(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_the_source_on_get_metrics_and_refuses_other_paths() {
        let bound = bind("127.0.0.1:0").unwrap();
        let addr = bound.local_addr().unwrap();
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let n2 = n.clone();
        let server = bound
            .serve(Arc::new(move || {
                let i = n2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!("scrape {i}\n")
            }))
            .unwrap();
        let first = get(addr, "/metrics");
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert!(first.contains("text/plain; version=0.0.4"), "{first}");
        assert!(first.ends_with("scrape 0\n"), "{first}");
        assert!(
            get(addr, "/metrics").ends_with("scrape 1\n"),
            "read at each scrape"
        );
        assert!(get(addr, "/").starts_with("HTTP/1.1 404"));
        server.stop().unwrap();
        assert!(std::net::TcpStream::connect(addr).is_err(), "stopped");
    }

    #[test]
    fn an_exporter_serves_what_was_published_last() {
        let e = Exporter::start("127.0.0.1:0", Arc::new(|| "first\n".to_string())).unwrap();
        let addr = e.local_addr().unwrap();
        assert!(get(addr, "/metrics").ends_with("\r\n\r\nfirst\n"));
        e.publish(Arc::new(|| "second\n".to_string()));
        assert!(get(addr, "/metrics").ends_with("\r\n\r\nsecond\n"));
    }

    #[test]
    fn a_port_in_use_or_a_bad_address_is_a_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = bind(&addr).err().unwrap();
        let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(chain.starts_with(&format!("Cannot listen for metrics on {addr}: ")));
        assert!(chain.contains("in use"), "{chain}");
        let e = bind("no-port").err().unwrap();
        assert_eq!(
            e.to_string(),
            "Invalid --metrics address 'no-port': expected HOST:PORT, e.g. 127.0.0.1:9464"
        );
    }

    #[test]
    fn a_failing_or_panicking_metrics_thread_tells_its_owner_and_its_join() {
        for (body, want) in [
            (
                Box::new(|| Err("no runtime".to_string()))
                    as Box<dyn FnOnce() -> Result<(), String> + Send>,
                "no runtime",
            ),
            (Box::new(|| panic!("boom {}", 7)), "panicked: boom 7"),
        ] {
            let slot: FailureSlot = FailureSlot::default();
            let (tx, rx) = std::sync::mpsc::channel();
            register(&slot, Box::new(move |cause| tx.send(cause).unwrap()));
            let t = spawn_reported(slot, body).unwrap();
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), want);
            assert_eq!(t.join().unwrap(), Err(want.to_string()));
        }
        // A thread that ends well tells nobody.
        let slot: FailureSlot = FailureSlot::default();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        register(&slot, Box::new(move |cause| tx.send(cause).unwrap()));
        let t = spawn_reported(slot.clone(), || Ok(())).unwrap();
        assert_eq!(t.join().unwrap(), Ok(()));
        assert!(rx.try_recv().is_err());
        assert!(slot.lock().unwrap().tell.is_some(), "not taken");
        // A failure before anyone asked is told to whoever asks later, at once.
        let slot = FailureSlot::default();
        let t = spawn_reported(slot.clone(), || Err("early".to_string())).unwrap();
        assert_eq!(t.join().unwrap(), Err("early".to_string()));
        let (tx, rx) = std::sync::mpsc::channel();
        register(&slot, Box::new(move |cause| tx.send(cause).unwrap()));
        assert_eq!(rx.try_recv().unwrap(), "early");
    }
}
