//! The node's mesh identity and the mTLS configs built from it.
//!
//! Proxies talk to each other over mutual TLS: TLS 1.3 only, ALPN `h2`, the ring provider.
//! Each side presents its node credential (a leaf for `spiffe://<site>/node/<node>`, maybe
//! with `spiffe://<site>/svc/<service>` IDs, followed by its issuer) and checks the other's
//! with [`pimesh_identity::verify_leaf`] against the site's anchor bundle:
//!
//! - the server ([`Identity::acceptor`]) requires a client certificate that chains to an
//!   anchor, is valid now, allows client authentication and carries a SPIFFE ID of the site;
//! - the client ([`Identity::connector`]) requires the same of the server's certificate for
//!   server authentication, plus the node ID of the peer it meant to reach, which it reads
//!   back from the [`ServerName`] made by [`Identity::server_name`].
//!
//! Verification failures carry a specific [`rustls::Error`] so that
//! [`handshake_failure_reason`] can label them for the failure metric.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pimesh_identity::{verify_leaf, Usage, VerifyError};
use pimesh_schema::{DnsLabel, SpiffeId, Workload};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, CommonState, DigitallySignedStruct,
    DistinguishedName, Error, ServerConfig, SignatureScheme,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The ALPN protocol proxies speak to each other.
const ALPN_H2: &[u8] = b"h2";

/// The DNS suffix of the names [`Identity::server_name`] makes: `<node>.<site>.pimesh`.
const NAME_SUFFIX: &str = "pimesh";

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
/// Invariants: the leaf chains (through the rest of the chain) to one of `anchors`, was
/// valid for both server and client authentication when it was loaded, and names exactly
/// one node ID, `spiffe://<site>/node/<node>`; `ids` are all the leaf's SPIFFE IDs of
/// `site` (the node ID among them); the private key belongs to the leaf. The configs only
/// ever present this leaf and only accept peers of `site` under `anchors`. Cloning is cheap
/// (the configs are shared).
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
    /// SHA-256 (hex) of the anchor of `anchors` the leaf chains to (the first, when several).
    pub anchor_sha256: String,
    chain: Arc<[CertificateDer<'static>]>,
    anchors: Arc<[CertificateDer<'static>]>,
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
            .field("anchors", &self.anchors.len())
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
        &self.chain
    }

    /// [`Identity::from_pem`] checking validity at `now` instead of the current time:
    /// tests use it to present credentials that are expired or not yet valid.
    #[cfg(test)]
    fn from_pem_at(
        chain_pem: &str,
        key_pem: &str,
        anchors_pem: &str,
        now: SystemTime,
    ) -> Result<Identity, String> {
        let names = Names {
            chain: "node chain",
            key: "node key",
            anchors: "anchor bundle",
        };
        Identity::build(chain_pem, key_pem, anchors_pem, &names, now)
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
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|err| {
            format!(
                "{}: expected a PEM PKCS#8 private key (BEGIN PRIVATE KEY): {err}",
                names.key
            )
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

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|err| format!("{}: expected an ECDSA P-256 PKCS#8 key: {err}", names.key))?;
        let certified = CertifiedKey::new(chain.clone(), signing_key);
        certified.keys_match().map_err(|_| {
            format!(
                "{}: the key does not belong to the leaf certificate in {}",
                names.key, names.chain
            )
        })?;

        let mut ids = Vec::new();
        for usage in [Usage::Server, Usage::Client] {
            ids = verify_leaf(leaf, intermediates, &anchors, &site, usage, now).map_err(|err| {
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
            })?;
        }

        // Which anchor the leaf chains to: the one that verifies it alone.
        let anchor_sha256 = anchors
            .iter()
            .find(|anchor| {
                let one = std::slice::from_ref(*anchor);
                verify_leaf(leaf, intermediates, one, &site, Usage::Client, now).is_ok()
            })
            .or(anchors.first())
            .map(|anchor| sha256_hex(anchor))
            .unwrap_or_default();
        let issuer_sha256 = intermediates.first().map(|issuer| sha256_hex(issuer));
        let anchors: Arc<[CertificateDer<'static>]> = anchors.into();
        let server = server_config(&provider, &chain, &key, &site, &anchors)
            .map_err(|err| format!("{}: cannot build the TLS server config: {err}", names.chain))?;
        let client = client_config(&provider, &chain, &key, &site, &anchors)
            .map_err(|err| format!("{}: cannot build the TLS client config: {err}", names.chain))?;
        let control = control_client_config(&provider, &chain, &key, &site, &anchors)
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
            chain: chain.into(),
            anchors,
            server: Arc::new(server),
            client: Arc::new(client),
            control: Arc::new(control),
        })
    }

    /// The server side of an inbound mesh connection: requires a client certificate that
    /// chains to one of the anchors, is valid now, allows client authentication and carries
    /// a SPIFFE ID of this site. TLS 1.3 only, ALPN `h2`. Read the caller's IDs with
    /// [`peer_ids`] once the handshake is done.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.server))
    }

    /// The client side of an outbound mesh connection: presents this identity and accepts
    /// only a server certificate that chains to one of the anchors, is valid now, allows
    /// server authentication and carries the node ID named by the [`ServerName`] passed to
    /// `connect` (make it with [`Identity::server_name`]). TLS 1.3 only, ALPN `h2`.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(Arc::clone(&self.client))
    }

    /// The client side of a connection to a control replica: presents this identity and
    /// accepts only a server certificate that chains to one of the anchors, is valid now,
    /// allows server authentication and carries `spiffe://<site>/svc/pimesh-control`. The
    /// server name is not checked (replicas are reached by address; their DNS and IP
    /// names are for operators). TLS 1.3 only, ALPN `h2`.
    pub fn control_connector(&self) -> TlsConnector {
        TlsConnector::from(Arc::clone(&self.control))
    }

    /// The site's anchor bundle this identity trusts.
    pub fn anchors(&self) -> &[CertificateDer<'static>] {
        &self.anchors
    }

    /// The name to pass to [`TlsConnector::connect`] to reach node `peer` of this site:
    /// the DNS name `<peer>.<site>.pimesh`, which the client's verifier maps back to
    /// `spiffe://<site>/node/<peer>`. (It is also sent as SNI; nothing resolves it.)
    pub fn server_name(&self, peer: &DnsLabel) -> ServerName<'static> {
        let name = format!("{peer}.{}.{NAME_SUFFIX}", self.site);
        match DnsName::try_from(name) {
            Ok(name) => ServerName::DnsName(name),
            // Unreachable for DNS labels; an IP address is a name no peer can match.
            Err(_) => ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into()),
        }
    }
}

