//! Operator requests: what only a site's operators may ask of the central server (its
//! rollouts, its stored revisions, pausing or aborting a rollout). The site key that signs
//! revisions is the site's own operator credential; a person may also have a key of their
//! own, which the central server's configuration names with a role for that site. Each
//! request carries
//!
//! ```text
//! Authorization: Pimesh-Operator site=<site>[,op=<name>],t=<milliseconds since the epoch>,sig=<base64 Ed25519>
//! ```
//!
//! `site` names the site, for resources whose path names none (the fleet view); where the
//! path names a site, that one counts. `op` names the person whose key signed; without it
//! the site key signed.
//!
//! The signature covers a domain-separated, length-prefixed encoding of the site, the
//! method, the path with its query, the time and the SHA-256 of the body (see [`payload`]),
//! so a signature for one site, resource, body or time is worth nothing for another. The
//! server accepts a time within [`MAX_SKEW_MS`] of its clock; requests that change state
//! must also be newer than the last one it accepted (the caller keeps that), so a captured
//! request cannot be replayed.

use std::fmt;

use base64::Engine as _;
use pimesh_schema::{DnsLabel, SigningKey};

use crate::signed::SignError;

/// The `Authorization` scheme.
pub const SCHEME: &str = "Pimesh-Operator";
/// How far the request's time may be from the server's clock.
pub const MAX_SKEW_MS: u64 = 5 * 60 * 1000;
const DOMAIN: &[u8] = b"pimesh-operator/1\0";
/// A person's signature: the person's name is covered too, so a signature cannot be passed
/// off as another person's (nor as the site key's).
const PERSON_DOMAIN: &[u8] = b"pimesh-operator-person/1\0";

/// The bytes an operator request's signature covers; `op`: the person who signs, `None`
/// for the site key.
pub fn payload(
    site: &DnsLabel,
    op: Option<&str>,
    method: &str,
    path_and_query: &str,
    at_ms: u64,
    body: &[u8],
) -> Vec<u8> {
    let mut payload = Vec::with_capacity(128);
    let mut parts = vec![
        site.as_str().as_bytes(),
        method.as_bytes(),
        path_and_query.as_bytes(),
    ];
    match op {
        Some(op) => {
            payload.extend_from_slice(PERSON_DOMAIN);
            parts.insert(0, op.as_bytes());
        }
        None => payload.extend_from_slice(DOMAIN),
    }
    for part in parts {
        payload.extend_from_slice(&(part.len() as u64).to_be_bytes());
        payload.extend_from_slice(part);
    }
    payload.extend_from_slice(&at_ms.to_be_bytes());
    payload.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, body).as_ref());
    payload
}

/// The `Authorization` header value for a request, signed with the site key (PKCS#8, as
/// `pimeshctl site init` writes it).
pub fn authorization(
    site_key_pkcs8: &[u8],
    site: &DnsLabel,
    method: &str,
    path_and_query: &str,
    at_ms: u64,
    body: &[u8],
) -> Result<String, SignError> {
    authorization_as(
        site_key_pkcs8,
        None,
        site,
        method,
        path_and_query,
        at_ms,
        body,
    )
}

/// [`authorization`] with the key (PKCS#8) of the person `op`, or of the site when `op` is
/// `None`.
pub fn authorization_as(
    key_pkcs8: &[u8],
    op: Option<&str>,
    site: &DnsLabel,
    method: &str,
    path_and_query: &str,
    at_ms: u64,
    body: &[u8],
) -> Result<String, SignError> {
    let key = ring::signature::Ed25519KeyPair::from_pkcs8(key_pkcs8)
        .map_err(SignError::NotEd25519Pkcs8)?;
    let signature = key.sign(&payload(site, op, method, path_and_query, at_ms, body));
    let signature = base64::engine::general_purpose::STANDARD.encode(signature.as_ref());
    let person = op.map(|op| format!(",op={op}")).unwrap_or_default();
    Ok(format!(
        "{SCHEME} site={site}{person},t={at_ms},sig={signature}"
    ))
}

/// The person an operator request's header says signed it (`op=`), unchecked: `None` for
/// the site key. The caller picks that person's key for [`verify`].
pub fn claimed_operator(header: Option<&str>) -> Option<&str> {
    header?
        .strip_prefix(SCHEME)?
        .strip_prefix(' ')?
        .split(',')
        .find_map(|part| part.trim().strip_prefix("op="))
}

/// The site an operator request's header names (`site=`), unchecked: the signature of
/// that site's key is checked by [`verify`].
pub fn claimed_site(header: Option<&str>) -> Option<&str> {
    header?
        .strip_prefix(SCHEME)?
        .strip_prefix(' ')?
        .split(',')
        .find_map(|part| part.trim().strip_prefix("site="))
}

