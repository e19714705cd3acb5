//! Certificate verification by pinned fingerprint, for both directions.
//!
//! No CA, no names, no validity dates: the peer's end-entity certificate must have the pinned
//! SHA-256, and the handshake signature must verify against that certificate's public key
//! (with the crypto provider's algorithms), so the peer has to hold the private key.

use std::sync::{Arc, Mutex};

use quinn::rustls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};

use super::{Error, Fingerprint, Role, fingerprint};

/// Where a verifier leaves the fingerprint of a refused certificate, so that the handshake's
/// error can name it (rustls's own error only carries text).
pub(super) type Refusal = Arc<Mutex<Option<Fingerprint>>>;

/// Accepts exactly the certificate with the pinned fingerprint.
#[derive(Debug)]
pub(super) struct PinVerifier {
    pin: Fingerprint,
    peer: Role,
    algorithms: WebPkiSupportedAlgorithms,
    refusal: Refusal,
}

impl PinVerifier {
    /// A verifier of `peer`'s certificate against `pin`; a refused fingerprint goes to
    /// `refusal`.
    pub(super) fn new(
        pin: Fingerprint,
        peer: Role,
        algorithms: WebPkiSupportedAlgorithms,
        refusal: Refusal,
    ) -> PinVerifier {
        PinVerifier {
            pin,
            peer,
            algorithms,
            refusal,
        }
    }

    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let presented = fingerprint(end_entity);
        if presented == self.pin {
            return Ok(());
        }
        if let Ok(mut slot) = self.refusal.lock() {
            *slot = Some(presented);
        }
        let error = Error::PinMismatch {
            peer: self.peer,
            presented,
            pinned: self.pin,
        };
        tracing::debug!("{error}");
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(error)),
        )))
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
