//! `/etc/rancher/k3s/config.yaml` for this node's K3s role: pure rendering, then one
//! atomic write when the content changed.
//!
//! The keys are K3s's own flag names at the pinned version (v1.34.3+k3s1; the list the
//! test fixture accepts is `tests/k3s/fixture/flags-v1.34.3+k3s1.txt`, with its sources).
//! Invariants:
//! - an agent's file holds only keys `k3s agent` accepts: an agent fails at once on a
//!   server-only key such as `disable` (K3s's config parser filters unknown keys for
//!   `server` only);
//! - the site's first server has `cluster-init: true` exactly when the site wants 3 or 5
//!   servers (embedded etcd); with one server K3s keeps its default SQLite datastore;
//! - the file holds the K3s token, so it is written mode 0600, and the user's own settings
//!   live in `config.yaml.d/`, which K3s reads after this file and this module never
//!   touches;
//! - every server has the site's `service-cidr` (all servers must agree on it; agents do
//!   not take the flag), which the nodes' redirect to the proxy (`super::redirect`) uses;
//! - `write-kubeconfig-mode` is a quoted string: an unquoted `0600` is a YAML integer that
//!   K3s would read as another mode.

use std::io;
use std::net::IpAddr;
use std::path::Path;

use pimesh_schema::cluster::K3sSettings;
use pimesh_schema::DnsLabel;
use serde::Serialize;

use super::token::K3sToken;

/// The port of K3s's supervisor and Kubernetes API on every server.
pub const API_PORT: u16 = 6443;

/// The mode of the rendered file (it holds the token) and of the admin kubeconfig.
pub const CONFIG_MODE: u32 = 0o600;

/// What this node is in the K3s cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum K3sRole {
    /// The site's first server (the `init` node): it creates the cluster.
    FirstServer,
    /// A further server, joining the cluster through the server at `via`.
    Server { via: IpAddr },
    /// An agent, registering with the server at `via` (K3s then learns every server).
    Agent { via: IpAddr },
}

impl K3sRole {
    pub fn is_server(&self) -> bool {
        !matches!(self, K3sRole::Agent { .. })
    }

    /// `server` or `agent`, as the status shows it.
    pub fn as_str(&self) -> &'static str {
        if self.is_server() {
            "server"
        } else {
            "agent"
        }
    }
}

/// Everything the file is made from.
#[derive(Debug, Clone)]
pub struct K3sInputs<'a> {
    pub role: K3sRole,
    pub token: &'a K3sToken,
    pub node: &'a DnsLabel,
    /// The address the mesh reaches this node at, when known; K3s picks one otherwise.
    pub node_ip: Option<IpAddr>,
    /// Every server's address the node knows (its own included on a server): the API
    /// certificate's extra names, so that agents may reach any server by address.
    pub server_addresses: Vec<IpAddr>,
    /// The site configuration's `[k3s]` (its defaults without one).
    pub settings: &'a K3sSettings,
}

/// The keys written, in K3s's spelling. `None` and empty lists are left out.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Rendered<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_init: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<String>,
    token: &'a str,
    node_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_ip: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tls_san: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    write_kubeconfig_mode: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    disable: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_cidr: Option<String>,
}

const HEADER: &str = "\
# Written by pimesh-supervisor for this node's K3s role; rewritten when the role, the
# site's servers or the site configuration's [k3s] change. Put your own settings in
# /etc/rancher/k3s/config.yaml.d/*.yaml: K3s reads them after this file, and Pimesh never
# writes there.
";

/// The file's text for `inputs`.
pub fn render(inputs: &K3sInputs<'_>) -> String {
    let server = inputs.role.is_server();
    let via = match inputs.role {
        K3sRole::FirstServer => None,
        K3sRole::Server { via } | K3sRole::Agent { via } => Some(via),
    };
    let mut tls_san: Vec<String> = Vec::new();
    if server {
        for address in &inputs.server_addresses {
            let address = address.to_string();
            if !tls_san.contains(&address) {
                tls_san.push(address);
            }
        }
    }
    let rendered = Rendered {
        cluster_init: (inputs.role == K3sRole::FirstServer && inputs.settings.servers > 1)
            .then_some(true),
        server: via.map(api_url),
        token: inputs.token.expose(),
        node_name: inputs.node.as_str(),
        node_ip: inputs.node_ip.map(|ip| ip.to_string()),
        tls_san,
        write_kubeconfig_mode: server.then_some("0600"),
        disable: if server {
            inputs.settings.disable.iter().map(String::as_str).collect()
        } else {
            Vec::new()
        },
        service_cidr: server.then(|| inputs.settings.service_cidr.to_string()),
    };
    // Plain strings, numbers and lists: serialising cannot fail; an empty body would
    // leave K3s with its defaults and is caught by the role's own probe.
    let body = serde_yaml_ng::to_string(&rendered).unwrap_or_default();
    format!("{HEADER}{body}")
}

/// `https://<address>:6443`, IPv6 in brackets.
pub fn api_url(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => format!("https://{v4}:{API_PORT}"),
        IpAddr::V6(v6) => format!("https://[{v6}]:{API_PORT}"),
    }
}

