//! The mesh's TLS: every rustls configuration a Pimesh part serves or dials with, the one
//! SPIFFE verifier they share, the identities of verified peers, and the labels of failed
//! handshakes.
//!
//! # Policy
//!
//! Every configuration made here speaks TLS 1.3 only, with the ring provider. Site
//! identities are X.509 leaves carrying SPIFFE IDs (`spiffe://<site>/node/<node>`,
//! `spiffe://<site>/svc/<service>`) issued under the site's anchors by
//! [`pimesh_identity`]; which chains are valid is decided there
//! ([`pimesh_identity::verify_leaf`], on webpki), and this crate decides which *identity*
//! each connection must carry:
//!
//! | configuration | presents | accepts |
//! |---|---|---|
//! | [`mesh_server`] (proxy inbound) | the node credential | a client chaining to the site's anchors with any SPIFFE ID of the site |
//! | [`mesh_client`] (proxy outbound) | the node credential | the server named by the dialled name `<node>.<site>.pimesh` ([`mesh_server_name`]) |
//! | [`control_client`] (proxy to a replica) | the node credential | `spiffe://<site>/svc/pimesh-control`, whatever address was dialled |
//! | [`control_server`] (a replica) | its self-issued serving leaf | a client chaining to the site's anchors (which node: per request, [`SpiffeVerifier::check_client`]) |
//! | [`join_bundle_client`], [`join_client`] (a joining node) | nothing | the bundle: any server; the join: a control replica under the anchor the join token pins |
//! | [`central_server`] | the operator's certificate | no client certificate, or one chaining to a registered site's anchors (which site: per request) |
//!
//! The mesh and replica configurations offer ALPN `h2` (replicas also `http/1.1` for
//! operators); the central server `http/1.1`.
//!
//! # Invariants
//!
//! - A [`Credential`] is a non-empty chain and the private key of its first certificate.
//! - A [`SiteTrust`] names one site and holds at least one anchor usable by webpki.
//! - A [`SpiffeVerifier`] accepts a chain only when [`pimesh_identity::verify_leaf`] does
//!   (chain to an anchor, valid at the time of the check, allowed for the usage, at least
//!   one SPIFFE ID of the site) *and* the certificate's IDs meet its [`Expected`]. Each
//!   refusal is a [`Refusal`] turned into the [`rustls::Error`] that
//!   [`HandshakeFailure::of`] classifies, so that the label of a refused handshake says
//!   why.
//! - [`HandshakeFailure::label`] strings are a contract (the metric
//!   `tls_handshake_failure_total{reason}` and tests read them).

mod config;
mod credential;
mod failure;
mod join;
mod join_server;
mod names;
mod peer;
pub mod pem;
mod provider;
mod trust;
mod verifier;

pub use config::{
    central_server, control_client, control_server, mesh_client, mesh_server, named_server_client,
    ConfigError, ALPN_H2, ALPN_HTTP1,
};
pub use credential::{Credential, CredentialError};
pub use failure::{handshake_failure_reason, HandshakeFailure};
pub use join::{join_bundle_client, join_client};
pub use join_server::join_server;
pub use names::{control_id, control_server_name, mesh_server_name, CONTROL_SERVICE};
pub use peer::{peer_ids, PeerIdentity};
pub use pem::PemError;
pub use trust::{root_store, SiteTrust, TrustError};
pub use verifier::{Expected, Refusal, SpiffeVerifier};

#[cfg(test)]
mod testing;
