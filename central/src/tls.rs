//! The server's TLS, as `pimesh_meshtls::central_server` configures it: TLS 1.3 only; a
//! client certificate is optional at the handshake (the operator's publish and the fleet
//! view need none) and, when given, must chain to one of the registered sites' anchors.
//! Which site it belongs to is checked against that site's anchor alone, once per
//! connection and site (see `api::Peer`). What is the server's own here: reading its
//! certificate and key from the files the operator names.

use std::path::Path;
use std::sync::Arc;

use pimesh_meshtls::{pem, Credential, CredentialError};
use rustls::pki_types::CertificateDer;
use rustls::ServerConfig;

/// The server configuration presenting the chain in `cert` with the key in `key` (PEM
/// files), taking client certificates under `anchors`. Errors name the file at fault.
pub fn server_config(
    cert: &Path,
    key: &Path,
    anchors: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, String> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|err| format!("{}: cannot read: {err}", path.display()))
    };
    let chain =
        pem::certificates(&read(cert)?).map_err(|err| format!("{}: {err}", cert.display()))?;
    let key_der =
        pem::private_key(&read(key)?).map_err(|err| format!("{}: {err}", key.display()))?;
    let credential = Credential::new(chain, key_der).map_err(|err| match err {
        CredentialError::UnsupportedKey(_) => format!("{}: {err}", key.display()),
        CredentialError::KeyMismatch => format!(
            "{}: the key in {} does not fit the certificate",
            cert.display(),
            key.display()
        ),
        other => format!("{}: {other}", cert.display()),
    })?;
    let config = pimesh_meshtls::central_server(&credential, anchors).map_err(|err| match err {
        pimesh_meshtls::ConfigError::Trust(err) => format!("unusable site anchor: {err}"),
        other => other.to_string(),
    })?;
    Ok(Arc::new(config))
}
