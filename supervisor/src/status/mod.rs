//! The node's status as the supervisor knows it: what `GET /status` serves ([`api`]).
//!
//! Every part of the supervisor writes its own section through a [`StatusHandle`]; the
//! section types live here, so that this module depends on no other part: the keeper
//! fills `units` and `dbus`, the OTA client `ota`, the trust files `trust`, the managed
//! set `control`, and the start `node`, `seed`, `k3s`, `image` and `setup`.
//!
//! Invariant: the JSON field names and the text values below are the status API's
//! contract with `pimeshctl`, the system tests and operators' scripts.

pub mod api;
pub mod metrics;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use pimesh_revision::NodeReport;
use pimesh_schema::ConfigError;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub version: &'static str,
    pub node: NodeInfo,
    pub seed: SeedReport,
    pub k3s: K3sReport,
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
    pub ota: OtaReport,
    /// The site's trust root on this node.
    pub trust: TrustReport,
    /// Whether this node runs control replicas and where its proxy finds them.
    pub control: ControlReport,
    /// How this node became a node of its site (plug-in join), and its role there.
    pub join: JoinReport,
    /// On a server node: the last joins this node's replicas answered, newest last
    /// (`<state>/pimesh-control/joins.jsonl`); empty elsewhere.
    pub joins: Vec<serde_json::Value>,
    /// What the node's proxy carried for its apps over the last window (`ota::traffic`);
    /// `null` until measured.
    pub traffic: Option<pimesh_revision::MeshTraffic>,
}

/// Which supervisor configuration is in force.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigReport {
    pub file: PathBuf,
    /// `file`, or `defaults` when the file is missing or broken.
    pub source: &'static str,
    /// Why the file could not be used (file, line, key, message).
    pub error: Option<ConfigError>,
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
    /// How far up the heal policy's escalation ladder the current failure episode went:
    /// `none`, `dependencies`, `reboot-refused` or `reboot`.
    pub escalation: &'static str,
    /// Why a heal is being held back (restarting a K3s server or rebooting would leave
    /// the site's etcd without a majority); `null` when none is.
    pub held_back: Option<String>,
    pub last_action: Option<ActionReport>,
    /// Every action taken for this unit since the supervisor started, by name
    /// (`start`, `reset-failed-and-start`, `restart`, `restart-dependencies`, `reboot`).
    pub action_counts: BTreeMap<&'static str, u64>,
    /// Why the unit cannot be managed (e.g. it does not exist).
    pub error: Option<String>,
    /// The last lines the unit logged (its journal), read at its last heal after a
    /// failure or a hang; empty before any.
    pub last_log: Vec<String>,
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

/// The node's name and board.
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub name_source: &'static str,
    pub model: Option<String>,
    /// The kernel's boot ID: changes on every boot.
    pub boot_id: Option<String>,
}

