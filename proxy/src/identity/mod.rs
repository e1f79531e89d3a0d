//! The node's mesh identity: its credential, checked when loaded, and the TLS
//! configurations the proxy serves and dials with.
//!
//! Proxies talk to each other over mutual TLS as [`pimesh_meshtls`] configures it (TLS 1.3
//! only, ALPN `h2`): each side presents its node credential (a leaf for
//! `spiffe://<site>/node/<node>`, maybe with `spiffe://<site>/svc/<service>` IDs, followed
//! by its issuer) and checks the other's against the site's anchor bundle:
//!
//! - the server ([`Identity::acceptor`]) takes a client with any SPIFFE ID of the site;
//! - the client ([`Identity::connector`]) takes only the node it dialled, named by the
//!   [`ServerName`] made by [`Identity::server_name`];
//! - the client of a control replica ([`Identity::control_connector`]) takes only
//!   `spiffe://<site>/svc/pimesh-control`.
//!
//! What is the proxy's own here: which files hold the credential (`files`), what a usable
//! node credential is (`load`: exactly one node ID, valid now for both server and client
//! authentication under the bundle, with errors that name the file at fault), the node
//! credential in use reloaded when its files change (`reload`), and what `/config` shows
//! of an identity.

mod files;
mod load;
mod reload;
#[cfg(test)]
mod testing;

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use pimesh_meshtls::{Credential, SiteTrust};
use pimesh_schema::{DnsLabel, SpiffeId};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub use files::{default_files, IdentityFiles};
pub use load::LoadError;
pub use reload::IdentityReloader;

/// Where an identity in use came from, for `/config` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The node credential files (`--identity-dir`, the credentials directory).
    NodeCredential,
    /// A leaf a control replica signed in this process's life.
    Control,
    /// A leaf a control replica signed earlier, read back from the state directory.
    Cache,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::NodeCredential => "node-credential",
            Source::Control => "control",
            Source::Cache => "cache",
        }
    }
}

/// A loaded, checked node identity and the TLS configs built from it.
///
/// Invariants: the leaf chains (through the rest of the chain) to one of the anchors, was
/// valid for both server and client authentication when it was loaded, and names exactly
/// one node ID, `spiffe://<site>/node/<node>`; `ids` are all the leaf's SPIFFE IDs of
/// `site` (the node ID among them); the private key belongs to the leaf. The configs only
/// ever present this leaf and only accept peers of `site` under the anchors. Cloning is
/// cheap (the configs are shared).
#[derive(Clone)]
pub struct Identity {
    pub site: DnsLabel,
    pub node: DnsLabel,
    pub ids: Vec<SpiffeId>,
    /// When the leaf becomes valid (it is backdated a little by the issuer).
    pub not_before: SystemTime,
    /// When the leaf expires: the identity must be replaced before then.
    pub not_after: SystemTime,
    pub source: Source,
    /// The leaf's issuer name (the subject of the certificate that signed it).
    pub issuer_subject: String,
    /// SHA-256 (hex) of the issuer certificate sent after the leaf, when there is one: it
    /// tells issuers apart across a rotation, as they share their names.
    pub issuer_sha256: Option<String>,
    /// SHA-256 (hex) of the anchor of the bundle the leaf chains to (the first, when
    /// several).
    pub anchor_sha256: String,
    credential: Credential,
    trust: SiteTrust,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    control: Arc<ClientConfig>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("site", &self.site.as_str())
            .field("node", &self.node.as_str())
            .field("ids", &self.ids)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("source", &self.source)
            .field("issuer_sha256", &self.issuer_sha256)
            .field("anchors", &self.trust.anchors().len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The same identity, labelled as coming from `source`.
    pub fn with_source(mut self, source: Source) -> Identity {
        self.source = source;
        self
    }

    /// The chain presented (leaf first, then the issuer).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        self.credential.chain()
    }
    /// The server side of an inbound mesh connection ([`pimesh_meshtls::mesh_server`]):
    /// requires a client certificate of this site. Read the caller's IDs with
    /// [`pimesh_meshtls::peer_ids`] once the handshake is done.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.server))
    }

    /// The client side of an outbound mesh connection ([`pimesh_meshtls::mesh_client`]):
    /// presents this identity and accepts only the node named by the [`ServerName`] passed
    /// to `connect` (make it with [`Identity::server_name`]).
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(Arc::clone(&self.client))
    }

    /// The client side of a connection to a control replica
    /// ([`pimesh_meshtls::control_client`]): presents this identity and accepts only
    /// `spiffe://<site>/svc/pimesh-control` of this site, whatever name is dialled.
    pub fn control_connector(&self) -> TlsConnector {
        TlsConnector::from(Arc::clone(&self.control))
    }

    /// The site's anchor bundle this identity trusts.
    pub fn anchors(&self) -> &[CertificateDer<'static>] {
        self.trust.anchors()
    }

    /// The name to pass to [`TlsConnector::connect`] to reach node `peer` of this site
    /// ([`pimesh_meshtls::mesh_server_name`]).
    pub fn server_name(&self, peer: &DnsLabel) -> ServerName<'static> {
        pimesh_meshtls::mesh_server_name(&self.site, peer)
    }
}

/// SHA-256 of a certificate (DER) in lowercase hex: how `/config` names certificates.
pub fn sha256_hex(cert: &CertificateDer<'_>) -> String {
    pimesh_identity::anchor_sha256_hex(cert)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::time::timeout;

    use super::testing::{label, NodeIdentity as _, Site, DAY};
    use super::*;

    const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

    #[tokio::test]
    async fn a_loaded_identity_names_its_node_and_its_configs_reach_a_peer() {
        let site = Site::backdated("depot-7");
        let a_cred = site.credential("pi-a", &["staff"], site.now, DAY);
        let a = Identity::from_pem(&a_cred.chain, &a_cred.key, &a_cred.anchors).expect("a");
        let b = site.identity("pi-b");
        assert_eq!(a.site, site.name);
        assert_eq!(a.node, label("pi-a"));
        assert_eq!(
            a.ids,
            [
                SpiffeId::node(&site.name, &label("pi-a")),
                SpiffeId::service(&site.name, &label("staff"))
            ]
        );
        assert!(a.not_before <= site.now && a.not_after > site.now + DAY / 2);
        assert_eq!(a.anchors().len(), 1);

        // The acceptor and connector are the mesh's (the handshakes themselves are
        // pimesh-meshtls's tests): each side sees the other's IDs.
        for (client, server) in [(&a, &b), (&b, &a)] {
            let (near, far) = tokio::io::duplex(64 * 1024);
            let (connected, accepted) = timeout(WAIT, async {
                tokio::join!(
                    client
                        .connector()
                        .connect(client.server_name(&server.node), near),
                    server.acceptor().accept(far)
                )
            })
            .await
            .expect("the handshake finishes");
            let mut connected = connected.expect("client side");
            let mut accepted = accepted.expect("server side");
            let (_, client_conn) = connected.get_ref();
            let (_, server_conn) = accepted.get_ref();
            assert_eq!(
                pimesh_meshtls::peer_ids(client_conn, &site.name),
                server.ids
            );
            assert_eq!(
                pimesh_meshtls::peer_ids(server_conn, &site.name),
                client.ids
            );
            connected.write_all(b"ping").await.expect("write");
            connected.flush().await.expect("flush");
            let mut buf = [0u8; 4];
            accepted.read_exact(&mut buf).await.expect("read");
            assert_eq!(&buf, b"ping");
        }
    }
}
