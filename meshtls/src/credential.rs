//! What a TLS endpoint presents: a certificate chain and the private key of its leaf.
//!
//! Nothing here checks *whom* the chain is for or whether it is trusted (that is
//! [`pimesh_identity::verify_leaf`] and [`crate::SpiffeVerifier`]); a [`Credential`] only
//! guarantees that the endpoint can prove it holds the leaf.

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::InconsistentKeys;

use crate::pem::{self, PemError};
use crate::provider::provider;

/// A certificate chain (leaf first, then its issuers) and the leaf's private key, loaded
/// for signing.
///
/// Invariants: the chain is not empty; the key is one the ring provider signs with; its
/// public key is the leaf's. Cloning is cheap (the key is shared).
#[derive(Clone)]
pub struct Credential {
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("chain", &self.certified.cert.len())
            .finish_non_exhaustive()
    }
}

/// Why a chain and a key do not make a [`Credential`].
#[derive(Debug)]
pub enum CredentialError {
    /// The chain's PEM text holds no certificate, or is not PEM.
    Chain(PemError),
    /// The key's PEM text holds no private key, or is not PEM.
    Key(PemError),
    /// The chain is empty.
    EmptyChain,
    /// The ring provider cannot sign with the key (not ECDSA P-256/P-384, Ed25519 or RSA,
    /// or malformed).
    UnsupportedKey(rustls::Error),
    /// The key is not the leaf's: their public keys differ.
    KeyMismatch,
    /// The leaf cannot be parsed to compare its public key with the key's.
    Leaf(rustls::Error),
}

impl fmt::Display for CredentialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialError::Chain(err) | CredentialError::Key(err) => err.fmt(f),
            CredentialError::EmptyChain => f.write_str("expected a certificate chain, found none"),
            CredentialError::UnsupportedKey(err) => {
                write!(f, "expected an ECDSA P-256 PKCS#8 key: {err}")
            }
            CredentialError::KeyMismatch => {
                f.write_str("the key does not belong to the leaf certificate")
            }
            CredentialError::Leaf(err) => write!(f, "the leaf certificate is not usable: {err}"),
        }
    }
}

impl std::error::Error for CredentialError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CredentialError::Chain(err) | CredentialError::Key(err) => Some(err),
            CredentialError::UnsupportedKey(err) | CredentialError::Leaf(err) => Some(err),
            CredentialError::EmptyChain | CredentialError::KeyMismatch => None,
        }
    }
}

impl Credential {
    /// `chain` (leaf first) with the leaf's `key`; see the invariants of [`Credential`].
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Credential, CredentialError> {
        if chain.is_empty() {
            return Err(CredentialError::EmptyChain);
        }
        let signing_key = provider()
            .key_provider
            .load_private_key(key)
            .map_err(CredentialError::UnsupportedKey)?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(
                InconsistentKeys::KeyMismatch | InconsistentKeys::Unknown,
            )) => return Err(CredentialError::KeyMismatch),
            Err(err) => return Err(CredentialError::Leaf(err)),
        }
        Ok(Credential {
            certified: Arc::new(certified),
        })
    }

    /// [`Credential::new`] from PEM text: the chain's `CERTIFICATE` blocks and the key.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Credential, CredentialError> {
        let chain = pem::certificates(chain_pem).map_err(CredentialError::Chain)?;
        let key = pem::private_key(key_pem).map_err(CredentialError::Key)?;
        Credential::new(chain, key)
    }

    /// The chain presented: the leaf, then its issuers.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Site, DAY};

    #[test]
    fn a_chain_and_its_own_key_make_a_credential() {
        let site = Site::backdated("depot-7");
        let cred = site.credential("pi-a", &[], site.now, DAY);
        let credential =
            Credential::from_pem(cred.chain.as_bytes(), cred.key.as_bytes()).expect("loads");
        assert_eq!(credential.chain().len(), 2, "leaf and issuer");
        assert_eq!(&credential.chain()[1], site.root.issuer.cert_der());
    }

    #[test]
    fn another_leafs_key_a_missing_key_and_no_chain_are_refused() {
        let site = Site::backdated("depot-7");
        let cred = site.credential("pi-a", &[], site.now, DAY);
        let other = site.credential("pi-a", &[], site.now, DAY);

        let err = Credential::from_pem(cred.chain.as_bytes(), other.key.as_bytes())
            .expect_err("foreign key");
        assert!(matches!(err, CredentialError::KeyMismatch), "{err:?}");
        assert!(
            err.to_string().contains("does not belong to the leaf"),
            "{err}"
        );

        let err = Credential::from_pem(cred.chain.as_bytes(), b"not a key").expect_err("no key");
        assert!(matches!(err, CredentialError::Key(_)), "{err:?}");

        let err = Credential::from_pem(b"hello", cred.key.as_bytes()).expect_err("no chain");
        assert!(matches!(err, CredentialError::Chain(_)), "{err:?}");

        let key = pem::private_key(cred.key.as_bytes()).expect("key");
        let err = Credential::new(Vec::new(), key).expect_err("empty chain");
        assert!(matches!(err, CredentialError::EmptyChain), "{err:?}");
    }
}
