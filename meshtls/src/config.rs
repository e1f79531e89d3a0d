//! The rustls configurations of every Pimesh connection (see the table in the crate's
//! documentation).
//!
//! Invariants: TLS 1.3 only; the ring provider; the configuration presents exactly the
//! [`Credential`] it was built from; the mesh and control-client configurations verify
//! peers with a [`SpiffeVerifier`], the replica and central servers with rustls' webpki
//! verifier over the given anchors (their handshakes only ask "under which anchors"; which
//! node a client is, they ask per request, where a refusal can say why in an HTTP answer).

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::sign::SingleCertAndKey;
use rustls::{ClientConfig, ServerConfig};

use crate::credential::Credential;
use crate::provider::provider;
use crate::trust::{root_store, SiteTrust, TrustError};
use crate::verifier::{Expected, SpiffeVerifier};

/// ALPN of HTTP/2, spoken between proxies and from proxies to replicas.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of HTTP/1.1, which replicas also offer operators and the central server speaks.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why a configuration cannot be built.
#[derive(Debug)]
pub enum ConfigError {
    /// The provider refuses TLS 1.3 (never with ring; reported rather than assumed).
    Protocol(rustls::Error),
    /// The anchors given for client certificates are unusable.
    Trust(TrustError),
    /// rustls cannot make a client-certificate verifier of the anchors.
    Verifier(VerifierBuilderError),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Protocol(err) => write!(f, "TLS 1.3 unavailable: {err}"),
            ConfigError::Trust(err) => err.fmt(f),
            ConfigError::Verifier(err) => {
                write!(f, "cannot build the client certificate verifier: {err}")
            }
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Protocol(err) => Some(err),
            ConfigError::Trust(err) => Some(err),
            ConfigError::Verifier(err) => Some(err),
        }
    }
}

pub(crate) fn server_builder(
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    credential: &Credential,
) -> Result<ServerConfig, ConfigError> {
    Ok(ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ConfigError::Protocol)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(credential.certified_key()))))
}

