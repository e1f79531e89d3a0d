//! The plug-in join protocol.
//!
//! A board flashed with nothing but the site's seed (`site`, `role = "join"`,
//! `join_token = "K10<pin>::<secret>"`) becomes a node of the site through any control
//! replica of any server node:
//!
//! 1. it finds server nodes: the seed's `servers`, else the mDNS service
//!    [`SERVICE_TYPE`] that every server node announces ([`Announcement`]);
//! 2. it fetches [`path::BUNDLE`] over TLS *without* verifying the server, and goes on
//!    only when one anchor of that bundle hashes to the token's pin ([`anchor_pin`]) —
//!    a rogue server on the LAN learns nothing;
//! 3. on a *new* TLS connection (server name [`JOIN_SERVER_NAME`]) whose certificate must
//!    chain to that pinned anchor and name the site's control replica, it posts a
//!    [`JoinRequest`]: the token's secret, its node name and the CSR of a key it made
//!    itself. The replica checks the secret against the site's [`AcceptedTokens`] in
//!    constant time and answers a [`JoinAnswer`] (node certificate, anchors, the node's
//!    [`Role`], the site's servers) or a [`Refusal`];
//! 4. a node told it is a [`Role::Server`] fetches [`path::ISSUER`] over mutual TLS with
//!    its new node certificate and receives the site issuer ([`IssuerHandover`]).
//!
//! Invariants: the secret travels only on a connection verified against the pinned
//! anchor; the node's private key never travels; the issuer's key travels only over
//! mutual TLS to a node the site counts as a server. Every message is JSON with unknown
//! fields refused; a request larger than [`MAX_REQUEST_BYTES`] is refused unread.

mod announce;
mod messages;
mod tokens;

pub use announce::{Announcement, AnnouncementError, SERVICE_TYPE};
pub use messages::{
    IssuerHandover, JoinAnswer, JoinRequest, Refusal, RefusalCode, Role, ServerEntry,
};
pub use tokens::{secret_sha256, AcceptedToken, AcceptedTokens, TokenRefusal};

/// The TLS server name a joining node sends: a replica that sees it serves the join
/// routes and asks for no client certificate.
pub const JOIN_SERVER_NAME: &str = "join.pimesh.invalid";

/// Join requests larger than this are refused unread.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// The routes of the join protocol on a control replica's port.
pub mod path {
    /// `GET`: the site's anchors (PEM), on the join configuration (no client certificate).
    pub const BUNDLE: &str = "/v1/join/bundle";
    /// `POST` a [`crate::JoinRequest`] → [`crate::JoinAnswer`], on the join configuration.
    pub const JOIN: &str = "/v1/join";
    /// `GET` → [`crate::IssuerHandover`], over mutual TLS, to server nodes only.
    pub const ISSUER: &str = "/v1/join/issuer";
    /// `POST` the node's CSR (PEM, of the key of the node certificate presented) → its
    /// node certificate chain re-signed by the current issuer (PEM), or 204 when the one
    /// presented is current; over mutual TLS.
    pub const RENEW: &str = "/v1/join/renew";
    /// `GET` → the replica's anchors (PEM), over mutual TLS (the identity API's route).
    pub const TRUST_BUNDLE: &str = "/v1/trust-bundle";
}

/// The SHA-256 of an anchor certificate's DER: what a join token pins.
pub fn anchor_pin(anchor_der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, anchor_der);
    let mut pin = [0u8; 32];
    pin.copy_from_slice(digest.as_ref());
    pin
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
