//! PEM text to DER: the certificate lists (chains, anchor bundles, CA bundles) and private
//! keys that Pimesh parts read from files, seeds and answers.
//!
//! Invariant: [`certificates`] never returns an empty list; a text without a
//! `CERTIFICATE` block is an error, not "trust nothing".

use std::fmt;

use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why PEM text does not hold what was asked of it.
#[derive(Debug)]
pub enum PemError {
    /// Certificates were asked for and the text is not well-formed PEM.
    Certificates(pem::Error),
    /// Certificates were asked for and the text holds no `CERTIFICATE` block.
    NoCertificate,
    /// A private key was asked for and the text holds none (`PRIVATE KEY`,
    /// `EC PRIVATE KEY` or `RSA PRIVATE KEY`), or is not well-formed PEM.
    Key(pem::Error),
}

impl fmt::Display for PemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PemError::Certificates(err) => write!(f, "expected PEM certificates: {err}"),
            PemError::NoCertificate => {
                f.write_str("expected PEM certificates, found no CERTIFICATE block")
            }
            PemError::Key(err) => write!(f, "expected a PEM private key: {err}"),
        }
    }
}

impl std::error::Error for PemError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PemError::Certificates(err) | PemError::Key(err) => Some(err),
            PemError::NoCertificate => None,
        }
    }
}

/// Every `CERTIFICATE` block of `text`, in order; at least one. Blocks of other kinds
/// (keys, requests) are skipped.
pub fn certificates(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(PemError::Certificates)?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(certs)
}

/// The first private key of `text` (PKCS#8, SEC1 or PKCS#1).
pub fn private_key(text: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(text).map_err(PemError::Key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Site;

    #[test]
    fn a_bundle_gives_every_certificate_and_nothing_is_an_error() {
        let site = Site::backdated("depot-7");
        let other = Site::backdated("depot-7");
        let bundle = format!(
            "{}{}",
            site.root.anchor.cert_pem(),
            other.root.anchor.cert_pem()
        );
        let certs = certificates(bundle.as_bytes()).expect("two anchors");
        assert_eq!(
            certs,
            [
                site.root.anchor.cert_der().clone(),
                other.root.anchor.cert_der().clone()
            ]
        );

        let err = certificates(b"no certificates here\n").expect_err("none");
        assert!(matches!(err, PemError::NoCertificate), "{err:?}");
        assert!(
            err.to_string().contains("found no CERTIFICATE block"),
            "{err}"
        );
        let torn = &bundle[..bundle.len() / 3];
        assert!(matches!(
            certificates(torn.as_bytes()),
            Err(PemError::Certificates(_))
        ));
    }

    #[test]
    fn a_key_is_read_and_its_absence_is_named() {
        let site = Site::backdated("depot-7");
        let cred = site.credential("pi-a", &[], site.now, crate::testing::DAY);
        assert!(private_key(cred.key.as_bytes()).is_ok());
        let err = private_key(cred.chain.as_bytes()).expect_err("a chain is no key");
        assert!(matches!(err, PemError::Key(_)), "{err:?}");
        assert!(
            err.to_string().starts_with("expected a PEM private key"),
            "{err}"
        );
    }
}
