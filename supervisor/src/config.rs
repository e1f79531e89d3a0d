//! The configuration files the supervisor reads at its start: its own
//! (`supervisor.toml`: the units it keeps, how it heals them, the OTA client's settings)
//! and the site configuration the node runs (`cluster.toml`). Neither stops the start: a
//! missing or broken file means the defaults, and says so.

use std::path::Path;

use pimesh_schema::cluster::ClusterConfig;
use pimesh_schema::SupervisorConfig;
use tracing::{info, warn};

use crate::status::ConfigReport;

/// The supervisor's configuration: the file, the defaults when it is missing, and the
/// defaults (with the error reported) when it is broken. Never fails.
pub fn load_supervisor_config(file: &Path) -> (SupervisorConfig, ConfigReport) {
    let file = file.to_path_buf();
    match SupervisorConfig::load(&file) {
        Ok(config) => {
            let source = if file.exists() { "file" } else { "defaults" };
            info!(
                file = %file.display(),
                source,
                units = config.units.len(),
                "supervisor configuration from {source}: {} units",
                config.units.len()
            );
            (
                config,
                ConfigReport {
                    file,
                    source,
                    error: None,
                },
            )
        }
        Err(err) => {
            warn!(file = %file.display(), "{err}; managing the default units meanwhile");
            (
                SupervisorConfig::default(),
                ConfigReport {
                    file,
                    source: "defaults",
                    error: Some(err),
                },
            )
        }
    }
}

/// The site configuration the node runs (`cluster.toml`), when there is a usable one.
pub fn active_site_config(file: &Path) -> Option<ClusterConfig> {
    if !file.exists() {
        return None;
    }
    ClusterConfig::load(file)
        .map_err(|err| warn!(%err, "the active site configuration is not usable; the default units meanwhile"))
        .ok()
}
