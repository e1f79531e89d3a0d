//! What a usable node credential is: the chain, the leaf's key and the anchor bundle,
//! checked together when they are loaded, with errors that name the input at fault.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pimesh_identity::{verify_leaf, Usage, VerifyError};
use pimesh_meshtls::{
    pem, ConfigError, Credential, CredentialError, PemError, SiteTrust, TrustError,
};
use pimesh_schema::{DnsLabel, SpiffeId, Workload};
use rustls::pki_types::CertificateDer;
use x509_parser::error::X509Error;

use super::{sha256_hex, Identity, IdentityFiles, Source};

/// Why a node identity was refused: the input at fault and what is wrong with it. Shown as
/// one line, `<input>: <problem>`.
#[derive(Debug)]
pub struct LoadError {
    /// The input at fault: a file path, or what the input is (`<what> chain`, `<what> key`,
    /// `<what> bundle`).
    pub input: String,
    pub problem: Problem,
}

/// What is wrong with a node identity's input.
#[derive(Debug)]
pub enum Problem {
    /// The file cannot be read.
    Unreadable(io::Error),
    /// The chain or the bundle is not PEM certificates; `expected` says what it should
    /// hold.
    Certificates {
        expected: &'static str,
        err: PemError,
    },
    /// The key is not a PEM private key.
    Key(PemError),
    /// The chain holds no certificate.
    NoChain,
    /// The leaf cannot be read.
    Leaf(LeafError),
    /// The leaf names no node ID.
    NoNode,
    /// The leaf names several node IDs.
    SeveralNodes,
    /// The key is not one the mesh signs with.
    UnsupportedKey(rustls::Error),
    /// The key is not the leaf's; `chain` names the chain's input.
    KeyMismatch { chain: String },
    /// The chain and the key make no credential for another reason.
    Credential(CredentialError),
    /// The bundle is no usable set of anchors.
    Anchors(TrustError),
    /// The leaf chains to none of the anchors in the input named `anchors`.
    UnknownIssuer { anchors: String, err: VerifyError },
    /// The leaf (or its issuer) expired; the leaf is valid until `not_after`.
    Expired { not_after: String, err: VerifyError },
    /// The leaf (or its issuer) is not valid yet; the leaf is valid from `not_before`.
    NotValidYet {
        not_before: String,
        err: VerifyError,
    },
    /// Not a node certificate of `site` under the anchors of the input named `anchors`.
    NotOfSite {
        site: DnsLabel,
        anchors: String,
        err: VerifyError,
    },
    /// The TLS configuration of `side` (`server` or `client`) cannot be built.
    TlsConfig {
        side: &'static str,
        err: ConfigError,
    },
}

/// Why the leaf cannot be read.
#[derive(Debug)]
pub enum LeafError {
    NotX509(x509_parser::nom::Err<X509Error>),
    SubjectAltNames(VerifyError),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.input, self.problem)
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.problem {
            Problem::Unreadable(err) => Some(err),
            _ => None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unreadable(err) => write!(f, "cannot read: {err}"),
            Problem::Certificates {
                expected,
                err: PemError::NoCertificate,
            } => write!(
                f,
                "expected PEM certificates ({expected}), found no CERTIFICATE block"
            ),
            Problem::Certificates {
                expected,
                err: PemError::Certificates(err),
            } => write!(f, "expected PEM certificates ({expected}): {err}"),
            Problem::Certificates { err, .. } => err.fmt(f),
            Problem::Key(PemError::Key(err)) => write!(
                f,
                "expected a PEM PKCS#8 private key (BEGIN PRIVATE KEY): {err}"
            ),
            Problem::Key(err) => err.fmt(f),
            Problem::NoChain => f.write_str("expected a PEM certificate chain"),
            Problem::Leaf(err) => write!(f, "the leaf certificate is not usable: {err}"),
            Problem::NoNode => f.write_str(
                "expected the leaf to name a node, spiffe://<site>/node/<node>; it names none",
            ),
            Problem::SeveralNodes => {
                f.write_str("expected the leaf to name exactly one node ID; it names several")
            }
            Problem::UnsupportedKey(err) => {
                write!(f, "expected an ECDSA P-256 PKCS#8 key: {err}")
            }
            Problem::KeyMismatch { chain } => write!(
                f,
                "the key does not belong to the leaf certificate in {chain}"
            ),
            Problem::Credential(err) => err.fmt(f),
            Problem::Anchors(err) => err.fmt(f),
            Problem::UnknownIssuer { anchors, err } => write!(
                f,
                "the leaf does not chain to any anchor in {anchors}: {err}"
            ),
            Problem::Expired { not_after, err } => write!(
                f,
                "the chain has expired (leaf valid until {not_after}): {err}"
            ),
            Problem::NotValidYet { not_before, err } => write!(
                f,
                "the chain is not valid yet (leaf valid from {not_before}): {err}"
            ),
            Problem::NotOfSite { site, anchors, err } => write!(
                f,
                "expected a node certificate of site {site} under {anchors}: {err}"
            ),
            Problem::TlsConfig { side, err } => {
                write!(f, "cannot build the TLS {side} config: {err}")
            }
        }
    }
}