fn client_builder(
    verifier: SpiffeVerifier,
    credential: &Credential,
) -> Result<ClientConfig, ConfigError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ConfigError::Protocol)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(credential.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A proxy's inbound side: presents `credential`; requires a client certificate that
/// chains to `trust`'s anchors, is valid now for client authentication and carries a
/// SPIFFE ID of the site ([`Expected::AnyId`]; read the caller's IDs with
/// [`crate::peer_ids`] once the handshake is done). ALPN `h2`.
pub fn mesh_server(
    credential: &Credential,
    trust: &SiteTrust,
) -> Result<ServerConfig, ConfigError> {
    let verifier = SpiffeVerifier::new(trust.clone(), Expected::AnyId);
    let mut config = server_builder(Arc::new(verifier), credential)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A proxy's outbound side: presents `credential`; accepts only a server certificate that
/// chains to `trust`'s anchors, is valid now for server authentication and carries the
/// node ID named by the server name passed to `connect` ([`Expected::DialledNode`]; make
/// it with [`crate::mesh_server_name`]). ALPN `h2`.
pub fn mesh_client(
    credential: &Credential,
    trust: &SiteTrust,
) -> Result<ClientConfig, ConfigError> {
    client_builder(
        SpiffeVerifier::new(trust.clone(), Expected::DialledNode),
        credential,
    )
}

/// A proxy's connection to a control replica: presents `credential`; accepts only a server
/// certificate that chains to `trust`'s anchors, is valid now for server authentication
/// and carries `spiffe://<site>/svc/pimesh-control` ([`Expected::ControlReplica`]). The
/// server name is not checked (replicas are reached by address; their DNS and IP names
/// are for operators). ALPN `h2`.
pub fn control_client(
    credential: &Credential,
    trust: &SiteTrust,
) -> Result<ClientConfig, ConfigError> {
    client_builder(
        SpiffeVerifier::new(trust.clone(), Expected::ControlReplica),
        credential,
    )
}

/// A control replica's server: presents `credential` (its serving leaf); requires a client
/// certificate chaining to one of `anchors` (the site's bundle), valid now for client
/// authentication. ALPN `h2` and `http/1.1`.
pub fn control_server(
    credential: &Credential,
    anchors: &[CertificateDer<'static>],
) -> Result<ServerConfig, ConfigError> {
    let roots = root_store(anchors).map_err(ConfigError::Trust)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(ConfigError::Verifier)?;
    let mut config = server_builder(verifier, credential)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(config)
}

/// The central server: presents `credential`; a client certificate is optional and, when
/// given, must chain to one of `site_anchors` (every registered site's anchor; none: no
/// client certificate is asked for). Which site a client belongs to is for the server to
/// check per request against that site's anchor alone. ALPN `http/1.1`.
pub fn central_server(
    credential: &Credential,
    site_anchors: &[CertificateDer<'static>],
) -> Result<ServerConfig, ConfigError> {
    let verifier = if site_anchors.is_empty() {
        WebPkiClientVerifier::no_client_auth()
    } else {
        let roots = root_store(site_anchors).map_err(ConfigError::Trust)?;
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(ConfigError::Verifier)?
    };
    let mut config = server_builder(verifier, credential)?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(config)
}

/// A client of an ordinary TLS server outside the mesh (the central server's PostgreSQL
/// database): accepts only a server certificate for the dialled name that chains to one of
/// `anchors` (WebPKI rules); presents no certificate. TLS 1.3 only.
pub fn named_server_client(
    anchors: &[CertificateDer<'static>],
) -> Result<ClientConfig, ConfigError> {
    let roots = root_store(anchors).map_err(ConfigError::Trust)?;
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ConfigError::Protocol)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::time::timeout;
    use tokio_rustls::TlsConnector;

    use super::*;
    use crate::testing::{handshake, label, server_refusal, MeshSite as _, Site, DAY, WAIT};
    use crate::{handshake_failure_reason, peer_ids, CONTROL_SERVICE};

    #[tokio::test]
    async fn nodes_of_a_site_handshake_both_ways_and_see_each_others_ids() {
        let site = Site::backdated("depot-7");
        let a = site.peer("pi-a", &["staff"]);
        let b = site.peer("pi-b", &[]);
        for (client, server, server_node) in [(&a, &b, "pi-b"), (&b, &a, "pi-a")] {
            let (connected, accepted) = handshake(
                &client.connector(),
                client.server_name(server_node),
                &server.acceptor(),
            )
            .await;
            let mut connected = connected.expect("client side");
            let mut accepted = accepted.expect("server side");
            let (_, client_conn) = connected.get_ref();
            let (_, server_conn) = accepted.get_ref();
            assert_eq!(client_conn.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(server_conn.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(
                client_conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            assert_eq!(peer_ids(client_conn, &site.name), server.ids);
            assert_eq!(peer_ids(server_conn, &site.name), client.ids);
            assert!(peer_ids(server_conn, &label("elsewhere")).is_empty());

            connected.write_all(b"ping").await.expect("write");
            connected.flush().await.expect("flush");
            let mut buf = [0u8; 4];
            accepted.read_exact(&mut buf).await.expect("read");
            assert_eq!(&buf, b"ping");
        }
    }

    #[tokio::test]
    async fn a_second_connection_resumes_and_keeps_the_peer_ids() {
        let site = Site::backdated("depot-7");
        let (a, b) = (site.peer("pi-a", &[]), site.peer("pi-b", &[]));
        let (connector, acceptor) = (a.connector(), b.acceptor());
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let (connected, accepted) =
                handshake(&connector, a.server_name("pi-b"), &acceptor).await;
            let mut connected = connected.expect("client side");
            let mut accepted = accepted.expect("server side");
            // The session tickets arrive after the handshake: exchange data to read them.
            accepted.write_all(b"x").await.expect("write");
            accepted.flush().await.expect("flush");
            let mut buf = [0u8; 1];
            connected.read_exact(&mut buf).await.expect("read");
            let (_, server_conn) = accepted.get_ref();
            kinds.push(server_conn.handshake_kind());
            assert_eq!(peer_ids(server_conn, &site.name), a.ids);
            assert_eq!(peer_ids(connected.get_ref().1, &site.name), b.ids);
        }
        assert_eq!(
            kinds,
            [
                Some(rustls::HandshakeKind::Full),
                Some(rustls::HandshakeKind::Resumed)
            ]
        );
    }

    #[tokio::test]
    async fn a_client_under_another_anchor_is_an_unknown_ca() {
        let site = Site::backdated("depot-7");
        let other = Site::backdated("depot-7"); // same name, another anchor
        let server = site.peer("pi-a", &[]).acceptor();
        assert_eq!(
            server_refusal(&server, &other.peer("pi-b", &[]), "pi-a").await,
            "unknown_ca"
        );
    }

    #[tokio::test]
    async fn expired_and_not_yet_valid_clients_are_refused() {
        let site = Site::backdated("depot-7");
        let server = site.peer("pi-a", &[]).acceptor();

        let past = site.now - 2 * DAY;
        let expired =
            site.peer_with(&site.credential("pi-b", &[], past, Duration::from_secs(3600)));
        assert_eq!(server_refusal(&server, &expired, "pi-a").await, "expired");

        let future = site.now + 2 * DAY;
        let early = site.peer_with(&site.credential("pi-b", &[], future, DAY));
        assert_eq!(
            server_refusal(&server, &early, "pi-a").await,
            "not_yet_valid"
        );
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let site = Site::backdated("depot-7");
        let server = site.peer("pi-a", &[]);
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeVerifier::new(
                site.trust(),
                Expected::DialledNode,
            )))
            .with_no_client_auth();
        let (_, accepted) = handshake(
            &TlsConnector::from(Arc::new(config)),
            server.server_name("pi-a"),
            &server.acceptor(),
        )
        .await;
        let err = accepted.expect_err("refused");
        assert_eq!(handshake_failure_reason(&err), "no_client_cert");
    }

    #[tokio::test]
    async fn plaintext_is_not_tls() {
        let site = Site::backdated("depot-7");
        let server = site.peer("pi-a", &[]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let client = tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(b"GET / HTTP/1.1\r\n\r\n")
                .await
                .expect("write");
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
        });
        let (stream, _) = listener.accept().await.expect("accept");
        let err = timeout(WAIT, server.acceptor().accept(stream))
            .await
            .expect("finishes")
            .expect_err("refused");
        assert_eq!(handshake_failure_reason(&err), "not_tls");
        drop(err);
        client.await.expect("client task");
    }

    #[tokio::test]
    async fn a_control_replica_is_known_by_its_spiffe_id_whatever_name_is_dialled() {
        let site = Site::backdated("depot-7");
        let client = site.peer("pi-a", &[]);
        let name = ServerName::try_from("localhost").expect("name");
        let replica = site.peer("srv", &[CONTROL_SERVICE]);
        let (connected, accepted) = handshake(
            &client.control_connector(),
            name.clone(),
            &replica.acceptor(),
        )
        .await;
        connected.expect("a certificate with the control ID is a replica");
        accepted.expect("the replica accepts the node");

        // A node of the site without the control ID is not a replica.
        let node = site.peer("pi-b", &[]);
        let (connected, _) =
            handshake(&client.control_connector(), name.clone(), &node.acceptor()).await;
        let err = connected.expect_err("a plain node is refused");
        assert_eq!(handshake_failure_reason(&err), "wrong_identity");

        // Nor is a replica of another site.
        let other = Site::backdated("depot-8");
        let foreign = other.peer("srv", &[CONTROL_SERVICE]);
        let (connected, _) =
            handshake(&client.control_connector(), name, &foreign.acceptor()).await;
        let err = connected.expect_err("another site's replica is refused");
        assert_eq!(handshake_failure_reason(&err), "unknown_ca");
    }

    #[tokio::test]
    async fn a_client_reaching_the_wrong_node_refuses_it() {
        let site = Site::backdated("depot-7");
        let client = site.peer("pi-a", &[]);
        let server = site.peer("c", &[]);
        let (connected, _) = handshake(
            &client.connector(),
            client.server_name("b"),
            &server.acceptor(),
        )
        .await;
        let err = connected.expect_err("the client refuses node c when it wants b");
        assert_eq!(handshake_failure_reason(&err), "wrong_identity");

        // A name outside the site's scheme names no node at all.
        let stranger = ServerName::try_from("b.other-site.pimesh").expect("name");
        let (connected, _) = handshake(&client.connector(), stranger, &server.acceptor()).await;
        let err = connected.expect_err("refused");
        assert_eq!(handshake_failure_reason(&err), "wrong_identity");
    }

    /// A client presenting `peer`'s credential (or none), trusting `server_anchor`'s
    /// webpki chain for any name: what an operator's or a node's client is to the replica
    /// and the central server.
    fn webpki_client(
        server_anchor: &CertificateDer<'static>,
        peer: Option<&crate::testing::Peer>,
    ) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(server_anchor.clone()).expect("anchor");
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots);
        let mut config = match peer {
            Some(peer) => builder
                .with_client_auth_cert(
                    peer.credential.chain().to_vec(),
                    crate::pem::private_key(peer.key_pem.as_bytes()).expect("key"),
                )
                .expect("client credential"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        TlsConnector::from(Arc::new(config))
    }

    /// A serving credential of `site` for `localhost`, as a replica issues itself.
    fn serving(site: &Site) -> Credential {
        let id = crate::control_id(&site.name).expect("control id");
        let (leaf, key) = site
            .root
            .issuer
            .issue_server_leaf(&id, &["localhost".to_owned()], &[], site.now)
            .expect("serving leaf");
        let chain = vec![leaf.der, site.root.issuer.cert_der().clone()];
        let key = crate::pem::private_key(key.serialize_pem().as_bytes()).expect("key");
        Credential::new(chain, key).expect("serving credential")
    }

    #[tokio::test]
    async fn a_replica_requires_a_client_of_its_bundle_and_offers_both_http_versions() {
        let site = Site::backdated("depot-7");
        let anchors = vec![site.root.anchor.cert_der().clone()];
        let config = control_server(&serving(&site), &anchors).expect("replica config");
        assert_eq!(
            config.alpn_protocols,
            [ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()]
        );
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let name = ServerName::try_from("localhost").expect("name");
        let anchor = site.root.anchor.cert_der();

        let node = site.peer("pi-a", &[]);
        let (connected, accepted) =
            handshake(&webpki_client(anchor, Some(&node)), name.clone(), &acceptor).await;
        connected.expect("the node reaches the replica");
        let accepted = accepted.expect("the replica accepts the node");
        assert_eq!(peer_ids(accepted.get_ref().1, &site.name), node.ids);

        let (_, accepted) = handshake(&webpki_client(anchor, None), name.clone(), &acceptor).await;
        let err = accepted.expect_err("no client certificate");
        assert_eq!(handshake_failure_reason(&err), "no_client_cert");

        let stranger = Site::backdated("depot-8").peer("pi-a", &[]);
        let (_, accepted) =
            handshake(&webpki_client(anchor, Some(&stranger)), name, &acceptor).await;
        let err = accepted.expect_err("another site's node");
        assert_eq!(handshake_failure_reason(&err), "unknown_ca");

        assert!(matches!(
            control_server(&serving(&site), &[]),
            Err(ConfigError::Trust(TrustError::NoAnchor))
        ));
    }

    #[tokio::test]
    async fn the_central_server_takes_anonymous_clients_and_nodes_of_registered_sites() {
        let site = Site::backdated("depot-7");
        let registered = vec![site.root.anchor.cert_der().clone()];
        let credential = serving(&site);
        let config = central_server(&credential, &registered).expect("central config");
        assert_eq!(config.alpn_protocols, [ALPN_HTTP1.to_vec()]);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let name = ServerName::try_from("localhost").expect("name");
        let anchor = site.root.anchor.cert_der();

        let (connected, accepted) =
            handshake(&webpki_client(anchor, None), name.clone(), &acceptor).await;
        connected.expect("an operator needs no certificate");
        let accepted = accepted.expect("accepted");
        assert!(accepted.get_ref().1.peer_certificates().is_none());

        let node = site.peer("pi-a", &[]);
        let (_, accepted) =
            handshake(&webpki_client(anchor, Some(&node)), name.clone(), &acceptor).await;
        let accepted = accepted.expect("a node of a registered site");
        assert_eq!(peer_ids(accepted.get_ref().1, &site.name), node.ids);

        let stranger = Site::backdated("depot-8").peer("pi-a", &[]);
        let (_, accepted) = handshake(
            &webpki_client(anchor, Some(&stranger)),
            name.clone(),
            &acceptor,
        )
        .await;
        let err = accepted.expect_err("a node of no registered site");
        assert_eq!(handshake_failure_reason(&err), "unknown_ca");

        // No site registered: no client certificate is asked for.
        let config = central_server(&credential, &[]).expect("central config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (_, accepted) = handshake(&webpki_client(anchor, Some(&node)), name, &acceptor).await;
        let accepted = accepted.expect("accepted");
        assert!(accepted.get_ref().1.peer_certificates().is_none());
    }
}
