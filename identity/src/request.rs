use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::CertificateSigningRequestDer;

use pimesh_schema::SpiffeId;

use crate::IdentityError;

/// A fresh leaf key and the signing request for it, made where the key will be used: the
/// private key stays in this process (and in the files the caller writes with mode 0600).
pub struct LeafRequest {
    pub key: KeyPair,
    pub csr: CertificateSigningRequestDer<'static>,
    /// `csr` as a PEM `CERTIFICATE REQUEST` block, for files and operators.
    pub csr_pem: String,
}

impl LeafRequest {
    /// A new ECDSA P-256 key and a CSR for `identities`.
    pub fn new(identities: &[SpiffeId]) -> Result<LeafRequest, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = identities
            .iter()
            .map(|id| id.to_string().try_into().map(SanType::URI))
            .collect::<Result<_, _>>()?;
        let csr = params.serialize_request(&key)?;
        Ok(LeafRequest {
            csr: csr.der().clone(),
            csr_pem: csr.pem()?,
            key,
        })
    }
}
