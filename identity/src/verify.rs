use std::time::SystemTime;

use pimesh_schema::DnsLabel;
use rustls_pki_types::{CertificateDer, UnixTime};

use pimesh_schema::SpiffeId;

use crate::VerifyError;

/// What the verified certificate is presented for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A proxy accepting a connection checks the caller's certificate.
    Client,
    /// A proxy connecting checks the server's certificate.
    Server,
}

/// Verifies that `leaf`, with `intermediates` (the issuer), chains to one of `anchors`, is
/// valid at `now` for `usage`, and carries at least one SPIFFE ID of `site`; returns those
/// IDs. Anchors are a bundle: during an anchor rotation both the old and the new are there.
pub fn verify_leaf(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    anchors: &[CertificateDer<'_>],
    site: &DnsLabel,
    usage: Usage,
    now: SystemTime,
) -> Result<Vec<SpiffeId>, VerifyError> {
    let trust: Vec<_> = anchors
        .iter()
        .map(|anchor| webpki::anchor_from_trusted_cert(anchor).map(|a| a.to_owned()))
        .collect::<Result<_, _>>()
        .map_err(|err| VerifyError::Chain(format!("unusable anchor: {err}")))?;
    let cert =
        webpki::EndEntityCert::try_from(leaf).map_err(|err| VerifyError::Chain(err.to_string()))?;
    let time = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let key_usage = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    cert.verify_for_usage(
        &[webpki::ring::ECDSA_P256_SHA256],
        &trust,
        intermediates,
        time,
        key_usage,
        None,
        None,
    )
    .map_err(|err| match err {
        // Anchors and issuers of a site share their names across rotations, so a chain
        // under another anchor usually finds a same-named candidate whose signature fails.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            VerifyError::UnknownIssuer(err.to_string())
        }
        webpki::Error::CertExpired { .. } => VerifyError::Expired(err.to_string()),
        webpki::Error::CertNotValidYet { .. } => VerifyError::NotValidYet(err.to_string()),
        _ => VerifyError::Chain(err.to_string()),
    })?;
    let ids: Vec<SpiffeId> = leaf_identities(leaf)?
        .into_iter()
        .filter(|id| &id.site == site)
        .collect();
    if ids.is_empty() {
        return Err(VerifyError::NoIdentity);
    }
    Ok(ids)
}

/// The SPIFFE IDs in a certificate's subject alternative names, of any site, without
/// checking the certificate in any other way (use [`verify_leaf`] for trust).
pub fn leaf_identities(leaf: &CertificateDer<'_>) -> Result<Vec<SpiffeId>, VerifyError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|err| VerifyError::Chain(err.to_string()))?;
    let names = parsed
        .subject_alternative_name()
        .map_err(|err| VerifyError::Chain(err.to_string()))?
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    Ok(names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => uri.parse::<SpiffeId>().ok(),
            _ => None,
        })
        .collect())
}
