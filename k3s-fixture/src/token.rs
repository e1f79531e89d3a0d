//! K3s's token (`pkg/clientaccess/token.go`): the full form
//! `K10<sha256 hex of the CA PEM>::<user>:<password>`, or the short form, the bare
//! password. The fixture authenticates `server:<password>` and `node:<password>` with it.

use std::fmt;

use ring::rand::SecureRandom as _;

/// A parsed token. Its `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The CA hash of the full form, when given.
    pub ca_hash: Option<String>,
    /// The user of the full form (`server`, `node`), when given.
    pub user: Option<String>,
    pub password: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("ca_hash", &self.ca_hash)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Token {
    /// Reads a token as K3s does; the errors are K3s's.
    pub fn parse(text: &str) -> Result<Token, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("token must not be empty".to_owned());
        }
        let Some(rest) = text.strip_prefix("K10") else {
            return Ok(Token {
                ca_hash: None,
                user: None,
                password: text.to_owned(),
            });
        };
        let (hash, credentials) = rest
            .split_once("::")
            .ok_or_else(|| "invalid token format".to_owned())?;
        if !hash.is_empty() && hash.len() != 64 {
            return Err("invalid token CA hash length".to_owned());
        }
        let (user, password) = credentials
            .split_once(':')
            .ok_or_else(|| "invalid token format".to_owned())?;
        if password.is_empty() {
            return Err("invalid token format".to_owned());
        }
        Ok(Token {
            ca_hash: (!hash.is_empty()).then(|| hash.to_lowercase()),
            user: (!user.is_empty()).then(|| user.to_owned()),
            password: password.to_owned(),
        })
    }

    /// A token with a new random password (the first server's, when none is given).
    pub fn generate() -> Result<Token, String> {
        Ok(Token {
            ca_hash: None,
            user: None,
            password: random_hex(16)?,
        })
    }

    /// The full server token for the CA whose hash is `ca_hash`.
    pub fn full(&self, ca_hash: &str) -> String {
        format!("K10{ca_hash}::server:{}", self.password)
    }

    /// Whether the token's CA hash, when it has one, is `actual`'s; K3s's message if not.
    pub fn check_hash(&self, actual: &str) -> Result<(), String> {
        match &self.ca_hash {
            Some(expected) if expected != actual => Err(format!(
                "token CA hash does not match the Cluster CA certificate hash: {expected} != {actual}"
            )),
            _ => Ok(()),
        }
    }
}

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> Result<String, String> {
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| "the system has no randomness to give".to_owned())?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The SHA-256 of `bytes`, lowercase hex (K3s's CA hash of the CA PEM file).
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_parse() {
        let short = Token::parse("secret\n").unwrap();
        assert_eq!(
            (short.ca_hash.as_deref(), short.password.as_str()),
            (None, "secret")
        );
        let hash = "a".repeat(64);
        let full = Token::parse(&format!("K10{hash}::server:pw")).unwrap();
        assert_eq!(full.ca_hash.as_deref(), Some(hash.as_str()));
        assert_eq!(full.user.as_deref(), Some("server"));
        assert_eq!(full.password, "pw");
        assert_eq!(full.full(&hash), format!("K10{hash}::server:pw"));
        assert!(full.check_hash(&hash).is_ok());
        let err = full.check_hash(&"b".repeat(64)).unwrap_err();
        assert!(err.starts_with("token CA hash does not match the Cluster CA certificate hash: "));
        assert_eq!(
            Token::parse("K10abc::server:pw").unwrap_err(),
            "invalid token CA hash length"
        );
        assert_eq!(
            Token::parse("K10::nopassword").unwrap_err(),
            "invalid token format"
        );
        assert_eq!(Token::parse(" ").unwrap_err(), "token must not be empty");
        assert!(!format!("{full:?}").contains("pw\""));
    }
}
