//! One discovery document, as a control replica streams it and as the cache keeps it:
//! `{"version","site","config","nodes"}` (see the replica's `discovery` module).
//!
//! The `config` text goes through the very same `pimesh_schema` validator as a file
//! config, and the node proxy's own checks (`config::site::check_runnable`); `nodes`
//! (addresses from live heartbeats) then override or extend the config's `[nodes]`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use pimesh_schema::cluster::{ClusterConfig, Node, NodeAddress};
use pimesh_schema::DnsLabel;
use serde::Deserialize;

use crate::config::site::{self, SiteConfig};

/// A document as received, not yet checked.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Document {
    pub version: String,
    pub site: String,
    pub config: Option<String>,
    #[serde(default)]
    pub nodes: BTreeMap<String, String>,
}

impl Document {
    /// Parses one line of the stream (or the cache file). `source` names where it came
    /// from in the error.
    pub fn parse(source: &str, text: &[u8]) -> Result<Document, String> {
        serde_json::from_slice(text).map_err(|err| {
            format!(
                "{source}: expected a discovery document {{\"version\", \"site\", \"config\", \
                 \"nodes\"}}: {err}"
            )
        })
    }

    /// The site config this document stands for, for a proxy of `site`: the config text
    /// validated as a file config would be, with the heartbeat addresses merged into
    /// `[nodes]`. `Ok(None)`: the replica has no site config. Errors name `source` (the
    /// replica or the cache file) and the key at fault.
    pub fn site_config(&self, source: &str, site: &DnsLabel) -> Result<Option<SiteConfig>, String> {
        if self.site != site.as_str() {
            return Err(format!(
                "{source}: the document is for site {:?}, this proxy is of site {site}",
                self.site
            ));
        }
        let Some(text) = &self.config else {
            return Ok(None);
        };
        let file = Path::new(source);
        let mut config = ClusterConfig::parse(file, text).map_err(|err| err.to_string())?;
        if config.site != *site {
            return Err(format!(
                "{source}: the config names site {}, this proxy is of site {site}",
                config.site
            ));
        }
        site::check_runnable(file, &config).map_err(|err| err.to_string())?;
        merge_nodes(&mut config, &self.nodes).map_err(|err| format!("{source}: {err}"))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(digest.as_ref());
        Ok(Some(SiteConfig { sha256, config }))
    }
}

/// Heartbeat addresses override or extend the config's `[nodes]`, except that a loopback
/// address never overrides one the config gives: a proxy that reaches a replica on its
/// own node over loopback is seen from 127.0.0.1, an address useless to other nodes.
fn merge_nodes(config: &mut ClusterConfig, nodes: &BTreeMap<String, String>) -> Result<(), String> {
    for (name, addr) in nodes {
        let node = DnsLabel::try_from(name.clone())
            .map_err(|err| format!("key `nodes.{name}`: expected a node name: {err}"))?;
        let addr: SocketAddr = addr.parse().map_err(|err| {
            format!("key `nodes.{name}`: expected IP:PORT, found {addr:?}: {err}")
        })?;
        if addr.ip().is_loopback() && config.nodes.contains_key(&node) {
            continue;
        }
        config.nodes.insert(
            node,
            Node {
                address: NodeAddress(addr),
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    const CONFIG: &str = "site = \"lab\"\n[proxy]\nmax_connections = 100\n\
        [nodes.a]\naddress = \"10.0.0.1\"\n[nodes.b]\naddress = \"10.0.0.2\"\n\
        [services.web]\nport = 8080\nnodes = [\"b\"]\n";

    fn document(config: Option<&str>, nodes: &[(&str, &str)]) -> Document {
        Document {
            version: "v".to_owned(),
            site: "lab".to_owned(),
            config: config.map(str::to_owned),
            nodes: nodes
                .iter()
                .map(|(n, a)| ((*n).to_owned(), (*a).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn heartbeat_addresses_override_and_extend_the_configs_nodes() {
        let doc = document(
            Some(CONFIG),
            &[
                ("a", "127.0.0.1:4143"),
                ("b", "10.0.0.9:5000"),
                ("c", "10.0.0.3:4143"),
                ("d", "127.0.0.1:4143"),
            ],
        );
        let loaded = doc
            .site_config("replica 127.0.0.1:8086", &label("lab"))
            .expect("valid")
            .expect("a config");
        let addr = |n: &str| loaded.config.nodes[&label(n)].address.0.to_string();
        assert_eq!(addr("a"), "10.0.0.1:4143");
        assert_eq!(addr("b"), "10.0.0.9:5000");
        assert_eq!(addr("c"), "10.0.0.3:4143");
        assert_eq!(addr("d"), "127.0.0.1:4143", "loopback extends");
        assert_eq!(loaded.sha256_hex(), site::sha256_hex_of(CONFIG.as_bytes()));
        let none = document(None, &[]).site_config("r", &label("lab"));
        assert!(matches!(none, Ok(None)), "{none:?}");
    }

    #[test]
    fn refusals_name_the_source_and_the_key() {
        let source = "replica 127.0.0.1:8086";
        let bad = document(Some(&CONFIG.replace("port = 8080", "port = \"x\"")), &[]);
        let err = bad.site_config(source, &label("lab")).expect_err("refused");
        assert!(err.contains(source) && err.contains("port"), "{err}");
        let err = document(Some(CONFIG), &[])
            .site_config(source, &label("depot"))
            .expect_err("other site");
        assert!(err.contains(source) && err.contains("lab"), "{err}");
        let err = document(Some(CONFIG), &[("b", "nowhere")])
            .site_config(source, &label("lab"))
            .expect_err("bad address");
        assert!(err.contains("nodes.b") && err.contains("nowhere"), "{err}");
        let err = Document::parse(source, b"{\"version\": 1}").expect_err("not a document");
        assert!(err.contains(source), "{err}");
    }
}
