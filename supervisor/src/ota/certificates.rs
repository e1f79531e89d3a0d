//! When the node's certificates expire, as its reports to the central server carry them
//! (so that the operator's dashboard shows a node whose certificate is about to lapse).
//! Read from the files the node uses: its certificate chain (its own certificate, then
//! the issuer that signed it) and the anchors it trusts (the site's trust folder on a
//! server, the joined node's `anchor.pem` elsewhere). A file that cannot be read leaves
//! its date out; it is not an error of the report.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use pimesh_revision::CertificateDates;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

use crate::credential::CredentialFiles;
use crate::trust::store::ANCHOR_BUNDLE;
use crate::trust::TrustFiles;

/// The certificates of `path` (PEM), none when it cannot be read.
fn certificates(path: &Path) -> Vec<CertificateDer<'static>> {
    let Ok(pem) = std::fs::read(path) else {
        return Vec::new();
    };
    CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect()
}

fn not_after(cert: &CertificateDer<'_>) -> Option<u64> {
    let (_, not_after) = pimesh_identity::cert_validity(cert).ok()?;
    not_after
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|since| since.as_secs())
}

/// The node's certificate dates now; `None` when it has no certificate yet.
pub fn dates(credential: &CredentialFiles, trust: &TrustFiles) -> Option<CertificateDates> {
    let chain = certificates(&credential.chain());
    let node = chain.first().and_then(not_after);
    let issuer = chain.get(1).and_then(not_after);
    let site_bundle = trust.dir.join(ANCHOR_BUNDLE);
    let anchors = if site_bundle.exists() {
        certificates(&site_bundle)
    } else {
        certificates(&credential.anchors())
    };
    let anchor = anchors.iter().filter_map(not_after).min();
    let dates = CertificateDates {
        node,
        issuer,
        anchor,
    };
    (dates != CertificateDates::default()).then_some(dates)
}

/// Whole days from `now` until `at` (negative once past), for logs.
pub fn days_left(at: u64, now: SystemTime) -> i64 {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    (i64::try_from(at).unwrap_or(i64::MAX) - i64::try_from(now).unwrap_or(0)) / 86_400
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dates_come_from_the_chain_and_the_earliest_anchor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let site = pimesh_test_support::Site::new("depot-7");
        let credential = CredentialFiles::new(dir.path().join("identity"));
        let trust = TrustFiles::on_node(&crate::paths::NodePaths::under(dir.path()));
        assert_eq!(dates(&credential, &trust), None, "no certificate yet");

        std::fs::create_dir_all(&credential.dir).expect("mkdir");
        let (chain, _) = site.node_credential_pem("pi-a");
        std::fs::write(credential.chain(), &chain).expect("chain");
        std::fs::write(credential.anchors(), site.root.anchor.cert_pem()).expect("anchor");
        let read = dates(&credential, &trust).expect("dates");
        let certs = certificates(&credential.chain());
        assert_eq!(read.node, not_after(&certs[0]));
        assert_eq!(read.issuer, not_after(&certs[1]));
        let anchor = certificates(&credential.anchors());
        assert_eq!(read.anchor, not_after(&anchor[0]));
        let (node, issuer, anchor) = (
            read.node.expect("node"),
            read.issuer.expect("issuer"),
            read.anchor.expect("anchor"),
        );
        assert!(node <= issuer && issuer <= anchor, "{read:?}");
        assert!(days_left(node, SystemTime::now()) >= 0);
    }
}
