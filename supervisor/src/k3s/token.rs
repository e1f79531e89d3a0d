//! The site's K3s token: the shared secret K3s servers and agents join the cluster with.
//!
//! The init node makes it with the site's trust root (`k3s-token` in the trust folder,
//! 0600 for the control replicas); the replicas hand it to joining nodes inside the
//! pinned, secret-proven join exchange and to server nodes with the issuer; a joined node
//! keeps it in `/var/lib/pimesh/k3s/token` (0600, root). It never travels on the card.
//!
//! It is K3s's short form (the bare password; `K10<ca-hash>::server:<password>` cannot be
//! made before the first server has made its CA). The pin that K3s's full form gives is
//! given here by the join exchange, which reaches only a server whose anchor matches the
//! join token's pin.

use std::fmt;
use std::io;
use std::path::Path;

use ring::rand::SecureRandom as _;

/// Random bytes in a new token (hex-encoded: 64 characters).
const TOKEN_BYTES: usize = 32;
/// The longest token file read.
const MAX_TOKEN_BYTES: u64 = 4096;

/// A K3s token. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct K3sToken(String);

impl K3sToken {
    pub fn new(secret: String) -> K3sToken {
        K3sToken(secret)
    }

    /// A new random token, or `None` when the system has no randomness to give.
    pub fn generate() -> Option<K3sToken> {
        let mut bytes = [0u8; TOKEN_BYTES];
        ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
        Some(K3sToken(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// The secret, for the K3s configuration and the join exchange only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The token kept in `path`: `Ok(None)` when there is no such file; an empty,
    /// oversized or multi-line file is refused with a reason naming it.
    pub fn load(path: &Path) -> Result<Option<K3sToken>, TokenError> {
        let bad = |reason: &'static str| TokenError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::metadata(path) {
            Ok(meta) if meta.len() > MAX_TOKEN_BYTES => return Err(bad("longer than 4096 bytes")),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(TokenError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(bad("empty"));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("expected one line without spaces"));
        }
        Ok(Some(K3sToken(token.to_owned())))
    }

    /// Keeps the token in `path` (0600), atomically; `Ok(true)` when the file changed.
    pub fn store(&self, path: &Path) -> io::Result<bool> {
        pimesh_runtime::atomic_file::replace(path, format!("{}\n", self.0).as_bytes(), 0o600)
    }
}

impl fmt::Debug for K3sToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("K3sToken(<redacted>)")
    }
}

/// Why a token file cannot be used; names the file.
#[derive(Debug)]
pub enum TokenError {
    Io { path: String, source: io::Error },
    Invalid { path: String, reason: &'static str },
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Io { path, source } => {
                write!(f, "cannot read the K3s token {path}: {source}")
            }
            TokenError::Invalid { path, reason } => {
                write!(f, "{path}: not a K3s token ({reason})")
            }
        }
    }
}

impl std::error::Error for TokenError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_random_kept_0600_and_never_shown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k3s/token");
        assert!(K3sToken::load(&path).expect("absent is fine").is_none());
        let token = K3sToken::generate().expect("randomness");
        assert_eq!(token.expose().len(), 64);
        assert_ne!(Some(&token), K3sToken::generate().as_ref());
        assert!(token.store(&path).expect("stored"));
        assert_eq!(K3sToken::load(&path).expect("read"), Some(token.clone()));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!format!("{token:?}").contains(token.expose()));
    }

    #[test]
    fn a_bad_token_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "\n").expect("write");
        let err = K3sToken::load(&path).expect_err("empty");
        assert!(
            err.to_string().contains("token: not a K3s token (empty)"),
            "{err}"
        );
        std::fs::write(&path, "two words\n").expect("write");
        assert!(K3sToken::load(&path).is_err());
    }
}
