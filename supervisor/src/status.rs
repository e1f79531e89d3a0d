//! The node's status as the supervisor knows it; what `GET /status` serves.

use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::node::{K3sPresence, NodeFacts};
use crate::node_setup::TaskReport;
use crate::seed_state::{SeedReport, SeedState};

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub version: &'static str,
    pub node: NodeReport,
    pub seed: SeedReport,
    pub k3s: K3sPresence,
    /// The image manifest (what the image holds), `null` off a Pimesh image.
    pub image: Option<serde_json::Value>,
    /// What the supervisor changed on the node from the seed at its start.
    pub setup: Vec<TaskReport>,
    /// Seconds since the Unix epoch when the supervisor started.
    pub started_at: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    pub name: String,
    pub name_source: &'static str,
    pub model: Option<String>,
    /// The kernel's boot ID: changes on every boot.
    pub boot_id: Option<String>,
}

impl NodeStatus {
    pub fn new(facts: &NodeFacts, seed: &SeedState, setup: Vec<TaskReport>) -> NodeStatus {
        NodeStatus {
            version: env!("CARGO_PKG_VERSION"),
            node: NodeReport {
                name: facts.node_name.clone(),
                name_source: facts.node_name_source,
                model: facts.model.clone(),
                boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                    .ok()
                    .map(|id| id.trim().to_owned()),
            },
            seed: seed.report(),
            k3s: facts.k3s.clone(),
            image: facts.image.clone(),
            setup,
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// Shared, updatable status. The lock is never held across an `.await`.
#[derive(Clone)]
pub struct StatusHandle(pub Arc<RwLock<NodeStatus>>);

impl StatusHandle {
    pub fn new(status: NodeStatus) -> Self {
        StatusHandle(Arc::new(RwLock::new(status)))
    }
}
