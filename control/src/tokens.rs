//! The join tokens a replica accepts.
//!
//! Two sources, the second replacing the first when present:
//!
//! 1. the trust folder's `join.json`: `{"tokens": [{"sha256": "<64 hex>", "expires":
//!    "<RFC 3339>"?}]}` (`pimesh_join::AcceptedTokens`), written by the init node at
//!    provisioning and handed to every server node with the issuer. A missing file
//!    accepts no token;
//! 2. the site config's `[join] tokens` (a rotation over the air).
//!
//! Invariant: the secrets themselves are never known here, only their SHA-256.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use pimesh_join::{AcceptedToken, AcceptedTokens};
use pimesh_schema::cluster::ClusterConfig;
use serde::Deserialize;

/// The file name in the trust folder.
pub const FILE: &str = "join.json";

/// The largest `join.json` read: thousands of tokens.
const MAX_BYTES: u64 = 1024 * 1024;

/// The shape of `join.json`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinFile {
    tokens: AcceptedTokens,
}

/// Why `join.json` cannot be used; names the file.
#[derive(Debug)]
pub enum TokensError {
    Unreadable { path: PathBuf, source: io::Error },
    TooLarge { path: PathBuf, bytes: u64 },
    Invalid { path: PathBuf, reason: String },
}

impl fmt::Display for TokensError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokensError::Unreadable { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            TokensError::TooLarge { path, bytes } => write!(
                f,
                "{}: {bytes} bytes, more than the {MAX_BYTES} accepted",
                path.display()
            ),
            TokensError::Invalid { path, reason } => write!(
                f,
                "{}: expected {{\"tokens\": [{{\"sha256\": \"<64 hex digits>\", \"expires\": \"<RFC 3339>\"}}]}}: {reason}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for TokensError {}

/// Reads `join.json` of the trust folder `dir` (resolved like the rest of the folder: a
/// link to the current generation). No file: no token accepted.
pub fn load(dir: &Path) -> Result<AcceptedTokens, TokensError> {
    let resolved = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let path = resolved.join(FILE);
    let unreadable = |source| TokensError::Unreadable {
        path: path.clone(),
        source,
    };
    let bytes = match std::fs::metadata(&path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(AcceptedTokens::default()),
        Err(err) => return Err(unreadable(err)),
        Ok(meta) => meta.len(),
    };
    if bytes > MAX_BYTES {
        return Err(TokensError::TooLarge { path, bytes });
    }
    let text = std::fs::read(&path).map_err(unreadable)?;
    let file: JoinFile = serde_json::from_slice(&text).map_err(|err| TokensError::Invalid {
        path: path.clone(),
        reason: err.to_string(),
    })?;
    Ok(file.tokens)
}

/// The tokens accepted under `config` with the trust folder's `from_trust`: the site
/// config's `[join] tokens` when it has them, else the trust folder's.
pub fn effective(config: Option<&ClusterConfig>, from_trust: &AcceptedTokens) -> AcceptedTokens {
    match config.and_then(|config| config.join.tokens.as_ref()) {
        Some(tokens) => AcceptedTokens(
            tokens
                .iter()
                .filter_map(|token| {
                    // The schema checked both: a 64-hex digest and a time always convert.
                    let mut value = serde_json::json!({ "sha256": token.sha256.as_str() });
                    if let Some(at) = token.expires {
                        value["expires"] =
                            humantime::format_rfc3339_seconds(at.0).to_string().into();
                    }
                    serde_json::from_value::<AcceptedToken>(value).ok()
                })
                .collect(),
        ),
        None => from_trust.clone(),
    }
}

/// Serialises `tokens` as `join.json` holds them.
#[cfg(test)]
pub fn file_text(tokens: &AcceptedTokens) -> String {
    serde_json::json!({ "tokens": tokens }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn join_json_reads_back_and_a_missing_file_accepts_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(load(dir.path()).expect("absent").is_empty());
        let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let tokens = AcceptedTokens(vec![
            AcceptedToken::for_secret("first", None),
            AcceptedToken::for_secret("second", Some(expires)),
        ]);
        std::fs::write(dir.path().join(FILE), file_text(&tokens)).expect("write");
        assert_eq!(load(dir.path()).expect("valid"), tokens);
        std::fs::write(dir.path().join(FILE), r#"{"tokens":[{"sha256":"abc"}]}"#).expect("write");
        let err = load(dir.path()).expect_err("short digest").to_string();
        assert!(err.contains("join.json") && err.contains("64 hex"), "{err}");
    }

    #[test]
    fn the_site_config_replaces_the_trust_folders_tokens_when_it_has_some() {
        let from_trust = AcceptedTokens(vec![AcceptedToken::for_secret("old", None)]);
        let path = Path::new("cluster.toml");
        let plain = ClusterConfig::parse(path, "site = \"s\"\n").expect("config");
        assert_eq!(effective(Some(&plain), &from_trust), from_trust);
        assert_eq!(effective(None, &from_trust), from_trust);
        let digest = pimesh_join::hex(&pimesh_join::secret_sha256("new"));
        let text = format!(
            "site = \"s\"\n[join]\ntokens = [{{ sha256 = \"{digest}\", expires = \"2030-01-01T00:00:00Z\" }}]\n"
        );
        let rotated = ClusterConfig::parse(path, &text).expect("config");
        let tokens = effective(Some(&rotated), &from_trust);
        let before = humantime::parse_rfc3339("2029-12-31T23:59:59Z").expect("time");
        assert_eq!(tokens.check("new", before), Ok(()));
        assert!(tokens.check("old", before).is_err());
        assert!(tokens
            .check("new", before + Duration::from_secs(2))
            .is_err());
    }
}