/// Why an operator request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header, or not of this scheme.
    Missing,
    /// The header is not `Pimesh-Operator t=<ms>,sig=<base64>`.
    Malformed,
    /// The signature does not verify with the site's key.
    BadSignature,
    /// The request's time is too far from the server's clock.
    Stale { at_ms: u64, now_ms: u64 },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Missing => write!(
                f,
                "this needs the site's operator: an Authorization: {SCHEME} header signed with \
                 the site key (pimeshctl sends it with --site-dir)"
            ),
            Refusal::Malformed => write!(
                f,
                "expected Authorization: {SCHEME} site=<site>,t=<milliseconds>,sig=<base64 signature>"
            ),
            Refusal::BadSignature => f.write_str(
                "the operator signature does not verify with this site's key (another \
                 site's key, or a changed request)",
            ),
            Refusal::Stale { at_ms, now_ms } => write!(
                f,
                "the request was signed at {at_ms} ms and the server's clock reads {now_ms} ms: \
                 more than {} s apart (check this machine's clock)",
                MAX_SKEW_MS / 1000
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// Checks an operator request's `Authorization` header against `key` (the site's, or that
/// of the person the header names: [`claimed_operator`]) at `now_ms`; returns the
/// request's time.
pub fn verify(
    header: Option<&str>,
    key: &SigningKey,
    site: &DnsLabel,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    now_ms: u64,
) -> Result<u64, Refusal> {
    let credentials = header
        .and_then(|value| value.strip_prefix(SCHEME))
        .and_then(|rest| rest.strip_prefix(' '))
        .ok_or(Refusal::Missing)?;
    let (mut at_ms, mut signature, mut op) = (None, None, None);
    for part in credentials.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => at_ms = value.parse::<u64>().ok(),
            Some(("sig", value)) => signature = Some(value),
            Some(("op", value)) => op = Some(value),
            Some(("site", _)) => {}
            _ => return Err(Refusal::Malformed),
        }
    }
    let (Some(at_ms), Some(signature)) = (at_ms, signature) else {
        return Err(Refusal::Malformed);
    };
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| Refusal::Malformed)?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key.as_bytes())
        .verify(
            &payload(site, op, method, path_and_query, at_ms, body),
            &signature,
        )
        .map_err(|_| Refusal::BadSignature)?;
    if at_ms.abs_diff(now_ms) > MAX_SKEW_MS {
        return Err(Refusal::Stale { at_ms, now_ms });
    }
    Ok(at_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    fn key() -> (Vec<u8>, SigningKey) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
        let public = format!(
            "ed25519:{}",
            base64::engine::general_purpose::STANDARD
                .encode(ring::signature::KeyPair::public_key(&pair).as_ref())
        );
        (
            pkcs8.as_ref().to_vec(),
            public.try_into().expect("public key"),
        )
    }

    #[test]
    fn a_signed_request_verifies_and_nothing_else_does() {
        let (pkcs8, public) = key();
        let (_, other) = key();
        let site = label("depot-7");
        let path = "/v1/sites/depot-7/rollouts/4/abort";
        let now = 1_800_000_000_000;
        let header = authorization(&pkcs8, &site, "POST", path, now, b"").expect("sign");
        assert!(header.starts_with("Pimesh-Operator site=depot-7,t=1800000000000,sig="));
        assert_eq!(claimed_site(Some(&header)), Some("depot-7"));
        assert_eq!(claimed_site(Some("Bearer x")), None);
        let check = |header: Option<&str>,
                     key: &SigningKey,
                     site: &DnsLabel,
                     method,
                     path,
                     body: &[u8],
                     at| { verify(header, key, site, method, path, body, at) };
        assert_eq!(
            check(Some(&header), &public, &site, "POST", path, b"", now),
            Ok(now)
        );
        assert_eq!(
            check(
                Some(&header),
                &public,
                &site,
                "POST",
                path,
                b"",
                now + MAX_SKEW_MS
            ),
            Ok(now)
        );
        assert_eq!(
            check(Some(&header), &other, &site, "POST", path, b"", now),
            Err(Refusal::BadSignature),
            "another site's key"
        );
        assert_eq!(
            check(
                Some(&header),
                &public,
                &label("depot-8"),
                "POST",
                path,
                b"",
                now
            ),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            check(Some(&header), &public, &site, "GET", path, b"", now),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            check(
                Some(&header),
                &public,
                &site,
                "POST",
                "/v1/sites/depot-7/rollouts/4/resume",
                b"",
                now
            ),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            check(Some(&header), &public, &site, "POST", path, b"x", now),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            check(
                Some(&header),
                &public,
                &site,
                "POST",
                path,
                b"",
                now + MAX_SKEW_MS + 1
            ),
            Err(Refusal::Stale {
                at_ms: now,
                now_ms: now + MAX_SKEW_MS + 1
            })
        );
        assert_eq!(
            check(None, &public, &site, "POST", path, b"", now),
            Err(Refusal::Missing)
        );
        assert_eq!(
            check(Some("Bearer abc"), &public, &site, "POST", path, b"", now),
            Err(Refusal::Missing)
        );
        let forged = header.replace("t=1800000000000", "t=1800000000001");
        assert_eq!(
            check(Some(&forged), &public, &site, "POST", path, b"", now),
            Err(Refusal::BadSignature)
        );
        // A person's signature: good under that person's name and key only.
        let (alice_key, alice) = key();
        let signed = authorization_as(&alice_key, Some("alice"), &site, "POST", path, now, b"")
            .expect("sign");
        assert!(signed.starts_with("Pimesh-Operator site=depot-7,op=alice,t="));
        assert_eq!(claimed_operator(Some(&signed)), Some("alice"));
        assert_eq!(claimed_operator(Some(&header)), None);
        assert_eq!(
            check(Some(&signed), &alice, &site, "POST", path, b"", now),
            Ok(now)
        );
        let renamed = signed.replace("op=alice", "op=bob");
        assert_eq!(
            check(Some(&renamed), &alice, &site, "POST", path, b"", now),
            Err(Refusal::BadSignature),
            "passed off as another person's"
        );
        let unnamed = signed.replace(",op=alice", "");
        assert_eq!(
            check(Some(&unnamed), &alice, &site, "POST", path, b"", now),
            Err(Refusal::BadSignature),
            "passed off as the site key's"
        );
        for malformed in [
            "Pimesh-Operator t=1",
            "Pimesh-Operator t=x,sig=AAAA",
            "Pimesh-Operator sig=%%%,t=1",
            "Pimesh-Operator u=1",
        ] {
            assert_eq!(
                check(Some(malformed), &public, &site, "POST", path, b"", now),
                Err(Refusal::Malformed),
                "{malformed}"
            );
        }
    }
}
