//! PEM files (anchors, chains, handovers) and the certificates in them: read, dated and
//! checked against themselves as anchors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pimesh_identity::Usage;
use pimesh_schema::DnsLabel;

fuzz_target!(|data: &[u8]| {
    let certs = match pimesh_meshtls::pem::certificates(data) {
        Ok(certs) => certs,
        Err(_) => vec![rustls_pki_types::CertificateDer::from(data.to_vec())],
    };
    let Ok(site) = DnsLabel::try_from("depot-7".to_owned()) else {
        return;
    };
    for cert in &certs {
        let _ = pimesh_identity::cert_validity(cert);
        let _ = pimesh_identity::certificate_key_sha256(cert);
        let _ = pimesh_identity::verify_leaf(
            cert,
            &[],
            &certs,
            &site,
            Usage::Client,
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
        );
    }
    let csr = rustls_pki_types::CertificateSigningRequestDer::from(data);
    let _ = pimesh_identity::request_key_sha256(&csr);
});
