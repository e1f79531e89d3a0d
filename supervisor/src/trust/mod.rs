//! The site's trust root on the node: `/var/lib/pimesh/trust/` holds the anchor
//! certificate (`anchor.pem`), the issuer that signs the site's leaves (`issuer.pem`,
//! `issuer.key`) and, until the operator exports it, the anchor's key (`anchor.key`).
//!
//! Only a node with role `init` provisions it, once: it imports the anchor and issuer that
//! the operator put on the boot partition (`pimesh-trust/`, written by `pimeshctl image
//! configure --trust`) — bring your own anchor, the same one the central server knows — or,
//! when there is none, generates a new root for the site. A join token in the seed pins the
//! anchor: a root whose anchor does not hash to the pinned value is refused.
//!
//! Invariant: the folder appears whole or not at all, and changes whole: `trust` is a link
//! to a complete generation `trust.d/<n>/`, swapped in one rename ([`store`]). A cut before
//! the first swap leaves no trust folder and the next start begins again. What happens to
//! the root after provisioning (issuer and anchor rotation, the anchor key leaving the
//! node) is in [`lifecycle`], run step by step by the operator's [`command`];
//! provisioning and the periodic check are in [`files`]; how server nodes that joined
//! tell a newer state of the site's trust from an older one is in [`freshness`].

pub mod command;
pub mod error;
pub mod files;
pub mod freshness;
pub mod lifecycle;
pub mod store;

pub use error::TrustError;
pub use files::TrustFiles;
