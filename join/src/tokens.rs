//! The join tokens a site accepts, kept as SHA-256 digests of their secrets.
//!
//! A server node never needs a token's secret, only to recognise it: it keeps
//! `sha256(secret)` and an optional expiry per token. [`AcceptedTokens::check`] compares
//! the digest of a presented secret with every accepted digest in constant time, and
//! always with all of them, so that neither the position of a match nor the length of a
//! common prefix shows in the time it takes.

use std::fmt;
use std::time::SystemTime;

use pimesh_schema::ValueError;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

/// The SHA-256 of a token secret's UTF-8 bytes.
pub fn secret_sha256(secret: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// One accepted token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptedToken {
    /// Hex SHA-256 of the secret.
    pub sha256: Digest,
    /// After this instant the token is refused as expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Instant>,
}

impl AcceptedToken {
    /// A token accepted for the secret `secret` until `expires` (forever when `None`).
    pub fn for_secret(secret: &str, expires: Option<SystemTime>) -> AcceptedToken {
        AcceptedToken {
            sha256: Digest(secret_sha256(secret)),
            expires: expires.map(Instant),
        }
    }
}

/// The tokens a site accepts. Serialised as a JSON array.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AcceptedTokens(pub Vec<AcceptedToken>);

/// Why a secret was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// It matches no accepted token.
    Wrong,
    /// It matches a token whose expiry has passed.
    Expired,
}

impl fmt::Display for TokenRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenRefusal::Wrong => "the join token's secret is not one this site accepts",
            TokenRefusal::Expired => "the join token has expired",
        })
    }
}

impl AcceptedTokens {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `secret` is accepted at `now`.
    pub fn check(&self, secret: &str, now: SystemTime) -> Result<(), TokenRefusal> {
        let presented = secret_sha256(secret);
        let mut matched: Option<&AcceptedToken> = None;
        for token in &self.0 {
            if bool::from(token.sha256.0.ct_eq(&presented)) && matched.is_none() {
                matched = Some(token);
            }
        }
        match matched {
            None => Err(TokenRefusal::Wrong),
            Some(token) => match token.expires {
                Some(Instant(expires)) if now >= expires => Err(TokenRefusal::Expired),
                _ => Ok(()),
            },
        }
    }
}

/// A SHA-256 digest written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(pub [u8; 32]);

impl TryFrom<String> for Digest {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        let expected = "expected a SHA-256 digest as 64 hex digits";
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ValueError::new(format!(
                "{expected}, found {} characters",
                text.len()
            )));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .map_err(|err| ValueError::new(format!("{expected}: {err}")))?;
        }
        Ok(Digest(out))
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> String {
        crate::hex(&digest.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex(&self.0))
    }
}

/// An instant written as RFC 3339 in UTC (`2027-01-31T12:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Instant(pub SystemTime);

impl TryFrom<String> for Instant {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        humantime::parse_rfc3339_weak(&text)
            .map(Instant)
            .map_err(|err| {
                ValueError::new(format!(
                    "expected a time such as \"2027-01-31T12:00:00Z\", found {text:?} ({err})"
                ))
            })
    }
}

impl From<Instant> for String {
    fn from(instant: Instant) -> String {
        humantime::format_rfc3339_seconds(instant.0).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const NOW: Duration = Duration::from_secs(1_800_000_000);

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + NOW
    }

    #[test]
    fn the_right_secret_is_accepted_and_any_other_refused() {
        let tokens = AcceptedTokens(vec![
            AcceptedToken::for_secret("oldsecretoldsecret", None),
            AcceptedToken::for_secret("newsecretnewsecret", None),
        ]);
        assert_eq!(tokens.check("newsecretnewsecret", now()), Ok(()));
        assert_eq!(tokens.check("oldsecretoldsecret", now()), Ok(()));
        assert_eq!(
            tokens.check("newsecretnewsecreT", now()),
            Err(TokenRefusal::Wrong)
        );
        assert_eq!(tokens.check("", now()), Err(TokenRefusal::Wrong));
        assert_eq!(
            AcceptedTokens::default().check("anything", now()),
            Err(TokenRefusal::Wrong)
        );
    }

    #[test]
    fn an_expired_token_is_refused_as_expired() {
        let tokens = AcceptedTokens(vec![AcceptedToken::for_secret(
            "secretsecretsecret",
            Some(now()),
        )]);
        let before = now() - Duration::from_secs(1);
        assert_eq!(tokens.check("secretsecretsecret", before), Ok(()));
        assert_eq!(
            tokens.check("secretsecretsecret", now()),
            Err(TokenRefusal::Expired)
        );
    }

    #[test]
    fn tokens_round_trip_as_json_with_hex_digests_and_rfc3339_times() {
        let tokens = AcceptedTokens(vec![AcceptedToken::for_secret(
            "secretsecretsecret",
            Some(now()),
        )]);
        let json = serde_json::to_string(&tokens).expect("json");
        assert_eq!(
            json,
            format!(
                r#"[{{"sha256":"{}","expires":"2027-01-15T08:00:00Z"}}]"#,
                crate::hex(&secret_sha256("secretsecretsecret"))
            )
        );
        let back: AcceptedTokens = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, tokens);
        assert!(serde_json::from_str::<AcceptedTokens>(r#"[{"sha256":"abc"}]"#).is_err());
        let bad_time = format!(
            r#"[{{"sha256":"{}","expires":"tomorrow"}}]"#,
            "0".repeat(64)
        );
        assert!(serde_json::from_str::<AcceptedTokens>(&bad_time).is_err());
    }
}
