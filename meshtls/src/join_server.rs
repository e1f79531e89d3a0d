//! The replica's join configuration: what a board that is not yet a node of the site
//! talks to (`pimesh_join`). A replica serves it on its usual port to a ClientHello
//! naming `join.pimesh.invalid`.
//!
//! Invariants: TLS 1.3 only, the ring provider; presents exactly the given
//! [`Credential`] (the replica's serving leaf, the same as [`crate::control_server`]'s);
//! asks for NO client certificate, so what a connection on it may reach is for the
//! replica to limit (the join routes only). ALPN `h2` and `http/1.1`.

use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

use crate::config::{server_builder, ConfigError, ALPN_H2, ALPN_HTTP1};
use crate::credential::Credential;

/// The server configuration of the join routes: presents `credential`, asks for no
/// client certificate.
pub fn join_server(credential: &Credential) -> Result<ServerConfig, ConfigError> {
    let mut config = server_builder(WebPkiClientVerifier::no_client_auth(), credential)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pimesh_identity::TrustRoot;
    use pimesh_schema::DnsLabel;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::time::SystemTime;

    #[test]
    fn the_join_configuration_offers_h2_and_http1() {
        let site = DnsLabel::try_from("depot-7".to_owned()).expect("label");
        let now = SystemTime::now();
        let root = TrustRoot::generate(&site, now).expect("root");
        let id = crate::control_id(&site).expect("id");
        let (leaf, key) = root
            .issuer
            .issue_server_leaf(&id, &["localhost".to_owned()], &[], now)
            .expect("leaf");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let credential =
            Credential::new(vec![leaf.der, root.issuer.cert_der().clone()], key).expect("cred");
        let config = join_server(&credential).expect("config");
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
