//! One discovery document, as a control replica streams it and as the cache keeps it:
//! `{"version","site","config","nodes"}` and, from replicas that know the join protocol,
//! `"servers": {"<node>": {"address": "IP", "replicas": [ports]}}` (see the replica's
//! `discovery` module; a document without `servers` lists none).
//!
//! The `config` text goes through the very same `pimesh_schema` validator as a file
//! config, and the node proxy's own checks (`config::site::check_runnable`); `nodes`
//! (addresses from live heartbeats) then override or extend the config's `[nodes]`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{AddrParseError, IpAddr, SocketAddr};
use std::path::Path;

use pimesh_schema::cluster::{ClusterConfig, Node, NodeAddress};
use pimesh_schema::kube_services::{KubeMesh, KubeRoute, KubeService};
use pimesh_schema::{ConfigError, DnsLabel, NameError};
use serde::Deserialize;

use crate::config::site::{self, SiteConfig};

/// Why a document was refused; shown as one line naming where it came from (`origin`:
/// the replica or the cache file) and, when the fault belongs to one, the key.
#[derive(Debug)]
pub enum DocumentError {
    /// Not a discovery document.
    NotADocument {
        origin: String,
        err: serde_json::Error,
    },
    /// The document is for another site than this proxy's.
    OtherSite {
        origin: String,
        site: String,
        this: DnsLabel,
    },
    /// The config text fails the schema or this node's checks; the error names `origin` as
    /// its file.
    Config(ConfigError),
    /// The config names another site than this proxy's.
    ConfigOtherSite {
        origin: String,
        site: DnsLabel,
        this: DnsLabel,
    },
    /// A heartbeat address is not a node name and an address.
    Node { origin: String, err: NodeError },
}

/// Why an entry of `nodes` is refused.
#[derive(Debug)]
pub enum NodeError {
    Name {
        name: String,
        err: NameError,
    },
    Address {
        name: String,
        addr: String,
        err: AddrParseError,
    },
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DocumentError::NotADocument { origin, err } => write!(
                f,
                "{origin}: expected a discovery document {{\"version\", \"site\", \"config\", \
                 \"nodes\"}}: {err}"
            ),
            DocumentError::OtherSite { origin, site, this } => write!(
                f,
                "{origin}: the document is for site {site:?}, this proxy is of site {this}"
            ),
            DocumentError::Config(err) => err.fmt(f),
            DocumentError::ConfigOtherSite { origin, site, this } => write!(
                f,
                "{origin}: the config names site {site}, this proxy is of site {this}"
            ),
            DocumentError::Node { origin, err } => write!(f, "{origin}: {err}"),
        }
    }
}

impl std::error::Error for DocumentError {}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeError::Name { name, err } => {
                write!(f, "key `nodes.{name}`: expected a node name: {err}")
            }
            NodeError::Address { name, addr, err } => {
                write!(
                    f,
                    "key `nodes.{name}`: expected IP:PORT, found {addr:?}: {err}"
                )
            }
        }
    }
}

/// A document as received, not yet checked.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Document {
    pub version: String,
    pub site: String,
    pub config: Option<String>,
    #[serde(default)]
    pub nodes: BTreeMap<String, String>,
    /// The server nodes and their control replicas, from live server heartbeats.
    #[serde(default)]
    pub servers: BTreeMap<String, Server>,
    /// The meshed Kubernetes Services, from replicas that read K3s's API.
    #[serde(default)]
    pub kube_services: Vec<KubeService>,
    /// The Gateway API routes of their namespaces, from the same replicas.
    #[serde(default)]
    pub kube_routes: Vec<KubeRoute>,
}

/// A server node of the document's `servers`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Server {
    pub address: IpAddr,
    /// The ports of its control replicas.
    #[serde(default)]
    pub replicas: Vec<u16>,
}

impl Document {
    /// Parses one line of the stream (or the cache file). `source` names where it came
    /// from in the error.
    pub fn parse(source: &str, text: &[u8]) -> Result<Document, DocumentError> {
        serde_json::from_slice(text).map_err(|err| DocumentError::NotADocument {
            origin: source.to_owned(),
            err,
        })
    }

    /// Every control replica of every server the document lists, servers by node name,
    /// ports in the order given (port 0, never a replica's, is left out).
    pub fn server_replicas(&self) -> Vec<SocketAddr> {
        replicas_of(&self.servers)
    }

