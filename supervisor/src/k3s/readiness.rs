//! Whether K3s on this node can do its job, asked through the Kubernetes API with the
//! node's own kubeconfig: on a server, `GET /readyz` with the admin kubeconfig K3s writes
//! (`/etc/rancher/k3s/k3s.yaml`) answers `ok`; on an agent, the node's own `Node` object,
//! read with the kubelet's kubeconfig (`<data-dir>/agent/kubelet.kubeconfig`, through the
//! agent's local load balancer), has condition `Ready` = `True`.
//!
//! The keeper probes it like any unit, over the supervisor's status API
//! (`GET /k3s/ready`: 200, or 503 with the reason), so K3s heals by the same policy as the
//! mesh's own units.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pimesh_schema::DnsLabel;
use serde::Deserialize;

use pimesh_kube::KubeClient;

/// A check gives up after this long (the keeper's probe timeout is about as long).
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(900);
/// The most of an answer read.
const MAX_ANSWER: usize = 256 * 1024;

/// What is checked: set once the node's K3s role is known.
#[derive(Debug, Clone)]
pub enum Check {
    /// `GET /readyz` with the admin kubeconfig.
    Server { kubeconfig: PathBuf },
    /// Node `node` Ready, with the kubelet's kubeconfig.
    Agent { kubeconfig: PathBuf, node: DnsLabel },
}

/// The current check, shared by the placement (which sets it) and the status API.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<Mutex<Option<Check>>>);

impl Readiness {
    pub fn set(&self, check: Option<Check>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = check;
    }

    pub fn current(&self) -> Option<Check> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `Ok(detail)` when K3s is ready, `Err(reason)` when not (or when no K3s runs here).
    pub async fn check(&self) -> Result<String, String> {
        match self.current() {
            None => Err("no K3s role on this node".to_owned()),
            Some(check) => check.run().await,
        }
    }
}

impl crate::status::api::ReadyCheck for Readiness {
    fn check(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        Box::pin(Readiness::check(self))
    }
}

impl Check {
    async fn run(&self) -> Result<String, String> {
        match self {
            Check::Server { kubeconfig } => {
                let client =
                    KubeClient::load(kubeconfig, CHECK_TIMEOUT).map_err(|e| e.to_string())?;
                let (status, body) = client
                    .get("/readyz", MAX_ANSWER)
                    .await
                    .map_err(|err| format!("GET {}/readyz: {err}", client.server))?;
                if status == 200 {
                    Ok(format!("{}/readyz: {}", client.server, body.trim()))
                } else {
                    Err(format!(
                        "{}/readyz answered {status}: {}",
                        client.server,
                        body.trim()
                    ))
                }
            }
            Check::Agent { kubeconfig, node } => {
                let client =
                    KubeClient::load(kubeconfig, CHECK_TIMEOUT).map_err(|e| e.to_string())?;
                let path = format!("/api/v1/nodes/{node}");
                let (status, body) = client
                    .get(&path, MAX_ANSWER)
                    .await
                    .map_err(|err| format!("GET {}{path}: {err}", client.server))?;
                if status != 200 {
                    return Err(format!(
                        "{}{path} answered {status}: {}",
                        client.server,
                        body.trim()
                    ));
                }
                node_ready(&body).map(|()| format!("node {node} is Ready"))
            }
        }
    }
}

#[derive(Deserialize)]
struct Node {
    #[serde(default)]
    status: NodeStatus,
}

#[derive(Deserialize, Default)]
struct NodeStatus {
    #[serde(default)]
    conditions: Vec<Condition>,
}

#[derive(Deserialize)]
struct Condition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
    #[serde(default)]
    reason: Option<String>,
}

/// `Ok` when the Node JSON `body` has condition `Ready` = `True`.
pub fn node_ready(body: &str) -> Result<(), String> {
    let node: Node =
        serde_json::from_str(body).map_err(|err| format!("not a Node object: {err}"))?;
    match node.status.conditions.iter().find(|c| c.kind == "Ready") {
        Some(ready) if ready.status == "True" => Ok(()),
        Some(ready) => Err(format!(
            "node not Ready (status {}, reason {})",
            ready.status,
            ready.reason.as_deref().unwrap_or("none given")
        )),
        None => Err("the node has no Ready condition yet".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_ready_only_with_ready_true() {
        let ready = r#"{"metadata":{"name":"pi-d"},"status":{"conditions":[{"type":"MemoryPressure","status":"False"},{"type":"Ready","status":"True","reason":"KubeletReady"}]}}"#;
        assert_eq!(node_ready(ready), Ok(()));
        let stale = r#"{"status":{"conditions":[{"type":"Ready","status":"Unknown","reason":"NodeStatusUnknown"}]}}"#;
        assert_eq!(
            node_ready(stale),
            Err("node not Ready (status Unknown, reason NodeStatusUnknown)".to_owned())
        );
        assert!(node_ready(r#"{"status":{}}"#).is_err());
        assert!(node_ready("<html>").is_err());
    }
}
