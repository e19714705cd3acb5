//! The QUIC endpoints: the replica's [`Server`] and the primary's [`Connection`] to it.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use quinn::rustls::{self, crypto::CryptoProvider};
use quinn::{ConnectionError, IdleTimeout, RecvStream, SendStream, VarInt};

use super::verify::{PinVerifier, Refusal};
use super::{Error, Fingerprint, Identity, Result, Role};

/// The ALPN protocol both sides require: a peer speaking anything else is refused in the
/// handshake.
pub(super) const ALPN: &[u8] = b"ftvm-replication/1";

/// The server name the primary sends. Nothing checks it: the pin is the identity.
const SERVER_NAME: &str = "ftvm-replica";

/// How a connection behaves. Both sides should use the same values; QUIC takes the smaller of
/// the two idle timeouts.
#[derive(Clone, Debug)]
pub struct Options {
    /// The connection fails after this long without a packet from the peer: how the replica
    /// notices a dead primary (and the primary a dead replica). Default 1.5 s.
    pub idle_timeout: Duration,
    /// A keep-alive (a PING) goes out after this long without other traffic, so an idle but
    /// healthy link is never taken for a silent one. Must be well under `idle_timeout`.
    /// Default 100 ms.
    pub keep_alive: Duration,
    /// Receive window of one stream, and the send window: bytes that may be in flight before
    /// the receiver reads them. Default 128 MiB, so that a whole epoch of 64 MiB of dirty
    /// pages (16 k pages) and the start of the next is never held back by flow control on a
    /// link whose bandwidth-delay product is smaller; it is also the most a receiver buffers
    /// for a reader that has stopped reading.
    pub stream_window: u64,
    /// Receive window of the whole connection. Default 128 MiB.
    pub connection_window: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            idle_timeout: Duration::from_millis(1500),
            keep_alive: Duration::from_millis(100),
            stream_window: 128 << 20,
            connection_window: 128 << 20,
        }
    }
}

impl Options {
    fn transport(&self) -> Result<Arc<quinn::TransportConfig>> {
        let twice = self.keep_alive.checked_mul(2).unwrap_or(Duration::MAX);
        if self.keep_alive.is_zero() || twice > self.idle_timeout {
            return Err(Error::BadOptions(
                "the keep-alive interval must be non-zero and at most half the idle timeout",
            ));
        }
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| Error::BadOptions("the idle timeout is too long"))?;
        let window =
            |n: u64| VarInt::from_u64(n).map_err(|_| Error::BadOptions("a window is too large"));
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive))
            .stream_receive_window(window(self.stream_window)?)
            .receive_window(window(self.connection_window)?)
            .send_window(self.stream_window)
            .datagram_receive_buffer_size(None);
        Ok(Arc::new(t))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A quinn server configuration that requires the client's certificate to be `pin`.
fn server_config(
    cert: &CertificateDer<'static>,
    key: &PrivateKeyDer<'static>,
    pin: Fingerprint,
    options: &Options,
    refusal: Refusal,
) -> Result<quinn::ServerConfig> {
    let provider = provider();
    let verifier = PinVerifier::new(
        pin,
        Role::Primary,
        provider.signature_verification_algorithms,
        refusal,
    );
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Tls)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(vec![cert.clone()], key.clone_key())
        .map_err(Error::Tls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // Cannot fail: the ring provider has TLS13_AES_128_GCM_SHA256, which QUIC needs.
    let quic = QuicServerConfig::try_from(tls)
        .map_err(|_| Error::Tls(rustls::Error::General("no QUIC cipher suite".into())))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(options.transport()?);
    Ok(config)
}

/// A quinn client configuration that presents `identity` (none: for tests of the server's
/// refusal) and requires the server's certificate to be `pin`.
fn client_config(
    identity: Option<&Identity>,
    pin: Fingerprint,
    options: &Options,
    refusal: Refusal,
) -> Result<quinn::ClientConfig> {
    let provider = provider();
    let verifier = PinVerifier::new(
        pin,
        Role::Replica,
        provider.signature_verification_algorithms,
        refusal,
    );
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut tls = match identity {
        Some(id) => builder
            .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
            .map_err(Error::Tls)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls)
        .map_err(|_| Error::Tls(rustls::Error::General("no QUIC cipher suite".into())))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(options.transport()?);
    Ok(config)
}

