//! The trust folder: what a replica signs with and whom it trusts.
//!
//! | file | what |
//! |---|---|
//! | `anchor.pem` | the trust bundle: one or more anchors (old and new during an anchor rotation) |
//! | `issuer.pem` | the issuer's certificate, signed by one of the anchors |
//! | `issuer.key` | the issuer's private key (PKCS#8 PEM, mode 0600, readable by the replica) |

use std::path::Path;

use pimesh_identity::Authority;
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
}

impl Trust {
    /// Reads `anchor.pem`, `issuer.pem` and `issuer.key` from `dir`. The error names the
    /// file and what is wrong with it.
    ///
    /// `dir` may be a link that the supervisor swaps to a new generation of the folder
    /// (a rotation): it is resolved once, so the three files come from one generation.
    pub fn load(dir: &Path) -> Result<Trust, String> {
        // A folder that cannot be resolved is reported below by the file it lacks.
        let resolved = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let dir = resolved.as_path();
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .map_err(|err| format!("cannot read {}: {err}", path.display()))
        };
        let anchor_path = dir.join("anchor.pem");
        let anchors: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(read("anchor.pem")?.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|err| {
                    let path = anchor_path.display();
                    format!("{path}: expected PEM certificates: {err}")
                })?;
        if anchors.is_empty() {
            let path = anchor_path.display();
            return Err(format!("{path}: expected PEM certificates, found none"));
        }
        let issuer_pem = read("issuer.pem")?;
        let issuer = Authority::from_pem(&issuer_pem, &read("issuer.key")?)
            .map_err(|err| format!("{}: {err}", dir.join("issuer.pem").display()))?;
        Ok(Trust {
            anchors,
            issuer,
            issuer_pem,
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

        let err = Trust::load(dir.path()).err().expect("empty folder");
        assert!(err.contains("anchor.pem"), "{err}");
        write("anchor.pem", "no certificates here\n").expect("write");
        let err = Trust::load(dir.path()).err().expect("no anchor");
        assert!(err.contains("anchor.pem") && err.contains("none"), "{err}");

        let bundle = format!("{}{}", root.anchor.cert_pem(), next.anchor.cert_pem());
        write("anchor.pem", &bundle).expect("write");
        write("issuer.pem", root.issuer.cert_pem()).expect("write");
        let err = Trust::load(dir.path()).err().expect("no key");
        assert!(err.contains("issuer.key"), "{err}");
        write("issuer.key", &next.issuer.key_pem()).expect("write");
        let err = Trust::load(dir.path()).err().expect("foreign key");
        assert!(err.contains("issuer.pem") && err.contains("key"), "{err}");

        write("issuer.key", &root.issuer.key_pem()).expect("write");
        let trust = Trust::load(dir.path()).expect("loads");
        assert_eq!(trust.anchors.len(), 2);
        assert_eq!(trust.issuer_pem, root.issuer.cert_pem());
    }
}
