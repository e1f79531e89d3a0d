//! Kubernetes `Node` objects as the fixture shows them (`GET /api/v1/nodes`), and the
//! table of nodes each fixture server keeps: the stand-in for the Nodes and node Leases
//! in K3s's datastore.
//!
//! - A node (a fixture kubelet: a server's own, or an agent's) registers its `Node` every
//!   [`HEARTBEAT_EVERY`]; a node not heard from for [`LEASE_SECONDS`] shows condition
//!   `Ready` = `Unknown`, reason `NodeStatusUnknown`, as when a node lease expires.
//! - K3s's node password check: the first registration of a name keeps the SHA-256 of the
//!   password the node sent (annotation `k3s.io/node-password`, never kept or shown);
//!   a registration of that name with another password is refused while the first one's
//!   lease is alive.
//! - Servers' tables are merged entry by entry, newest heartbeat winning (the stand-in
//!   for etcd replication, see `peers`), and kept on disk across restarts (the stand-in
//!   for the datastore, see `server`).
//!
//! Fixture-only annotations, named as such: `pimesh.fixture/https-port` (a server's
//! HTTPS port: on 127.0.0.1 several servers share one InternalIP) and
//! `pimesh.fixture/node-password-sha256`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::log::{parse_rfc3339, rfc3339};

/// How often a node registers (its heartbeat).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A node not heard from for longer is not Ready (the node lease duration).
pub const LEASE_SECONDS: u64 = 40;
/// The Kubernetes version the fixture claims.
pub const KUBE_VERSION: &str = "v1.34.3+k3s1";

pub const LABEL_CONTROL_PLANE: &str = "node-role.kubernetes.io/control-plane";
pub const LABEL_MASTER: &str = "node-role.kubernetes.io/master";
pub const LABEL_ETCD: &str = "node-role.kubernetes.io/etcd";
/// The password a node registers with (K3s carries it in a header; the fixture in the
/// body); the table keeps only its hash.
pub const ANNOTATION_PASSWORD: &str = "k3s.io/node-password";
/// Fixture-only: the SHA-256 of the node password of the first registration.
pub const ANNOTATION_PASSWORD_HASH: &str = "pimesh.fixture/node-password-sha256";
/// Fixture-only: a server's HTTPS port (supervisor and API), next to its InternalIP.
pub const ANNOTATION_HTTPS_PORT: &str = "pimesh.fixture/https-port";

/// K3s's message when a node password does not match.
pub const PASSWORD_REJECTED: &str = "Node password rejected, duplicate hostname or contents of \
     '/etc/rancher/node/password' may not match server node-passwd entry, try enabling a \
     unique node name with the --with-node-id flag";

/// What role a node has in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    /// A server; `etcd` when embedded etcd is in use (cluster-init, or joined).
    Server {
        etcd: bool,
        https_port: u16,
    },
}

/// What a fixture kubelet reports about its node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub internal_ip: IpAddr,
    pub external_ips: Vec<String>,
    /// `--node-label` values, `key=value`.
    pub labels: Vec<String>,
    /// `--node-taint` values, `key=value:Effect`.
    pub taints: Vec<String>,
    pub role: Role,
    pub password: String,
    pub uid: String,
}

