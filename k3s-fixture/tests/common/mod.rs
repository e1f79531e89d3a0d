//! What the fixture's tests share: the fixture as a child process in a folder of its own,
//! isolated from the host's K3s files and environment, and HTTPS clients made from the
//! kubeconfigs it writes.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use pimesh_test_support::ports::free_port;
use pimesh_test_support::Daemon;

/// Variables K3s (and systemd) read that a test must not inherit.
const ENVIRONMENT: &[&str] = &[
    "K3S_TOKEN",
    "K3S_TOKEN_FILE",
    "K3S_AGENT_TOKEN",
    "K3S_URL",
    "K3S_CONFIG_FILE",
    "K3S_DATA_DIR",
    "K3S_NODE_NAME",
    "K3S_KUBECONFIG_OUTPUT",
    "K3S_KUBECONFIG_MODE",
    "K3S_CLUSTER_INIT",
    "K3S_LB_SERVER_PORT",
    "NOTIFY_SOCKET",
];

/// One fixture node's folder: its config file, data folder, kubeconfig and log.
pub struct NodeDir {
    pub root: PathBuf,
    pub name: String,
}

impl NodeDir {
    pub fn new(parent: &Path, name: &str) -> NodeDir {
        let root = parent.join(name);
        std::fs::create_dir_all(&root).unwrap();
        NodeDir {
            root,
            name: name.to_owned(),
        }
    }

    pub fn config(&self) -> PathBuf {
        self.root.join("config.yaml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.root.join("k3s.yaml")
    }

    pub fn kubelet_kubeconfig(&self) -> PathBuf {
        self.data_dir().join("agent/kubelet.kubeconfig")
    }

    pub fn log(&self) -> PathBuf {
        self.root.join(format!("{}.log", self.name))
    }

    /// Writes `text` to the config file (or to a drop-in when `drop_in` is given).
    pub fn write_config(&self, drop_in: Option<&str>, text: &str) {
        let path = match drop_in {
            Some(name) => {
                let dir = self.root.join("config.yaml.d");
                std::fs::create_dir_all(&dir).unwrap();
                dir.join(name)
            }
            None => self.config(),
        };
        std::fs::write(path, text).unwrap();
    }

    /// `k3s-fixture <subcommand> --config <config> --data-dir <data> <args>`, the
    /// environment cleaned.
    pub fn command(&self, subcommand: &str, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_k3s-fixture"));
        for var in ENVIRONMENT {
            command.env_remove(var);
        }
        command
            .arg(subcommand)
            .arg("--config")
            .arg(self.config())
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        command
    }

    /// Starts `k3s-fixture <subcommand>` (see [`NodeDir::command`]), logging to [`NodeDir::log`].
    pub fn spawn(&self, subcommand: &str, args: &[&str]) -> Daemon {
        Daemon::spawn(
            &self.name,
            self.command(subcommand, args),
            Some(&self.log()),
        )
    }
}

/// A server's usual arguments: its node name, 127.0.0.1 as node IP and bind address,
/// `port`, and the kubeconfig in its folder.
pub fn server_args(dir: &NodeDir, port: u16) -> Vec<String> {
    vec![
        "--node-name".into(),
        dir.name.clone(),
        "--node-ip".into(),
        "127.0.0.1".into(),
        "--bind-address".into(),
        "127.0.0.1".into(),
        "--https-listen-port".into(),
        port.to_string(),
        "--write-kubeconfig".into(),
        dir.kubeconfig().display().to_string(),
    ]
}

pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

pub fn port() -> u16 {
    free_port()
}

/// An HTTPS client of the server a kubeconfig names, with its CA and client certificate
/// (inline or as file paths), and that server's URL.
pub fn kube_client(kubeconfig: &Path) -> Option<(reqwest::Client, String)> {
    let text = std::fs::read_to_string(kubeconfig).ok()?;
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).ok()?;
    let cluster = &doc["clusters"][0]["cluster"];
    let user = &doc["users"][0]["user"];
    let read = |data: &serde_yaml_ng::Value, file: &serde_yaml_ng::Value| -> Option<Vec<u8>> {
        match (data.as_str(), file.as_str()) {
            (Some(data), _) => base64::engine::general_purpose::STANDARD.decode(data).ok(),
            (None, Some(file)) => std::fs::read(file).ok(),
            (None, None) => None,
        }
    };
    let ca = read(
        &cluster["certificate-authority-data"],
        &cluster["certificate-authority"],
    )?;
    let mut identity = read(
        &user["client-certificate-data"],
        &user["client-certificate"],
    )?;
    identity.push(b'\n');
    identity.extend(read(&user["client-key-data"], &user["client-key"])?);
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).ok()?)
        .identity(reqwest::Identity::from_pem(&identity).ok()?)
        .timeout(std::time::Duration::from_secs(3))
        .build()
        .ok()?;
    Some((client, cluster["server"].as_str()?.to_owned()))
}

/// `GET <server><path>` with `client`: status and body, or `None` when it failed.
pub async fn get(client: &reqwest::Client, url: &str) -> Option<(u16, String)> {
    let response = client.get(url).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// A client that trusts the CA in `ca_pem` and has no client certificate.
pub fn anonymous_client(ca_pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).unwrap())
        .timeout(std::time::Duration::from_secs(3))
        .build()
        .unwrap()
}

/// The node `name` in a NodeList, when its `Ready` condition is `True`.
pub fn ready_in(list: &serde_json::Value, name: &str) -> bool {
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["metadata"]["name"] == name)
        .any(node_ready)
}

/// Whether a Node's `Ready` condition is `True`.
pub fn node_ready(node: &serde_json::Value) -> bool {
    node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The NodeList a server answers with `kubeconfig`'s credentials.
pub async fn nodes(kubeconfig: &Path) -> Option<serde_json::Value> {
    let (client, server) = kube_client(kubeconfig)?;
    let (status, body) = get(&client, &format!("{server}/api/v1/nodes")).await?;
    if status != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

/// The Node `name` in the NodeList a server answers with `kubeconfig`'s credentials.
pub async fn find_node(kubeconfig: &Path, name: &str) -> Option<serde_json::Value> {
    nodes(kubeconfig)
        .await?
        .get("items")?
        .as_array()?
        .iter()
        .find(|n| n["metadata"]["name"] == name)
        .cloned()
}
