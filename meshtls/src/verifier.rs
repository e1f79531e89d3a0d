//! The one SPIFFE verifier: a chain to the site's anchors, valid now, for the usage at
//! hand, carrying the identity expected of the peer.
//!
//! [`SpiffeVerifier`] is both rustls' [`ServerCertVerifier`] (a client checking the
//! server) and [`ClientCertVerifier`] (a server checking the client), and the check a
//! server runs again per request on a chain accepted at the handshake
//! ([`SpiffeVerifier::check_client`]). Which peer is acceptable is its [`Expected`]; the
//! chain itself is judged by [`pimesh_identity::verify_leaf`] alone.
//!
//! Invariants:
//! - a chain is accepted only when `verify_leaf` accepts it for the usage (server
//!   certificates for server authentication, client certificates for client
//!   authentication) at the time of the check, and the IDs it returns (the certificate's
//!   SPIFFE IDs of the site, at least one) meet the expectation;
//! - with [`Expected::DialledNode`], the dialled name is read before the chain, so a name
//!   that names no node of the site is refused whatever the chain;
//! - every refusal is a [`Refusal`] whose [`rustls::Error`] is the one
//!   [`crate::HandshakeFailure::of`] labels by its cause: `unknown_ca`, `expired`,
//!   `not_yet_valid`, `wrong_identity` (no ID of the site, not the expected one), or
//!   `no_client_cert`.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pimesh_identity::{verify_leaf, Usage, VerifyError};
use pimesh_schema::{SpiffeId, Workload};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::names::{dialled_node, is_control_id, CONTROL_SERVICE};
use crate::peer::PeerIdentity;
use crate::provider::provider;
use crate::trust::SiteTrust;

/// Which identity a peer's certificate must carry, beyond chaining to the site's anchors.
/// IDs are always of the verifier's site: an ID of another site counts for nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// Any SPIFFE ID of the site (a proxy's inbound side, which authorizes callers by
    /// their IDs afterwards).
    AnyId,
    /// Exactly one node ID of the site, whichever node, with or without service IDs (a
    /// node asking a control replica or the central server for something of its own).
    OneNode,
    /// This ID among the certificate's: exactly node N, or one service.
    Id(SpiffeId),
    /// `spiffe://<site>/svc/pimesh-control`: one of the site's control replicas.
    ControlReplica,
    /// The node named by the dialled server name `<node>.<site>.pimesh` (see
    /// [`crate::mesh_server_name`]). Only a client knows a dialled name: as an expectation
    /// of client certificates, it refuses every one.
    DialledNode,
}

/// Why a peer's certificate chain was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The peer presented no certificate.
    NoCertificate,
    /// The chain is not a valid identity of the site: malformed, under no anchor of the
    /// bundle, expired, not valid yet, not allowed for the usage, or without any SPIFFE ID
    /// of the site ([`VerifyError`] says which).
    Invalid(VerifyError),
    /// The expectation is the dialled node, and the dialled name (`None`: there is none, on
    /// a server) names no node of the site.
    NoDialledNode { server_name: Option<String> },
    /// The certificate does not carry the expected ID; `presented` are its IDs of the site.
    WrongIdentity {
        expected: String,
        presented: Vec<SpiffeId>,
    },
    /// One node was expected; the certificate names none of the site.
    NoNode,
    /// One node was expected; the certificate names several.
    SeveralNodes,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoCertificate => f.write_str("no certificate was presented"),
            Refusal::Invalid(err) => err.fmt(f),
            Refusal::NoDialledNode {
                server_name: Some(name),
            } => write!(
                f,
                "the dialled name {name} names no node of the site (expected <node>.<site>.pimesh)"
            ),
            Refusal::NoDialledNode { server_name: None } => {
                f.write_str("no dialled name to expect a node by")
            }
            Refusal::WrongIdentity {
                expected,
                presented,
            } => {
                let presented: Vec<String> = presented.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "expected {expected}, the certificate names {}",
                    presented.join(", ")
                )
            }
            Refusal::NoNode => f.write_str("the certificate names no node of the site"),
            Refusal::SeveralNodes => f.write_str("the certificate names more than one node"),
        }
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Refusal::Invalid(err) => Some(err),
            _ => None,
        }
    }
}

