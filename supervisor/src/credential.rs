//! The node credential: the key and certificate with which the node proves, over TLS, that
//! it is `spiffe://<site>/node/<node>`.
//!
//! The key is made on the node and never leaves it (`node.key`, 0600); the node writes a
//! signing request beside it (`node.csr`) and uses the certificate chain (`node.pem`) as
//! soon as it appears there. On the node that holds the site's issuer the trust files sign
//! it (`trust::TrustFiles::self_enroll`); on the others the operator does (`pimeshctl node
//! sign`). The node IDs a certificate carries are read here ([`node_ids`]).
//!
//! Of the supervisor's parts it depends on `paths` alone: the trust root and the OTA client
//! use it, never the reverse.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pimesh_identity::{anchor_sha256, anchor_sha256_hex, IdentityError, IssueError, LeafRequest};
use pimesh_schema::{DnsLabel, Seed, SpiffeId, Workload};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

use crate::file_error::FileError;
use crate::paths::NodePaths;

/// The proxy's system user (systemd/pimesh.sysusers): the node key is its.
const PROXY_USER: &str = "pimesh-proxy";

/// How long a certificate the node signs for itself lasts: as long as one the operator
/// signs with `pimeshctl node sign` or a replica signs at a join (never past the issuer's
/// own expiry).
pub const SELF_ENROLLED_LIFETIME: Duration = pimesh_identity::NODE_LIFETIME;

/// Why the node credential could not be made, read, imported or re-signed. Each names the
/// file concerned.
#[derive(Debug)]
pub enum CredentialError {
    /// A file could not be read or written: `action` says which.
    Io(FileError),
    /// A file is not the PEM it should be: `problem` says what was expected.
    NotPem {
        path: PathBuf,
        problem: &'static str,
        source: rustls_pki_types::pem::Error,
    },
    /// `node.pem` holds no certificate.
    EmptyChain { path: PathBuf },
    /// The certificate in `node.pem` names no node ID to carry into a new one.
    NoNodeId { path: PathBuf },
    /// An anchor is not the one the seed's join token pins.
    Pin(PinMismatch),
    /// The node key and its request could not be made.
    MakeKey(IdentityError),
    /// The issuer refused to re-sign the request kept at `request`.
    Resign {
        request: PathBuf,
        source: IssueError,
    },
}

impl CredentialError {
    fn io<'p>(
        action: &'static str,
        path: &'p Path,
    ) -> impl FnOnce(io::Error) -> CredentialError + 'p {
        let on = FileError::on(action, path);
        move |source| CredentialError::Io(on(source))
    }

    fn not_pem(
        problem: &'static str,
        path: &Path,
    ) -> impl FnOnce(rustls_pki_types::pem::Error) -> CredentialError {
        let path = path.to_path_buf();
        move |source| CredentialError::NotPem {
            path,
            problem,
            source,
        }
    }
}

impl fmt::Display for CredentialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialError::Io(err) => err.fmt(f),
            CredentialError::NotPem {
                path,
                problem,
                source,
            } => write!(f, "{}: {problem}: {source}", path.display()),
            CredentialError::EmptyChain { path } => write!(
                f,
                "{}: expected PEM certificates (leaf, issuer), found none",
                path.display()
            ),
            CredentialError::NoNodeId { path } => write!(
                f,
                "{}: the certificate names no spiffe://<site>/node/<node> identity to re-sign",
                path.display()
            ),
            CredentialError::Pin(mismatch) => mismatch.fmt(f),
            CredentialError::MakeKey(err) => write!(f, "cannot make the node key: {err}"),
            CredentialError::Resign { request, source } => write!(
                f,
                "cannot re-sign {} with the current issuer: {source}",
                request.display()
            ),
        }
    }
}

