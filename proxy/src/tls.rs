//! The node's mesh identity: its credential, checked when loaded, and the TLS
//! configurations the proxy serves and dials with.
//!
//! Proxies talk to each other over mutual TLS as [`pimesh_meshtls`] configures it (TLS 1.3
//! only, ALPN `h2`): each side presents its node credential (a leaf for
//! `spiffe://<site>/node/<node>`, maybe with `spiffe://<site>/svc/<service>` IDs, followed
//! by its issuer) and checks the other's against the site's anchor bundle:
//!
//! - the server ([`Identity::acceptor`]) takes a client with any SPIFFE ID of the site;
//! - the client ([`Identity::connector`]) takes only the node it dialled, named by the
//!   [`ServerName`] made by [`Identity::server_name`];
//! - the client of a control replica ([`Identity::control_connector`]) takes only
//!   `spiffe://<site>/svc/pimesh-control`.
//!
//! What is the proxy's own here: which files hold the credential, what a usable node
//! credential is (exactly one node ID, valid now for both server and client
//! authentication under the bundle), what `/config` shows of it, and error messages that
//! name the file at fault.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pimesh_identity::{verify_leaf, Usage, VerifyError};
use pimesh_meshtls::{pem, Credential, CredentialError, PemError, SiteTrust};
use pimesh_schema::{DnsLabel, SpiffeId, Workload};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

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

/// Where an identity in use came from, for `/config` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The node credential files (`--identity-dir`, the credentials directory).
    NodeCredential,
    /// A leaf a control replica signed in this process's life.
    Control,
    /// A leaf a control replica signed earlier, read back from the state directory.
    Cache,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::NodeCredential => "node-credential",
            Source::Control => "control",
            Source::Cache => "cache",
        }
    }
}

/// A loaded, checked node identity and the TLS configs built from it.
///
/// Invariants: the leaf chains (through the rest of the chain) to one of the anchors, was
/// valid for both server and client authentication when it was loaded, and names exactly
/// one node ID, `spiffe://<site>/node/<node>`; `ids` are all the leaf's SPIFFE IDs of
/// `site` (the node ID among them); the private key belongs to the leaf. The configs only
/// ever present this leaf and only accept peers of `site` under the anchors. Cloning is
/// cheap (the configs are shared).
#[derive(Clone)]
pub struct Identity {
    pub site: DnsLabel,
    pub node: DnsLabel,
    pub ids: Vec<SpiffeId>,
    /// When the leaf becomes valid (it is backdated a little by the issuer).
    pub not_before: SystemTime,
    /// When the leaf expires: the identity must be replaced before then.
    pub not_after: SystemTime,
    pub source: Source,
    /// The leaf's issuer name (the subject of the certificate that signed it).
    pub issuer_subject: String,
    /// SHA-256 (hex) of the issuer certificate sent after the leaf, when there is one: it
    /// tells issuers apart across a rotation, as they share their names.
    pub issuer_sha256: Option<String>,
    /// SHA-256 (hex) of the anchor of the bundle the leaf chains to (the first, when
    /// several).
    pub anchor_sha256: String,
    credential: Credential,
    trust: SiteTrust,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    control: Arc<ClientConfig>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("site", &self.site.as_str())
            .field("node", &self.node.as_str())
            .field("ids", &self.ids)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("source", &self.source)
            .field("issuer_sha256", &self.issuer_sha256)
            .field("anchors", &self.trust.anchors().len())
            .finish_non_exhaustive()
    }
}

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

    /// The same identity, labelled as coming from `source`.
    pub fn with_source(mut self, source: Source) -> Identity {
        self.source = source;
        self
    }

    /// The chain presented (leaf first, then the issuer).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        self.credential.chain()
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

    /// The server side of an inbound mesh connection ([`pimesh_meshtls::mesh_server`]):
    /// requires a client certificate of this site. Read the caller's IDs with
    /// [`pimesh_meshtls::peer_ids`] once the handshake is done.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.server))
    }

    /// The client side of an outbound mesh connection ([`pimesh_meshtls::mesh_client`]):
    /// presents this identity and accepts only the node named by the [`ServerName`] passed
    /// to `connect` (make it with [`Identity::server_name`]).
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(Arc::clone(&self.client))
    }

    /// The client side of a connection to a control replica
    /// ([`pimesh_meshtls::control_client`]): presents this identity and accepts only
    /// `spiffe://<site>/svc/pimesh-control` of this site, whatever name is dialled.
    pub fn control_connector(&self) -> TlsConnector {
        TlsConnector::from(Arc::clone(&self.control))
    }

    /// The site's anchor bundle this identity trusts.
    pub fn anchors(&self) -> &[CertificateDer<'static>] {
        self.trust.anchors()
    }

    /// The name to pass to [`TlsConnector::connect`] to reach node `peer` of this site
    /// ([`pimesh_meshtls::mesh_server_name`]).
    pub fn server_name(&self, peer: &DnsLabel) -> ServerName<'static> {
        pimesh_meshtls::mesh_server_name(&self.site, peer)
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