/// The alert number of a close that came from the peer's TLS stack, if it is one.
fn tls_alert(e: &ConnectionError) -> Option<u8> {
    match e {
        ConnectionError::ConnectionClosed(close) => {
            let code = u64::from(close.error_code);
            (0x100..=0x1ff)
                .contains(&code)
                .then_some((code & 0xff) as u8)
        }
        _ => None,
    }
}

/// The error for a handshake with `peer` at `addr` that failed with `e`.
fn handshake_error(
    e: ConnectionError,
    addr: SocketAddr,
    peer: Role,
    pin: Fingerprint,
    refusal: &Refusal,
) -> Error {
    let refused = refusal.lock().ok().and_then(|slot| *slot);
    if let Some(presented) = refused {
        return Error::PinMismatch {
            peer,
            presented,
            pinned: pin,
        };
    }
    match tls_alert(&e) {
        Some(alert) => Error::Refused { peer, alert },
        None => Error::Handshake { addr, source: e },
    }
}

/// The replica's listening endpoint.
pub struct Server {
    endpoint: quinn::Endpoint,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    pin: Fingerprint,
    options: Options,
}

/// [`listen_with`] the default [`Options`].
pub async fn listen(
    addr: SocketAddr,
    identity: &Identity,
    peer_pin: Fingerprint,
) -> Result<Server> {
    listen_with(addr, identity, peer_pin, &Options::default()).await
}

/// Listens on UDP `addr` as `identity`, accepting only a primary whose certificate has the
/// fingerprint `peer_pin`. Fails at once if the key does not match the certificate.
pub async fn listen_with(
    addr: SocketAddr,
    identity: &Identity,
    peer_pin: Fingerprint,
    options: &Options,
) -> Result<Server> {
    let config = server_config(
        &identity.cert,
        &identity.key,
        peer_pin,
        options,
        Refusal::default(),
    )?;
    let endpoint =
        quinn::Endpoint::server(config, addr).map_err(|source| Error::Bind { addr, source })?;
    Ok(Server {
        endpoint,
        cert: identity.cert.clone(),
        key: identity.key.clone_key(),
        pin: peer_pin,
        options: options.clone(),
    })
}

impl Server {
    /// The address it listens on (with the port the system chose for port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint.local_addr().map_err(|source| Error::Io {
            action: "read the address of",
            path: "the listening socket".into(),
            source,
        })
    }

    /// Waits for the next primary and completes its handshake. A refused peer (another
    /// certificate, none, another protocol) gives its error here, and the server goes on
    /// listening: call `accept` again. [`Error::EndpointClosed`] once [`Server::close`] ran.
    pub async fn accept(&self) -> Result<Connection> {
        let incoming = self.endpoint.accept().await.ok_or(Error::EndpointClosed)?;
        let addr = incoming.remote_address();
        // A configuration per connection, so that a refusal is reported for this peer only.
        let refusal = Refusal::default();
        let config = server_config(
            &self.cert,
            &self.key,
            self.pin,
            &self.options,
            refusal.clone(),
        )?;
        let fail = |e| handshake_error(e, addr, Role::Primary, self.pin, &refusal);
        let conn = incoming
            .accept_with(Arc::new(config))
            .map_err(fail)?
            .await
            .map_err(fail)?;
        tracing::info!(%addr, "primary connected");
        Ok(Connection {
            conn,
            peer: Role::Primary,
            idle: self.options.idle_timeout,
            _endpoint: None,
        })
    }

    /// Closes every connection and stops listening.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"replica closing");
    }
}

/// [`connect_with`] the default [`Options`].
pub async fn connect(
    addr: SocketAddr,
    identity: &Identity,
    peer_pin: Fingerprint,
) -> Result<Connection> {
    connect_with(addr, identity, peer_pin, &Options::default()).await
}

