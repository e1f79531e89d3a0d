//! The client configurations of a node that joins a site with nothing but its join token
//! (`pimesh_join`'s protocol): it holds no credential yet and knows the site's anchor only
//! by its SHA-256 (the token's pin).
//!
//! | configuration | presents | accepts |
//! |---|---|---|
//! | [`join_bundle_client`] | nothing | any server whose handshake signature verifies: only the bundle is fetched, and the caller keeps it only when an anchor hashes to the pin |
//! | [`join_client`] | nothing | `spiffe://<site>/svc/pimesh-control` under the pinned anchors ([`Expected::ControlReplica`]) |
//!
//! Invariant: nothing but a `GET` of the public bundle may travel over
//! [`join_bundle_client`]; the token's secret and the CSR travel only over
//! [`join_client`], whose anchors the caller took from a bundle that matched the pin.
//! Both offer ALPN `http/1.1`; the caller dials the server name
//! `pimesh_join::JOIN_SERVER_NAME`, whose SNI makes a replica answer with its join routes
//! and ask for no client certificate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use crate::config::{ConfigError, ALPN_HTTP1};
use crate::provider::provider;
use crate::trust::SiteTrust;
use crate::verifier::{Expected, SpiffeVerifier};

/// A client that accepts any server certificate (see the module doc: for the bundle only).
pub fn join_bundle_client() -> Result<ClientConfig, ConfigError> {
    let verifier = AnyServer {
        algorithms: provider().signature_verification_algorithms,
    };
    builder(Arc::new(verifier))
}

/// A client that accepts only a control replica of `trust`'s site under `trust`'s anchors
/// (the pinned ones), and presents no certificate.
pub fn join_client(trust: &SiteTrust) -> Result<ClientConfig, ConfigError> {
    builder(Arc::new(SpiffeVerifier::new(
        trust.clone(),
        Expected::ControlReplica,
    )))
}

fn builder(verifier: Arc<dyn ServerCertVerifier>) -> Result<ClientConfig, ConfigError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ConfigError::Protocol)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(config)
}

/// Takes any certificate, but still checks that the server holds its key (the handshake
/// signature), so that what answers is at least one party, not a relay of another.
#[derive(Debug)]
struct AnyServer {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configuration speaks TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
