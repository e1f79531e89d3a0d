//! Sites, credentials and handshakes for this crate's tests: real certificates made by
//! `pimesh-identity` (through `pimesh-test-support`'s [`Site`]), real rustls handshakes
//! over an in-memory pipe.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use pimesh_schema::SpiffeId;
use rustls::pki_types::ServerName;
use tokio::io::DuplexStream;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub use pimesh_test_support::pki::{label, PemCredential, Site, DAY};

use crate::{control_client, mesh_client, mesh_server, mesh_server_name, Credential, SiteTrust};

pub const WAIT: Duration = Duration::from_secs(10);

/// What this crate's tests make of a [`Site`]: its trust and peers that present its
/// credentials.
pub trait MeshSite {
    fn trust(&self) -> SiteTrust;
    /// A peer of this site: node `node` with `services`, valid from now for a day.
    fn peer(&self, node: &str, services: &[&str]) -> Peer;
    /// A peer presenting `pem` and trusting this site's anchor.
    fn peer_with(&self, pem: &PemCredential) -> Peer;
}

impl MeshSite for Site {
    fn trust(&self) -> SiteTrust {
        SiteTrust::new(self.name.clone(), vec![self.root.anchor.cert_der().clone()]).expect("trust")
    }

    fn peer(&self, node: &str, services: &[&str]) -> Peer {
        let pem = self.credential(node, services, self.now, DAY);
        self.peer_with(&pem)
    }

    fn peer_with(&self, pem: &PemCredential) -> Peer {
        let credential =
            Credential::from_pem(pem.chain.as_bytes(), pem.key.as_bytes()).expect("credential");
        let ids = pimesh_identity::leaf_identities(&credential.chain()[0]).expect("ids");
        Peer {
            credential,
            key_pem: pem.key.clone(),
            trust: self.trust(),
            ids,
        }
    }
}

/// A credential (and its key as PEM), the site trust it is checked under, and the SPIFFE IDs its leaf names.
pub struct Peer {
    pub credential: Credential,
    /// The credential's key as PEM, for clients built by hand.
    pub key_pem: String,
    pub trust: SiteTrust,
    pub ids: Vec<SpiffeId>,
}

impl Peer {
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = mesh_server(&self.credential, &self.trust).expect("server config");
        TlsAcceptor::from(Arc::new(config))
    }

    pub fn connector(&self) -> TlsConnector {
        let config = mesh_client(&self.credential, &self.trust).expect("client config");
        TlsConnector::from(Arc::new(config))
    }

    pub fn control_connector(&self) -> TlsConnector {
        let config = control_client(&self.credential, &self.trust).expect("client config");
        TlsConnector::from(Arc::new(config))
    }

    pub fn server_name(&self, node: &str) -> ServerName<'static> {
        mesh_server_name(self.trust.site(), &label(node))
    }
}

pub type Outcomes = (
    io::Result<tokio_rustls::client::TlsStream<DuplexStream>>,
    io::Result<tokio_rustls::server::TlsStream<DuplexStream>>,
);

/// Runs a handshake between `client` (dialling `name`) and `server` over an in-memory
/// pipe; returns both sides' outcomes.
pub async fn handshake(
    client: &TlsConnector,
    name: ServerName<'static>,
    server: &TlsAcceptor,
) -> Outcomes {
    let (near, far) = tokio::io::duplex(64 * 1024);
    let outcome = timeout(WAIT, async {
        tokio::join!(client.connect(name, near), server.accept(far))
    })
    .await;
    outcome.expect("the handshake finishes")
}

/// The reason `server` gives for refusing `client`, which dials node `node`.
pub async fn server_refusal(server: &TlsAcceptor, client: &Peer, node: &str) -> &'static str {
    let (_, accepted) = handshake(&client.connector(), client.server_name(node), server).await;
    let err = accepted.expect_err("the server refuses the client");
    crate::handshake_failure_reason(&err)
}
