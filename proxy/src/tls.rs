//! TLS for tunnel connections: TLS 1.3 only, the ring provider passed explicitly, mutual
//! authentication by pinned key fingerprints, ALPN "ditto/1".
//!
//! Both verifiers ignore names, chains and validity dates: the only question is whether the key in the
//! presented certificate is one we were configured to trust. The handshake signature is still checked
//! against that same certificate (with the provider's algorithms), which proves the peer holds the key.

use crate::identity::{Fingerprint, Identity};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::collections::HashSet;
use std::sync::Arc;

/// The ALPN protocol id of tunnel connections.
pub const ALPN: &[u8] = b"ditto/1";
/// The server name a dialer presents; verifiers ignore it.
pub const SERVER_NAME: &str = "ditto";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pin_error() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// Checks the presented key against the pinned set.
fn check_pin(
    end_entity: &CertificateDer<'_>,
    allowed: &HashSet<Fingerprint>,
) -> Result<(), rustls::Error> {
    let fp = Fingerprint::of_cert(end_entity).ok_or(rustls::Error::InvalidCertificate(
        CertificateError::BadEncoding,
    ))?;
    if allowed.contains(&fp) {
        Ok(())
    } else {
        Err(pin_error())
    }
}

/// Verifies the server we dial against its one pinned fingerprint.
#[derive(Debug)]
struct PinnedServer {
    allowed: HashSet<Fingerprint>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check_pin(end_entity, &self.allowed)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with a TLS 1.3-only config; refuse rather than trust.
        Err(rustls::Error::General(
            "TLS 1.2 is not used by ditto".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies dialing clients against the fingerprints of all configured peers.
#[derive(Debug)]
struct PinnedClients {
    allowed: HashSet<Fingerprint>,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_pin(end_entity, &self.allowed)?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not used by ditto".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client config for dialing the peer whose key is `peer`.
pub fn client_config(
    identity: &Identity,
    peer: Fingerprint,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(PinnedServer {
        allowed: HashSet::from([peer]),
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.private_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // Tunnel connections are long-lived; resumption would only add state to reason about.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Server config accepting any of `peers`.
pub fn server_config(
    identity: &Identity,
    peers: impl IntoIterator<Item = Fingerprint>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(PinnedClients {
        allowed: peers.into_iter().collect(),
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert.clone()], identity.private_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The fingerprint of the peer of an established connection.
pub fn peer_fingerprint(conn: &rustls::CommonState) -> Option<Fingerprint> {
    let certs = conn.peer_certificates()?;
    Fingerprint::of_cert(certs.first()?)
}
