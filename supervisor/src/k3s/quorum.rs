//! Quorum-aware healing: on a K3s server node of a site with several servers (embedded
//! etcd), taking this node's K3s down — restarting it, or rebooting the node — is held
//! back while the site's other servers could not keep a majority without it.
//!
//! Every [`EVERY`], the node reads the site's servers from its own Kubernetes API
//! (`GET /api/v1/nodes`, the nodes labelled `node-role.kubernetes.io/control-plane`, at
//! their `InternalIP`; the last list read is kept while the API does not answer, beside
//! the servers the join record lists) and asks each of the others `GET /readyz` with the
//! admin kubeconfig's credentials (the site's servers share K3s's cluster CA). With `n`
//! servers, a majority is `n / 2 + 1`; the hold is on while fewer than that many others
//! answer ready.
//!
//! Invariants: the hold never blocks starting a unit that is down (the heal policy's
//! rule); an agent, a single-server site and a node without K3s never hold; the reason is
//! one sentence naming the counts, shown in the status of the unit held back and in the
//! node status's `k3s.quorum`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tracing::{info, warn};

use super::config::{api_url, API_PORT};
use super::kubeconfig::KubeClient;
use super::readiness::{Check, Readiness};
use crate::status::{QuorumReport, ServerHealth, StatusHandle};

/// How often the site's servers are asked.
pub const EVERY: Duration = Duration::from_secs(5);
/// Each server gets this long to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_ANSWER: usize = 1024 * 1024;

/// The hold for `servers` servers (this one included) of which `others_ready` others are
/// ready: `None` when this server may go down.
pub fn hold_for(servers: usize, others_ready: usize) -> Option<String> {
    if servers <= 1 {
        return None;
    }
    let majority = servers / 2 + 1;
    (others_ready < majority).then(|| {
        format!(
            "{others_ready} of the other {} K3s servers ready: without this one etcd would \
             have {others_ready} of {servers} members, and needs {majority}",
            servers - 1
        )
    })
}

/// What the task reads its inputs from.
pub struct QuorumWatch {
    pub readiness: Readiness,
    /// The managed set, whose placement knows the servers the join record lists.
    pub units: std::sync::Arc<crate::units::managed_set::ManagedSet>,
    pub admin_kubeconfig: PathBuf,
    pub status: StatusHandle,
    pub hold: watch::Sender<Option<String>>,
}

impl QuorumWatch {
    pub async fn run(self) {
        let mut known: BTreeMap<IpAddr, Option<String>> = BTreeMap::new();
        let mut own: Option<IpAddr> = None;
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let running = self.readiness.current().is_some();
            let readiness = if running {
                Some(self.readiness.check().await)
            } else {
                None
            };
            let report = match self.readiness.current() {
                Some(Check::Server { .. }) => self.ask(&mut known, &mut own).await,
                _ => QuorumReport::default(),
            };
            let hold = report.hold.clone();
            self.hold.send_if_modified(|current| {
                if *current == hold {
                    return false;
                }
                match &hold {
                    Some(why) => {
                        warn!(reason = %why, "holding back K3s server restarts and reboots")
                    }
                    None => info!("K3s quorum allows heals again"),
                }
                *current = hold.clone();
                true
            });
            self.status.update(|status| {
                status.k3s.ready = readiness.as_ref().map(Result::is_ok);
                status.k3s.readiness = readiness.map(|answer| answer.unwrap_or_else(|why| why));
                status.k3s.quorum = report;
            });
        }
    }

    async fn ask(
        &self,
        known: &mut BTreeMap<IpAddr, Option<String>>,
        own: &mut Option<IpAddr>,
    ) -> QuorumReport {
        let admin = match KubeClient::load(&self.admin_kubeconfig, ASK_TIMEOUT) {
            Ok(admin) => admin,
            // K3s has not written its kubeconfig yet: nothing runs that a heal could stop.
            Err(err) => {
                return QuorumReport {
                    servers: 1,
                    note: Some(err.to_string()),
                    ..QuorumReport::default()
                }
            }
        };
        if let Ok((200, body)) = admin.get("/api/v1/nodes", MAX_ANSWER).await {
            if let Ok(list) = serde_json::from_str::<NodeList>(&body) {
                let own_name = own_node_name(&self.readiness);
                for node in list.items.iter().filter(|n| n.is_server()) {
                    if let Some(address) = node.internal_ip() {
                        if Some(node.metadata.name.as_str()) == own_name.as_deref() {
                            *own = Some(address);
                        }
                        known.insert(address, Some(node.metadata.name.clone()));
                    }
                }
            }
        }
        for address in self.units.k3s_servers() {
            known.entry(address).or_insert(None);
        }
        let others: Vec<(IpAddr, Option<String>)> = known
            .iter()
            .filter(|(address, _)| Some(**address) != *own)
            .map(|(address, name)| (*address, name.clone()))
            .collect();
        let mut health = Vec::new();
        for (address, name) in others {
            let result = match admin.for_server(api_url(address), ASK_TIMEOUT) {
                Ok(client) => match client.get("/readyz", 4096).await {
                    Ok((200, _)) => Ok(()),
                    Ok((status, body)) => {
                        Err(format!("/readyz answered {status}: {}", body.trim()))
                    }
                    Err(err) => Err(format!("cannot ask {address}:{API_PORT}: {err}")),
                },
                Err(err) => Err(err.to_string()),
            };
            health.push(ServerHealth {
                address,
                name,
                ready: result.is_ok(),
                error: result.err(),
            });
        }
        let servers = health.len() + 1;
        let others_ready = health.iter().filter(|h| h.ready).count();
        QuorumReport {
            servers,
            others_ready,
            hold: hold_for(servers, others_ready),
            others: health,
            note: None,
        }
    }
}

