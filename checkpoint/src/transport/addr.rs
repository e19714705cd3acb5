//! The replica's address as the operator writes it: `HOST[:PORT]`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use super::{Error, Result};

/// The UDP port a replica listens on when none is given.
pub const DEFAULT_PORT: u16 = 7480;

/// `HOST[:PORT]`: a name, an IPv4 address, or an IPv6 address (bare, or in brackets when a
/// port follows, `[::1]:7480`); the port defaults to [`DEFAULT_PORT`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAddr {
    /// The host name or address, without brackets.
    pub host: String,
    /// The UDP port.
    pub port: u16,
}

impl FromStr for PeerAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::BadAddress(s.to_string());
        let t = s.trim();
        if t.is_empty() {
            return Err(bad());
        }
        // A bare IPv6 address has colons but no port.
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(PeerAddr {
                host: ip.to_string(),
                port: DEFAULT_PORT,
            });
        }
        let (host, port) = if let Some(rest) = t.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            host.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            match t.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (t, None),
            }
        };
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(bad()),
            },
        };
        let name_ok = |h: &str| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b':')
        };
        if !name_ok(host) {
            return Err(bad());
        }
        Ok(PeerAddr {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl PeerAddr {
    /// The first address the host resolves to (an IP address resolves to itself).
    pub async fn resolve(&self) -> Result<SocketAddr> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        let resolve_error = |source| Error::Resolve {
            addr: self.to_string(),
            source,
        };
        let mut addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(resolve_error)?;
        addrs.next().ok_or_else(|| {
            resolve_error(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the name has no addresses",
            ))
        })
    }
}