/// Connects to the replica at `addr` as `identity`, accepting only a replica whose
/// certificate has the fingerprint `peer_pin`.
///
/// A replica that never answers is given up on ([`Error::Handshake`], timed out) after the
/// idle timeout or three of the handshake's probe timeouts, whichever is longer: about 3 s,
/// as QUIC starts from an RTT guess of 333 ms.
///
/// In TLS 1.3 the client finishes its handshake before the server has checked the client's
/// certificate: a replica that refuses this primary shows as [`Error::Refused`] on the first
/// stream operation rather than here.
pub async fn connect_with(
    addr: SocketAddr,
    identity: &Identity,
    peer_pin: Fingerprint,
    options: &Options,
) -> Result<Connection> {
    connect_as(addr, Some(identity), peer_pin, options).await
}

/// [`connect_with`], optionally without a client certificate (for tests of the refusal).
pub(super) async fn connect_as(
    addr: SocketAddr,
    identity: Option<&Identity>,
    peer_pin: Fingerprint,
    options: &Options,
) -> Result<Connection> {
    let bind = if addr.is_ipv6() {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    };
    let endpoint =
        quinn::Endpoint::client(bind).map_err(|source| Error::Bind { addr: bind, source })?;
    let refusal = Refusal::default();
    let config = client_config(identity, peer_pin, options, refusal.clone())?;
    let conn = endpoint
        .connect_with(config, addr, SERVER_NAME)
        .map_err(|source| Error::Connect { addr, source })?
        .await
        .map_err(|e| handshake_error(e, addr, Role::Replica, peer_pin, &refusal))?;
    Ok(Connection {
        conn,
        peer: Role::Replica,
        idle: options.idle_timeout,
        _endpoint: Some(endpoint),
    })
}

/// An authenticated connection to the peer.
pub struct Connection {
    conn: quinn::Connection,
    peer: Role,
    idle: Duration,
    /// The primary's own endpoint, kept as long as its only connection.
    _endpoint: Option<quinn::Endpoint>,
}

impl Connection {
    /// Which side the peer is.
    pub fn peer(&self) -> Role {
        self.peer
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// The current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Opens a bidirectional stream. The peer's [`Connection::accept_stream`] sees it when the
    /// first bytes are sent on it.
    pub async fn open_stream(&self) -> Result<(SendStream, RecvStream)> {
        self.conn.open_bi().await.map_err(|e| self.lost(e))
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept_stream(&self) -> Result<(SendStream, RecvStream)> {
        self.conn.accept_bi().await.map_err(|e| self.lost(e))
    }

    /// Waits until the connection ends; says why ([`Error::Silent`] when the peer went
    /// silent for the idle timeout).
    pub async fn closed(&self) -> Error {
        self.lost(self.conn.closed().await)
    }

    /// Closes the connection at once, telling the peer `reason`.
    pub fn close(&self, reason: &str) {
        self.conn.close(VarInt::from_u32(0), reason.as_bytes());
    }

    /// Turns a stream error caused by the connection's end into the connection's reason
    /// (silence, refusal, loss); other errors pass unchanged.
    pub fn explain(&self, e: Error) -> Error {
        match e {
            Error::Send(quinn::WriteError::ConnectionLost(c))
            | Error::Recv(quinn::ReadError::ConnectionLost(c)) => self.lost(c),
            e => e,
        }
    }

    /// The quinn connection, for what this wrapper does not offer (statistics, streams of
    /// other kinds).
    pub fn quinn(&self) -> &quinn::Connection {
        &self.conn
    }

    fn lost(&self, e: ConnectionError) -> Error {
        match (&e, tls_alert(&e)) {
            (ConnectionError::TimedOut, _) => Error::Silent {
                peer: self.peer,
                idle: self.idle,
            },
            (_, Some(alert)) => Error::Refused {
                peer: self.peer,
                alert,
            },
            _ => Error::Lost {
                peer: self.peer,
                source: e,
            },
        }
    }
}
