//! Where the node identity's files are.

use std::path::{Path, PathBuf};

/// Where a node identity lives on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    /// PEM chain: the node's leaf, then its issuer.
    pub chain: PathBuf,
    /// PEM PKCS#8 ECDSA P-256 private key of the leaf.
    pub key: PathBuf,
    /// PEM bundle of the site's anchors (old and new during an anchor rotation).
    pub anchors: PathBuf,
}

impl IdentityFiles {
    /// `<dir>/node.pem`, `<dir>/node.key`, `<dir>/anchor.pem`.
    pub fn in_dir(dir: &Path) -> IdentityFiles {
        IdentityFiles {
            chain: dir.join("node.pem"),
            key: dir.join("node.key"),
            anchors: dir.join("anchor.pem"),
        }
    }
}

/// The site's trust folder on a node that holds it (a server node).
const SITE_ANCHORS: &str = "/var/lib/pimesh/trust/anchor.pem";

/// Where the identity files are when `--identity-dir` is not given: the unit's
/// credentials directory (systemd `LoadCredential=`), else the supervisor's own files —
/// the anchors of the site's trust folder on a node that has one, else those the
/// supervisor imported beside the node credential (a joining node).
pub fn default_files() -> IdentityFiles {
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        return IdentityFiles::in_dir(&PathBuf::from(dir));
    }
    let identity = Path::new("/var/lib/pimesh/identity");
    let anchors = if Path::new(SITE_ANCHORS).exists() {
        PathBuf::from(SITE_ANCHORS)
    } else {
        identity.join("anchor.pem")
    };
    IdentityFiles {
        chain: identity.join("node.pem"),
        key: identity.join("node.key"),
        anchors,
    }
}