impl NodeStatus {
    /// The status at the supervisor's start: what it found, before any part reports.
    pub fn new(
        node: NodeInfo,
        seed: SeedReport,
        k3s: K3sPresence,
        image: Option<serde_json::Value>,
        setup: Vec<TaskReport>,
        supervisor_config: ConfigReport,
    ) -> NodeStatus {
        NodeStatus {
            version: env!("CARGO_PKG_VERSION"),
            node,
            seed,
            k3s: K3sReport {
                presence: k3s,
                placement: K3sPlacementReport::default(),
                ready: None,
                readiness: None,
                quorum: QuorumReport::default(),
                redirect: None,
                control_kubeconfig: None,
                datastore: None,
            },
            image,
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
            ota: OtaReport {
                state: OtaState::Disabled,
                ..Default::default()
            },
            trust: TrustReport::default(),
            control: ControlReport::default(),
            join: JoinReport::default(),
            joins: Vec::new(),
            traffic: None,
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

/// The seed as the status API shows it: no secrets (the join token's secret is left out).
#[derive(Debug, Clone, Serialize)]
pub struct SeedReport {
    /// `valid`, `unconfigured` or `invalid`.
    pub state: &'static str,
    pub file: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<SeedSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ConfigError>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeedSummary {
    pub site: String,
    pub role: &'static str,
    pub node: Option<String>,
    /// The trust anchor hash the join token pins (public; the secret is never shown).
    pub join_token_anchor_sha256: Option<String>,
    pub servers: Vec<String>,
    pub ssh_authorized_keys: usize,
    pub central_url: Option<String>,
    pub central_public_key: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct K3sPresence {
    pub present: bool,
    pub path: String,
    /// The version recorded in the image manifest when K3s is installed.
    pub version: Option<String>,
}

/// The status's `k3s`: whether K3s is installed, its role and unit here, whether it is
/// ready, and the quorum of the site's servers.
#[derive(Debug, Clone, Serialize)]
pub struct K3sReport {
    #[serde(flatten)]
    pub presence: K3sPresence,
    #[serde(flatten)]
    pub placement: K3sPlacementReport,
    /// K3s's own answer, through the node's kubeconfig; `null` while K3s does not run here.
    pub ready: Option<bool>,
    /// What it said, or why it is not ready.
    pub readiness: Option<String>,
    pub quorum: QuorumReport,
    /// The redirect of the Services' traffic to the proxy (`crate::k3s::redirect`);
    /// `null` while K3s is not placed here.
    pub redirect: Option<RedirectReport>,
    /// The control replicas' copy of the admin kubeconfig (`crate::k3s::kubeconfig`);
    /// `null` when this node is not a K3s server.
    pub control_kubeconfig: Option<ControlKubeconfigReport>,
    /// Where K3s's data folder is and how fast its disk syncs (`crate::k3s::datastore`);
    /// `null` before the supervisor has looked.
    pub datastore: Option<DatastoreReport>,
}

/// The status's `k3s.datastore`: the disk under `/var/lib/rancher`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DatastoreReport {
    /// `choosing`, `preparing` (formatting or mounting a disk), `disk` (on its own USB or
    /// NVMe disk), `sd-card` (on the disk holding `/`), or `off-node` (`--no-node-setup`:
    /// no disk is chosen).
    pub state: &'static str,
    /// The whole disk holding the folder, as the supervisor sees it (`/dev/nvme0n1`;
    /// `/dev/mmcblk0`, the root disk, on the SD card).
    pub device: Option<String>,
    /// The mount point of the filesystem holding the folder (`/var/lib/rancher` on its
    /// own disk, `/` on the SD card).
    pub mounted_at: Option<String>,
    /// That filesystem's type (`ext4`).
    pub filesystem: Option<String>,
    /// Its label, as udev read it (`pimesh-data` on its own disk).
    pub label: Option<String>,
    /// Why this disk was taken, when it is not the SD card.
    pub chosen_because: Option<String>,
    /// Why K3s's data is on the SD card, or what failed preparing a disk.
    pub note: Option<String>,
    /// The USB and NVMe disks not used, each with why (`/dev/sda has data (...); not
    /// touched`).
    pub left_alone: Vec<String>,
    /// The `fsync` probe of the folder's disk, every 60 s; `null` before the first one.
    pub fsync_ms: Option<FsyncReport>,
}

/// The status's `k3s.datastore.fsync_ms`, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FsyncReport {
    /// The last probe that finished: 4 KiB written and `fsync`ed.
    pub last: Option<f64>,
    /// The slowest probe of the last hour.
    pub max_of_last_hour: Option<f64>,
    /// Why the last probe failed or did not finish.
    pub error: Option<String>,
}

/// The status's `k3s.redirect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RedirectReport {
    /// The Services' range redirected (`[k3s] service_cidr`).
    pub service_cidr: String,
    /// Whether the rules are in place, as checked last.
    pub installed: bool,
    /// Why not (iptables missing or failing).
    pub error: Option<String>,
}

/// The status's `k3s.control_kubeconfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControlKubeconfigReport {
    pub path: String,
    /// Whether it is a copy of K3s's admin kubeconfig, as checked last.
    pub copied: bool,
    /// Why not: K3s has not written its kubeconfig yet, or the copy failed.
    pub note: Option<String>,
}

/// K3s's placement on this node (`crate::k3s`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct K3sPlacementReport {
    /// `server` or `agent`, once known.
    pub role: Option<&'static str>,
    /// The unit that runs K3s here, when it runs.
    pub unit: Option<String>,
    /// The rendered config file, when written.
    pub config: Option<String>,
    /// Why K3s does not run here, or what went wrong writing its config.
    pub note: Option<String>,
    /// On a K3s server, the site's `[k3s.manifests]` in K3s's auto-deploy folder.
    pub manifests: Vec<String>,
    /// Why they are not all there.
    pub manifests_note: Option<String>,
}