impl From<Refusal> for Error {
    /// The rustls error a refusal is sent and labelled as: see the module's invariants.
    fn from(refusal: Refusal) -> Error {
        let kind = match refusal {
            Refusal::NoCertificate => return Error::NoCertificatesPresented,
            Refusal::Invalid(VerifyError::UnknownIssuer(_)) => CertificateError::UnknownIssuer,
            Refusal::Invalid(VerifyError::Expired(_)) => CertificateError::Expired,
            Refusal::Invalid(VerifyError::NotValidYet(_)) => CertificateError::NotValidYet,
            Refusal::Invalid(VerifyError::NoIdentity) | Refusal::NoNode | Refusal::SeveralNodes => {
                CertificateError::ApplicationVerificationFailure
            }
            Refusal::Invalid(err @ VerifyError::Chain(_)) => {
                CertificateError::Other(rustls::OtherError(Arc::new(err)))
            }
            Refusal::NoDialledNode { .. } | Refusal::WrongIdentity { .. } => {
                CertificateError::NotValidForName
            }
        };
        Error::InvalidCertificate(kind)
    }
}

/// Checks peers' certificate chains against one site's trust and one [`Expected`]
/// identity (see the module's invariants).
#[derive(Debug, Clone)]
pub struct SpiffeVerifier {
    trust: SiteTrust,
    expected: Expected,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeVerifier {
    /// A verifier of peers of `trust`'s site, under its anchors, carrying `expected`.
    pub fn new(trust: SiteTrust, expected: Expected) -> SpiffeVerifier {
        SpiffeVerifier {
            trust,
            expected,
            algorithms: provider().signature_verification_algorithms,
        }
    }

    pub fn trust(&self) -> &SiteTrust {
        &self.trust
    }

    pub fn expected(&self) -> &Expected {
        &self.expected
    }

    /// Checks a client's `chain` (leaf first, then intermediates; empty: none presented)
    /// for client authentication at `now`: what a server asks at the handshake, and again
    /// per request of a long connection (the certificate may have expired since, or the
    /// request may need [`Expected::OneNode`] where the handshake took any ID).
    pub fn check_client(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<PeerIdentity, Refusal> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(Refusal::NoCertificate);
        };
        self.check(leaf, intermediates, Usage::Client, None, now)
    }

    /// Checks a server's `chain` for server authentication at `now`, reached by dialling
    /// `server_name`.
    pub fn check_server(
        &self,
        chain: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: SystemTime,
    ) -> Result<PeerIdentity, Refusal> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(Refusal::NoCertificate);
        };
        self.check(leaf, intermediates, Usage::Server, Some(server_name), now)
    }

    fn check(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: Usage,
        server_name: Option<&ServerName<'_>>,
        now: SystemTime,
    ) -> Result<PeerIdentity, Refusal> {
        let site = self.trust.site();
        let dialled = match &self.expected {
            Expected::DialledNode => {
                let node = server_name.and_then(|name| dialled_node(site, name));
                let Some(node) = node else {
                    return Err(Refusal::NoDialledNode {
                        server_name: server_name.map(|name| name.to_str().into_owned()),
                    });
                };
                Some(node)
            }
            _ => None,
        };
        let ids = verify_leaf(leaf, intermediates, self.trust.anchors(), site, usage, now)
            .map_err(Refusal::Invalid)?;
        let wrong = |expected: String| Refusal::WrongIdentity {
            expected,
            presented: ids.clone(),
        };
        match (&self.expected, dialled) {
            (Expected::AnyId, _) => {}
            (Expected::OneNode, _) => {
                let nodes = ids
                    .iter()
                    .filter(|id| matches!(id.workload, Workload::Node(_)))
                    .count();
                match nodes {
                    0 => return Err(Refusal::NoNode),
                    1 => {}
                    _ => return Err(Refusal::SeveralNodes),
                }
            }
            (Expected::Id(expected), _) => {
                if !ids.contains(expected) {
                    return Err(wrong(expected.to_string()));
                }
            }
            (Expected::ControlReplica, _) => {
                if !ids.iter().any(is_control_id) {
                    return Err(wrong(format!("spiffe://{site}/svc/{CONTROL_SERVICE}")));
                }
            }
            (Expected::DialledNode, Some(node)) => {
                if !ids.contains(&node) {
                    return Err(wrong(node.to_string()));
                }
            }
            (Expected::DialledNode, None) => {
                return Err(Refusal::NoDialledNode { server_name: None });
            }
        }
        Ok(PeerIdentity::new(ids))
    }
}

