//! Certificates as PEM text, as the identity and join APIs hand them out.

use rustls_pki_types::CertificateDer;

use crate::state::Snapshot;

/// The content type of PEM answers.
pub const CONTENT_TYPE: &str = "application/x-pem-file";

/// One DER certificate as a PEM `CERTIFICATE` block with 64-column lines.
pub fn certificate(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The anchors of `snapshot` (the trust bundle), one PEM block each.
pub fn anchors(snapshot: &Snapshot) -> String {
    snapshot
        .trust
        .anchors
        .iter()
        .map(|a| certificate(a))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pimesh_identity::TrustRoot;
    use pimesh_schema::DnsLabel;
    use rustls_pki_types::pem::PemObject as _;

    #[test]
    fn a_certificate_is_written_as_pem_that_reads_back() {
        let site = DnsLabel::try_from("depot-7".to_owned()).expect("label");
        let root = TrustRoot::generate(&site, std::time::SystemTime::now()).expect("root");
        let pem = certificate(root.anchor.cert_der());
        let back: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("PEM");
        assert_eq!(back, vec![root.anchor.cert_der().clone()]);
    }
}