/// The `Node` a fixture kubelet registers (with its password annotation).
pub fn node_object(info: &NodeInfo) -> Value {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let mut labels = Map::new();
    for (k, v) in [
        ("beta.kubernetes.io/arch", arch),
        ("beta.kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", arch),
        ("kubernetes.io/hostname", info.name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("node.kubernetes.io/instance-type", "k3s"),
    ] {
        labels.insert(k.to_owned(), json!(v));
    }
    let mut annotations = Map::new();
    annotations.insert("k3s.io/hostname".to_owned(), json!(info.name));
    annotations.insert(
        "k3s.io/internal-ip".to_owned(),
        json!(info.internal_ip.to_string()),
    );
    annotations.insert(ANNOTATION_PASSWORD.to_owned(), json!(info.password));
    if let Role::Server { etcd, https_port } = info.role {
        labels.insert(LABEL_CONTROL_PLANE.to_owned(), json!("true"));
        labels.insert(LABEL_MASTER.to_owned(), json!("true"));
        if etcd {
            labels.insert(LABEL_ETCD.to_owned(), json!("true"));
        }
        annotations.insert(
            ANNOTATION_HTTPS_PORT.to_owned(),
            json!(https_port.to_string()),
        );
    }
    for label in &info.labels {
        let (k, v) = label.split_once('=').unwrap_or((label.as_str(), ""));
        labels.insert(k.to_owned(), json!(v));
    }
    let taints: Vec<Value> = info.taints.iter().map(|t| taint(t)).collect();
    let mut addresses =
        vec![json!({"type": "InternalIP", "address": info.internal_ip.to_string()})];
    for ip in &info.external_ips {
        addresses.push(json!({"type": "ExternalIP", "address": ip}));
    }
    addresses.push(json!({"type": "Hostname", "address": info.name}));
    let cidr = format!("10.42.{}.0/24", pod_subnet(&info.name));
    let mut spec = json!({
        "podCIDR": cidr,
        "podCIDRs": [cidr],
        "providerID": format!("k3s://{}", info.name),
    });
    if !taints.is_empty() {
        spec["taints"] = Value::Array(taints);
    }
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": info.name,
            "uid": info.uid,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": spec,
        "status": {
            "addresses": addresses,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "architecture": arch,
                "containerRuntimeVersion": "containerd://2.1.5-k3s1",
                "kernelVersion": crate::files::kernel_version(),
                "kubeProxyVersion": KUBE_VERSION,
                "kubeletVersion": KUBE_VERSION,
                "operatingSystem": "linux",
                "osImage": crate::files::os_image(),
            },
        },
    })
}

/// `key=value:Effect` (or `key:Effect`) as a taint.
fn taint(text: &str) -> Value {
    let (kv, effect) = text.rsplit_once(':').unwrap_or((text, "NoSchedule"));
    let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
    let mut taint = json!({"key": key, "effect": effect});
    if !value.is_empty() {
        taint["value"] = json!(value);
    }
    taint
}

/// A pod subnet number from the node name (the fixture has no IPAM).
fn pod_subnet(name: &str) -> u8 {
    name.bytes()
        .fold(0u8, |acc, b| acc.wrapping_mul(31).wrapping_add(b))
}

/// A random version-4 UUID.
pub fn uuid() -> String {
    let hex = crate::token::random_hex(16).unwrap_or_else(|_| "0".repeat(32));
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// A server of the cluster as the table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    pub name: String,
    /// InternalIP and the HTTPS port annotation (6443 when absent).
    pub address: SocketAddr,
}

/// Why a registration was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not a Node with a name and a node password.
    Invalid(String),
    /// Another password than the name's live registration.
    Password,
}

#[derive(Debug, Clone)]
struct Entry {
    /// The Node as registered (password hash, no conditions).
    node: Value,
    heartbeat: u64,
    ready_since: u64,
    resource_version: u64,
    created: u64,
}

impl Entry {
    fn fresh(&self, now: u64) -> bool {
        now.saturating_sub(self.heartbeat) <= LEASE_SECONDS
    }
}

/// The nodes a server knows.
#[derive(Debug, Default)]
pub struct Table {
    entries: BTreeMap<String, Entry>,
    version: u64,
}