fn system_time(now: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(
            end_entity,
            intermediates,
            Usage::Server,
            Some(server_name),
            system_time(now),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(
            end_entity,
            intermediates,
            Usage::Client,
            None,
            system_time(now),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pimesh_schema::DnsLabel;
    use rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::testing::{
        handshake, label, server_refusal, MeshSite as _, PemCredential, Site, DAY,
    };
    use crate::{HandshakeFailure, CONTROL_SERVICE};

    fn chain(pem: &PemCredential) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.chain.as_bytes())
            .collect::<Result<_, _>>()
            .expect("chain")
    }

    fn node(site: &Site, name: &str) -> SpiffeId {
        SpiffeId::node(&site.name, &label(name))
    }

    fn service(site: &Site, name: &str) -> SpiffeId {
        SpiffeId::service(&site.name, &label(name))
    }

    /// The refusals every expectation shares, checked on both sides: `ids` is a
    /// credential the expectation accepts from `site`.
    fn refuses_what_is_not_a_valid_identity_of_the_site(
        verifier: &SpiffeVerifier,
        site: &Site,
        ids: &[SpiffeId],
        dialled: &ServerName<'_>,
    ) {
        let is_client = !matches!(verifier.expected(), Expected::DialledNode);
        let check = |pem: &PemCredential| {
            if is_client {
                verifier.check_client(&chain(pem), site.now)
            } else {
                verifier.check_server(&chain(pem), dialled, site.now)
            }
        };
        let good = site.credential_for(ids, site.now, DAY);
        let accepted = check(&good).expect("the expected identity");
        assert_eq!(accepted.ids(), ids);

        // The same IDs under an impostor's anchor for this very site name.
        let impostor = Site::backdated(site.name.as_str());
        let refused = check(&impostor.credential_for(ids, site.now, DAY));
        assert!(
            matches!(
                refused,
                Err(Refusal::Invalid(VerifyError::UnknownIssuer(_)))
            ),
            "{refused:?}"
        );

        // Another site's node under its own anchor.
        let other = Site::backdated("depot-8");
        let refused = check(&other.credential("pi-a", &[], other.now, DAY));
        assert!(
            matches!(
                refused,
                Err(Refusal::Invalid(VerifyError::UnknownIssuer(_)))
            ),
            "{refused:?}"
        );

        let expired = site.credential_for(ids, site.now - 2 * DAY, Duration::from_secs(3600));
        let refused = check(&expired);
        assert!(
            matches!(refused, Err(Refusal::Invalid(VerifyError::Expired(_)))),
            "{refused:?}"
        );

        let early = site.credential_for(ids, site.now + 2 * DAY, DAY);
        let refused = check(&early);
        assert!(
            matches!(refused, Err(Refusal::Invalid(VerifyError::NotValidYet(_)))),
            "{refused:?}"
        );

        assert_eq!(
            verifier.check_client(&[], site.now),
            Err(Refusal::NoCertificate)
        );
        assert_eq!(
            verifier.check_server(&[], dialled, site.now),
            Err(Refusal::NoCertificate)
        );
    }

    #[test]
    fn any_id_takes_every_identity_of_the_site() {
        let site = Site::backdated("depot-7");
        let verifier = SpiffeVerifier::new(site.trust(), Expected::AnyId);
        let name = ServerName::try_from("localhost").expect("name");
        refuses_what_is_not_a_valid_identity_of_the_site(
            &verifier,
            &site,
            &[node(&site, "pi-a"), service(&site, "web")],
            &name,
        );
        let services_only = site.credential_for(&[service(&site, "web")], site.now, DAY);
        let accepted = verifier
            .check_client(&chain(&services_only), site.now)
            .expect("a service ID is an ID of the site");
        assert_eq!(accepted.node(), None);
    }

    #[test]
    fn one_node_takes_a_single_node_and_names_it() {
        let site = Site::backdated("depot-7");
        let verifier = SpiffeVerifier::new(site.trust(), Expected::OneNode);
        let name = ServerName::try_from("localhost").expect("name");
        let ids = [node(&site, "pi-a"), service(&site, "web")];
        refuses_what_is_not_a_valid_identity_of_the_site(&verifier, &site, &ids, &name);
        let accepted = verifier
            .check_client(&chain(&site.credential_for(&ids, site.now, DAY)), site.now)
            .expect("one node");
        assert_eq!(accepted.node(), Some(&label("pi-a")));

        let services_only = site.credential_for(&[service(&site, "web")], site.now, DAY);
        assert_eq!(
            verifier.check_client(&chain(&services_only), site.now),
            Err(Refusal::NoNode)
        );
        let two = site.credential_for(&[node(&site, "pi-a"), node(&site, "pi-b")], site.now, DAY);
        assert_eq!(
            verifier.check_client(&chain(&two), site.now),
            Err(Refusal::SeveralNodes)
        );
    }

    #[test]
    fn an_exact_id_refuses_another_identity_of_the_same_site() {
        let site = Site::backdated("depot-7");
        let expected = node(&site, "pi-a");
        let verifier = SpiffeVerifier::new(site.trust(), Expected::Id(expected.clone()));
        let name = ServerName::try_from("localhost").expect("name");
        refuses_what_is_not_a_valid_identity_of_the_site(
            &verifier,
            &site,
            std::slice::from_ref(&expected),
            &name,
        );
        let other = site.credential("pi-b", &["web"], site.now, DAY);
        let refused = verifier.check_client(&chain(&other), site.now);
        assert_eq!(
            refused,
            Err(Refusal::WrongIdentity {
                expected: "spiffe://depot-7/node/pi-a".to_owned(),
                presented: vec![node(&site, "pi-b"), service(&site, "web")],
            })
        );
    }

    #[test]
    fn a_control_replica_is_its_reserved_service_of_the_site() {
        let site = Site::backdated("depot-7");
        let verifier = SpiffeVerifier::new(site.trust(), Expected::ControlReplica);
        let name = ServerName::try_from("10.0.0.1").expect("an address");
        let ids = [node(&site, "srv"), service(&site, CONTROL_SERVICE)];
        refuses_what_is_not_a_valid_identity_of_the_site(&verifier, &site, &ids, &name);
        verifier
            .check_server(
                &chain(&site.credential_for(&ids, site.now, DAY)),
                &name,
                site.now,
            )
            .expect("whatever name is dialled");
        let plain = site.credential("pi-b", &["web"], site.now, DAY);
        let refused = verifier.check_server(&chain(&plain), &name, site.now);
        assert!(
            matches!(&refused, Err(Refusal::WrongIdentity { expected, .. })
                if expected == "spiffe://depot-7/svc/pimesh-control"),
            "{refused:?}"
        );
    }

    #[test]
    fn the_dialled_node_is_read_from_the_name_before_the_chain() {
        let site = Site::backdated("depot-7");
        let verifier = SpiffeVerifier::new(site.trust(), Expected::DialledNode);
        let dialled = crate::mesh_server_name(&site.name, &label("pi-a"));
        refuses_what_is_not_a_valid_identity_of_the_site(
            &verifier,
            &site,
            &[node(&site, "pi-a")],
            &dialled,
        );
        let b = site.credential("pi-b", &[], site.now, DAY);
        assert!(matches!(
            verifier.check_server(&chain(&b), &dialled, site.now),
            Err(Refusal::WrongIdentity { .. })
        ));

        // A name of another site names no node of this one, even with a valid chain.
        let elsewhere = crate::mesh_server_name(&label("depot-8"), &label("pi-b"));
        assert_eq!(
            verifier.check_server(&chain(&b), &elsewhere, site.now),
            Err(Refusal::NoDialledNode {
                server_name: Some("pi-b.depot-8.pimesh".to_owned())
            })
        );
        // A server dials nobody: as a client-certificate check it refuses every client.
        assert_eq!(
            verifier.check_client(&chain(&b), site.now),
            Err(Refusal::NoDialledNode { server_name: None })
        );
    }

    #[test]
    fn each_refusal_is_labelled_by_its_cause() {
        let label_of = |refusal: Refusal| HandshakeFailure::of_tls(&Error::from(refusal)).label();
        let why = || "webpki's reason".to_owned();
        assert_eq!(label_of(Refusal::NoCertificate), "no_client_cert");
        assert_eq!(
            label_of(Refusal::Invalid(VerifyError::UnknownIssuer(why()))),
            "unknown_ca"
        );
        assert_eq!(
            label_of(Refusal::Invalid(VerifyError::Expired(why()))),
            "expired"
        );
        assert_eq!(
            label_of(Refusal::Invalid(VerifyError::NotValidYet(why()))),
            "not_yet_valid"
        );
        assert_eq!(
            label_of(Refusal::Invalid(VerifyError::NoIdentity)),
            "wrong_identity"
        );
        assert_eq!(
            label_of(Refusal::Invalid(VerifyError::Chain(why()))),
            "protocol"
        );
        assert_eq!(
            label_of(Refusal::NoDialledNode { server_name: None }),
            "wrong_identity"
        );
        assert_eq!(
            label_of(Refusal::WrongIdentity {
                expected: "x".to_owned(),
                presented: Vec::new()
            }),
            "wrong_identity"
        );
        assert_eq!(label_of(Refusal::NoNode), "wrong_identity");
        assert_eq!(label_of(Refusal::SeveralNodes), "wrong_identity");
    }

    /// A server that accepts exactly node `expected` of `site` as its client.
    fn exact_node_server(site: &Site, expected: &DnsLabel) -> TlsAcceptor {
        let server = site.peer("srv", &[]);
        let verifier = SpiffeVerifier::new(
            site.trust(),
            Expected::Id(SpiffeId::node(&site.name, expected)),
        );
        let config = crate::config::server_builder(Arc::new(verifier), &server.credential)
            .expect("server config");
        TlsAcceptor::from(Arc::new(config))
    }

    #[tokio::test]
    async fn a_server_expecting_node_n_takes_n_alone_and_labels_every_refusal() {
        let site = Site::backdated("depot-7");
        let server = exact_node_server(&site, &label("pi-a"));

        let (connected, accepted) = {
            let a = site.peer("pi-a", &[]);
            handshake(&a.connector(), a.server_name("srv"), &server).await
        };
        connected.expect("client side");
        let accepted = accepted.expect("node pi-a is the expected client");
        assert_eq!(
            crate::peer_ids(accepted.get_ref().1, &site.name),
            [node(&site, "pi-a")]
        );

        let b = site.peer("pi-b", &[]);
        assert_eq!(server_refusal(&server, &b, "srv").await, "wrong_identity");
        let impostor = Site::backdated("depot-7");
        let forged = site.peer_with(&impostor.credential("pi-a", &[], site.now, DAY));
        assert_eq!(server_refusal(&server, &forged, "srv").await, "unknown_ca");
        // Another site's node that trusts this site's anchor, so that it is the server
        // that refuses (not the client refusing the server first).
        let elsewhere = Site::backdated("depot-8");
        let other = site.peer_with(&elsewhere.credential("pi-a", &[], site.now, DAY));
        assert_eq!(server_refusal(&server, &other, "srv").await, "unknown_ca");
        let expired = site.peer_with(&site.credential(
            "pi-a",
            &[],
            site.now - 2 * DAY,
            Duration::from_secs(3600),
        ));
        assert_eq!(server_refusal(&server, &expired, "srv").await, "expired");
        let early = site.peer_with(&site.credential("pi-a", &[], site.now + 2 * DAY, DAY));
        assert_eq!(
            server_refusal(&server, &early, "srv").await,
            "not_yet_valid"
        );
    }
}