/// The site's K3s servers as this server node sees them (`crate::k3s::quorum`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QuorumReport {
    /// Servers of the site known to this node, itself included (0: not a server node).
    pub servers: usize,
    pub others_ready: usize,
    /// Why disruptive heals (restarting K3s, rebooting) are held back; `null` when not.
    pub hold: Option<String>,
    pub others: Vec<ServerHealth>,
    /// Why there is no view of the other servers yet.
    pub note: Option<String>,
}

/// One of the site's other K3s servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerHealth {
    pub address: std::net::IpAddr,
    pub name: Option<String>,
    pub ready: bool,
    /// Why it does not count as ready.
    pub error: Option<String>,
}

/// The outcome of one setup task, as shown in the status API.
#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub task: &'static str,
    /// `changed`, `unchanged`, `skipped` or `failed`.
    pub outcome: &'static str,
    pub detail: String,
}

/// What the OTA client is doing, as `GET /status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OtaState {
    /// No central server in the seed.
    #[default]
    Disabled,
    WaitingForCredential,
    Idle,
    Applying,
    Trying,
    RollingBack,
}

impl OtaState {
    /// Every state, in the order of the enum.
    pub const ALL: [OtaState; 6] = [
        OtaState::Disabled,
        OtaState::WaitingForCredential,
        OtaState::Idle,
        OtaState::Applying,
        OtaState::Trying,
        OtaState::RollingBack,
    ];
}

/// What `GET /status` shows about over-the-air configuration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OtaReport {
    pub state: OtaState,
    pub central: Option<String>,
    /// The revision the node falls back to.
    pub committed: Option<u64>,
    /// A revision being applied or on trial.
    pub pending: Option<u64>,
    pub highest_verified: u64,
    /// The SHA-256 of the active `cluster.toml` (`None`: no file).
    pub active_sha256: Option<String>,
    /// The latest outcome, as reported to the central server.
    pub last_outcome: Option<NodeReport>,
    /// Reports waiting to reach the central server.
    pub queued_reports: usize,
    /// Why the central server could not be used, while that lasts.
    pub last_error: Option<String>,
    /// What the node waits for, in words.
    pub detail: Option<String>,
}

/// What `GET /status` shows about the trust root.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrustReport {
    pub present: bool,
    /// `generated`, `imported` (this start), or `existing`.
    pub source: Option<&'static str>,
    /// Hex SHA-256 of the anchor certificate (DER): what join tokens pin.
    pub anchor_sha256: Option<String>,
    /// Whether the anchor's private key is still on this node.
    pub anchor_key_on_node: bool,
    /// The issuer: expiry, days left, when it rotates, which anchor signed it.
    pub issuer: Option<IssuerInfo>,
    /// What needs the operator: an issuer that cannot be rotated here (no anchor key on
    /// the node), or one close to expiry.
    pub warning: Option<String>,
    pub error: Option<String>,
}

/// The issuer, as `pimesh-supervisor trust status` and `/status` show it.
#[derive(Debug, Clone, Serialize)]
pub struct IssuerInfo {
    pub not_after: String,
    /// Whole days until `not_after` (negative once expired).
    pub days_left: i64,
    /// When one third of its lifetime is left: the supervisor rotates it from then on.
    pub rotate_from: String,
    /// The SHA-256 of the bundle anchor that signed it; `None` if none did (broken root).
    pub signed_by: Option<String>,
}

/// What `GET /status` shows about the control plane on this node.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControlReport {
    /// Whether this node runs control replicas.
    pub runs_replicas: bool,
    /// The replica units this node runs.
    pub replicas: Vec<String>,
    /// The replica addresses the proxy is given (`--control`).
    pub proxy_control: Vec<String>,
    /// Why the node runs no replicas, or what went wrong telling the proxy.
    pub note: Option<String>,
}

