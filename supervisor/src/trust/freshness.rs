//! Which of two states of a site's trust is the newer, read from the certificates alone.
//!
//! Only a node holding an anchor key changes the site's trust, one [`super::lifecycle`]
//! step at a time: a new issuer (a rotation, or `anchor switch` to the next anchor), a next
//! anchor added to the bundle (`anchor begin`), the anchor before it dropped (`anchor
//! finish`). Server nodes that received the issuer through the join protocol follow the
//! holder by taking any state that ranks above their own, ordered by
//! 1. the issuer's `notBefore` (every new issuer is made after the one it replaces);
//! 2. for the same issuer, the newest anchor's `notBefore` (`begin` adds an anchor made
//!    after every anchor of the bundle);
//! 3. then fewer anchors older than the one that signed the issuer (`finish` drops them).
//!
//! Invariant: every step of the lifecycle moves the rank strictly up (certificates count
//! whole seconds: two issuers made within the same second rank alike) and nothing else
//! changes it, so a node that only ever takes a strictly higher rank never goes back to a
//! state the holder has left, whichever server it hears it from.

use std::cmp::Reverse;
use std::path::Path;
use std::time::SystemTime;

use pimesh_identity::{cert_validity, issued_by};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

use super::error::TrustError;

/// The place of one trust state in the holder's sequence of changes (compare with `<`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    issuer_from: SystemTime,
    newest_anchor_from: SystemTime,
    retired_anchors: Reverse<usize>,
}

/// The rank of the state made of `issuer_pem` (the issuer's certificate) and
/// `anchors_pem` (the bundle); `source` names where they were read for errors.
pub fn rank(issuer_pem: &str, anchors_pem: &str, source: &Path) -> Result<Rank, TrustError> {
    let not_pem = |expected: &'static str| {
        move |err| TrustError::NotPem {
            path: source.to_path_buf(),
            expected,
            source: err,
        }
    };
    let issuer = CertificateDer::from_pem_slice(issuer_pem.as_bytes())
        .map_err(not_pem("the issuer's PEM certificate"))?;
    let anchors: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(anchors_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(not_pem("the site's PEM anchors"))?;
    let validity = |der: &CertificateDer<'_>| {
        cert_validity(der)
            .map(|(not_before, _)| not_before)
            .map_err(TrustError::authority(source))
    };
    let issuer_from = validity(&issuer)?;
    let mut froms = Vec::with_capacity(anchors.len());
    for anchor in &anchors {
        froms.push(validity(anchor)?);
    }
    let Some(newest_anchor_from) = froms.iter().max().copied() else {
        return Err(TrustError::NoCertificates {
            path: source.to_path_buf(),
        });
    };
    let signer_from = anchors
        .iter()
        .zip(&froms)
        .find(|(anchor, _)| issued_by(&issuer, anchor))
        .map(|(_, from)| *from);
    let retired = match signer_from {
        Some(signer_from) => froms.iter().filter(|from| **from < signer_from).count(),
        None => froms.len(),
    };
    Ok(Rank {
        issuer_from,
        newest_anchor_from,
        retired_anchors: Reverse(retired),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pimesh_identity::Authority;
    use pimesh_schema::DnsLabel;

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn at(days: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + DAY * days as u32
    }

    fn site() -> DnsLabel {
        DnsLabel::try_from("depot-7".to_owned()).expect("label")
    }

    fn of(issuer: &Authority, anchors: &[&Authority]) -> Rank {
        let bundle: String = anchors.iter().map(|anchor| anchor.cert_pem()).collect();
        rank(issuer.cert_pem(), &bundle, Path::new("test")).expect("rank")
    }

    /// The states an anchor key holder goes through, in order: each ranks above the one
    /// before, so a follower takes every step and never steps back.
    #[test]
    fn every_lifecycle_step_ranks_above_the_state_before() {
        let a = Authority::new_anchor(&site(), at(0)).expect("anchor a");
        let first = a.new_issuer(&site(), at(0)).expect("issuer");
        let rotated = a.new_issuer(&site(), at(200)).expect("rotated issuer");
        let b = Authority::new_anchor(&site(), at(300)).expect("anchor b");
        let switched = b.new_issuer(&site(), at(310)).expect("switched issuer");
        let c = Authority::new_anchor(&site(), at(600)).expect("anchor c");
        let steps = [
            ("steady", of(&first, &[&a])),
            ("issuer rotated", of(&rotated, &[&a])),
            ("anchor begin", of(&rotated, &[&a, &b])),
            ("anchor switch", of(&switched, &[&a, &b])),
            ("anchor finish", of(&switched, &[&b])),
            ("the next begin", of(&switched, &[&b, &c])),
        ];
        for pair in steps.windows(2) {
            let ((before, old), (after, new)) = (&pair[0], &pair[1]);
            assert!(old < new, "{after} must rank above {before}");
        }
        assert_eq!(of(&switched, &[&b]), of(&switched, &[&b]));
    }

    #[test]
    fn garbage_names_its_source() {
        let err = rank("not pem", "", Path::new("the issuer handed over")).unwrap_err();
        assert!(err.to_string().contains("the issuer handed over"), "{err}");
    }
}
