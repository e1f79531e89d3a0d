//! What a usable node credential is: the chain, the leaf's key and the anchor bundle,
//! checked together when they are loaded, with errors that name the input at fault.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pimesh_identity::{verify_leaf, Usage, VerifyError};
use pimesh_meshtls::{pem, Credential, CredentialError, PemError, SiteTrust};
use pimesh_schema::{SpiffeId, Workload};
use rustls::pki_types::CertificateDer;

use super::{sha256_hex, Identity, IdentityFiles, Source};

/// What the three inputs are called in error messages: file paths, or what they are.
struct Names<'a> {
    chain: &'a str,
    key: &'a str,
    anchors: &'a str,
}

impl Identity {
    /// Reads and checks the identity in `files` (see [`Identity::from_pem`]). Errors are
    /// one line naming the file and what was expected.
    pub fn load(files: &IdentityFiles) -> Result<Identity, String> {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map_err(|err| format!("{}: cannot read: {err}", path.display()))
        };
        let chain = read(&files.chain)?;
        let key = read(&files.key)?;
        let anchors = read(&files.anchors)?;
        let names = Names {
            chain: &files.chain.to_string_lossy(),
            key: &files.key.to_string_lossy(),
            anchors: &files.anchors.to_string_lossy(),
        };
        Identity::build(&chain, &key, &anchors, &names, SystemTime::now())
    }

    /// Checks a node identity given as PEM text — the chain (leaf, then issuer), the leaf's
    /// PKCS#8 key and the anchor bundle — at the current time, and builds the TLS configs.
    /// Refused: no certificate or key, a key that is not ECDSA or not the leaf's, a leaf
    /// that does not chain to any anchor, is not valid now, or does not name exactly one
    /// node ID.
    #[cfg(test)]
    pub fn from_pem(chain_pem: &str, key_pem: &str, anchors_pem: &str) -> Result<Identity, String> {
        Identity::from_pem_named(chain_pem, key_pem, anchors_pem, "node")
    }

    /// [`Identity::from_pem`] with errors naming the inputs `<what> chain`, `<what> key`
    /// and `<what> bundle` (`what`: where they came from, e.g. a replica's address).
    pub fn from_pem_named(
        chain_pem: &str,
        key_pem: &str,
        anchors_pem: &str,
        what: &str,
    ) -> Result<Identity, String> {
        let names = Names {
            chain: &format!("{what} chain"),
            key: &format!("{what} key"),
            anchors: &format!("{what} bundle"),
        };
        Identity::build(chain_pem, key_pem, anchors_pem, &names, SystemTime::now())
    }
    fn build(
        chain_pem: &str,
        key_pem: &str,
        anchors_pem: &str,
        names: &Names<'_>,
        now: SystemTime,
    ) -> Result<Identity, String> {
        let chain = certificates(chain_pem, names.chain, "the node chain (leaf, then issuer)")?;
        let anchors = certificates(anchors_pem, names.anchors, "one or more anchors")?;
        let key = pem::private_key(key_pem.as_bytes()).map_err(|err| match err {
            PemError::Key(err) => format!(
                "{}: expected a PEM PKCS#8 private key (BEGIN PRIVATE KEY): {err}",
                names.key
            ),
            other => format!("{}: {other}", names.key),
        })?;
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(format!("{}: expected a PEM certificate chain", names.chain));
        };

        let leaf_info = LeafInfo::parse(leaf)
            .map_err(|why| format!("{}: the leaf certificate is not usable: {why}", names.chain))?;
        let mut nodes = leaf_info.ids.iter().filter_map(|id| match &id.workload {
            Workload::Node(node) => Some((id.site.clone(), node.clone())),
            Workload::Service(_) => None,
        });
        let (site, node) = match (nodes.next(), nodes.next()) {
            (Some(only), None) => only,
            (None, _) => {
                let expected = "expected the leaf to name a node, spiffe://<site>/node/<node>";
                return Err(format!("{}: {expected}; it names none", names.chain));
            }
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{}: expected the leaf to name exactly one node ID; it names several",
                    names.chain
                ))
            }
        };

        let credential = Credential::new(chain.clone(), key).map_err(|err| match err {
            CredentialError::UnsupportedKey(err) => {
                format!("{}: expected an ECDSA P-256 PKCS#8 key: {err}", names.key)
            }
            CredentialError::KeyMismatch => format!(
                "{}: the key does not belong to the leaf certificate in {}",
                names.key, names.chain
            ),
            other => format!("{}: {other}", names.chain),
        })?;

        let trust = SiteTrust::new(site.clone(), anchors)
            .map_err(|err| format!("{}: {err}", names.anchors))?;
        let mut ids = Vec::new();
        for usage in [Usage::Server, Usage::Client] {
            ids = verify_leaf(leaf, intermediates, trust.anchors(), &site, usage, now).map_err(
                |err| {
                    let what = match &err {
                        VerifyError::UnknownIssuer(_) => {
                            format!("the leaf does not chain to any anchor in {}", names.anchors)
                        }
                        VerifyError::Expired(_) => {
                            format!(
                                "the chain has expired (leaf valid until {})",
                                leaf_info.not_after_text
                            )
                        }
                        VerifyError::NotValidYet(_) => {
                            format!(
                                "the chain is not valid yet (leaf valid from {})",
                                leaf_info.not_before_text
                            )
                        }
                        VerifyError::Chain(_) | VerifyError::NoIdentity => {
                            format!(
                                "expected a node certificate of site {site} under {}",
                                names.anchors
                            )
                        }
                    };
                    format!("{}: {what}: {err}", names.chain)
                },
            )?;
        }

        // Which anchor the leaf chains to: the one that verifies it alone.
        let anchor_sha256 = trust
            .anchors()
            .iter()
            .find(|anchor| {
                let one = std::slice::from_ref(*anchor);
                verify_leaf(leaf, intermediates, one, &site, Usage::Client, now).is_ok()
            })
            .or(trust.anchors().first())
            .map(|anchor| sha256_hex(anchor))
            .unwrap_or_default();
        let issuer_sha256 = intermediates.first().map(|issuer| sha256_hex(issuer));
        let server = pimesh_meshtls::mesh_server(&credential, &trust)
            .map_err(|err| format!("{}: cannot build the TLS server config: {err}", names.chain))?;
        let client = pimesh_meshtls::mesh_client(&credential, &trust)
            .map_err(|err| format!("{}: cannot build the TLS client config: {err}", names.chain))?;
        let control = pimesh_meshtls::control_client(&credential, &trust)
            .map_err(|err| format!("{}: cannot build the TLS client config: {err}", names.chain))?;
        Ok(Identity {
            site,
            node,
            ids,
            not_before: leaf_info.not_before,
            not_after: leaf_info.not_after,
            source: Source::NodeCredential,
            issuer_subject: leaf_info.issuer,
            issuer_sha256,
            anchor_sha256,
            credential,
            trust,
            server: Arc::new(server),
            client: Arc::new(client),
            control: Arc::new(control),
        })
    }
}