impl std::error::Error for CredentialError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CredentialError::Io(err) => Some(&err.source),
            CredentialError::NotPem { source, .. } => Some(source),
            CredentialError::Pin(mismatch) => Some(mismatch),
            CredentialError::MakeKey(err) => Some(err),
            CredentialError::Resign { source, .. } => Some(source),
            CredentialError::EmptyChain { .. } | CredentialError::NoNodeId { .. } => None,
        }
    }
}

/// An anchor certificate (in `file`) whose SHA-256 is not the one the seed's join token
/// pins: the card does not belong to the site the token joins.
#[derive(Debug)]
pub struct PinMismatch {
    pub file: PathBuf,
    /// Hex SHA-256 of the anchor found.
    pub found: String,
    /// Hex SHA-256 the join token pins.
    pub pinned: String,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} has SHA-256 {}, but the seed's join token pins {}",
            self.file.display(),
            self.found,
            self.pinned
        )
    }
}

impl std::error::Error for PinMismatch {}

/// Checks `anchor`, read from `file`, against the pin of the seed's join token; a seed
/// without a token pins nothing.
pub fn check_pin(anchor: &CertificateDer<'_>, seed: &Seed, file: &Path) -> Result<(), PinMismatch> {
    match &seed.join_token {
        Some(token) if &anchor_sha256(anchor) != token.anchor_sha256() => Err(PinMismatch {
            file: file.to_path_buf(),
            found: anchor_sha256_hex(anchor),
            pinned: token.anchor_sha256_hex(),
        }),
        _ => Ok(()),
    }
}

/// The node's TLS client credential: the certificate chain and the private key, in PEM.
pub struct NodeCredential {
    pub chain_pem: String,
    pub key_pem: String,
}

/// The node's files in `/var/lib/pimesh/identity/`: its key, its signing request, its
/// certificate chain and, on a joining node, the site's anchor.
pub struct CredentialFiles {
    pub dir: PathBuf,
}

impl CredentialFiles {
    /// The node's credential files in `dir`.
    pub fn new(dir: PathBuf) -> CredentialFiles {
        CredentialFiles { dir }
    }

    pub fn on_node(paths: &NodePaths) -> CredentialFiles {
        CredentialFiles::new(paths.identity_dir())
    }

