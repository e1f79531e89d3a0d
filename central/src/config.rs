//! `central.toml`: where the central server listens, keeps its state, and which sites it
//! serves (each with the trust anchor its nodes' certificates chain to and the public key
//! its revisions are signed with).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pimesh_schema::cluster::HumanDuration;
use pimesh_schema::{parse_toml, ConfigError, DnsLabel, SigningKey};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CentralConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// The server's certificate chain and key (PEM).
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// The longest a node's long-poll is held before an empty answer.
    #[serde(default = "default_long_poll")]
    pub long_poll_max: HumanDuration,
    #[serde(default)]
    pub sites: Vec<SiteEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteEntry {
    pub name: DnsLabel,
    /// The site's trust anchor (PEM), as written by `pimeshctl site init`.
    pub anchor: PathBuf,
    /// The site's revision-signing public key, `ed25519:<base64>`.
    pub public_key: SigningKey,
}

fn default_long_poll() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

impl CentralConfig {
    pub fn load(file: &Path) -> Result<CentralConfig, ConfigError> {
        let text = pimesh_schema::seed::read_small(file)?;
        parse_toml(file, &text)
    }
}
