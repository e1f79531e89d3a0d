//! The site config (`cluster.toml`) as the identity API uses it: which identities a node
//! may hold.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use pimesh_schema::cluster::ClusterConfig;
use pimesh_schema::{ConfigError, DnsLabel, SpiffeId};

/// A validated site config with the exact text it was parsed from (discovery serves the
/// text, so that proxies validate it with the same schema).
///
/// Invariant: `config` is `ClusterConfig::parse` of `text`.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub config: ClusterConfig,
    pub text: String,
}

/// Reads and validates the site config at `file`. `Ok(None)` when there is no file at that
/// path (not delivered yet: no service is placed anywhere). Every other failure, a dangling
/// symlink or an unreadable file included, is an `Err` naming the file and, when the fault
/// belongs to one, the key.
pub fn load(file: &Path) -> Result<Option<Loaded>, ConfigError> {
    match std::fs::symlink_metadata(file) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(ConfigError::file(file, format!("cannot inspect: {err}"))),
        Ok(_) => {
            let text = pimesh_schema::seed::read_small(file)?;
            let config = ClusterConfig::parse(file, &text)?;
            Ok(Some(Loaded { config, text }))
        }
    }
}

/// The identities `node` of `site` may hold: its node ID, plus `svc/<s>` for each service
/// that `config` (of the same site) places on it, minus the reserved control identity
/// (`pimesh_meshtls::control_id`, under which every replica serves: the identity API never
/// issues it, even when a site config places a service of that name on a node, so that
/// no node can pose as a control replica). Without a config, the node ID alone.
pub fn permitted(
    config: Option<&ClusterConfig>,
    site: &DnsLabel,
    node: &DnsLabel,
) -> BTreeSet<SpiffeId> {
    let mut ids = match config {
        Some(config) if &config.site == site => config.identities_of_node(node),
        _ => BTreeSet::from([SpiffeId::node(site, node)]),
    };
    if let Ok(control) = pimesh_meshtls::control_id(site) {
        ids.remove(&control);
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    const CONFIG: &str = "site = \"depot-7\"\n\
        [services.web]\nport = 8080\nnodes = [\"pi-a\", \"pi-b\"]\n\
        [services.db]\nport = 5432\nnodes = [\"pi-b\"]\n\
        [services.pimesh-control]\nport = 8086\nnodes = [\"pi-a\"]\n";

    #[test]
    fn a_node_holds_its_id_and_its_placed_services_but_never_the_control_identity() {
        let config = ClusterConfig::parse(Path::new("cluster.toml"), CONFIG).expect("valid");
        let site = label("depot-7");
        let ids = |node: &str| -> Vec<String> {
            permitted(Some(&config), &site, &label(node))
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            ids("pi-a"),
            ["spiffe://depot-7/node/pi-a", "spiffe://depot-7/svc/web"]
        );
        assert_eq!(
            ids("pi-b"),
            [
                "spiffe://depot-7/node/pi-b",
                "spiffe://depot-7/svc/db",
                "spiffe://depot-7/svc/web"
            ]
        );
        assert_eq!(ids("pi-c"), ["spiffe://depot-7/node/pi-c"]);
        let alone = permitted(None, &site, &label("pi-a"));
        assert_eq!(
            alone,
            BTreeSet::from([SpiffeId::node(&site, &label("pi-a"))])
        );
    }

    #[test]
    fn a_missing_file_places_nothing_and_a_broken_one_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("cluster.toml");
        assert_eq!(load(&file).expect("absent is fine"), None);
        std::fs::write(&file, "site = \"depot-7\"\nfrob = 1\n").expect("write");
        let err = load(&file).expect_err("unknown key");
        assert!(err.to_string().contains("cluster.toml"), "{err}");
        std::fs::write(&file, CONFIG).expect("write");
        let loaded = load(&file).expect("valid").expect("present");
        assert_eq!(loaded.config.services.len(), 3);
        assert_eq!(loaded.text, CONFIG);
    }
}
