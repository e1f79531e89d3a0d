//! The node's status as the supervisor knows it; what `GET /status` serves ([`api`]).

pub mod api;

use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::node::facts::{K3sPresence, NodeFacts};
use crate::node::setup::TaskReport;
use crate::node::seed::{SeedReport, SeedState};

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
    /// The supervisor's own configuration file and whether it could be used.
    pub supervisor_config: ConfigReport,
    /// Every configuration problem in one list (the file's, and units that do not exist),
    /// each a full sentence naming the file or unit.
    pub config_errors: Vec<String>,
    /// The supervisor's connection to systemd over D-Bus.
    pub dbus: BusReport,
    /// The units the supervisor keeps running, in configuration order.
    pub units: Vec<UnitReport>,
    /// Over-the-air configuration from the central server.
    pub ota: crate::ota::OtaReport,
    /// The site's trust root on this node.
    pub trust: crate::trust::TrustReport,
    /// Whether this node runs control replicas and where its proxy finds them.
    pub control: crate::units::placement::ControlReport,
}

/// Which supervisor configuration is in force.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigReport {
    pub file: std::path::PathBuf,
    /// `file`, or `defaults` when the file is missing or broken.
    pub source: &'static str,
    /// Why the file could not be used (file, line, key, message).
    pub error: Option<pimesh_schema::ConfigError>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BusReport {
    pub connected: bool,
    /// Successful connections since the start (more than one: the bus was restarted).
    pub connections: u64,
    pub last_error: Option<String>,
}

/// One managed unit: what Pimesh wants, what systemd says, what Pimesh did about it.
#[derive(Debug, Clone, Serialize)]
pub struct UnitReport {
    pub name: String,
    /// Always `running` for now.
    pub desired_state: &'static str,
    pub load_state: Option<String>,
    pub active_state: Option<String>,
    pub sub_state: Option<String>,
    pub result: Option<String>,
    pub main_pid: Option<u32>,
    /// Restarts done by systemd itself (`NRestarts`, from its `Restart=` setting).
    pub systemd_restarts: Option<u32>,
    /// The last readiness probe answer since the process started; `null` before the
    /// first one or for a unit without a probe.
    pub ready: Option<bool>,
    /// Starts and restarts of this unit that Pimesh asked systemd for.
    pub restarts_by_pimesh: u64,
    /// Heal attempts in the current failure episode (0 once the unit is stable).
    pub heal_attempts: u32,
    pub escalation: crate::units::heal::Escalation,
    pub last_action: Option<ActionReport>,
    /// Every action taken for this unit since the supervisor started, by name
    /// (`start`, `reset-failed-and-start`, `restart`, `restart-dependencies`, `reboot`).
    pub action_counts: std::collections::BTreeMap<&'static str, u64>,
    /// Why the unit cannot be managed (e.g. it does not exist).
    pub error: Option<String>,
}

/// An action the supervisor took, why, and how systemd took it.
#[derive(Debug, Clone, Serialize)]
pub struct ActionReport {
    pub action: &'static str,
    pub reason: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `ok` or the D-Bus error.
    pub outcome: String,
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
    pub fn new(
        facts: &NodeFacts,
        seed: &SeedState,
        setup: Vec<TaskReport>,
        supervisor_config: ConfigReport,
    ) -> NodeStatus {
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
            config_errors: supervisor_config
                .error
                .iter()
                .map(|err| format!("{err} (using the default configuration)"))
                .collect(),
            supervisor_config,
            dbus: BusReport::default(),
            units: Vec::new(),
            ota: crate::ota::OtaReport {
                state: crate::ota::OtaState::Disabled,
                ..Default::default()
            },
            trust: crate::trust::TrustReport::default(),
            control: crate::units::placement::ControlReport::default(),
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

    /// Applies `change` under the write lock (recovering it if a writer panicked).
    pub fn update(&self, change: impl FnOnce(&mut NodeStatus)) {
        let mut guard = match self.0.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        change(&mut guard);
    }
}