    /// The site config this document stands for, for a proxy of `site`: the config text
    /// validated as a file config would be, with the heartbeat addresses merged into
    /// `[nodes]`. `Ok(None)`: the replica has no site config. Errors name `source` (the
    /// replica or the cache file) and the key at fault.
    pub fn site_config(
        &self,
        source: &str,
        site: &DnsLabel,
    ) -> Result<Option<SiteConfig>, DocumentError> {
        if self.site != site.as_str() {
            return Err(DocumentError::OtherSite {
                origin: source.to_owned(),
                site: self.site.clone(),
                this: site.clone(),
            });
        }
        let Some(text) = &self.config else {
            return Ok(None);
        };
        let file = Path::new(source);
        let mut config = ClusterConfig::parse(file, text).map_err(DocumentError::Config)?;
        if config.site != *site {
            return Err(DocumentError::ConfigOtherSite {
                origin: source.to_owned(),
                site: config.site,
                this: site.clone(),
            });
        }
        site::check_runnable(file, &config).map_err(DocumentError::Config)?;
        merge_nodes(&mut config, &self.nodes).map_err(|err| DocumentError::Node {
            origin: source.to_owned(),
            err,
        })?;
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(digest.as_ref());
        Ok(Some(SiteConfig {
            sha256,
            config,
            kube: KubeMesh {
                services: self.kube_services.clone(),
                routes: self.kube_routes.clone(),
            },
        }))
    }
}

/// Heartbeat addresses override or extend the config's `[nodes]`, except that a loopback
/// address never overrides one the config gives: a proxy that reaches a replica on its
/// own node over loopback is seen from 127.0.0.1, an address useless to other nodes.
fn merge_nodes(
    config: &mut ClusterConfig,
    nodes: &BTreeMap<String, String>,
) -> Result<(), NodeError> {
    for (name, addr) in nodes {
        let node = DnsLabel::try_from(name.clone()).map_err(|err| NodeError::Name {
            name: name.clone(),
            err,
        })?;
        let addr: SocketAddr = addr.parse().map_err(|err| NodeError::Address {
            name: name.clone(),
            addr: addr.clone(),
            err,
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

/// Every control replica of `servers`, servers by node name, ports in the order given
/// (port 0, never a replica's, is left out).
pub fn replicas_of(servers: &BTreeMap<String, Server>) -> Vec<SocketAddr> {
    servers
        .values()
        .flat_map(|server| {
            server
                .replicas
                .iter()
                .filter(|port| **port != 0)
                .map(|port| SocketAddr::new(server.address, *port))
        })
        .collect()
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
            servers: BTreeMap::new(),
            kube_services: Vec::new(),
            kube_routes: Vec::new(),
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
    fn servers_are_optional_and_list_their_replicas() {
        let old = br#"{"version":"v1","site":"lab","config":null,"nodes":{"a":"10.0.0.1:4143"}}"#;
        let parsed = Document::parse("r", old).expect("an old document stays valid");
        assert!(parsed.servers.is_empty());
        assert!(parsed.server_replicas().is_empty());
        let new = br#"{"version":"v2","site":"lab","config":null,"nodes":{},
            "servers":{"s2":{"address":"10.0.0.2","replicas":[8086,8087]},
                       "s1":{"address":"fd00::1","replicas":[8086,0]},
                       "s3":{"address":"10.0.0.3"}}}"#;
        let parsed = Document::parse("r", new).expect("valid");
        assert_eq!(parsed.servers.len(), 3);
        let replicas: Vec<String> = parsed
            .server_replicas()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            replicas,
            ["[fd00::1]:8086", "10.0.0.2:8086", "10.0.0.2:8087"],
            "by node name, port 0 left out"
        );
        let bad = br#"{"version":"v","site":"lab","config":null,
            "servers":{"s1":{"address":"nowhere","replicas":[8086]}}}"#;
        let err = Document::parse("replica 127.0.0.1:8086", bad)
            .expect_err("not an address")
            .to_string();
        assert!(err.contains("replica 127.0.0.1:8086"), "{err}");
    }

    #[test]
    fn refusals_name_the_source_and_the_key() {
        let source = "replica 127.0.0.1:8086";
        let bad = document(Some(&CONFIG.replace("port = 8080", "port = \"x\"")), &[]);
        let err = bad
            .site_config(source, &label("lab"))
            .expect_err("refused")
            .to_string();
        assert!(err.contains(source) && err.contains("port"), "{err}");
        let err = document(Some(CONFIG), &[])
            .site_config(source, &label("depot"))
            .expect_err("other site")
            .to_string();
        assert!(err.contains(source) && err.contains("lab"), "{err}");
        let err = document(Some(CONFIG), &[("b", "nowhere")])
            .site_config(source, &label("lab"))
            .expect_err("bad address")
            .to_string();
        assert!(err.contains("nodes.b") && err.contains("nowhere"), "{err}");
        let err = Document::parse(source, b"{\"version\": 1}")
            .expect_err("not a document")
            .to_string();
        assert!(err.contains(source), "{err}");
    }
}
