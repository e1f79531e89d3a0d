//! Sites and node credentials for the identity module's tests: `pimesh-test-support`'s
//! [`Site`], whose trust root is backdated, and the proxy's [`Identity`] made from it.

pub use pimesh_test_support::pki::{label, Site, DAY};

use super::Identity;

/// The proxy's identity for a node of a site.
pub trait NodeIdentity {
    /// Node `node`'s identity: a leaf valid from now for a day, and the site's anchor.
    fn identity(&self, node: &str) -> Identity;
}

impl NodeIdentity for Site {
    fn identity(&self, node: &str) -> Identity {
        let cred = self.credential(node, &[], self.now, DAY);
        Identity::from_pem(&cred.chain, &cred.key, &cred.anchors).expect("identity")
    }
}