    /// Makes the node key (0600) the proxy's, when its user exists: the proxy reads the
    /// node credential from these files and notices a new certificate by itself. The
    /// folder stays readable (0755): the key's mode is what protects it. Idempotent, so a
    /// cut between writing the key and this leaves it for the next start; a failure is
    /// logged (the proxy then has no node credential, and says so).
    fn give_key_to_proxy(&self) {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let user = match nix::unistd::User::from_name(PROXY_USER) {
            Ok(Some(user)) => user,
            Ok(None) => return, // a development host: the key stays the supervisor's
            Err(err) => {
                tracing::warn!(user = PROXY_USER, %err, "cannot look up the user; the node key stays root's");
                return;
            }
        };
        let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
        let result = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755))
            .and_then(|()| std::fs::metadata(self.key()))
            .and_then(|meta| {
                if (meta.uid(), meta.gid()) == (uid, gid) {
                    Ok(())
                } else {
                    std::os::unix::fs::chown(self.key(), Some(uid), Some(gid))
                }
            });
        if let Err(err) = result {
            tracing::warn!(key = %self.key().display(), %err, "cannot give the node key to the proxy's user");
        }
    }

    /// The anchors a node without the site's trust folder (a joining node) trusts.
    pub fn anchors(&self) -> PathBuf {
        self.dir.join("anchor.pem")
    }

    /// On a joining node: takes the site's anchor that the operator put on the boot
    /// partition (`pimesh-trust/anchor.pem` in `boot_trust_dir`, written by `pimeshctl
    /// image configure --trust`) into [`CredentialFiles::anchors`], once its SHA-256
    /// matches the join token's pin (when the seed has a token). Returns whether it wrote
    /// the file; a node already holding the same anchor, or a card without one, is left as
    /// it is.
    pub fn import_anchor(
        &self,
        boot_trust_dir: &Path,
        seed: &Seed,
    ) -> Result<bool, CredentialError> {
        let source = boot_trust_dir.join("anchor.pem");
        let Ok(pem) = std::fs::read(&source) else {
            return Ok(false);
        };
        let anchor = CertificateDer::from_pem_slice(&pem).map_err(CredentialError::not_pem(
            "expected a PEM certificate",
            &source,
        ))?;
        check_pin(&anchor, seed, &source).map_err(CredentialError::Pin)?;
        let written = pimesh_runtime::atomic_file::replace(&self.anchors(), &pem, 0o644)
            .map_err(CredentialError::io("write", &self.anchors()))?;
        if written {
            tracing::info!(anchor = %anchor_sha256_hex(&anchor), file = %self.anchors().display(), "site anchor imported from the boot partition");
        }
        Ok(written)
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("node.key")
    }

    pub fn request(&self) -> PathBuf {
        self.dir.join("node.csr")
    }

    pub fn chain(&self) -> PathBuf {
        self.dir.join("node.pem")
    }

    /// Makes the node key and its signing request when there is no key yet. Idempotent:
    /// an existing key is kept (a new one would orphan a certificate being signed).
    pub fn ensure_request(&self, site: &DnsLabel, node: &DnsLabel) -> Result<(), CredentialError> {
        if self.key().exists() {
            self.give_key_to_proxy();
            return Ok(());
        }
        let id = SpiffeId {
            site: site.clone(),
            workload: Workload::Node(node.clone()),
        };
        let request =
            LeafRequest::new(std::slice::from_ref(&id)).map_err(CredentialError::MakeKey)?;
        // The request first: a key without its request is regenerated, never the reverse.
        pimesh_runtime::atomic_file::replace(&self.request(), request.csr_pem.as_bytes(), 0o644)
            .map_err(CredentialError::io("write", &self.request()))?;
        pimesh_runtime::atomic_file::replace(
            &self.key(),
            request.key.serialize_pem().as_bytes(),
            0o600,
        )
        .map_err(CredentialError::io("write", &self.key()))?;
        self.give_key_to_proxy();
        tracing::info!(request = %self.request().display(), %id, "node key made; waiting for its certificate");
        Ok(())
    }

    /// Whether the node's certificate chain is there.
    pub fn has_certificate(&self) -> bool {
        self.chain().exists()
    }

    /// The signing request kept beside the key.
    pub fn signing_request(
        &self,
    ) -> Result<CertificateSigningRequestDer<'static>, CredentialError> {
        let request_pem =
            std::fs::read(self.request()).map_err(CredentialError::io("read", &self.request()))?;
        CertificateSigningRequestDer::from_pem_slice(&request_pem).map_err(
            CredentialError::not_pem("not a PEM request", &self.request()),
        )
    }

    /// Makes `chain` (PEM: the leaf, then its issuer) the node's certificate chain.
    pub fn install_chain(&self, chain: &str) -> Result<(), CredentialError> {
        pimesh_runtime::atomic_file::replace(&self.chain(), chain.as_bytes(), 0o644)
            .map(drop)
            .map_err(CredentialError::io("write", &self.chain()))
    }

    /// Re-signs the node's certificate with `issuer` when the chain in `node.pem` names
    /// another issuer (after an issuer rotation or an anchor switch), from the request kept
    /// beside the key: the key does not change, and the new certificate carries exactly the
    /// node IDs of the old one. Returns whether it re-signed; nothing to do without
    /// `node.pem`.
    pub fn renew_from(
        &self,
        issuer: &pimesh_identity::Authority,
        now: SystemTime,
    ) -> Result<bool, CredentialError> {
        let chain_pem = match std::fs::read(self.chain()) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(CredentialError::io("read", &self.chain())(err)),
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
            .collect::<Result<_, _>>()
            .map_err(CredentialError::not_pem(
                "expected PEM certificates (leaf, issuer)",
                &self.chain(),
            ))?;
        if chain.get(1) == Some(issuer.cert_der()) {
            return Ok(false);
        }
        let Some(leaf) = chain.first() else {
            return Err(CredentialError::EmptyChain { path: self.chain() });
        };
        let permitted = node_ids(leaf);
        let Some(site) = permitted.iter().next().map(|id| id.site.clone()) else {
            return Err(CredentialError::NoNodeId { path: self.chain() });
        };
        let request = self.signing_request()?;
        let leaf = issuer
            .sign_leaf_for(&request, &site, &permitted, now, SELF_ENROLLED_LIFETIME)
            .map_err(|source| CredentialError::Resign {
                request: self.request(),
                source,
            })?;
        self.install_chain(&format!("{}{}", leaf.pem, issuer.cert_pem()))?;
        tracing::info!(chain = %self.chain().display(), "node certificate re-signed by the current issuer");
        Ok(true)
    }

    /// The credential, once the certificate is there.
    pub fn load(&self) -> Result<Option<NodeCredential>, CredentialError> {
        let chain_pem = match std::fs::read_to_string(self.chain()) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(CredentialError::io("read", &self.chain())(err)),
        };
        let key_pem = std::fs::read_to_string(self.key())
            .map_err(CredentialError::io("read", &self.key()))?;
        Ok(Some(NodeCredential { chain_pem, key_pem }))
    }
}

