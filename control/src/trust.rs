//! The trust folder: what a replica signs with and whom it trusts.
//!
//! | file | what |
//! |---|---|
//! | `anchor.pem` | the trust bundle: one or more anchors (old and new during an anchor rotation) |
//! | `issuer.pem` | the issuer's certificate, signed by one of the anchors |
//! | `issuer.key` | the issuer's private key (PKCS#8 PEM, mode 0600, readable by the replica) |
//! | `join.json` | the join tokens the site accepts (optional; see `tokens`) |

use std::fmt;
use std::path::{Path, PathBuf};

use pimesh_identity::{Authority, IdentityError};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

/// A loaded trust folder.
///
/// Invariant: `anchors` is not empty, and `issuer` is a CA whose key matches its
/// certificate (`issuer_pem`). That the issuer chains to an anchor is checked when a
/// serving certificate is made from it (`tls::Serving::issue`).
pub struct Trust {
    pub anchors: Vec<CertificateDer<'static>>,
    pub issuer: Authority,
    /// The issuer's certificate as read, appended to every leaf issued (the chain).
    pub issuer_pem: String,
    /// `issuer.key` as read (PKCS#8 PEM): handed to server nodes only
    /// (`join_api`'s issuer route); never logged.
    pub issuer_key_pem: String,
    /// `k3s-token` (the site's K3s token, first line) when the folder has one: handed to
    /// joining nodes and server nodes over the join exchange; never logged.
    pub k3s_token: Option<String>,
}

/// The site's K3s token in the trust folder.
pub const K3S_TOKEN: &str = "k3s-token";

/// Why a trust folder cannot be used; each names the file at fault.
#[derive(Debug)]
pub enum TrustError {
    /// A file of the folder cannot be read.
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `anchor.pem` holds a block that is not a PEM certificate.
    BadAnchors {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    /// `anchor.pem` holds no certificate at all.
    NoAnchors { path: PathBuf },
    /// `issuer.pem` and `issuer.key` are not a CA certificate and its key.
    Issuer {
        path: PathBuf,
        source: IdentityError,
    },
}

impl fmt::Display for TrustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustError::Unreadable { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            TrustError::BadAnchors { path, source } => {
                write!(f, "{}: expected PEM certificates: {source}", path.display())
            }
            TrustError::NoAnchors { path } => {
                write!(
                    f,
                    "{}: expected PEM certificates, found none",
                    path.display()
                )
            }
            TrustError::Issuer { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for TrustError {}

impl Trust {
    /// Reads `anchor.pem`, `issuer.pem` and `issuer.key` from `dir`. The error names the
    /// file and what is wrong with it.
    ///
    /// `dir` may be a link that the supervisor swaps to a new generation of the folder
    /// (a rotation): it is resolved once, so the three files come from one generation.
    pub fn load(dir: &Path) -> Result<Trust, TrustError> {
        // A folder that cannot be resolved is reported below by the file it lacks.
        let resolved = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let dir = resolved.as_path();
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TrustError::Unreadable { path, source })
        };
        let anchor_path = dir.join("anchor.pem");
        let anchors: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(read("anchor.pem")?.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|source| TrustError::BadAnchors {
                    path: anchor_path.clone(),
                    source,
                })?;
        if anchors.is_empty() {
            return Err(TrustError::NoAnchors { path: anchor_path });
        }
        let issuer_pem = read("issuer.pem")?;
        let issuer_key_pem = read("issuer.key")?;
        let issuer = Authority::from_pem(&issuer_pem, &issuer_key_pem).map_err(|source| {
            TrustError::Issuer {
                path: dir.join("issuer.pem"),
                source,
            }
        })?;
        // Optional: a site made before K3s tokens were kept has none, and joins then
        // carry none.
        let k3s_token = std::fs::read_to_string(dir.join(K3S_TOKEN))
            .ok()
            .and_then(|text| text.lines().next().map(str::trim).map(str::to_owned))
            .filter(|token| !token.is_empty());
        Ok(Trust {
            anchors,
            issuer,
            issuer_pem,
            issuer_key_pem,
            k3s_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pimesh_identity::TrustRoot;
    use pimesh_schema::DnsLabel;

    #[test]
    fn a_trust_folder_loads_with_a_bundle_and_each_fault_names_its_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let site = DnsLabel::try_from("depot-7".to_owned()).expect("label");
        let now = std::time::SystemTime::now();
        let root = TrustRoot::generate(&site, now).expect("root");
        let next = TrustRoot::generate(&site, now).expect("root");
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text);

        let err = Trust::load(dir.path())
            .err()
            .expect("empty folder")
            .to_string();
        assert!(err.contains("anchor.pem"), "{err}");
        write("anchor.pem", "no certificates here\n").expect("write");
        let err = Trust::load(dir.path())
            .err()
            .expect("no anchor")
            .to_string();
        assert!(err.contains("anchor.pem") && err.contains("none"), "{err}");

        let bundle = format!("{}{}", root.anchor.cert_pem(), next.anchor.cert_pem());
        write("anchor.pem", &bundle).expect("write");
        write("issuer.pem", root.issuer.cert_pem()).expect("write");
        let err = Trust::load(dir.path()).err().expect("no key").to_string();
        assert!(err.contains("issuer.key"), "{err}");
        write("issuer.key", &next.issuer.key_pem()).expect("write");
        let err = Trust::load(dir.path())
            .err()
            .expect("foreign key")
            .to_string();
        assert!(err.contains("issuer.pem") && err.contains("key"), "{err}");

        write("issuer.key", &root.issuer.key_pem()).expect("write");
        let trust = Trust::load(dir.path()).expect("loads");
        assert_eq!(trust.anchors.len(), 2);
        assert_eq!(trust.issuer_pem, root.issuer.cert_pem());
    }
}