/// SHA-256 of a certificate (DER) in lowercase hex: how `/config` names certificates.
pub fn sha256_hex(cert: &CertificateDer<'_>) -> String {
    pimesh_identity::anchor_sha256_hex(cert)
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
    use std::collections::BTreeSet;

    use pimesh_identity::{LeafRequest, TrustRoot};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::time::timeout;

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);
    const WAIT: Duration = Duration::from_secs(10);

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    /// A site whose trust root was made three days ago, so that it can also sign leaves
    /// that are already expired.
    struct Site {
        name: DnsLabel,
        root: TrustRoot,
        now: SystemTime,
    }

    /// A node credential as PEM text.
    struct Credential {
        chain: String,
        key: String,
        anchors: String,
    }

    impl Site {
        fn new(name: &str) -> Site {
            let now = SystemTime::now();
            Site {
                name: label(name),
                root: TrustRoot::generate(&label(name), now - 3 * DAY).expect("trust root"),
                now,
            }
        }

        /// A credential for node `node` (plus `services`), signed as of `at` for `lifetime`.
        fn credential(
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

        fn identity(&self, node: &str) -> Identity {
            let cred = self.credential(node, &[], self.now, DAY);
            Identity::from_pem(&cred.chain, &cred.key, &cred.anchors).expect("identity")
        }
    }

    #[tokio::test]
    async fn a_loaded_identity_names_its_node_and_its_configs_reach_a_peer() {
        let site = Site::new("depot-7");
        let a_cred = site.credential("pi-a", &["staff"], site.now, DAY);
        let a = Identity::from_pem(&a_cred.chain, &a_cred.key, &a_cred.anchors).expect("a");
        let b = site.identity("pi-b");
        assert_eq!(a.site, site.name);
        assert_eq!(a.node, label("pi-a"));
        assert_eq!(
            a.ids,
            [
                SpiffeId::node(&site.name, &label("pi-a")),
                SpiffeId::service(&site.name, &label("staff"))
            ]
        );
        assert!(a.not_before <= site.now && a.not_after > site.now + DAY / 2);
        assert_eq!(a.anchors().len(), 1);

        // The acceptor and connector are the mesh's (the handshakes themselves are
        // pimesh-meshtls's tests): each side sees the other's IDs.
        for (client, server) in [(&a, &b), (&b, &a)] {
            let (near, far) = tokio::io::duplex(64 * 1024);
            let (connected, accepted) = timeout(WAIT, async {
                tokio::join!(
                    client
                        .connector()
                        .connect(client.server_name(&server.node), near),
                    server.acceptor().accept(far)
                )
            })
            .await
            .expect("the handshake finishes");
            let mut connected = connected.expect("client side");
            let mut accepted = accepted.expect("server side");
            let (_, client_conn) = connected.get_ref();
            let (_, server_conn) = accepted.get_ref();
            assert_eq!(
                pimesh_meshtls::peer_ids(client_conn, &site.name),
                server.ids
            );
            assert_eq!(
                pimesh_meshtls::peer_ids(server_conn, &site.name),
                client.ids
            );
            connected.write_all(b"ping").await.expect("write");
            connected.flush().await.expect("flush");
            let mut buf = [0u8; 4];
            accepted.read_exact(&mut buf).await.expect("read");
            assert_eq!(&buf, b"ping");
        }
    }

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
