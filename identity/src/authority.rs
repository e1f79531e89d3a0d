use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use pimesh_schema::DnsLabel;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

use pimesh_schema::SpiffeId;

use crate::{IdentityError, IssueError};

/// How long an anchor is valid.
pub const ANCHOR_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long an issuer is valid; the supervisor rotates it well before.
pub const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a leaf is valid; proxies renew at two thirds of it.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long a node credential lasts (never past its issuer): what `pimeshctl node sign`
/// makes by default, a node signs for itself, and a control replica signs for a joining
/// node.
pub const NODE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start this long before they are made, so that a node whose clock is a
/// little behind the issuer's still accepts them.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A certificate authority: its certificate and private key. The key never leaves the
/// process except through [`Authority::key_pem`], which the caller writes with mode 0600.
pub struct Authority {
    cert: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
    not_after: SystemTime,
}

/// A site's trust root: the anchor and the issuer it signed.
pub struct TrustRoot {
    pub anchor: Authority,
    pub issuer: Authority,
}

/// A signed leaf certificate.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub der: CertificateDer<'static>,
    pub pem: String,
    pub identities: Vec<SpiffeId>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl TrustRoot {
    /// Creates a new anchor and issuer for `site`, valid from `now`.
    pub fn generate(site: &DnsLabel, now: SystemTime) -> Result<TrustRoot, IdentityError> {
        let anchor = Authority::new_anchor(site, now)?;
        let issuer = anchor.new_issuer(site, now)?;
        Ok(TrustRoot { anchor, issuer })
    }
}

