//! A host's key and self-signed certificate, their files, and certificate fingerprints.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use quinn::rustls::pki_types::pem::PemObject;
use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{Error, Result};

/// The certificate's file name in an identity directory.
pub const CERT_FILE: &str = "cert.pem";
/// The private key's file name in an identity directory (mode 0600).
pub const KEY_FILE: &str = "key.pem";

/// The SHA-256 of a certificate's DER encoding: what `--peer` pins.
///
/// Displayed as 32 lower-case hex bytes joined by colons; parsed from that or from 64 plain
/// hex digits, in either case, with an optional `sha256:` prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

/// The fingerprint of a DER-encoded certificate.
pub fn fingerprint(cert_der: &[u8]) -> Fingerprint {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    Fingerprint(out)
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::BadFingerprint(s.to_string());
        let t = s.trim();
        let t = match t.get(..7) {
            Some(p) if p.eq_ignore_ascii_case("sha256:") => &t[7..],
            _ => t,
        };
        let digits: Vec<u8> = t.bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let hi = (pair[0] as char).to_digit(16).ok_or_else(bad)?;
            let lo = (pair[1] as char).to_digit(16).ok_or_else(bad)?;
            *byte = (hi * 16 + lo) as u8;
        }
        Ok(Fingerprint(out))
    }
}

/// A host's private key and self-signed certificate.
pub struct Identity {
    cert_pem: String,
    key_pem: String,
    pub(super) cert: CertificateDer<'static>,
    pub(super) key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A new ECDSA P-256 key and a self-signed certificate for it (subject name "ftvm"; its
    /// validity dates are rcgen's defaults and are not checked: the pin is what counts).
    pub fn generate() -> Result<Identity> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(Error::Generate)?;
        let mut params =
            rcgen::CertificateParams::new(vec!["ftvm".to_string()]).map_err(Error::Generate)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ftvm replication");
        let cert = params.self_signed(&key).map_err(Error::Generate)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Identity::from_pem(cert_pem, key_pem, Path::new("(generated)"))
    }

    fn from_pem(cert_pem: String, key_pem: String, dir: &Path) -> Result<Identity> {
        let cert =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|source| Error::Pem {
                path: dir.join(CERT_FILE),
                source,
            })?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| Error::Pem {
                path: dir.join(KEY_FILE),
                source,
            })?;
        Ok(Identity {
            cert_pem,
            key_pem,
            cert,
            key,
        })
    }

    /// The certificate's fingerprint: what the other side pins.
    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint(&self.cert)
    }

    /// The certificate, DER-encoded.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert
    }

    /// Reads `dir/cert.pem` and `dir/key.pem`. Refuses a key file that other users can read.
    /// Whether the key matches the certificate is checked when a TLS configuration is built.
    pub fn load(dir: &Path) -> Result<Identity> {
        let key_path = dir.join(KEY_FILE);
        let key_file = File::open(&key_path).map_err(io("read", &key_path))?;
        let meta = key_file.metadata().map_err(io("read", &key_path))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(Error::KeyExposed {
                path: key_path,
                mode,
            });
        }
        let key_pem = std::io::read_to_string(key_file).map_err(io("read", &key_path))?;
        let cert_path = dir.join(CERT_FILE);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io("read", &cert_path))?;
        Identity::from_pem(cert_pem, key_pem, dir)
    }

    /// Writes `dir/key.pem` (mode 0600) and `dir/cert.pem` (0644), creating `dir` with mode
    /// 0700 if it is missing. Each file is written to an exclusive temporary in `dir`, synced,
    /// then linked into place, which fails if the file exists: an existing key or certificate
    /// is never replaced unless `force` is given (then renamed over). The directory is synced
    /// last.
    pub fn write(&self, dir: &Path, force: bool) -> Result<()> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create directory", dir))?;
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        if !force {
            for path in [&key_path, &cert_path] {
                if fs::symlink_metadata(path).is_ok() {
                    return Err(Error::Exists { path: path.clone() });
                }
            }
        }
        place(dir, KEY_FILE, self.key_pem.as_bytes(), 0o600, force)?;
        if let Err(e) = place(dir, CERT_FILE, self.cert_pem.as_bytes(), 0o644, force) {
            if !force {
                // The key was placed by this call a moment ago: without its certificate it
                // is of no use, and a retry would be refused because of it.
                let _ = fs::remove_file(&key_path);
            }
            return Err(e);
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync directory", dir))
    }
}

/// `ftvm cert --out DIR`: a new identity written to `dir` (see [`Identity::write`]); returns
/// its fingerprint.
pub fn generate_into(dir: &Path, force: bool) -> Result<Fingerprint> {
    let identity = Identity::generate()?;
    identity.write(dir, force)?;
    Ok(identity.fingerprint())
}

/// Writes `bytes` to `dir/name` through an exclusive temporary: linked into place (refusing an
/// existing file) or, with `replace`, renamed over it.
fn place(dir: &Path, name: &str, bytes: &[u8], mode: u32, replace: bool) -> Result<()> {
    let path = dir.join(name);
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".{name}.{}.{nonce}.tmp", std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    let result = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io("write", &tmp))
        .and_then(|()| {
            if replace {
                fs::rename(&tmp, &path).map_err(io("replace", &path))
            } else {
                match fs::hard_link(&tmp, &path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                        Err(Error::Exists { path: path.clone() })
                    }
                    Err(e) => Err(io("create", &path)(e)),
                }
            }
        });
    // The temporary is ours: gone after a rename, a second name after a link.
    if !replace || result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path: PathBuf = path.to_path_buf();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}
