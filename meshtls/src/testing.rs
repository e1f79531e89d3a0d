//! Sites, credentials and handshakes for this crate's tests: real certificates made by
//! `pimesh-identity`, real rustls handshakes over an in-memory pipe.

use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pimesh_identity::{LeafRequest, TrustRoot};
use pimesh_schema::{DnsLabel, SpiffeId};
use rustls::pki_types::ServerName;
use tokio::io::DuplexStream;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::{control_client, mesh_client, mesh_server, mesh_server_name, Credential, SiteTrust};

pub const DAY: Duration = Duration::from_secs(24 * 3600);
pub const WAIT: Duration = Duration::from_secs(10);

pub fn label(s: &str) -> DnsLabel {
    DnsLabel::try_from(s.to_owned()).expect("label")
}

/// A site whose trust root was made three days ago, so that it can also sign leaves that
/// are already expired.
pub struct Site {
    pub name: DnsLabel,
    pub root: TrustRoot,
    pub now: SystemTime,
}

/// A credential as PEM text.
pub struct PemCredential {
    pub chain: String,
    pub key: String,
}

impl Site {
    pub fn new(name: &str) -> Site {
        let now = SystemTime::now();
        Site {
            name: label(name),
            root: TrustRoot::generate(&label(name), now - 3 * DAY).expect("trust root"),
            now,
        }
    }

    /// A credential for node `node` (plus `services`), signed as of `at` for `lifetime`.
    pub fn credential(
        &self,
        node: &str,
        services: &[&str],
        at: SystemTime,
        lifetime: Duration,
    ) -> PemCredential {
        let mut ids = vec![SpiffeId::node(&self.name, &label(node))];
        ids.extend(
            services
                .iter()
                .map(|svc| SpiffeId::service(&self.name, &label(svc))),
        );
        self.credential_for(&ids, at, lifetime)
    }

    /// A credential for exactly `ids` (of this site), signed as of `at` for `lifetime`.
    pub fn credential_for(
        &self,
        ids: &[SpiffeId],
        at: SystemTime,
        lifetime: Duration,
    ) -> PemCredential {
        let request = LeafRequest::new(ids).expect("request");
        let permitted: BTreeSet<SpiffeId> = ids.iter().cloned().collect();
        let leaf = self
            .root
            .issuer
            .sign_leaf_for(&request.csr, &self.name, &permitted, at, lifetime)
            .expect("signed");
        PemCredential {
            chain: format!("{}{}", leaf.pem, self.root.issuer.cert_pem()),
            key: request.key.serialize_pem(),
        }
    }

    pub fn trust(&self) -> SiteTrust {
        SiteTrust::new(self.name.clone(), vec![self.root.anchor.cert_der().clone()]).expect("trust")
    }

    /// A peer of this site: node `node` with `services`, valid from now for a day.
    pub fn peer(&self, node: &str, services: &[&str]) -> Peer {
        let pem = self.credential(node, services, self.now, DAY);
        self.peer_with(&pem)
    }

    /// A peer presenting `pem` and trusting this site's anchor.
    pub fn peer_with(&self, pem: &PemCredential) -> Peer {
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
