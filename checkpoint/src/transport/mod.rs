//! The replication transport: QUIC (quinn) with mutual TLS between a primary and its replica.
//!
//! The replica listens ([`listen`]) and the primary connects ([`connect`]). Each side presents
//! its own self-signed certificate ([`Identity`], made by `ftvm cert`) and accepts exactly one
//! peer: the one whose certificate has the SHA-256 [`Fingerprint`] given with `--peer`. There
//! is no CA and no host-name check — the pin is the identity — but the TLS handshake's
//! signatures are still verified, so a peer must hold the private key of the pinned
//! certificate, not just a copy of the certificate.
//!
//! The connection sends keep-alives ([`Options::keep_alive`]) so that an idle link stays up
//! and a silent one is noticed: after [`Options::idle_timeout`] without a packet from the
//! peer, both sides see [`Error::Silent`]. Messages travel as length-prefixed frames on a
//! bidirectional stream ([`send_frame`], [`recv_frame`]), the length checked against a cap
//! before anything is allocated.

mod addr;
mod endpoint;
mod frame;
mod identity;
mod verify;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use addr::{DEFAULT_PORT, PeerAddr};
pub use endpoint::{Connection, Options, Server, connect, connect_with, listen, listen_with};
pub use frame::{FRAME_HEADER_LEN, frame_len, recv_frame, recv_frame_unless_silent, send_frame};
pub use identity::{CERT_FILE, Fingerprint, Identity, KEY_FILE, fingerprint, generate_into};
pub use quinn::{RecvStream, SendStream};

/// The side of a replication pair, named in messages about the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The host that runs the guest and connects to the replica.
    Primary,
    /// The host that listens and keeps the committed copy.
    Replica,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "Primary",
            Role::Replica => "Replica",
        })
    }
}

/// What can go wrong in the transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rcgen could not make a key or certificate.
    #[error("Cannot generate a key and certificate")]
    Generate(#[source] rcgen::Error),
    /// A file or directory operation failed.
    #[error("Cannot {action} {}", path.display())]
    Io {
        /// What was being done ("write", "read", "create directory", ...).
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The key or certificate exists and `force` was not given.
    #[error("{} exists; pass --force to replace it", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The private key file can be read by other users.
    #[error("{} is readable by other users (mode {mode:04o}); run chmod 600 on it", path.display())]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A PEM file has no usable certificate or key.
    #[error("Cannot parse {}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: quinn::rustls::pki_types::pem::Error,
    },
    /// A fingerprint given as text is malformed.
    #[error(
        "Invalid fingerprint '{0}': expected the certificate's SHA-256 as 64 hex digits, with or without colons"
    )]
    BadFingerprint(String),
    /// A peer address given as text is malformed.
    #[error("Invalid address '{0}': expected HOST[:PORT], e.g. 10.0.0.2:{DEFAULT_PORT} or [::1]")]
    BadAddress(String),
    /// A peer address did not resolve.
    #[error("Cannot resolve '{addr}'")]
    Resolve {
        /// The address as given.
        addr: String,
        /// Why (empty result: `NotFound`).
        #[source]
        source: std::io::Error,
    },
    /// Transport options out of range.
    #[error("Invalid transport options: {0}")]
    BadOptions(&'static str),
    /// rustls refused the configuration (e.g. a key that does not match the certificate).
    #[error("Cannot configure TLS with this certificate and key")]
    Tls(#[source] quinn::rustls::Error),
    /// The UDP socket could not be bound.
    #[error("Cannot bind a UDP socket on {addr}")]
    Bind {
        /// The local address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// quinn refused to start a connection.
    #[error("Cannot connect to {addr}")]
    Connect {
        /// The peer's address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: quinn::ConnectError,
    },
    /// The peer's certificate is not the pinned one.
    #[error("{peer} presented certificate SHA256 {presented} but --peer pins {pinned}")]
    PinMismatch {
        /// Which side presented it.
        peer: Role,
        /// The fingerprint of what it presented.
        presented: Fingerprint,
        /// The fingerprint it should have had.
        pinned: Fingerprint,
    },
    /// The peer refused this host during the TLS handshake (a TLS alert from its side:
    /// usually it pins another certificate).
    #[error(
        "{peer} refused this host in the TLS handshake (alert {alert}, {}); does its --peer pin this host's certificate?",
        alert_name(*alert)
    )]
    Refused {
        /// Which side refused.
        peer: Role,
        /// The TLS alert number (46: certificate unknown, 116: certificate required).
        alert: u8,
    },
    /// The handshake failed for another reason (no certificate, wrong protocol, ...).
    #[error("TLS handshake with {addr} failed")]
    Handshake {
        /// The peer's address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: quinn::ConnectionError,
    },
    /// Nothing was heard from the peer for the idle timeout.
    #[error("{peer} went silent: nothing heard for {idle:?}")]
    Silent {
        /// Which side went silent.
        peer: Role,
        /// The idle timeout that expired.
        idle: Duration,
    },
    /// The connection ended.
    #[error("Connection to the {peer} lost")]
    Lost {
        /// The other side.
        peer: Role,
        /// How it ended.
        #[source]
        source: quinn::ConnectionError,
    },
    /// The listening endpoint was closed.
    #[error("The listening endpoint is closed")]
    EndpointClosed,
    /// Writing a frame failed.
    #[error("Cannot send a frame")]
    Send(#[source] quinn::WriteError),
    /// Reading a frame failed.
    #[error("Cannot receive a frame")]
    Recv(#[source] quinn::ReadError),
    /// The stream ended cleanly where the next frame would start.
    #[error("The peer finished the stream")]
    StreamEnded,
    /// The stream ended inside a frame.
    #[error("Frame truncated: the stream ended after {got} of {want} bytes")]
    Truncated {
        /// Bytes received of the header or body.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// A frame is longer than the cap (checked before allocating).
    #[error("Frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLong {
        /// The announced (or attempted) length.
        len: u64,
        /// The cap.
        max: u64,
    },
}

/// The name of a TLS alert that a refusing peer may send (RFC 8446, section 6).
fn alert_name(alert: u8) -> &'static str {
    match alert {
        40 => "handshake failure",
        42 => "bad certificate",
        46 => "certificate unknown",
        48 => "unknown CA",
        49 => "access denied",
        50 => "decode error",
        51 => "decrypt error",
        70 => "protocol version",
        80 => "internal error",
        116 => "certificate required",
        120 => "no application protocol",
        _ => "other",
    }
}

/// The transport's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The peer closed the connection on purpose (an application close, as an orderly stop or
    /// a deliberate end sends), as opposed to going silent or failing: a crashed peer cannot
    /// send one.
    pub fn is_closed_by_peer(&self) -> bool {
        matches!(
            self,
            Error::Lost {
                source: quinn::ConnectionError::ApplicationClosed(_),
                ..
            } | Error::StreamEnded
        )
    }
}
