//! Whom a site trusts: its name and its anchor bundle.
//!
//! A bundle holds one anchor, or two during an anchor rotation (the old and the new): a
//! chain to either is trusted. Anchors and issuers of one site share their names across
//! rotations, so an anchor is told apart from another only by its key.

use std::fmt;
use std::sync::Arc;

use pimesh_schema::DnsLabel;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

/// A site and the anchors its peers' chains must lead to.
///
/// Invariants: at least one anchor; each parses as a webpki trust anchor. Cloning is cheap
/// (the anchors are shared).
#[derive(Clone)]
pub struct SiteTrust {
    site: DnsLabel,
    anchors: Arc<[CertificateDer<'static>]>,
}

impl fmt::Debug for SiteTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteTrust")
            .field("site", &self.site.as_str())
            .field("anchors", &self.anchors.len())
            .finish()
    }
}

/// Why a bundle cannot be trusted.
#[derive(Debug)]
pub enum TrustError {
    /// The bundle holds no anchor.
    NoAnchor,
    /// The anchor at `index` (from 0, in bundle order) is not a usable trust anchor.
    Anchor { index: usize, err: rustls::Error },
}

impl fmt::Display for TrustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustError::NoAnchor => f.write_str("expected one or more anchors, found none"),
            TrustError::Anchor { index, err } => {
                write!(f, "anchor {} of the bundle is unusable: {err}", index + 1)
            }
        }
    }
}

impl std::error::Error for TrustError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TrustError::NoAnchor => None,
            TrustError::Anchor { err, .. } => Some(err),
        }
    }
}

impl SiteTrust {
    /// The trust of `site` in `anchors`; see the invariants of [`SiteTrust`].
    pub fn new(
        site: DnsLabel,
        anchors: Vec<CertificateDer<'static>>,
    ) -> Result<SiteTrust, TrustError> {
        root_store(&anchors)?;
        Ok(SiteTrust {
            site,
            anchors: anchors.into(),
        })
    }

    pub fn site(&self) -> &DnsLabel {
        &self.site
    }

    /// The bundle, in the order given.
    pub fn anchors(&self) -> &[CertificateDer<'static>] {
        &self.anchors
    }
}

/// A root store of `anchors` for rustls' own (webpki) verifiers; at least one anchor.
pub fn root_store(anchors: &[CertificateDer<'static>]) -> Result<RootCertStore, TrustError> {
    if anchors.is_empty() {
        return Err(TrustError::NoAnchor);
    }
    let mut roots = RootCertStore::empty();
    for (index, anchor) in anchors.iter().enumerate() {
        roots
            .add(anchor.clone())
            .map_err(|err| TrustError::Anchor { index, err })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{label, Site};

    #[test]
    fn a_bundle_needs_an_anchor_and_every_anchor_must_parse() {
        let site = Site::backdated("depot-7");
        let err = SiteTrust::new(label("depot-7"), Vec::new()).expect_err("empty");
        assert!(matches!(err, TrustError::NoAnchor), "{err:?}");

        let garbage = CertificateDer::from(b"not a certificate".to_vec());
        let anchors = vec![site.root.anchor.cert_der().clone(), garbage];
        let err = SiteTrust::new(label("depot-7"), anchors).expect_err("garbage");
        assert!(
            matches!(err, TrustError::Anchor { index: 1, .. }),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("anchor 2 "), "{err}");

        let trust = SiteTrust::new(label("depot-7"), vec![site.root.anchor.cert_der().clone()])
            .expect("one anchor");
        assert_eq!(trust.site(), &label("depot-7"));
        assert_eq!(trust.anchors().len(), 1);
    }
}