impl fmt::Display for LeafError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeafError::NotX509(err) => write!(f, "not X.509: {err}"),
            LeafError::SubjectAltNames(err) => write!(f, "bad subject alternative names: {err}"),
        }
    }
}

/// What the three inputs are called in error messages: file paths, or what they are.
struct Names<'a> {
    chain: &'a str,
    key: &'a str,
    anchors: &'a str,
}

impl Names<'_> {
    fn chain(&self, problem: Problem) -> LoadError {
        refused(self.chain, problem)
    }

    fn key(&self, problem: Problem) -> LoadError {
        refused(self.key, problem)
    }

    fn anchors(&self, problem: Problem) -> LoadError {
        refused(self.anchors, problem)
    }
}

fn refused(input: &str, problem: Problem) -> LoadError {
    LoadError {
        input: input.to_owned(),
        problem,
    }
}

impl Identity {
    /// Reads and checks the identity in `files` (see [`Identity::from_pem`]). Errors are
    /// one line naming the file and what was expected.
    pub fn load(files: &IdentityFiles) -> Result<Identity, LoadError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map_err(|err| refused(&path.display().to_string(), Problem::Unreadable(err)))
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
    pub fn from_pem(
        chain_pem: &str,
        key_pem: &str,
        anchors_pem: &str,
    ) -> Result<Identity, LoadError> {
        Identity::from_pem_named(chain_pem, key_pem, anchors_pem, "node")
    }

    /// [`Identity::from_pem`] with errors naming the inputs `<what> chain`, `<what> key`
    /// and `<what> bundle` (`what`: where they came from, e.g. a replica's address).
    pub fn from_pem_named(
        chain_pem: &str,
        key_pem: &str,
        anchors_pem: &str,
        what: &str,
    ) -> Result<Identity, LoadError> {
        let names = Names {
            chain: &format!("{what} chain"),
            key: &format!("{what} key"),
            anchors: &format!("{what} bundle"),
        };
        Identity::build(chain_pem, key_pem, anchors_pem, &names, SystemTime::now())
    }

    /// The checks of [`Identity::from_pem`] at `now`, with errors naming `names`.
    fn build(
        chain_pem: &str,
        key_pem: &str,
        anchors_pem: &str,
        names: &Names<'_>,
        now: SystemTime,
    ) -> Result<Identity, LoadError> {
        let chain = certificates(chain_pem, "the node chain (leaf, then issuer)")
            .map_err(|problem| names.chain(problem))?;
        let anchors = certificates(anchors_pem, "one or more anchors")
            .map_err(|problem| names.anchors(problem))?;
        let key =
            pem::private_key(key_pem.as_bytes()).map_err(|err| names.key(Problem::Key(err)))?;
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(names.chain(Problem::NoChain));
        };

        let leaf_info = LeafInfo::parse(leaf).map_err(|err| names.chain(Problem::Leaf(err)))?;
        let mut nodes = leaf_info.ids.iter().filter_map(|id| match &id.workload {
            Workload::Node(node) => Some((id.site.clone(), node.clone())),
            Workload::Service(_) => None,
        });
        let (site, node) = match (nodes.next(), nodes.next()) {
            (Some(only), None) => only,
            (None, _) => return Err(names.chain(Problem::NoNode)),
            (Some(_), Some(_)) => return Err(names.chain(Problem::SeveralNodes)),
        };

        let credential = Credential::new(chain.clone(), key).map_err(|err| match err {
            CredentialError::UnsupportedKey(err) => names.key(Problem::UnsupportedKey(err)),
            CredentialError::KeyMismatch => names.key(Problem::KeyMismatch {
                chain: names.chain.to_owned(),
            }),
            other => names.chain(Problem::Credential(other)),
        })?;