/// The node's join (`join` in the status).
#[derive(Debug, Clone, Serialize)]
pub struct JoinReport {
    /// `server` or `agent` once known; the init node is a server.
    pub role: Option<&'static str>,
    /// `init` (the site's first server), `manual` (a node whose seed has no join token:
    /// its certificate is signed by hand), `waiting-for-clock`, `discovering`, `joining`,
    /// `fetching-issuer`, `joined`, or `refused` (the site said no for good: the seed's
    /// token is wrong or expired; `last_error` says which).
    pub state: &'static str,
    /// The replica that answered the join.
    pub via: Option<serde_json::Value>,
    /// The site's server nodes as the join answer listed them.
    pub servers: Vec<pimesh_join::ServerEntry>,
    pub clock: ClockReport,
    /// Join rounds so far (one round tries every candidate once).
    pub attempts: u32,
    pub last_error: Option<String>,
    /// RFC 3339.
    pub joined_at: Option<String>,
    /// On a server node: it has held only a link-local IPv4 address on the site LAN for
    /// the whole lease grace and announces that the LAN has no DHCP server (`dhcp=none`),
    /// so that boards plugged in later join over link-local at once.
    pub lan_without_dhcp: bool,
}

impl Default for JoinReport {
    fn default() -> Self {
        JoinReport {
            role: None,
            state: "manual",
            via: None,
            servers: Vec::new(),
            clock: ClockReport::default(),
            attempts: 0,
            last_error: None,
            joined_at: None,
            lan_without_dhcp: false,
        }
    }
}

/// What the join waits for before it checks any certificate: a clock no earlier than the
/// floor (the image's build time, or the last time this node saw).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClockReport {
    pub sane: bool,
    /// RFC 3339.
    pub now: Option<String>,
    /// RFC 3339.
    pub floor: Option<String>,
    /// Where the node takes its time from (the site's servers once known).
    pub sources: Vec<String>,
}

#[cfg(test)]
mod tests {
    use pimesh_revision::ReportState;

    use super::*;

    #[test]
    fn the_datastore_report_keeps_its_shape() {
        let report = DatastoreReport {
            state: "disk",
            device: Some("/dev/nvme0n1".into()),
            mounted_at: Some("/var/lib/rancher".into()),
            filesystem: Some("ext4".into()),
            label: Some("pimesh-data".into()),
            chosen_because: Some("blank NVMe disk".into()),
            fsync_ms: Some(FsyncReport {
                last: Some(1.25),
                max_of_last_hour: Some(3.5),
                error: None,
            }),
            ..DatastoreReport::default()
        };
        assert_eq!(
            serde_json::to_value(&report).expect("encode"),
            serde_json::json!({
                "state": "disk",
                "device": "/dev/nvme0n1",
                "mounted_at": "/var/lib/rancher",
                "filesystem": "ext4",
                "label": "pimesh-data",
                "chosen_because": "blank NVMe disk",
                "note": null,
                "left_alone": [],
                "fsync_ms": {"last": 1.25, "max_of_last_hour": 3.5, "error": null},
            })
        );
    }

    #[test]
    fn the_status_report_keeps_its_field_names_and_state_strings() {
        let states = [
            (OtaState::Disabled, "disabled"),
            (OtaState::WaitingForCredential, "waiting-for-credential"),
            (OtaState::Idle, "idle"),
            (OtaState::Applying, "applying"),
            (OtaState::Trying, "trying"),
            (OtaState::RollingBack, "rolling-back"),
        ];
        for (state, text) in states {
            assert_eq!(serde_json::to_value(state).expect("encode"), text);
        }
        let report = OtaReport {
            state: OtaState::Idle,
            committed: Some(3),
            last_outcome: Some(NodeReport {
                revision: Some(3),
                state: ReportState::Applied,
                detail: String::new(),
                about: None,
                k3s: None,
                certificates: None,
                traffic: None,
            }),
            queued_reports: 1,
            ..OtaReport::default()
        };
        let json = serde_json::to_value(&report).expect("encode");
        assert_eq!(json["state"], "idle");
        assert_eq!(json["committed"], 3);
        assert_eq!(json["queued_reports"], 1);
        assert_eq!(
            json["last_outcome"],
            serde_json::json!({"revision": 3, "state": "applied", "detail": ""})
        );
    }
}
