//! Signed configuration revisions, and everything the central server, a node's OTA client
//! and `pimeshctl` exchange about them.
//!
//! - [`signed`]: the revision itself. On the wire it is one JSON document:
//!
//!   ```json
//!   {"format": "pimesh-revision/1", "site": "depot-7", "revision": 12, "mode": "apply",
//!    "config": "<cluster.toml text>", "signature": "<base64 Ed25519 signature>"}
//!   ```
//!
//! - [`report`]: what a node says about its configuration ([`NodeReport`], with its
//!   [`ReportState`]) and what the central server records of it ([`RecordedReport`]).
//! - [`fleet`]: the central server's view of every site and node ([`FleetView`]).
//! - [`path`]: the central server's URL paths, built by the clients and parsed by the server.
//! - [`rollout`]: how the central server hands a revision to a site's nodes in waves.
//! - [`operator`]: requests only the site's operator may make, signed with the site key.
//!
//! Each wire type is serde-typed on both ends, so the server and its clients cannot drift
//! apart on a field name or a state string.

pub mod fleet;
pub mod operator;
pub mod path;
pub mod report;
pub mod rollout;
pub mod signed;

pub use fleet::{FleetView, NodeView, SiteView};
pub use report::{
    CertificateDates, K3sSummary, MeshTraffic, NodeReport, RecordedReport, ReportState,
    ServiceTraffic, UnrecognisedState,
};
pub use rollout::{FleetPlan, Plan, Rollout, RolloutState, Wave};
pub use signed::{
    Mode, Rejection, Revision, SignError, SignedRevision, Verified, Verifier, DEFAULT_MAX_BYTES,
    FORMAT,
};
