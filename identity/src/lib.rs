//! Site trust and workload identity for the Pimesh mesh.
//!
//! A site has one trust anchor (10 years) that signs an issuer (1 year), and the issuer
//! signs short-lived leaves (24 hours) for SPIFFE IDs: `spiffe://<site>/node/<node>` for a
//! node and its proxy, `spiffe://<site>/svc/<service>` for a service placed on a node. All
//! keys are ECDSA P-256. A leaf's private key is generated where it is used and never
//! leaves it: the issuer signs certificate signing requests, and only for the identities
//! that the caller says the requester may hold.

mod authority;
mod error;
mod request;
mod spki;
mod verify;

pub use authority::{
    anchor_sha256, anchor_sha256_hex, cert_validity, issued_by, Authority, Leaf, TrustRoot,
    ISSUER_LIFETIME, LEAF_LIFETIME, NODE_LIFETIME,
};
pub use error::{IdentityError, IssueError, VerifyError};
pub use pimesh_schema::{SpiffeId, Workload};
pub use request::LeafRequest;
pub use spki::{certificate_key_sha256, request_key_sha256, KeyError};
pub use verify::leaf_identities;
pub use verify::{verify_leaf, Usage};