impl Table {
    /// Registers (or refreshes) `node`, heard from at `now`; `Ok(true)` when it is new.
    pub fn register(&mut self, mut node: Value, now: u64) -> Result<bool, Refused> {
        let name = node_name(&node)
            .ok_or_else(|| Refused::Invalid("a Node needs metadata.name".to_owned()))?;
        let password = node
            .pointer(&format!(
                "/metadata/annotations/{}",
                escape_pointer(ANNOTATION_PASSWORD)
            ))
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                Refused::Invalid(format!(
                    "a Node needs the annotation {ANNOTATION_PASSWORD} (its node password)"
                ))
            })?;
        let hash = crate::token::sha256_hex(password.as_bytes());
        let existing = self.entries.get(&name);
        if let Some(old) = existing.filter(|old| old.fresh(now)) {
            if password_hash(&old.node).is_some_and(|old_hash| old_hash != hash) {
                return Err(Refused::Password);
            }
        }
        let (uid, created, ready_since) = match existing {
            Some(old) => (
                old.node.pointer("/metadata/uid").cloned(),
                old.created,
                if old.fresh(now) { old.ready_since } else { now },
            ),
            None => (None, now, now),
        };
        if let Some(annotations) = node
            .pointer_mut("/metadata/annotations")
            .and_then(Value::as_object_mut)
        {
            annotations.remove(ANNOTATION_PASSWORD);
            annotations.insert(ANNOTATION_PASSWORD_HASH.to_owned(), json!(hash));
        }
        if let Some(uid) = uid {
            node["metadata"]["uid"] = uid;
        }
        strip_conditions(&mut node);
        self.version += 1;
        let is_new = existing.is_none();
        self.entries.insert(
            name,
            Entry {
                node,
                heartbeat: now,
                ready_since,
                resource_version: self.version,
                created,
            },
        );
        Ok(is_new)
    }

    /// Whether `password` may be used for the node `name` now: no live registration of
    /// that name, or one with the same password.
    pub fn password_matches(&self, name: &str, password: &str, now: u64) -> bool {
        let hash = crate::token::sha256_hex(password.as_bytes());
        self.entries
            .get(name)
            .filter(|entry| entry.fresh(now))
            .and_then(|entry| password_hash(&entry.node))
            .is_none_or(|old| old == hash)
    }

    /// Takes `node` from another server's list when its heartbeat is newer than ours.
    /// `except` (this server's own node) is never taken. `true` when taken.
    pub fn merge(&mut self, mut node: Value, except: &str, now: u64) -> bool {
        let Some(name) = node_name(&node) else {
            return false;
        };
        let Some(heartbeat) = heartbeat_of(&node) else {
            return false;
        };
        if name == except {
            return false;
        }
        let existing = self.entries.get(&name);
        if existing.is_some_and(|old| old.heartbeat >= heartbeat) {
            return false;
        }
        let (created, ready_since) = match existing {
            Some(old) if old.fresh(now) => (old.created, old.ready_since),
            Some(old) => (old.created, now),
            None => (
                node.pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str)
                    .and_then(parse_rfc3339)
                    .unwrap_or(now),
                now,
            ),
        };
        strip_conditions(&mut node);
        if let Some(meta) = node.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        self.version += 1;
        self.entries.insert(
            name,
            Entry {
                node,
                heartbeat,
                ready_since,
                resource_version: self.version,
                created,
            },
        );
        true
    }

    /// One Node as shown at `now`.
    pub fn get(&self, name: &str, now: u64) -> Option<Value> {
        self.entries.get(name).map(|entry| show(entry, now))
    }

    /// The NodeList as shown at `now`.
    pub fn list(&self, now: u64) -> Value {
        let items: Vec<Value> = self.entries.values().map(|e| show(e, now)).collect();
        json!({
            "kind": "NodeList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": self.version.to_string()},
            "items": items,
        })
    }

    /// The table's version: it grows with every change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The table as JSON, to keep on disk (the stand-in for the datastore's contents).
    pub fn snapshot(&self) -> Value {
        let entries: Vec<Value> = self
            .entries
            .values()
            .map(|e| {
                json!({"node": e.node, "heartbeat": e.heartbeat,
                       "readySince": e.ready_since, "created": e.created})
            })
            .collect();
        json!({"version": self.version, "entries": entries})
    }

    /// A table from a [`Table::snapshot`]; entries that do not read are left out.
    pub fn restore(snapshot: &Value) -> Table {
        let mut table = Table {
            entries: BTreeMap::new(),
            version: snapshot["version"].as_u64().unwrap_or(0),
        };
        for e in snapshot["entries"].as_array().into_iter().flatten() {
            let (Some(name), Some(heartbeat)) = (node_name(&e["node"]), e["heartbeat"].as_u64())
            else {
                continue;
            };
            table.version += 1;
            table.entries.insert(
                name,
                Entry {
                    node: e["node"].clone(),
                    heartbeat,
                    ready_since: e["readySince"].as_u64().unwrap_or(heartbeat),
                    resource_version: table.version,
                    created: e["created"].as_u64().unwrap_or(heartbeat),
                },
            );
        }
        table
    }

    /// The servers (nodes with the control-plane label) and where to reach them.
    pub fn servers(&self) -> Vec<ServerEntry> {
        self.entries
            .iter()
            .filter(|(_, e)| {
                e.node
                    .pointer(&format!(
                        "/metadata/labels/{}",
                        escape_pointer(LABEL_CONTROL_PLANE)
                    ))
                    .and_then(Value::as_str)
                    == Some("true")
            })
            .filter_map(|(name, e)| {
                let ip: IpAddr = e
                    .node
                    .pointer("/status/addresses")?
                    .as_array()?
                    .iter()
                    .find(|a| a["type"] == "InternalIP")?["address"]
                    .as_str()?
                    .parse()
                    .ok()?;
                let port = e
                    .node
                    .pointer(&format!(
                        "/metadata/annotations/{}",
                        escape_pointer(ANNOTATION_HTTPS_PORT)
                    ))
                    .and_then(Value::as_str)
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(6443);
                Some(ServerEntry {
                    name: name.clone(),
                    address: SocketAddr::new(ip, port),
                })
            })
            .collect()
    }
}

