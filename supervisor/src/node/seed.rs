//! What the supervisor made of the seed file. A broken seed is a state of the node, not a
//! reason to stop: the node boots, reports the error, and can be reached to fix it.

use std::path::{Path, PathBuf};

use pimesh_schema::seed::{is_blank, read_small};
use pimesh_schema::{ConfigError, Seed};
use tracing::{error, info, warn};

use crate::status::{SeedReport, SeedSummary};

#[derive(Debug, Clone)]
pub enum SeedState {
    Valid {
        path: PathBuf,
        seed: Box<Seed>,
    },
    /// The file holds no settings (the unedited template) or does not exist.
    Unconfigured {
        path: PathBuf,
        reason: String,
    },
    Invalid {
        error: ConfigError,
    },
}

impl SeedState {
    pub fn load(path: &Path) -> SeedState {
        let text = match read_small(path) {
            Ok(text) => text,
            Err(_) if !path.exists() => {
                return SeedState::Unconfigured {
                    path: path.to_path_buf(),
                    reason: format!("{} does not exist", path.display()),
                }
            }
            Err(error) => return SeedState::Invalid { error },
        };
        if is_blank(&text) {
            return SeedState::Unconfigured {
                path: path.to_path_buf(),
                reason: format!("{} sets nothing yet: edit it and reboot", path.display()),
            };
        }
        match Seed::parse(path, &text) {
            Ok(seed) => SeedState::Valid {
                path: path.to_path_buf(),
                seed: Box::new(seed),
            },
            Err(error) => SeedState::Invalid { error },
        }
    }

    pub fn seed(&self) -> Option<&Seed> {
        match self {
            SeedState::Valid { seed, .. } => Some(seed),
            _ => None,
        }
    }

    /// Logs the state once, with the error's location as journal fields.
    pub fn log(&self) {
        match self {
            SeedState::Valid { path, seed } => info!(
                file = %path.display(),
                site = %seed.site,
                role = seed.role.as_str(),
                "seed read"
            ),
            SeedState::Unconfigured { path, reason } => {
                warn!(file = %path.display(), "seed not configured: {reason}")
            }
            SeedState::Invalid { error } => error!(
                file = %error.file.display(),
                line = error.line.unwrap_or(0),
                key = error.key.as_deref().unwrap_or(""),
                "seed invalid: {error}"
            ),
        }
    }

    /// The text systemd shows as the unit's status.
    pub fn one_line_summary(&self, node_name: &str) -> String {
        match self {
            SeedState::Valid { seed, .. } => {
                format!(
                    "node {node_name}: site {} role {}",
                    seed.site,
                    seed.role.as_str()
                )
            }
            SeedState::Unconfigured { reason, .. } => {
                format!("node {node_name}: not configured: {reason}")
            }
            SeedState::Invalid { error } => format!("node {node_name}: seed invalid: {error}"),
        }
    }

    pub fn report(&self) -> SeedReport {
        match self {
            SeedState::Valid { path, seed } => SeedReport {
                state: "valid",
                file: path.clone(),
                summary: Some(summary(seed)),
                reason: None,
                error: None,
            },
            SeedState::Unconfigured { path, reason } => SeedReport {
                state: "unconfigured",
                file: path.clone(),
                summary: None,
                reason: Some(reason.clone()),
                error: None,
            },
            SeedState::Invalid { error } => SeedReport {
                state: "invalid",
                file: error.file.clone(),
                summary: None,
                reason: Some(error.to_string()),
                error: Some(error.clone()),
            },
        }
    }
}

/// The seed's settings without its secrets.
fn summary(seed: &Seed) -> SeedSummary {
    SeedSummary {
        site: seed.site.to_string(),
        role: seed.role.as_str(),
        node: seed.node.as_ref().map(ToString::to_string),
        join_token_anchor_sha256: seed.join_token.as_ref().map(|t| t.anchor_sha256_hex()),
        servers: seed.servers.iter().cloned().map(String::from).collect(),
        ssh_authorized_keys: seed.ssh_authorized_keys.len(),
        central_url: seed.central.as_ref().map(|c| c.url.as_url().to_string()),
        central_public_key: seed.central.as_ref().map(|c| c.public_key.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_blank_seeds_are_unconfigured_not_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("pimesh.toml");
        assert!(matches!(
            SeedState::load(&missing),
            SeedState::Unconfigured { .. }
        ));
        std::fs::write(&missing, "# only comments\n\n#site = \"x\"\n").expect("write");
        assert!(matches!(
            SeedState::load(&missing),
            SeedState::Unconfigured { .. }
        ));
    }

    #[test]
    fn the_report_never_shows_the_join_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pimesh.toml");
        let secret = "VerySecretJoinSecret42";
        std::fs::write(
            &path,
            format!(
                "site = \"s\"\njoin_token = \"K10{}::{secret}\"\n",
                "0".repeat(64)
            ),
        )
        .expect("write");
        let state = SeedState::load(&path);
        let json = serde_json::to_string(&state.report()).expect("json");
        assert!(json.contains("\"state\":\"valid\""), "{json}");
        assert!(!json.contains(secret), "{json}");
    }
}