impl Authority {
    /// A self-signed anchor for `site`, valid for [`ANCHOR_LIFETIME`] from `now`.
    pub fn new_anchor(site: &DnsLabel, now: SystemTime) -> Result<Authority, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(
            &format!("pimesh {site} trust anchor"),
            now,
            ANCHOR_LIFETIME,
            None,
        )?;
        let cert = params.self_signed(&key)?;
        Ok(Authority::new(cert, key, now + ANCHOR_LIFETIME))
    }

    /// An issuer for `site` signed by this anchor, valid for [`ISSUER_LIFETIME`] from
    /// `now` (never past this anchor's own expiry). It may sign leaves, not further CAs.
    pub fn new_issuer(&self, site: &DnsLabel, now: SystemTime) -> Result<Authority, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let lifetime = ISSUER_LIFETIME.min(self.not_after.duration_since(now).unwrap_or_default());
        let params = ca_params(&format!("pimesh {site} issuer"), now, lifetime, Some(0))?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(Authority::new(cert, key, now + lifetime))
    }

    /// Loads an authority from its PEM certificate and PEM (PKCS#8) private key, checking
    /// that the key belongs to the certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, IdentityError> {
        use rustls_pki_types::pem::PemObject as _;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|err| IdentityError::Load(format!("certificate is not PEM: {err}")))?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|err| IdentityError::Load(format!("key is not a PKCS#8 PEM key: {err}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|err| IdentityError::Load(format!("certificate is not X.509: {err}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(IdentityError::Load(
                "the key does not belong to the certificate".into(),
            ));
        }
        if !parsed.is_ca() {
            return Err(IdentityError::Load("the certificate is not a CA".into()));
        }
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0),
            );
        Ok(Authority {
            cert_pem: cert_pem.to_owned(),
            cert: cert.into_owned(),
            key,
            not_after,
        })
    }

    fn new(cert: rcgen::Certificate, key: KeyPair, not_after: SystemTime) -> Authority {
        Authority {
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            key,
            not_after,
        }
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, IdentityError> {
        Ok(Issuer::from_ca_cert_der(&self.cert, &self.key)?)
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key in PKCS#8 PEM: a secret, to be written only with mode 0600.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs `csr` as a leaf for [`LEAF_LIFETIME`] from `now` when every identity it
    /// requests is in `permitted` (the requester's node ID and the services placed on that
    /// node) — the CA refuses anything else, whole. Only the public key and the requested
    /// SPIFFE IDs are taken from the request; every other field is set here.
    pub fn sign_leaf(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        site: &DnsLabel,
        permitted: &BTreeSet<SpiffeId>,
        now: SystemTime,
    ) -> Result<Leaf, IssueError> {
        self.sign_leaf_for(csr, site, permitted, now, LEAF_LIFETIME)
    }

    /// A node credential for `node` of `site` from its own request: exactly
    /// `spiffe://<site>/node/<node>`, valid for `lifetime` (see [`Authority::sign_leaf_for`]),
    /// returned as the PEM chain the node presents (the leaf, then this authority).
    pub fn sign_node_chain(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        site: &DnsLabel,
        node: &DnsLabel,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<String, IssueError> {
        let id = SpiffeId {
            site: site.clone(),
            workload: pimesh_schema::Workload::Node(node.clone()),
        };
        let leaf = self.sign_leaf_for(csr, site, &BTreeSet::from([id]), now, lifetime)?;
        Ok(format!("{}{}", leaf.pem, self.cert_pem))
    }

    /// [`Authority::sign_leaf`] with another lifetime (never past this authority's own
    /// expiry): for node credentials that an operator enrolls by hand.
    pub fn sign_leaf_for(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        site: &DnsLabel,
        permitted: &BTreeSet<SpiffeId>,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Leaf, IssueError> {
        let request = CertificateSigningRequestParams::from_der(csr)
            .map_err(|err| IssueError::MalformedRequest(err.to_string()))?;
        let mut identities = Vec::new();
        for name in &request.params.subject_alt_names {
            let SanType::URI(uri) = name else {
                return Err(IssueError::UnsupportedName(format!("{name:?}")));
            };
            let id: SpiffeId = uri
                .as_str()
                .parse()
                .map_err(|_| IssueError::UnsupportedName(uri.as_str().to_owned()))?;
            if &id.site != site {
                return Err(IssueError::ForeignSite(id.to_string()));
            }
            if !permitted.contains(&id) {
                return Err(IssueError::NotPermitted(id.to_string()));
            }
            identities.push(id);
        }
        if identities.is_empty() {
            return Err(IssueError::NoIdentity);
        }
        let lifetime = lifetime.min(self.not_after.duration_since(now).unwrap_or_default());
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(
            random_serial().ok_or_else(|| IssueError::Sign(IdentityError::Entropy.to_string()))?,
        );
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.subject_alt_names = identities
            .iter()
            .map(|id| id.to_string().try_into().map(SanType::URI))
            .collect::<Result<_, _>>()
            .map_err(|err: rcgen::Error| IssueError::Sign(err.to_string()))?;
        let issuer = self
            .issuer()
            .map_err(|err| IssueError::Sign(err.to_string()))?;
        let cert = params
            .signed_by(&request.public_key, &issuer)
            .map_err(|err| IssueError::Sign(err.to_string()))?;
        Ok(Leaf {
            pem: cert.pem(),
            der: cert.der().clone(),
            identities,
            not_before: now - BACKDATE,
            not_after: now + lifetime,
        })
    }
}

/// The SHA-256 of an anchor certificate (DER): the value a join token pins.
pub fn anchor_sha256(anchor: &CertificateDer<'_>) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, anchor);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The validity window of a certificate (DER): `(not_before, not_after)`.
pub fn cert_validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|err| IdentityError::Load(format!("certificate is not X.509: {err}")))?;
    let at = |time: x509_parser::time::ASN1Time| {
        let secs = time.timestamp();
        match u64::try_from(secs) {
            Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            Err(_) => SystemTime::UNIX_EPOCH,
        }
    };
    Ok((
        at(parsed.validity().not_before),
        at(parsed.validity().not_after),
    ))
}

/// Whether `cert` carries a signature by `ca`'s key (ECDSA P-256 with SHA-256, the only
/// algorithm a site uses). Checks the signature only — not validity, names or constraints:
/// it answers "which anchor of a bundle signed this issuer", not "is this chain trusted"
/// (that is [`crate::verify_leaf`]). `false` for anything unparsable.
pub fn issued_by(cert: &CertificateDer<'_>, ca: &CertificateDer<'_>) -> bool {
    let (Ok((_, cert)), Ok((_, ca))) = (
        x509_parser::parse_x509_certificate(cert),
        x509_parser::parse_x509_certificate(ca),
    ) else {
        return false;
    };
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        ca.public_key().subject_public_key.data.as_ref(),
    );
    key.verify(
        cert.tbs_certificate.as_ref(),
        cert.signature_value.data.as_ref(),
    )
    .is_ok()
}

/// [`anchor_sha256`] in lowercase hex, as a join token writes it.
pub fn anchor_sha256_hex(anchor: &CertificateDer<'_>) -> String {
    anchor_sha256(anchor)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn ca_params(
    common_name: &str,
    now: SystemTime,
    lifetime: Duration,
    path_len: Option<u8>,
) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "pimesh");
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
    params.serial_number = Some(random_serial().ok_or(IdentityError::Entropy)?);
    params.is_ca = IsCa::Ca(match path_len {
        Some(len) => BasicConstraints::Constrained(len),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A positive 128-bit serial number from the system's secure random source; `None` when
/// that source fails.
fn random_serial() -> Option<SerialNumber> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
    bytes[0] &= 0x7f;
    Some(SerialNumber::from_slice(&bytes))
}

impl Authority {
    /// A serving certificate for the process that holds this authority itself (a control
    /// replica signing its own TLS certificate), valid for [`LEAF_LIFETIME`] from `now`
    /// (never past this authority's own expiry), with a fresh ECDSA P-256 key made here.
    ///
    /// Unlike [`Authority::sign_leaf`], which signs only SPIFFE IDs for a requester, this
    /// leaf also names `dns_names` and `ips`, so that ordinary TLS clients can check the
    /// host they dialled; it is for server authentication only (no `clientAuth`), so it
    /// cannot be used as a node credential. The caller picks `id`: nothing checks it
    /// against a placement, as the key never leaves the authority's own process.
    pub fn issue_server_leaf(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        now: SystemTime,
    ) -> Result<(Leaf, KeyPair), IssueError> {
        let sign = |err: rcgen::Error| IssueError::Sign(err.to_string());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign)?;
        let lifetime = LEAF_LIFETIME.min(self.not_after.duration_since(now).unwrap_or_default());
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(
            random_serial().ok_or_else(|| IssueError::Sign(IdentityError::Entropy.to_string()))?,
        );
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let mut names = vec![SanType::URI(id.to_string().try_into().map_err(sign)?)];
        for name in dns_names {
            names.push(SanType::DnsName(name.as_str().try_into().map_err(sign)?));
        }
        names.extend(ips.iter().copied().map(SanType::IpAddress));
        params.subject_alt_names = names;
        let issuer = self
            .issuer()
            .map_err(|err| IssueError::Sign(err.to_string()))?;
        let cert = params.signed_by(&key, &issuer).map_err(sign)?;
        let leaf = Leaf {
            pem: cert.pem(),
            der: cert.der().clone(),
            identities: vec![id.clone()],
            not_before: now - BACKDATE,
            not_after: now + lifetime,
        };
        Ok((leaf, key))
    }
}
