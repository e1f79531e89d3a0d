//! Which key a certificate or a signing request is for, as the SHA-256 of its DER
//! SubjectPublicKeyInfo: how a node's credential is named in its heartbeats
//! (`credential`), and how a control replica compares a join's key with a live node's.

use std::fmt;

use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer as _;
use x509_parser::x509::SubjectPublicKeyInfo;

/// Why no key digest can be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// Not a DER certificate (or signing request); the string is the parser's reason.
    Malformed(String),
    /// The key is not an ECDSA P-256 key (the only kind the site issues for).
    NotP256,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Malformed(why) => write!(f, "cannot read the public key: {why}"),
            KeyError::NotP256 => f.write_str("the public key is not an ECDSA P-256 key"),
        }
    }
}

impl std::error::Error for KeyError {}

/// The SHA-256 of the SubjectPublicKeyInfo of `cert` (any key type).
pub fn certificate_key_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], KeyError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|err| KeyError::Malformed(err.to_string()))?;
    Ok(sha256(parsed.public_key().raw))
}

/// The SHA-256 of the SubjectPublicKeyInfo that `csr` asks to certify, which must be an
/// ECDSA P-256 key. The request's self-signature is not checked here (signing it does).
pub fn request_key_sha256(csr: &CertificateSigningRequestDer<'_>) -> Result<[u8; 32], KeyError> {
    let (_, parsed) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr.as_ref())
            .map_err(|err| KeyError::Malformed(err.to_string()))?;
    let key = &parsed.certification_request_info.subject_pki;
    if !is_p256(key) {
        return Err(KeyError::NotP256);
    }
    Ok(sha256(key.raw))
}

fn is_p256(key: &SubjectPublicKeyInfo<'_>) -> bool {
    key.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && key
            .algorithm
            .parameters
            .as_ref()
            .and_then(|parameters| parameters.as_oid().ok())
            .is_some_and(|curve| curve == OID_EC_P256)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LeafRequest, TrustRoot};
    use pimesh_schema::{DnsLabel, SpiffeId};
    use std::collections::BTreeSet;
    use std::time::SystemTime;

    #[test]
    fn a_certificate_and_its_request_name_the_same_key() {
        let site = DnsLabel::try_from("depot-7".to_owned()).expect("label");
        let node = DnsLabel::try_from("pi-a".to_owned()).expect("label");
        let root = TrustRoot::generate(&site, SystemTime::now()).expect("root");
        let id = SpiffeId::node(&site, &node);
        let request = LeafRequest::new(std::slice::from_ref(&id)).expect("request");
        let leaf = root
            .issuer
            .sign_leaf(
                &request.csr,
                &site,
                &BTreeSet::from([id.clone()]),
                SystemTime::now(),
            )
            .expect("leaf");
        let from_request = request_key_sha256(&request.csr).expect("P-256");
        assert_eq!(certificate_key_sha256(&leaf.der), Ok(from_request));
        let other = LeafRequest::new(&[id]).expect("request");
        assert_ne!(request_key_sha256(&other.csr), Ok(from_request));
        let garbage = CertificateSigningRequestDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(
            request_key_sha256(&garbage),
            Err(KeyError::Malformed(_))
        ));
    }

    #[test]
    fn a_request_for_another_kind_of_key_is_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://depot-7/node/pi-a".try_into().expect("uri"),
        )];
        let csr = params.serialize_request(&key).expect("csr");
        assert_eq!(request_key_sha256(csr.der()), Err(KeyError::NotP256));
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let csr = params.serialize_request(&p384).expect("csr");
        assert_eq!(request_key_sha256(csr.der()), Err(KeyError::NotP256));
    }
}
