//! Sites and node credentials for the identity module's tests.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use pimesh_identity::{LeafRequest, TrustRoot};
use pimesh_schema::{DnsLabel, SpiffeId};

use super::Identity;

pub const DAY: Duration = Duration::from_secs(24 * 3600);

pub fn label(s: &str) -> DnsLabel {
    DnsLabel::try_from(s.to_owned()).expect("label")
}

/// A site whose trust root was made three days ago, so that it can also sign leaves
/// that are already expired.
pub struct Site {
    pub name: DnsLabel,
    pub root: TrustRoot,
    pub now: SystemTime,
}

/// A node credential as PEM text.
pub struct Credential {
    pub chain: String,
    pub key: String,
    pub anchors: String,
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
    ) -> Credential {
        let mut ids = vec![SpiffeId::node(&self.name, &label(node))];
        ids.extend(
            services
                .iter()
                .map(|svc| SpiffeId::service(&self.name, &label(svc))),
        );
        let request = LeafRequest::new(&ids).expect("request");
        let permitted: BTreeSet<SpiffeId> = ids.into_iter().collect();
        let leaf = self
            .root
            .issuer
            .sign_leaf_for(&request.csr, &self.name, &permitted, at, lifetime)
            .expect("signed");
        Credential {
            chain: format!("{}{}", leaf.pem, self.root.issuer.cert_pem()),
            key: request.key.serialize_pem(),
            anchors: self.root.anchor.cert_pem().to_owned(),
        }
    }

    pub fn identity(&self, node: &str) -> Identity {
        let cred = self.credential(node, &[], self.now, DAY);
        Identity::from_pem(&cred.chain, &cred.key, &cred.anchors).expect("identity")
    }
}
