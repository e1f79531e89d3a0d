//! The server's TLS: TLS 1.3 only; a client certificate is optional at the handshake (the
//! operator's publish and the fleet view need none) and, when given, must chain to one
//! of the registered sites' anchors. Which site it belongs to is checked against that
//! site's anchor alone, once per connection and site (see `api::Peer`).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

pub fn server_config(
    cert: &Path,
    key: &Path,
    anchors: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|err| format!("{}: expected PEM certificates: {err}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: expected PEM certificates, found none",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|err| format!("{}: expected a PEM private key: {err}", key.display()))?;
    let verifier = if anchors.is_empty() {
        WebPkiClientVerifier::no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for anchor in anchors {
            roots
                .add(anchor.clone())
                .map_err(|err| format!("unusable site anchor: {err}"))?;
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .allow_unauthenticated()
            .build()
            .map_err(|err| format!("cannot build the client certificate verifier: {err}"))?
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|err| format!("TLS 1.3 unavailable: {err}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|err| {
            format!(
                "{}: the key does not fit the certificate: {err}",
                cert.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