/// Writes `text` to `path` (mode 0600) when it differs from what is there, so that a
/// power cut leaves the old file or the new one; `Ok(true)` when it was written.
pub fn write(path: &Path, text: &str) -> io::Result<bool> {
    pimesh_runtime::atomic_file::replace(path, text.as_bytes(), CONFIG_MODE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(servers: u8) -> K3sSettings {
        K3sSettings {
            servers,
            disable: vec!["traefik".into(), "servicelb".into()],
            ..K3sSettings::default()
        }
    }

    fn parsed(text: &str) -> serde_json::Value {
        // The fixture reads YAML; here JSON values are compared after a YAML round trip.
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).expect("YAML");
        serde_json::to_value(value).expect("JSON")
    }

    fn inputs<'a>(
        role: K3sRole,
        token: &'a K3sToken,
        node: &'a DnsLabel,
        settings: &'a K3sSettings,
    ) -> K3sInputs<'a> {
        K3sInputs {
            role,
            token,
            node,
            node_ip: Some("192.168.1.11".parse().expect("ip")),
            server_addresses: vec![
                "192.168.1.10".parse().expect("ip"),
                "192.168.1.11".parse().expect("ip"),
                "192.168.1.10".parse().expect("ip"),
            ],
            settings,
        }
    }

    #[test]
    fn the_first_server_of_a_three_server_site_starts_embedded_etcd() {
        let token = K3sToken::new("s3cret".into());
        let node = DnsLabel::try_from("pi-a".to_owned()).expect("label");
        let settings = settings(3);
        let text = render(&inputs(K3sRole::FirstServer, &token, &node, &settings));
        assert!(text.starts_with("# Written by pimesh-supervisor"));
        assert_eq!(
            parsed(&text),
            serde_json::json!({
                "cluster-init": true,
                "token": "s3cret",
                "node-name": "pi-a",
                "node-ip": "192.168.1.11",
                "tls-san": ["192.168.1.10", "192.168.1.11"],
                "write-kubeconfig-mode": "0600",
                "disable": ["traefik", "servicelb"],
                "service-cidr": "10.43.0.0/16",
            })
        );
        assert!(
            text.contains("write-kubeconfig-mode: '0600'")
                || text.contains("write-kubeconfig-mode: \"0600\""),
            "the mode is a quoted string: {text}"
        );
    }

    #[test]
    fn a_one_server_site_keeps_the_default_datastore() {
        let token = K3sToken::new("s3cret".into());
        let node = DnsLabel::try_from("pi-a".to_owned()).expect("label");
        let settings = settings(1);
        let text = render(&inputs(K3sRole::FirstServer, &token, &node, &settings));
        assert!(parsed(&text).get("cluster-init").is_none(), "{text}");
    }

    #[test]
    fn a_further_server_joins_through_a_live_one() {
        let token = K3sToken::new("s3cret".into());
        let node = DnsLabel::try_from("pi-b".to_owned()).expect("label");
        let settings = settings(3);
        let role = K3sRole::Server {
            via: "192.168.1.10".parse().expect("ip"),
        };
        let value = parsed(&render(&inputs(role, &token, &node, &settings)));
        assert_eq!(value["server"], "https://192.168.1.10:6443");
        assert!(value.get("cluster-init").is_none());
        assert_eq!(
            value["disable"],
            serde_json::json!(["traefik", "servicelb"])
        );
        let v6 = K3sRole::Server {
            via: "fd00::1".parse().expect("ip"),
        };
        let value = parsed(&render(&inputs(v6, &token, &node, &settings)));
        assert_eq!(value["server"], "https://[fd00::1]:6443");
    }

    #[test]
    fn an_agent_gets_only_keys_that_k3s_agent_accepts() {
        let token = K3sToken::new("s3cret".into());
        let node = DnsLabel::try_from("pi-d".to_owned()).expect("label");
        let settings = settings(3);
        let role = K3sRole::Agent {
            via: "192.168.1.10".parse().expect("ip"),
        };
        let value = parsed(&render(&inputs(role, &token, &node, &settings)));
        assert_eq!(
            value,
            serde_json::json!({
                "server": "https://192.168.1.10:6443",
                "token": "s3cret",
                "node-name": "pi-d",
                "node-ip": "192.168.1.11",
            })
        );
        // Every key is an agent flag of the pinned version.
        let flags = include_str!("../../../tests/k3s/fixture/flags-v1.34.3+k3s1.txt");
        let agent_flags: Vec<&str> = flags
            .lines()
            .skip_while(|line| line.trim() != "[agent]")
            .skip(1)
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split_whitespace().next())
            .collect();
        for key in value.as_object().expect("map").keys() {
            assert!(
                agent_flags.contains(&key.as_str()),
                "{key} is not an agent flag"
            );
        }
    }

    #[test]
    fn the_file_is_written_once_per_content_with_mode_0600_and_drop_ins_are_left_alone() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.yaml");
        let drop_in = dir.path().join("config.yaml.d/10-mine.yaml");
        std::fs::create_dir_all(drop_in.parent().expect("parent")).expect("mkdir");
        std::fs::write(&drop_in, "node-label: [room=lab]\n").expect("drop-in");
        assert!(write(&path, "a: 1\n").expect("written"));
        assert!(!write(&path, "a: 1\n").expect("unchanged"));
        assert!(write(&path, "a: 2\n").expect("changed"));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_to_string(&drop_in).expect("kept"),
            "node-label: [room=lab]\n"
        );
    }
}