        let trust = SiteTrust::new(site.clone(), anchors)
            .map_err(|err| names.anchors(Problem::Anchors(err)))?;
        let mut ids = Vec::new();
        for usage in [Usage::Server, Usage::Client] {
            ids = verify_leaf(leaf, intermediates, trust.anchors(), &site, usage, now).map_err(
                |err| {
                    names.chain(match &err {
                        VerifyError::UnknownIssuer(_) => Problem::UnknownIssuer {
                            anchors: names.anchors.to_owned(),
                            err,
                        },
                        VerifyError::Expired(_) => Problem::Expired {
                            not_after: leaf_info.not_after_text.clone(),
                            err,
                        },
                        VerifyError::NotValidYet(_) => Problem::NotValidYet {
                            not_before: leaf_info.not_before_text.clone(),
                            err,
                        },
                        VerifyError::Chain(_) | VerifyError::NoIdentity => Problem::NotOfSite {
                            site: site.clone(),
                            anchors: names.anchors.to_owned(),
                            err,
                        },
                    })
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
        let config = |side: &'static str| move |err| names.chain(Problem::TlsConfig { side, err });
        let server = pimesh_meshtls::mesh_server(&credential, &trust).map_err(config("server"))?;
        let client = pimesh_meshtls::mesh_client(&credential, &trust).map_err(config("client"))?;
        let control =
            pimesh_meshtls::control_client(&credential, &trust).map_err(config("client"))?;
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

/// All `CERTIFICATE` blocks of `pem`; at least one. `expected` says what the input should
/// hold.
fn certificates(
    pem: &str,
    expected: &'static str,
) -> Result<Vec<CertificateDer<'static>>, Problem> {
    pem::certificates(pem.as_bytes()).map_err(|err| Problem::Certificates { expected, err })
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
    fn parse(leaf: &CertificateDer<'_>) -> Result<LeafInfo, LeafError> {
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(LeafError::NotX509)?;
        let validity = cert.validity();
        let time = |t: &x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            match u64::try_from(secs) {
                Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
                Err(_) => SystemTime::UNIX_EPOCH,
            }
        };
        let ids = pimesh_identity::leaf_identities(leaf).map_err(LeafError::SubjectAltNames)?;
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
        let site = Site::backdated("depot-7");

        let past = site.now - 2 * DAY;
        let cred = site.credential("pi-b", &[], past, Duration::from_secs(3600));
        let err =
            Identity::from_pem(&cred.chain, &cred.key, &cred.anchors).expect_err("expired at load");
        assert!(matches!(err.problem, Problem::Expired { .. }), "{err}");
        assert!(err.to_string().contains("expired"), "{err}");

        let future = site.now + 2 * DAY;
        let cred = site.credential("pi-b", &[], future, DAY);
        let err = Identity::from_pem(&cred.chain, &cred.key, &cred.anchors)
            .expect_err("not valid yet at load");
        assert!(matches!(err.problem, Problem::NotValidYet { .. }), "{err}");
        assert!(err.to_string().contains("not valid yet"), "{err}");
    }

    #[test]
    fn load_names_the_file_and_refuses_bad_credentials() {
        let site = Site::backdated("depot-7");
        let dir = tempfile::tempdir().expect("temporary directory");
        let files = IdentityFiles::in_dir(dir.path());
        assert_eq!(files.chain, dir.path().join("node.pem"));
        assert_eq!(files.key, dir.path().join("node.key"));
        assert_eq!(files.anchors, dir.path().join("anchor.pem"));

        let err = Identity::load(&files).expect_err("missing").to_string();
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
        assert!(matches!(err.problem, Problem::KeyMismatch { .. }), "{err}");
        let err = err.to_string();
        assert!(err.contains("does not belong to the leaf"), "{err}");
        assert!(err.starts_with(&files.key.display().to_string()), "{err}");
        assert!(!err.contains('\n'), "{err}");
        write(&files.key, &cred.key);

        write(&files.key, "not a key");
        let err = Identity::load(&files).expect_err("no key").to_string();
        assert!(err.starts_with(&files.key.display().to_string()), "{err}");
        write(&files.key, &cred.key);

        write(&files.chain, "hello");
        let err = Identity::load(&files).expect_err("not PEM").to_string();
        assert!(err.starts_with(&files.chain.display().to_string()), "{err}");
        write(&files.chain, &cred.chain);

        let elsewhere = Site::backdated("depot-7");
        write(&files.anchors, elsewhere.root.anchor.cert_pem());
        let err = Identity::load(&files)
            .expect_err("another anchor")
            .to_string();
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
        let site = Site::backdated("depot-7");
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
        assert!(matches!(err.problem, Problem::NoNode), "{err}");
        assert!(err.to_string().contains("names none"), "{err}");
    }
}
