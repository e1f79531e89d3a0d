//! The last leaf a replica signed, kept in `<state-dir>/identity/` so that a restarted
//! proxy serves at once (and, with every replica down, until the leaf expires).
//!
//! | file | what |
//! |---|---|
//! | `leaf.pem` | the chain: the leaf, then its issuer |
//! | `leaf.key` | the leaf's private key, PKCS#8 PEM, mode 0600 |
//! | `bundle.pem` | the trust bundle the leaf was checked under |
//!
//! Invariants: each file is replaced atomically (temporary file, fsync, rename, fsync of
//! the folder), the key first and the chain last; a set read back is used only when it
//! passes every check a fresh leaf passes (chain to the bundle, key of the leaf, valid
//! now), so a set torn by a crash between two files is refused as a whole, never half used.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::identity::{Identity, IdentityFiles, LoadError, Source};

/// `<state_dir>/identity`.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("identity")
}

fn files(state_dir: &Path) -> IdentityFiles {
    let dir = dir(state_dir);
    IdentityFiles {
        chain: dir.join("leaf.pem"),
        key: dir.join("leaf.key"),
        anchors: dir.join("bundle.pem"),
    }
}

/// A file of the set that could not be written.
#[derive(Debug)]
pub struct SaveError {
    pub path: PathBuf,
    pub err: io::Error,
}

impl fmt::Display for SaveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: cannot write: {}", self.path.display(), self.err)
    }
}

impl std::error::Error for SaveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.err)
    }
}

/// Writes the set. The error names the file.
pub fn save(
    state_dir: &Path,
    chain_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
) -> Result<(), SaveError> {
    let files = files(state_dir);
    for (path, text, mode) in [
        (&files.key, key_pem, 0o600),
        (&files.anchors, bundle_pem, 0o644),
        (&files.chain, chain_pem, 0o644),
    ] {
        pimesh_runtime::atomic_file::replace(path, text.as_bytes(), mode).map_err(|err| {
            SaveError {
                path: path.clone(),
                err,
            }
        })?;
    }
    Ok(())
}

/// The saved identity, when there is one: `Ok(None)` when no set was ever saved, `Err`
/// naming the file when one is there but not usable (expired, torn, damaged).
pub fn load(state_dir: &Path) -> Result<Option<Identity>, LoadError> {
    let files = files(state_dir);
    if !files.chain.exists() && !files.key.exists() {
        return Ok(None);
    }
    Identity::load(&files).map(|identity| Some(identity.with_source(Source::Cache)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pimesh_identity::{LeafRequest, SpiffeId, TrustRoot};
    use pimesh_schema::DnsLabel;
    use std::collections::BTreeSet;
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::{Duration, SystemTime};

    const HOUR: Duration = Duration::from_secs(3600);

    /// (chain, key, bundle) PEM of a leaf for node `node` of site `depot`.
    fn leaf(root: &TrustRoot, node: &str, at: SystemTime) -> (String, String, String) {
        let site = DnsLabel::try_from("depot".to_owned()).expect("label");
        let node = DnsLabel::try_from(node.to_owned()).expect("label");
        let id = SpiffeId::node(&site, &node);
        let request = LeafRequest::new(std::slice::from_ref(&id)).expect("csr");
        let leaf = root
            .issuer
            .sign_leaf_for(&request.csr, &site, &BTreeSet::from([id]), at, HOUR)
            .expect("leaf");
        (
            format!("{}{}", leaf.pem, root.issuer.cert_pem()),
            request.key.serialize_pem(),
            root.anchor.cert_pem().to_owned(),
        )
    }

    #[test]
    fn a_saved_leaf_reads_back_and_a_torn_or_expired_set_is_refused_by_name() {
        let state = tempfile::tempdir().expect("temp dir");
        assert!(load(state.path()).expect("nothing saved").is_none());
        let site = DnsLabel::try_from("depot".to_owned()).expect("label");
        let root = TrustRoot::generate(&site, SystemTime::now()).expect("root");
        let (chain, key, bundle) = leaf(&root, "a", SystemTime::now());
        save(state.path(), &chain, &key, &bundle).expect("saved");
        let mode = std::fs::metadata(dir(state.path()).join("leaf.key"))
            .expect("leaf.key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let identity = load(state.path()).expect("loads").expect("saved");
        assert_eq!(identity.source, Source::Cache);
        assert_eq!(identity.node.as_str(), "a");

        // A crash between the key and the chain: the new key with the old chain.
        let (_, other_key, _) = leaf(&root, "a", SystemTime::now());
        pimesh_runtime::atomic_file::replace(
            &dir(state.path()).join("leaf.key"),
            other_key.as_bytes(),
            0o600,
        )
        .expect("write");
        let err = load(state.path()).expect_err("torn").to_string();
        assert!(err.contains("leaf.key"), "{err}");

        // The leaf expired while the proxy was down.
        let (chain, key, bundle) = leaf(&root, "a", SystemTime::now() - 2 * HOUR);
        save(state.path(), &chain, &key, &bundle).expect("saved");
        let err = load(state.path()).expect_err("expired").to_string();
        assert!(err.contains("leaf.pem") && err.contains("expired"), "{err}");
    }
}
