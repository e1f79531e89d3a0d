//! The effective settings of one run: the config file's flags, overridden by the command
//! line's, then the environment variables K3s reads for a few flags, then the defaults.
//!
//! As in K3s, the config file's keys act as flags placed before the command line's, so a
//! command-line value wins; for a repeatable flag, the command line's values replace the
//! config file's list (K3s docs: "the CLI arguments will overwrite all values in the list").

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::flags::{flags, Kind, Subcommand};

/// Flags whose values never appear in a log.
const SECRETS: &[&str] = &[
    "token",
    "agent-token",
    "vpn-auth",
    "etcd-s3-secret-key",
    "etcd-s3-session-token",
    "datastore-endpoint",
];

/// The environment variables K3s reads for the flags the fixture uses (urfave/cli `EnvVars`).
const ENV: &[(&str, &str)] = &[
    ("token", "K3S_TOKEN"),
    ("token-file", "K3S_TOKEN_FILE"),
    ("agent-token", "K3S_AGENT_TOKEN"),
    ("server", "K3S_URL"),
    ("data-dir", "K3S_DATA_DIR"),
    ("node-name", "K3S_NODE_NAME"),
    ("write-kubeconfig", "K3S_KUBECONFIG_OUTPUT"),
    ("write-kubeconfig-mode", "K3S_KUBECONFIG_MODE"),
    ("cluster-init", "K3S_CLUSTER_INIT"),
    ("lb-server-port", "K3S_LB_SERVER_PORT"),
];

/// The default data folder.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/rancher/k3s";
/// The default admin kubeconfig.
pub const DEFAULT_KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";

/// Every flag that has a value, by long name, with its values (one for a scalar).
#[derive(Debug, Clone)]
pub struct Settings {
    values: BTreeMap<String, Vec<String>>,
}

impl Settings {
    /// Config file flags, overridden by the command line's, then `env` for flags neither set.
    pub fn resolve(
        command: Subcommand,
        config: Vec<(String, Vec<String>)>,
        cli: Vec<(String, String)>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Settings {
        let set = flags(command);
        let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, list) in config {
            values.insert(name, list);
        }
        let mut from_cli: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in cli {
            from_cli.entry(name).or_default().push(value);
        }
        for (name, list) in from_cli {
            values.insert(name, list);
        }
        for (name, var) in ENV {
            if values.contains_key(*name) || set.lookup(command, name).is_none() {
                continue;
            }
            if let Some(value) = env(var).filter(|v| !v.is_empty()) {
                values.insert((*name).to_owned(), vec![value]);
            }
        }
        // A scalar keeps its last value only.
        for (name, list) in &mut values {
            if matches!(
                set.lookup(command, name),
                Some((_, Kind::Scalar | Kind::Bool))
            ) {
                if let Some(last) = list.pop() {
                    *list = vec![last];
                }
            }
        }
        Settings { values }
    }

    /// The value of a scalar flag.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .and_then(|list| list.last())
            .map(String::as_str)
    }

    /// The values of a repeatable flag.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.values.get(name).cloned().unwrap_or_default()
    }

    /// A boolean flag (false when not given).
    pub fn flag(&self, name: &str) -> bool {
        self.get(name)
            .and_then(crate::cli::parse_bool)
            .unwrap_or(false)
    }

    /// A port flag, or `default`.
    pub fn port(&self, name: &str, default: u16) -> Result<u16, String> {
        match self.get(name) {
            None | Some("") => Ok(default),
            Some(text) => text
                .parse::<u16>()
                .map_err(|_| format!("invalid value {text:?} for flag -{name}: parse error")),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        PathBuf::from(
            self.get("data-dir")
                .filter(|d| !d.is_empty())
                .unwrap_or(DEFAULT_DATA_DIR),
        )
    }

    /// Whether the data folder is K3s's default (then the node password lives in
    /// `/etc/rancher/node/password`, as in K3s).
    pub fn default_data_dir(&self) -> bool {
        self.data_dir() == std::path::Path::new(DEFAULT_DATA_DIR)
    }

    /// The token: `--token` (or `K3S_TOKEN`), else the contents of `--token-file`.
    pub fn token_text(&self) -> Result<Option<String>, String> {
        if let Some(token) = self.get("token").filter(|t| !t.trim().is_empty()) {
            return Ok(Some(token.trim().to_owned()));
        }
        match self.get("token-file").filter(|f| !f.is_empty()) {
            Some(file) => std::fs::read_to_string(file)
                .map(|text| Some(text.trim().to_owned()))
                .map_err(|err| format!("failed to read token file {file}: {err}")),
            None => Ok(None),
        }
    }

    /// `--node-name`, else the host name.
    pub fn node_name(&self) -> String {
        self.get("node-name")
            .filter(|n| !n.is_empty())
            .map_or_else(crate::files::hostname, str::to_owned)
    }

    /// The first `--node-ip`, else the host's first non-loopback IPv4 address.
    pub fn internal_ip(&self) -> Result<std::net::IpAddr, String> {
        match self.list("node-ip").first() {
            Some(ip) => ip
                .parse()
                .map_err(|_| format!("invalid node-ip {ip:?}: not an IP address")),
            None => Ok(crate::files::default_ip()),
        }
    }

    /// The settings as one log line: `name=value` pairs, secrets shown as `<redacted>`.
    pub fn describe(&self) -> String {
        self.values
            .iter()
            .map(|(name, list)| {
                let value = if SECRETS.contains(&name.as_str()) {
                    "<redacted>".to_owned()
                } else {
                    list.join(",")
                };
                format!("{name}={value}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str, value: &str) -> (String, String) {
        (name.to_owned(), value.to_owned())
    }

    #[test]
    fn the_command_line_wins_and_replaces_lists() {
        let config = vec![
            (
                "node-label".to_owned(),
                vec!["a=1".to_owned(), "b=2".to_owned()],
            ),
            ("tls-san".to_owned(), vec!["x".to_owned()]),
            ("data-dir".to_owned(), vec!["/config".to_owned()]),
            ("token".to_owned(), vec!["from-config".to_owned()]),
        ];
        let cli = vec![
            pair("node-label", "c=3"),
            pair("data-dir", "/one"),
            pair("data-dir", "/cli"),
        ];
        let env = |var: &str| match var {
            "K3S_TOKEN" => Some("from-env".to_owned()),
            "K3S_NODE_NAME" => Some("env-node".to_owned()),
            _ => None,
        };
        let settings = Settings::resolve(Subcommand::Server, config, cli, env);
        assert_eq!(settings.list("node-label"), vec!["c=3".to_owned()]);
        assert_eq!(settings.list("tls-san"), vec!["x".to_owned()]);
        assert_eq!(settings.get("data-dir"), Some("/cli"));
        assert_eq!(settings.get("token"), Some("from-config"));
        assert_eq!(settings.get("node-name"), Some("env-node"));
        let line = settings.describe();
        assert!(line.contains("token=<redacted>"), "{line}");
        assert!(!line.contains("from-config"), "{line}");
    }

    #[test]
    fn ports_default_and_must_parse() {
        let settings = Settings::resolve(
            Subcommand::Agent,
            Vec::new(),
            vec![pair("lb-server-port", "70000")],
            |_| None,
        );
        assert!(settings.port("lb-server-port", 6444).is_err());
        let settings = Settings::resolve(Subcommand::Agent, Vec::new(), Vec::new(), |_| None);
        assert_eq!(settings.port("lb-server-port", 6444), Ok(6444));
        assert!(settings.default_data_dir());
    }
}
