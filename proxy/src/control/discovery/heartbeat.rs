//! What a heartbeat tells the control replicas (`POST /v1/heartbeat`):
//!
//! ```json
//! {"port": P, "credential": "<hex>", "role": "server", "replicas": [8086, 8087]}
//! ```
//!
//! - `port`: the port this node's proxy takes mesh traffic on (always);
//! - `credential`: the lower-case hex SHA-256 of the node credential certificate's
//!   SubjectPublicKeyInfo (DER), whenever there is a node credential — the replicas keep it
//!   to refuse a join that takes a live node's name with another key;
//! - `role` (with `--role`) and `replicas` (with `--role server`: `--server-replicas`,
//!   maybe empty), from which the replicas list the server nodes in discovery.
//!
//! Invariant: the body is made at every beat from the node credential then in use, so a
//! changed credential file is announced at the next beat.
//!
//! Sent with `accept: application/json`, a heartbeat is answered `200` with the server
//! nodes the replica hears from, in the discovery document's shape ([`Answer`]); a replica
//! that predates that answer says `204` and nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use hyper::body::Bytes;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use super::document::Server;
use crate::cli::Role;
use crate::identity::Identity;

/// The largest heartbeat answer read: a site's servers fit in a few kilobytes.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A replica's answer to a heartbeat: `{"servers": {"<node>": {"address": IP, "replicas":
/// [ports]}}}`, the servers whose heartbeats it hears.
#[derive(Debug, Deserialize)]
pub struct Answer {
    #[serde(default)]
    servers: BTreeMap<String, Server>,
}

impl Answer {
    pub fn parse(body: &[u8]) -> Result<Answer, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// Every control replica of the listed servers (port 0, never a replica's, left out).
    pub fn server_replicas(&self) -> Vec<SocketAddr> {
        super::document::replicas_of(&self.servers)
    }
}

/// This node's side of every heartbeat.
#[derive(Debug, Clone)]
pub struct Announce {
    pub inbound_port: u16,
    pub role: Option<Role>,
    /// Sent only with `role` [`Role::Server`].
    pub server_replicas: Vec<u16>,
}

impl Announce {
    /// The body of one heartbeat, announcing `node_credential`'s key when there is one
    /// (and it can be read: an identity's leaf was parsed when it was loaded).
    pub fn body(&self, node_credential: Option<&Identity>) -> Bytes {
        let mut body = serde_json::Map::new();
        body.insert("port".to_owned(), self.inbound_port.into());
        let credential = node_credential
            .and_then(|identity| identity.chain().first())
            .and_then(|leaf| spki_sha256_hex(leaf).ok());
        if let Some(credential) = credential {
            body.insert("credential".to_owned(), credential.into());
        }
        if let Some(role) = self.role {
            body.insert("role".to_owned(), role.as_str().into());
            if role == Role::Server {
                body.insert("replicas".to_owned(), self.server_replicas.clone().into());
            }
        }
        Bytes::from(serde_json::Value::Object(body).to_string())
    }
}

/// The lower-case hex SHA-256 of the SubjectPublicKeyInfo (DER) of the certificate `cert`.
pub fn spki_sha256_hex(
    cert: &CertificateDer<'_>,
) -> Result<String, x509_parser::nom::Err<x509_parser::error::X509Error>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)?;
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        parsed.tbs_certificate.subject_pki.raw,
    );
    Ok(digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_lists_the_replicas_of_the_servers_it_hears() {
        let answer = Answer::parse(
            br#"{"servers":{"pi-b":{"address":"10.0.0.2","replicas":[8086,0,8087]},"pi-a":{"address":"10.0.0.1","replicas":[8086]}}}"#,
        )
        .expect("an answer");
        let replicas: Vec<String> = answer
            .server_replicas()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            replicas,
            ["10.0.0.1:8086", "10.0.0.2:8086", "10.0.0.2:8087"]
        );
        assert!(Answer::parse(b"{}")
            .expect("no servers")
            .server_replicas()
            .is_empty());
        assert!(Answer::parse(br#"{"servers":{"x":{"address":"not an ip"}}}"#).is_err());
    }
    use pimesh_test_support::pki::{Site, DAY};
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::PrivatePkcs8KeyDer;

    /// The DER SubjectPublicKeyInfo of a P-256 key, made from the private key alone: the
    /// fixed algorithm prefix (id-ecPublicKey, prime256v1) and the uncompressed point.
    fn p256_spki_of_key(key_pem: &[u8]) -> Vec<u8> {
        use ring::signature::KeyPair as _;
        let der = PrivatePkcs8KeyDer::from_pem_slice(key_pem).expect("a PKCS#8 key");
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            der.secret_pkcs8_der(),
            &ring::rand::SystemRandom::new(),
        )
        .expect("a P-256 key");
        let prefix: [u8; 26] = [
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        let mut spki = prefix.to_vec();
        spki.extend_from_slice(key.public_key().as_ref());
        spki
    }

    #[test]
    fn the_credential_is_the_sha256_of_the_keys_spki() {
        let site = Site::backdated("depot");
        let cred = site.credential("pi-a", &[], site.now, DAY);
        let identity = Identity::from_pem(&cred.chain, &cred.key, &cred.anchors).expect("identity");
        let spki = p256_spki_of_key(cred.key.as_bytes());
        let expected: String = ring::digest::digest(&ring::digest::SHA256, &spki)
            .as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let leaf = identity.chain().first().expect("a leaf");
        assert_eq!(spki_sha256_hex(leaf).expect("parsed"), expected);
        assert!(spki_sha256_hex(&CertificateDer::from(vec![1, 2, 3])).is_err());

        let announce = Announce {
            inbound_port: 4143,
            role: None,
            server_replicas: Vec::new(),
        };
        let body: serde_json::Value =
            serde_json::from_slice(&announce.body(Some(&identity))).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!({"port": 4143, "credential": expected})
        );
        let body: serde_json::Value = serde_json::from_slice(&announce.body(None)).expect("JSON");
        assert_eq!(body, serde_json::json!({"port": 4143}));
    }

    #[test]
    fn a_server_announces_its_role_and_replicas_an_agent_its_role() {
        let server = Announce {
            inbound_port: 4143,
            role: Some(Role::Server),
            server_replicas: vec![8086, 8087],
        };
        let body: serde_json::Value = serde_json::from_slice(&server.body(None)).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!({"port": 4143, "role": "server", "replicas": [8086, 8087]})
        );
        let agent = Announce {
            role: Some(Role::Agent),
            server_replicas: Vec::new(),
            ..server
        };
        let body: serde_json::Value = serde_json::from_slice(&agent.body(None)).expect("JSON");
        assert_eq!(body, serde_json::json!({"port": 4143, "role": "agent"}));
    }
}