fn own_node_name(readiness: &Readiness) -> Option<String> {
    readiness.node().map(|node| node.to_string())
}

#[derive(Deserialize)]
struct NodeList {
    #[serde(default)]
    items: Vec<Node>,
}

#[derive(Deserialize)]
struct Node {
    metadata: Metadata,
    #[serde(default)]
    status: NodeStatus,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct NodeStatus {
    #[serde(default)]
    addresses: Vec<Address>,
}

#[derive(Deserialize)]
struct Address {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

impl Node {
    fn is_server(&self) -> bool {
        self.metadata
            .labels
            .get("node-role.kubernetes.io/control-plane")
            .is_some_and(|v| v == "true")
    }

    fn internal_ip(&self) -> Option<IpAddr> {
        self.status
            .addresses
            .iter()
            .find(|a| a.kind == "InternalIP")
            .and_then(|a| a.address.parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_majority_of_the_servers_must_stay_without_this_one() {
        assert_eq!(hold_for(1, 0), None, "a single server always heals");
        assert_eq!(hold_for(3, 2), None);
        let held = hold_for(3, 1).expect("held");
        assert!(
            held.contains("1 of the other 2 K3s servers ready"),
            "{held}"
        );
        assert!(held.contains("needs 2"), "{held}");
        assert!(hold_for(3, 0).is_some());
        assert_eq!(hold_for(5, 3), None);
        assert!(hold_for(5, 2).is_some());
    }

    #[test]
    fn servers_are_the_control_plane_nodes_at_their_internal_ip() {
        let list: NodeList = serde_json::from_str(
            r#"{"kind":"NodeList","items":[
              {"metadata":{"name":"pi-a","labels":{"node-role.kubernetes.io/control-plane":"true"}},
               "status":{"addresses":[{"type":"Hostname","address":"pi-a"},{"type":"InternalIP","address":"10.0.0.1"}]}},
              {"metadata":{"name":"pi-d","labels":{}},
               "status":{"addresses":[{"type":"InternalIP","address":"10.0.0.4"}]}}]}"#,
        )
        .expect("a NodeList");
        let servers: Vec<(String, Option<IpAddr>)> = list
            .items
            .iter()
            .filter(|n| n.is_server())
            .map(|n| (n.metadata.name.clone(), n.internal_ip()))
            .collect();
        assert_eq!(servers, [("pi-a".to_owned(), "10.0.0.1".parse().ok())]);
    }
}