/// All `CERTIFICATE` blocks of `pem`; at least one. Errors name the input and what it
/// should hold.
fn certificates(
    pem: &str,
    name: &str,
    expected: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    pem::certificates(pem.as_bytes()).map_err(|err| match err {
        PemError::NoCertificate => {
            format!("{name}: expected PEM certificates ({expected}), found no CERTIFICATE block")
        }
        PemError::Certificates(err) => {
            format!("{name}: expected PEM certificates ({expected}): {err}")
        }
        other => format!("{name}: {other}"),
    })
}
/// What [`Identity::build`] reads from the leaf before verifying it.
struct LeafInfo {
    /// The issuer's distinguished name.
    issuer: String,
    /// Every SPIFFE ID among the URI SANs, of any site.
    ids: Vec<SpiffeId>,
    not_before: SystemTime,
    not_after: SystemTime,
    not_before_text: String,
    not_after_text: String,
}

impl LeafInfo {
    fn parse(leaf: &CertificateDer<'_>) -> Result<LeafInfo, String> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(leaf).map_err(|err| format!("not X.509: {err}"))?;
        let validity = cert.validity();
        let time = |t: &x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            match u64::try_from(secs) {
                Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
                Err(_) => SystemTime::UNIX_EPOCH,
            }
        };
        let ids = pimesh_identity::leaf_identities(leaf)
            .map_err(|err| format!("bad subject alternative names: {err}"))?;
        Ok(LeafInfo {
            issuer: cert.issuer().to_string(),
            ids,
            not_before: time(&validity.not_before),
            not_after: time(&validity.not_after),
            not_before_text: validity.not_before.to_string(),
            not_after_text: validity.not_after.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use pimesh_identity::LeafRequest;
    use pimesh_schema::SpiffeId;

    use super::super::testing::{label, Site, DAY};
    use super::*;

    #[test]
    fn expired_and_not_yet_valid_credentials_are_refused_at_load() {
        let site = Site::new("depot-7");

        let past = site.now - 2 * DAY;
        let cred = site.credential("pi-b", &[], past, Duration::from_secs(3600));
        assert!(Identity::from_pem(&cred.chain, &cred.key, &cred.anchors)
            .expect_err("expired at load")
            .contains("expired"),);

        let future = site.now + 2 * DAY;
        let cred = site.credential("pi-b", &[], future, DAY);
        assert!(Identity::from_pem(&cred.chain, &cred.key, &cred.anchors)
            .expect_err("not valid yet at load")
            .contains("not valid yet"),);
    }

    #[test]
    fn load_names_the_file_and_refuses_bad_credentials() {
        let site = Site::new("depot-7");
        let dir = tempfile::tempdir().expect("temporary directory");
        let files = IdentityFiles::in_dir(dir.path());
        assert_eq!(files.chain, dir.path().join("node.pem"));
        assert_eq!(files.key, dir.path().join("node.key"));
        assert_eq!(files.anchors, dir.path().join("anchor.pem"));

        let err = Identity::load(&files).expect_err("missing");
        assert!(
            err.starts_with(&format!("{}: cannot read", files.chain.display())),
            "{err}"
        );

        let cred = site.credential("pi-a", &[], site.now, DAY);
        let write = |path: &Path, text: &str| std::fs::write(path, text).expect("write");
        write(&files.chain, &cred.chain);
        write(&files.key, &cred.key);
        write(&files.anchors, &cred.anchors);
        let loaded = Identity::load(&files).expect("loads");
        assert_eq!(loaded.node, label("pi-a"));
        assert_eq!(loaded.site, site.name);

        let other = site.credential("pi-a", &[], site.now, DAY);
        write(&files.key, &other.key);
        let err = Identity::load(&files).expect_err("foreign key");
        assert!(err.contains("does not belong to the leaf"), "{err}");
        assert!(err.starts_with(&files.key.display().to_string()), "{err}");
        assert!(!err.contains('\n'), "{err}");
        write(&files.key, &cred.key);

        write(&files.key, "not a key");
        let err = Identity::load(&files).expect_err("no key");
        assert!(err.starts_with(&files.key.display().to_string()), "{err}");
        write(&files.key, &cred.key);

        write(&files.chain, "hello");
        let err = Identity::load(&files).expect_err("not PEM");
        assert!(err.starts_with(&files.chain.display().to_string()), "{err}");
        write(&files.chain, &cred.chain);

        let elsewhere = Site::new("depot-7");
        write(&files.anchors, elsewhere.root.anchor.cert_pem());
        let err = Identity::load(&files).expect_err("another anchor");
        assert!(err.contains("does not chain to any anchor"), "{err}");
        // During an anchor rotation the bundle holds both.
        write(
            &files.anchors,
            &format!("{}{}", elsewhere.root.anchor.cert_pem(), cred.anchors),
        );
        assert_eq!(Identity::load(&files).expect("bundle").anchors().len(), 2);
    }

    #[test]
    fn a_leaf_must_name_exactly_one_node() {
        let site = Site::new("depot-7");
        let ids = [SpiffeId::service(&site.name, &label("staff"))];
        let request = LeafRequest::new(&ids).expect("request");
        let leaf = site
            .root
            .issuer
            .sign_leaf_for(
                &request.csr,
                &site.name,
                &ids.iter().cloned().collect(),
                site.now,
                DAY,
            )
            .expect("signed");
        let err = Identity::from_pem(
            &format!("{}{}", leaf.pem, site.root.issuer.cert_pem()),
            &request.key.serialize_pem(),
            site.root.anchor.cert_pem(),
        )
        .expect_err("no node");
        assert!(err.contains("names none"), "{err}");
    }
}