/// All `CERTIFICATE` blocks of `pem`; at least one.
fn certificates(
    pem: &str,
    name: &str,
    expected: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{name}: expected PEM certificates ({expected}): {err}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{name}: expected PEM certificates ({expected}), found no CERTIFICATE block"
        ));
    }
    Ok(certs)
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
        Ok(LeafInfo {
            issuer: cert.issuer().to_string(),
            ids: spiffe_ids(&cert)?,
            not_before: time(&validity.not_before),
            not_after: time(&validity.not_after),
            not_before_text: validity.not_before.to_string(),
            not_after_text: validity.not_after.to_string(),
        })
    }
}

/// The SPIFFE IDs among `cert`'s URI subject alternative names, of any site; other names
/// and URIs that are not Pimesh SPIFFE IDs are skipped.
fn spiffe_ids(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<Vec<SpiffeId>, String> {
    let names = cert
        .subject_alternative_name()
        .map_err(|err| format!("bad subject alternative names: {err}"))?
        .map(|ext| ext.value.general_names.as_slice())
        .unwrap_or_default();
    Ok(names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => uri.parse::<SpiffeId>().ok(),
            _ => None,
        })
        .collect())
}

fn server_config(
    provider: &Arc<CryptoProvider>,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    site: &DnsLabel,
    anchors: &Arc<[CertificateDer<'static>]>,
) -> Result<ServerConfig, Error> {
    let verifier = Arc::new(MeshClientVerifier {
        site: site.clone(),
        anchors: Arc::clone(anchors),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.to_vec(), key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

fn client_config(
    provider: &Arc<CryptoProvider>,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    site: &DnsLabel,
    anchors: &Arc<[CertificateDer<'static>]>,
) -> Result<ClientConfig, Error> {
    let mut config = ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier(provider, site, anchors))
        .with_client_auth_cert(chain.to_vec(), key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

fn control_client_config(
    provider: &Arc<CryptoProvider>,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    site: &DnsLabel,
    anchors: &Arc<[CertificateDer<'static>]>,
) -> Result<ClientConfig, Error> {
    let service = DnsLabel::try_from(CONTROL_SERVICE.to_owned())
        .map_err(|err| Error::General(format!("{CONTROL_SERVICE}: {err}")))?;
    let verifier = Arc::new(ControlServerVerifier {
        site: site.clone(),
        expected: SpiffeId::service(site, &service),
        anchors: Arc::clone(anchors),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain.to_vec(), key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

fn server_verifier(
    provider: &Arc<CryptoProvider>,
    site: &DnsLabel,
    anchors: &Arc<[CertificateDer<'static>]>,
) -> Arc<MeshServerVerifier> {
    Arc::new(MeshServerVerifier {
        site: site.clone(),
        anchors: Arc::clone(anchors),
        algorithms: provider.signature_verification_algorithms,
    })
}

/// The rustls error for a refused peer certificate, chosen so that
/// [`handshake_failure_reason`] can classify it.
fn certificate_error(err: VerifyError) -> Error {
    let kind = match err {
        VerifyError::UnknownIssuer(_) => CertificateError::UnknownIssuer,
        VerifyError::Expired(_) => CertificateError::Expired,
        VerifyError::NotValidYet(_) => CertificateError::NotValidYet,
        VerifyError::NoIdentity => CertificateError::ApplicationVerificationFailure,
        VerifyError::Chain(_) => CertificateError::Other(rustls::OtherError(Arc::new(err))),
    };
    Error::InvalidCertificate(kind)
}

fn system_time(now: UnixTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

/// Checks client certificates on inbound connections: a chain to one of `anchors`, valid
/// now, for client authentication, with a SPIFFE ID of `site`.
#[derive(Debug)]
struct MeshClientVerifier {
    site: DnsLabel,
    anchors: Arc<[CertificateDer<'static>]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify_leaf(
            end_entity,
            intermediates,
            &self.anchors,
            &self.site,
            Usage::Client,
            system_time(now),
        )
        .map_err(certificate_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Checks server certificates on outbound connections: a chain to one of `anchors`, valid
/// now, for server authentication, carrying the node ID that the [`ServerName`] (made by
/// [`Identity::server_name`]) stands for.
#[derive(Debug)]
struct MeshServerVerifier {
    site: DnsLabel,
    anchors: Arc<[CertificateDer<'static>]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl MeshServerVerifier {
    /// The node ID that `name`, `<node>.<site>.pimesh`, stands for.
    fn expected_peer(&self, name: &ServerName<'_>) -> Option<SpiffeId> {
        let ServerName::DnsName(name) = name else {
            return None;
        };
        let suffix = format!(".{}.{NAME_SUFFIX}", self.site);
        let node = name.as_ref().strip_suffix(suffix.as_str())?;
        let node = DnsLabel::try_from(node.to_owned()).ok()?;
        Some(SpiffeId::node(&self.site, &node))
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let expected = self
            .expected_peer(server_name)
            .ok_or(Error::InvalidCertificate(CertificateError::NotValidForName))?;
        let ids = verify_leaf(
            end_entity,
            intermediates,
            &self.anchors,
            &self.site,
            Usage::Server,
            system_time(now),
        )
        .map_err(certificate_error)?;
        if !ids.contains(&expected) {
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The service name every control replica of a site serves under (the replicas' own
/// `site_config::CONTROL_SERVICE`): `spiffe://<site>/svc/pimesh-control`.
pub const CONTROL_SERVICE: &str = "pimesh-control";

/// Checks a control replica's serving certificate: a chain to one of `anchors`, valid
/// now, for server authentication, carrying `expected` (the site's control identity),
/// whatever name the client dialled.
#[derive(Debug)]
struct ControlServerVerifier {
    site: DnsLabel,
    expected: SpiffeId,
    anchors: Arc<[CertificateDer<'static>]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ControlServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let ids = verify_leaf(
            end_entity,
            intermediates,
            &self.anchors,
            &self.site,
            Usage::Server,
            system_time(now),
        )
        .map_err(certificate_error)?;
        if !ids.contains(&self.expected) {
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The SPIFFE IDs of `site` in the peer's leaf certificate of an established connection,
/// server or client side, for authorization and logs. The leaf was verified during the
/// handshake by this module's verifiers (on a resumed session: when the session was first
/// established). Empty when there is no peer certificate (no handshake yet) or it cannot
/// be read.
pub fn peer_ids(conn: &CommonState, site: &DnsLabel) -> Vec<SpiffeId> {
    let Some(leaf) = conn.peer_certificates().and_then(|chain| chain.first()) else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return Vec::new();
    };
    let mut ids = spiffe_ids(&cert).unwrap_or_default();
    ids.retain(|id| &id.site == site);
    ids
}

/// A short label for a failed handshake, for `tls_handshake_failure_total{reason=...}`:
///
/// - `"not_tls"`: the peer sent plaintext or garbage (bytes that are not TLS records
///   or messages);
/// - `"no_client_cert"`: the client presented no certificate (or, client side, the server
///   said one is required);
/// - `"unknown_ca"`: the peer's chain leads to none of our anchors (or the peer said so of
///   ours);
/// - `"expired"`, `"not_yet_valid"`: the peer's chain is outside its validity (a peer
///   refusing ours for either reason sends one alert, counted as `"expired"`);
/// - `"wrong_identity"`: no SPIFFE ID of this site, or not the expected peer node (or the
///   peer denied access);
/// - `"timeout"`: an [`io::ErrorKind::TimedOut`] error (the caller maps its own timeout);
/// - `"protocol"`: any other TLS alert or protocol error;
/// - `"io"`: anything else (reset, end of stream in the middle of the handshake, ...).
pub fn handshake_failure_reason(err: &io::Error) -> &'static str {
    if err.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
    else {
        return "io";
    };
    match tls {
        // Bytes that do not parse as TLS records or messages: plaintext or garbage.
        Error::InvalidMessage(_) => "not_tls",
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::ApplicationVerificationFailure
            | CertificateError::NotValidForName
            | CertificateError::NotValidForNameContext { .. } => "wrong_identity",
            _ => "protocol",
        },
        Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => "no_client_cert",
            AlertDescription::UnknownCA => "unknown_ca",
            AlertDescription::CertificateExpired => "expired",
            AlertDescription::AccessDenied => "wrong_identity",
            _ => "protocol",
        },
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use pimesh_identity::{LeafRequest, TrustRoot};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
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

    /// Runs a handshake between `client` (expecting to reach `peer`) and `server` over an
    /// in-memory pipe; returns both sides' outcomes.
    async fn handshake(
        client: &TlsConnector,
        name: ServerName<'static>,
        server: &TlsAcceptor,
    ) -> (
        io::Result<tokio_rustls::client::TlsStream<DuplexStream>>,
        io::Result<tokio_rustls::server::TlsStream<DuplexStream>>,
    ) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let outcome = timeout(WAIT, async {
            tokio::join!(client.connect(name, near), server.accept(far))
        })
        .await;
        outcome.expect("the handshake finishes")
    }

    /// The reason the server gives for refusing `client`'s credential.
    async fn server_refusal(server: &Identity, client: &Identity) -> &'static str {
        let (_, accepted) = handshake(
            &client.connector(),
            client.server_name(&server.node),
            &server.acceptor(),
        )
        .await;
        let err = accepted.expect_err("the server refuses the client");
        handshake_failure_reason(&err)
    }

    #[tokio::test]
    async fn nodes_of_a_site_handshake_both_ways_and_see_each_others_ids() {
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

        for (client, server) in [(&a, &b), (&b, &a)] {
            let (connected, accepted) = handshake(
                &client.connector(),
                client.server_name(&server.node),
                &server.acceptor(),
            )
            .await;
            let mut connected = connected.expect("client side");
            let mut accepted = accepted.expect("server side");
            let (_, client_conn) = connected.get_ref();
            let (_, server_conn) = accepted.get_ref();
            assert_eq!(client_conn.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(server_conn.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(
                client_conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            assert_eq!(peer_ids(client_conn, &site.name), server.ids);
            assert_eq!(peer_ids(server_conn, &site.name), client.ids);
            assert!(peer_ids(server_conn, &label("elsewhere")).is_empty());

            connected.write_all(b"ping").await.expect("write");
            connected.flush().await.expect("flush");
            let mut buf = [0u8; 4];
            accepted.read_exact(&mut buf).await.expect("read");
            assert_eq!(&buf, b"ping");
        }
    }

    #[tokio::test]
    async fn a_second_connection_resumes_and_keeps_the_peer_ids() {
        let site = Site::new("depot-7");
        let (a, b) = (site.identity("pi-a"), site.identity("pi-b"));
        let (connector, acceptor) = (a.connector(), b.acceptor());
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let (connected, accepted) =
                handshake(&connector, a.server_name(&b.node), &acceptor).await;
            let mut connected = connected.expect("client side");
            let mut accepted = accepted.expect("server side");
            // The session tickets arrive after the handshake: exchange data to read them.
            accepted.write_all(b"x").await.expect("write");
            accepted.flush().await.expect("flush");
            let mut buf = [0u8; 1];
            connected.read_exact(&mut buf).await.expect("read");
            let (_, server_conn) = accepted.get_ref();
            kinds.push(server_conn.handshake_kind());
            assert_eq!(peer_ids(server_conn, &site.name), a.ids);
            assert_eq!(peer_ids(connected.get_ref().1, &site.name), b.ids);
        }
        assert_eq!(
            kinds,
            [
                Some(rustls::HandshakeKind::Full),
                Some(rustls::HandshakeKind::Resumed)
            ]
        );
    }

    #[tokio::test]
    async fn a_client_under_another_anchor_is_an_unknown_ca() {
        let site = Site::new("depot-7");
        let other = Site::new("depot-7"); // same name, another anchor
        assert_eq!(
            server_refusal(&site.identity("pi-a"), &other.identity("pi-b")).await,
            "unknown_ca"
        );
    }

    #[tokio::test]
    async fn expired_and_not_yet_valid_clients_are_refused() {
        let site = Site::new("depot-7");
        let server = site.identity("pi-a");

        let past = site.now - 2 * DAY;
        let cred = site.credential("pi-b", &[], past, Duration::from_secs(3600));
        assert!(Identity::from_pem(&cred.chain, &cred.key, &cred.anchors)
            .expect_err("expired at load")
            .contains("expired"),);
        let expired = Identity::from_pem_at(
            &cred.chain,
            &cred.key,
            &cred.anchors,
            past + Duration::from_secs(60),
        )
        .expect("valid back then");
        assert_eq!(server_refusal(&server, &expired).await, "expired");

        let future = site.now + 2 * DAY;
        let cred = site.credential("pi-b", &[], future, DAY);
        assert!(Identity::from_pem(&cred.chain, &cred.key, &cred.anchors)
            .expect_err("not valid yet at load")
            .contains("not valid yet"),);
        let early = Identity::from_pem_at(&cred.chain, &cred.key, &cred.anchors, future)
            .expect("valid then");
        assert_eq!(server_refusal(&server, &early).await, "not_yet_valid");
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let site = Site::new("depot-7");
        let server = site.identity("pi-a");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let anchors: Arc<[CertificateDer<'static>]> = server.anchors().to_vec().into();
        let config = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(server_verifier(&provider, &site.name, &anchors))
            .with_no_client_auth();
        let (_, accepted) = handshake(
            &TlsConnector::from(Arc::new(config)),
            server.server_name(&server.node),
            &server.acceptor(),
        )
        .await;
        let err = accepted.expect_err("refused");
        assert_eq!(handshake_failure_reason(&err), "no_client_cert");
    }

    #[tokio::test]
    async fn plaintext_is_not_tls() {
        let site = Site::new("depot-7");
        let server = site.identity("pi-a");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let client = tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(b"GET / HTTP/1.1\r\n\r\n")
                .await
                .expect("write");
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
        });
        let (stream, _) = listener.accept().await.expect("accept");
        let err = timeout(WAIT, server.acceptor().accept(stream))
            .await
            .expect("finishes")
            .expect_err("refused");
        assert_eq!(handshake_failure_reason(&err), "not_tls");
        drop(err);
        client.await.expect("client task");
    }

    #[tokio::test]
    async fn a_control_replica_is_known_by_its_spiffe_id_whatever_name_is_dialled() {
        let site = Site::new("depot-7");
        let client = site.identity("pi-a");
        let name = ServerName::try_from("localhost").expect("name");
        let cred = site.credential("srv", &[CONTROL_SERVICE], site.now, DAY);
        let replica = Identity::from_pem(&cred.chain, &cred.key, &cred.anchors).expect("id");
        let (connected, accepted) = handshake(
            &client.control_connector(),
            name.clone(),
            &replica.acceptor(),
        )
        .await;
        connected.expect("a certificate with the control ID is a replica");
        accepted.expect("the replica accepts the node");

        // A node of the site without the control ID is not a replica.
        let node = site.identity("pi-b");
        let (connected, _) =
            handshake(&client.control_connector(), name.clone(), &node.acceptor()).await;
        let err = connected.expect_err("a plain node is refused");
        assert_eq!(handshake_failure_reason(&err), "wrong_identity");

        // Nor is a replica of another site.
        let other = Site::new("depot-8");
        let cred = other.credential("srv", &[CONTROL_SERVICE], other.now, DAY);
        let foreign = Identity::from_pem(&cred.chain, &cred.key, &cred.anchors).expect("id");
        let (connected, _) =
            handshake(&client.control_connector(), name, &foreign.acceptor()).await;
        let err = connected.expect_err("another site's replica is refused");
        assert_eq!(handshake_failure_reason(&err), "unknown_ca");
    }

    #[tokio::test]
    async fn a_client_reaching_the_wrong_node_refuses_it() {
        let site = Site::new("depot-7");
        let client = site.identity("pi-a");
        let server = site.identity("c");
        let (connected, _) = handshake(
            &client.connector(),
            client.server_name(&label("b")),
            &server.acceptor(),
        )
        .await;
        let err = connected.expect_err("the client refuses node c when it wants b");
        assert_eq!(handshake_failure_reason(&err), "wrong_identity");

        // A name outside the site's scheme names no node at all.
        let stranger = ServerName::try_from("b.other-site.pimesh").expect("name");
        let (connected, _) = handshake(&client.connector(), stranger, &server.acceptor()).await;
        let err = connected.expect_err("refused");
        assert_eq!(handshake_failure_reason(&err), "wrong_identity");
    }

    #[test]
    fn other_errors_have_coarse_reasons() {
        let reason = |err: io::Error| handshake_failure_reason(&err);
        assert_eq!(reason(io::ErrorKind::TimedOut.into()), "timeout");
        assert_eq!(reason(io::ErrorKind::ConnectionReset.into()), "io");
        assert_eq!(reason(io::ErrorKind::UnexpectedEof.into()), "io");
        let tls = |err: Error| io::Error::new(io::ErrorKind::InvalidData, err);
        assert_eq!(
            reason(tls(Error::AlertReceived(AlertDescription::UnknownCA))),
            "unknown_ca"
        );
        assert_eq!(
            reason(tls(Error::AlertReceived(
                AlertDescription::HandshakeFailure
            ))),
            "protocol"
        );
        assert_eq!(
            reason(tls(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure
            ))),
            "wrong_identity"
        );
        assert_eq!(reason(tls(Error::DecryptError)), "protocol");
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