/// The SPIFFE node IDs in `leaf`, as the set a re-signed credential may carry.
pub fn node_ids(leaf: &CertificateDer<'_>) -> BTreeSet<SpiffeId> {
    pimesh_identity::leaf_identities(leaf)
        .unwrap_or_default()
        .into_iter()
        .filter(|id| matches!(id.workload, Workload::Node(_)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pimesh_identity::TrustRoot;

    fn joining_seed(pinned: &[u8; 32]) -> Seed {
        let pin: String = pinned.iter().map(|b| format!("{b:02x}")).collect();
        let text = format!(
            "site = \"depot-7\"\nrole = \"join\"\njoin_token = \"K10{pin}::secret0123456789abcdef\"\n"
        );
        Seed::parse(Path::new("/boot/firmware/pimesh.toml"), &text).expect("seed")
    }

    #[test]
    fn a_joining_node_takes_the_cards_anchor_only_when_the_token_pins_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let site = DnsLabel::try_from("depot-7".to_owned()).expect("label");
        let root = TrustRoot::generate(&site, SystemTime::now()).expect("root");
        let other = TrustRoot::generate(&site, SystemTime::now()).expect("root");
        let paths = NodePaths::under(dir.path());
        let boot = paths.boot_trust_dir();
        std::fs::create_dir_all(&boot).expect("boot");
        std::fs::write(boot.join("anchor.pem"), root.anchor.cert_pem()).expect("card");
        let files = CredentialFiles::on_node(&paths);

        let wrong = joining_seed(&anchor_sha256(other.anchor.cert_der()));
        let err = files
            .import_anchor(&boot, &wrong)
            .expect_err("another pin")
            .to_string();
        assert!(err.contains("pins") && err.contains("anchor.pem"), "{err}");
        assert!(
            !files.anchors().exists(),
            "nothing written for a wrong anchor"
        );

        let right = joining_seed(&anchor_sha256(root.anchor.cert_der()));
        assert!(files.import_anchor(&boot, &right).expect("pinned"));
        assert_eq!(
            std::fs::read_to_string(files.anchors()).expect("written"),
            root.anchor.cert_pem()
        );
        assert!(
            !files.import_anchor(&boot, &right).expect("again"),
            "idempotent"
        );
        let empty = dir.path().join("empty-boot/pimesh-trust");
        assert!(!files.import_anchor(&empty, &right).expect("no card file"));
    }
}
