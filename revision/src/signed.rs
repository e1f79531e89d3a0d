//! The signed revision: a site's whole `cluster.toml` with a strictly increasing number,
//! signed offline by the operator with the site's Ed25519 key, and the checks a node (or
//! the central server) runs before accepting one.
//!
//! The signature covers a domain-separated, length-prefixed encoding of every field but
//! itself (see [`Revision::signed_payload`]), so no field can be changed or moved into
//! another without breaking it. A revision is accepted only through [`Verifier`], which
//! checks, in this order: size, shape, signature, site, revision order, and only then the
//! configuration itself.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use pimesh_schema::cluster::ClusterConfig;
use pimesh_schema::{ConfigError, DnsLabel, SigningKey};
use serde::{Deserialize, Serialize};

/// The format tag; a different one is refused, never guessed at.
pub const FORMAT: &str = "pimesh-revision/1";
/// Revisions larger than this are refused unread.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;

/// How a node applies a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Apply, and keep if healthy.
    Apply,
    /// Apply, and revert unless confirmed within the confirmation window.
    Try,
}

/// A revision before signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub site: DnsLabel,
    pub revision: u64,
    pub mode: Mode,
    /// The `cluster.toml` text, exactly as signed.
    pub config: String,
}

/// A revision with its signature, as stored and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRevision {
    pub format: String,
    pub site: DnsLabel,
    pub revision: u64,
    pub mode: Mode,
    pub config: String,
    /// Base64 of the 64-byte Ed25519 signature over [`Revision::signed_payload`].
    pub signature: String,
}

impl Revision {
    /// The bytes the signature covers.
    pub fn signed_payload(&self) -> Vec<u8> {
        let mut payload = Vec::with_capacity(self.config.len() + 64);
        payload.extend_from_slice(FORMAT.as_bytes());
        payload.push(0);
        let site = self.site.as_str().as_bytes();
        payload.extend_from_slice(&(site.len() as u64).to_be_bytes());
        payload.extend_from_slice(site);
        payload.extend_from_slice(&self.revision.to_be_bytes());
        payload.push(match self.mode {
            Mode::Apply => 0,
            Mode::Try => 1,
        });
        payload.extend_from_slice(&(self.config.len() as u64).to_be_bytes());
        payload.extend_from_slice(self.config.as_bytes());
        payload
    }

    /// Signs with the site key given as PKCS#8 (what `pimeshctl site init` writes).
    pub fn sign(self, site_key_pkcs8: &[u8]) -> Result<SignedRevision, SignError> {
        let key = ring::signature::Ed25519KeyPair::from_pkcs8(site_key_pkcs8)
            .map_err(SignError::NotEd25519Pkcs8)?;
        let signature = key.sign(&self.signed_payload());
        Ok(SignedRevision {
            format: FORMAT.to_owned(),
            site: self.site,
            revision: self.revision,
            mode: self.mode,
            config: self.config,
            signature: base64::engine::general_purpose::STANDARD.encode(signature.as_ref()),
        })
    }
}

impl SignedRevision {
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn unsigned(&self) -> Revision {
        Revision {
            site: self.site.clone(),
            revision: self.revision,
            mode: self.mode,
            config: self.config.clone(),
        }
    }
}

/// Why a revision could not be signed.
#[derive(Debug, Clone, Copy)]
pub enum SignError {
    /// The site key is not an Ed25519 key in PKCS#8; ring says why.
    NotEd25519Pkcs8(ring::error::KeyRejected),
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignError::NotEd25519Pkcs8(err) => {
                write!(
                    f,
                    "the site signing key is not an Ed25519 PKCS#8 key: {err}"
                )
            }
        }
    }
}

impl std::error::Error for SignError {}

/// Why a node (or the central server) refused a revision. The text of each is what gets
/// reported back to the central server.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    TooLarge {
        size: usize,
        max: usize,
    },
    /// Not JSON of the revision's shape (garbage, truncated, unknown fields).
    Malformed(String),
    UnknownFormat(String),
    BadSignature,
    WrongSite {
        expected: DnsLabel,
        found: DnsLabel,
    },
    /// Not newer than what the node runs: a replay or a downgrade.
    NotNewer {
        current: u64,
        offered: u64,
    },
    /// Properly signed, but the configuration is not valid.
    InvalidConfig(ConfigError),
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::TooLarge { size, max } => {
                write!(f, "revision is {size} bytes, more than the {max} allowed")
            }
            Rejection::Malformed(why) => write!(f, "revision is not a {FORMAT} document: {why}"),
            Rejection::UnknownFormat(format) => {
                write!(f, "revision format {format:?} is not {FORMAT:?}")
            }
            Rejection::BadSignature => {
                f.write_str("revision signature does not verify with the site's public key")
            }
            Rejection::WrongSite { expected, found } => {
                write!(f, "revision is for site {found}, this is site {expected}")
            }
            Rejection::NotNewer { current, offered } => {
                write!(
                    f,
                    "revision {offered} is not newer than the current revision {current}"
                )
            }
            Rejection::InvalidConfig(err) => {
                write!(f, "revision's configuration is invalid: {err}")
            }
        }
    }
}

impl std::error::Error for Rejection {}

/// A revision that passed every check, with its configuration decoded.
#[derive(Debug, Clone)]
pub struct Verified {
    pub signed: SignedRevision,
    pub config: ClusterConfig,
}

/// Checks revisions for one site against its public key.
pub struct Verifier {
    pub site: DnsLabel,
    pub key: SigningKey,
    pub max_bytes: usize,
}

impl Verifier {
    pub fn new(site: DnsLabel, key: SigningKey) -> Verifier {
        Verifier {
            site,
            key,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }

    /// Verifies `bytes` as a revision newer than `current` (`None`: the node has none yet).
    pub fn verify(&self, bytes: &[u8], current: Option<u64>) -> Result<Verified, Rejection> {
        let signed = self.verify_signature(bytes)?;
        if let Some(current) = current {
            if signed.revision <= current {
                return Err(Rejection::NotNewer {
                    current,
                    offered: signed.revision,
                });
            }
        }
        let source = format!("cluster.toml (revision {})", signed.revision);
        let config = ClusterConfig::parse(Path::new(&source), &signed.config)
            .map_err(Rejection::InvalidConfig)?;
        if config.site != self.site {
            return Err(Rejection::WrongSite {
                expected: self.site.clone(),
                found: config.site,
            });
        }
        Ok(Verified { signed, config })
    }

    /// Size, shape, format, signature and site: everything but revision order and the
    /// configuration's validity.
    pub fn verify_signature(&self, bytes: &[u8]) -> Result<SignedRevision, Rejection> {
        if bytes.len() > self.max_bytes {
            return Err(Rejection::TooLarge {
                size: bytes.len(),
                max: self.max_bytes,
            });
        }
        let signed: SignedRevision =
            serde_json::from_slice(bytes).map_err(|err| Rejection::Malformed(err.to_string()))?;
        if signed.format != FORMAT {
            return Err(Rejection::UnknownFormat(signed.format));
        }
        let signature = base64::engine::general_purpose::STANDARD
            .decode(&signed.signature)
            .map_err(|_| Rejection::BadSignature)?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, self.key.as_bytes())
            .verify(&signed.unsigned().signed_payload(), &signature)
            .map_err(|_| Rejection::BadSignature)?;
        if signed.site != self.site {
            return Err(Rejection::WrongSite {
                expected: self.site.clone(),
                found: signed.site,
            });
        }
        Ok(signed)
    }
}