fn node_name(node: &Value) -> Option<String> {
    node.pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
}

fn password_hash(node: &Value) -> Option<&str> {
    node.pointer(&format!(
        "/metadata/annotations/{}",
        escape_pointer(ANNOTATION_PASSWORD_HASH)
    ))
    .and_then(Value::as_str)
}

/// The `lastHeartbeatTime` of the Node's `Ready` condition.
fn heartbeat_of(node: &Value) -> Option<u64> {
    node.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?["lastHeartbeatTime"]
        .as_str()
        .and_then(parse_rfc3339)
}

fn strip_conditions(node: &mut Value) {
    if let Some(status) = node.get_mut("status").and_then(Value::as_object_mut) {
        status.remove("conditions");
    }
}

/// A JSON pointer token (`/` and `~` escaped).
fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The Node of `entry` with its conditions as of `now`.
fn show(entry: &Entry, now: u64) -> Value {
    let mut node = entry.node.clone();
    if !node.is_object() {
        return node;
    }
    node["kind"] = json!("Node");
    node["apiVersion"] = json!("v1");
    if let Some(meta) = node.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".to_owned(),
            json!(entry.resource_version.to_string()),
        );
        meta.insert(
            "creationTimestamp".to_owned(),
            json!(rfc3339(entry.created)),
        );
    }
    let heartbeat = rfc3339(entry.heartbeat);
    let conditions = if entry.fresh(now) {
        let since = rfc3339(entry.ready_since);
        let pressure = |kind: &str, reason: &str, message: &str| {
            json!({"type": kind, "status": "False", "reason": reason, "message": message,
                   "lastHeartbeatTime": heartbeat, "lastTransitionTime": since})
        };
        vec![
            pressure(
                "MemoryPressure",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            pressure(
                "DiskPressure",
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
            ),
            pressure(
                "PIDPressure",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            ),
            json!({"type": "Ready", "status": "True", "reason": "KubeletReady",
                   "message": "kubelet is posting ready status",
                   "lastHeartbeatTime": heartbeat, "lastTransitionTime": since}),
        ]
    } else {
        let since = rfc3339(entry.heartbeat + LEASE_SECONDS);
        ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]
            .iter()
            .map(|kind| {
                json!({"type": kind, "status": "Unknown", "reason": "NodeStatusUnknown",
                       "message": "Kubelet stopped posting node status.",
                       "lastHeartbeatTime": heartbeat, "lastTransitionTime": since})
            })
            .collect()
    };
    if let Some(status) = node.get_mut("status").and_then(Value::as_object_mut) {
        status.insert("conditions".to_owned(), Value::Array(conditions));
    } else {
        node["status"] = json!({"conditions": conditions});
    }
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, role: Role, password: &str) -> NodeInfo {
        NodeInfo {
            name: name.to_owned(),
            internal_ip: "127.0.0.1".parse().unwrap(),
            external_ips: Vec::new(),
            labels: vec!["site=a".to_owned()],
            taints: vec!["dedicated=edge:NoSchedule".to_owned()],
            role,
            password: password.to_owned(),
            uid: uuid(),
        }
    }

    fn ready(node: &Value) -> (String, String) {
        let c = node["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        (
            c["status"].as_str().unwrap().to_owned(),
            c["reason"].as_str().unwrap().to_owned(),
        )
    }

    #[test]
    fn nodes_are_ready_until_their_lease_expires() {
        let mut table = Table::default();
        let server = info(
            "srv1",
            Role::Server {
                etcd: true,
                https_port: 7000,
            },
            "pw",
        );
        assert_eq!(table.register(node_object(&server), 1000), Ok(true));
        assert_eq!(table.register(node_object(&server), 1005), Ok(false));
        let node = table.get("srv1", 1010).unwrap();
        assert_eq!(ready(&node), ("True".to_owned(), "KubeletReady".to_owned()));
        assert_eq!(node["metadata"]["labels"][LABEL_ETCD], "true");
        assert_eq!(node["metadata"]["labels"]["site"], "a");
        assert_eq!(node["spec"]["taints"][0]["effect"], "NoSchedule");
        assert!(node["metadata"]["annotations"][ANNOTATION_PASSWORD].is_null());
        let node = table.get("srv1", 1046).unwrap();
        assert_eq!(
            ready(&node),
            ("Unknown".to_owned(), "NodeStatusUnknown".to_owned())
        );
        assert_eq!(
            table.servers(),
            vec![ServerEntry {
                name: "srv1".to_owned(),
                address: "127.0.0.1:7000".parse().unwrap()
            }]
        );
        let list = table.list(1010);
        assert_eq!(list["kind"], "NodeList");
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn another_password_is_refused_while_the_lease_lives() {
        let mut table = Table::default();
        table
            .register(node_object(&info("a1", Role::Agent, "one")), 1000)
            .unwrap();
        assert_eq!(
            table.register(node_object(&info("a1", Role::Agent, "two")), 1010),
            Err(Refused::Password)
        );
        assert_eq!(
            table.register(node_object(&info("a1", Role::Agent, "two")), 1100),
            Ok(false)
        );
        let mut no_password = node_object(&info("a2", Role::Agent, "x"));
        no_password["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove(ANNOTATION_PASSWORD);
        assert!(matches!(
            table.register(no_password, 1100),
            Err(Refused::Invalid(_))
        ));
        assert!(table.servers().is_empty());
    }

    #[test]
    fn a_snapshot_restores_the_table() {
        let mut table = Table::default();
        let server = Role::Server {
            etcd: true,
            https_port: 7000,
        };
        table
            .register(node_object(&info("srv1", server, "p")), 1000)
            .unwrap();
        table
            .register(node_object(&info("a1", Role::Agent, "q")), 1001)
            .unwrap();
        let restored = Table::restore(&table.snapshot());
        assert!(restored.version() >= table.version());
        assert_eq!(restored.servers(), table.servers());
        assert_eq!(ready(&restored.get("a1", 1002).unwrap()).0, "True");
        assert!(!restored.password_matches("a1", "other", 1002));
    }

    #[test]
    fn merges_keep_the_newest_heartbeat() {
        let mut here = Table::default();
        let mut there = Table::default();
        here.register(node_object(&info("a1", Role::Agent, "p")), 1000)
            .unwrap();
        there
            .register(node_object(&info("a1", Role::Agent, "p")), 1020)
            .unwrap();
        there
            .register(node_object(&info("self", Role::Agent, "p")), 1020)
            .unwrap();
        let list = there.list(1020);
        for item in list["items"].as_array().unwrap() {
            here.merge(item.clone(), "self", 1021);
        }
        assert!(here.get("self", 1021).is_none());
        let a1 = here.get("a1", 1050).unwrap();
        assert_eq!(
            ready(&a1).0,
            "True",
            "the merged heartbeat is the newer one"
        );
        // An older copy does not win.
        let old = Table::default().list(0);
        assert_eq!(old["items"].as_array().unwrap().len(), 0);
        let mut stale = here.get("a1", 1050).unwrap();
        stale["status"]["conditions"][3]["lastHeartbeatTime"] = json!(rfc3339(900));
        assert!(!here.merge(stale, "self", 1050));
    }
}
