//! A site folder's routes: `cluster.toml` with its `[[routes]]`, plus every `*.yaml` and
//! `*.yml` file of the `routes/` folder beside it (Gateway API or SMI documents, read in
//! file-name order).
//!
//! [`compile`] gives the one text nodes receive: `cluster.toml` as written, followed by
//! the YAML files' routes as `[[routes]]` tables. Invariant: that text parses to a
//! [`ClusterConfig`] whose routes are those of `cluster.toml` followed by those of the
//! files, so what the operator validated is what every proxy runs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{gateway, Route};
use crate::cluster::ClusterConfig;
use crate::ConfigError;

/// The folder beside `cluster.toml` that holds route files.
pub const ROUTES_FOLDER: &str = "routes";

/// A site folder read and checked as a whole.
#[derive(Debug, Clone)]
pub struct CompiledSite {
    pub config: ClusterConfig,
    /// What nodes receive (see the module's invariant).
    pub text: String,
    /// The route files read, with how many routes each held.
    pub route_files: Vec<(PathBuf, usize)>,
}

/// Reads `file` (a `cluster.toml`) and the route files beside it.
pub fn compile(file: &Path) -> Result<CompiledSite, ConfigError> {
    let text = crate::seed::read_small(file)?;
    let config = ClusterConfig::parse(file, &text)?;
    let folder = file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(ROUTES_FOLDER);
    let mut paths = Vec::new();
    match std::fs::read_dir(&folder) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry
                    .map_err(|err| ConfigError::file(&folder, format!("cannot list: {err}")))?;
                let path = entry.path();
                let yaml = path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e == "yaml" || e == "yml");
                if yaml && path.is_file() {
                    paths.push(path);
                }
            }
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(ConfigError::file(&folder, format!("cannot list: {err}"))),
    }
    paths.sort();
    let mut taken: BTreeSet<_> = config
        .routes
        .iter()
        .map(|r| (r.service.clone(), r.name.clone()))
        .collect();
    let mut extra: Vec<Route> = Vec::new();
    let mut route_files = Vec::new();
    for path in paths {
        let yaml = crate::seed::read_small(&path)?;
        let routes = gateway::parse(&path, &yaml, &config.services, &mut taken)?;
        route_files.push((path, routes.len()));
        extra.extend(routes);
    }
    if extra.is_empty() {
        return Ok(CompiledSite {
            config,
            text,
            route_files,
        });
    }
    let tables = gateway::to_toml(&extra).map_err(|err| {
        ConfigError::file(file, format!("cannot write the routes as TOML: {err}"))
    })?;
    let mut compiled = text.clone();
    if !compiled.ends_with('\n') {
        compiled.push('\n');
    }
    compiled.push_str(&format!(
        "\n# Routes from {ROUTES_FOLDER}/*.yaml, added by pimeshctl.\n{tables}"
    ));
    let config = ClusterConfig::parse(file, &compiled)?;
    Ok(CompiledSite {
        config,
        text: compiled,
        route_files,
    })
}
