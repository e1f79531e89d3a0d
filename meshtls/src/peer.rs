//! Who is at the other end of an established connection: the SPIFFE IDs of the peer's
//! verified leaf certificate.

use pimesh_schema::{DnsLabel, SpiffeId, Workload};
use rustls::CommonState;

/// The SPIFFE IDs of a verified peer certificate, of the verifier's site.
///
/// Invariant: made only from the IDs that [`pimesh_identity::verify_leaf`] returned for an
/// accepted chain (at least one, all of the site).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    ids: Vec<SpiffeId>,
}

impl PeerIdentity {
    pub(crate) fn new(ids: Vec<SpiffeId>) -> PeerIdentity {
        PeerIdentity { ids }
    }

    pub fn ids(&self) -> &[SpiffeId] {
        &self.ids
    }

    pub fn into_ids(self) -> Vec<SpiffeId> {
        self.ids
    }

    /// The first node the certificate names (with [`crate::Expected::OneNode`]: the only
    /// one); `None` when it names services only.
    pub fn node(&self) -> Option<&DnsLabel> {
        self.ids.iter().find_map(|id| match &id.workload {
            Workload::Node(node) => Some(node),
            Workload::Service(_) => None,
        })
    }
}

/// The SPIFFE IDs of `site` in the peer's leaf certificate of an established connection,
/// server or client side, for authorization and logs. The leaf was verified during the
/// handshake by a [`crate::SpiffeVerifier`] (on a resumed session: when the session was
/// first established). Empty when there is no peer certificate (no handshake yet) or it
/// cannot be read.
pub fn peer_ids(conn: &CommonState, site: &DnsLabel) -> Vec<SpiffeId> {
    let Some(leaf) = conn.peer_certificates().and_then(|chain| chain.first()) else {
        return Vec::new();
    };
    let mut ids = pimesh_identity::leaf_identities(leaf).unwrap_or_default();
    ids.retain(|id| &id.site == site);
    ids
}
