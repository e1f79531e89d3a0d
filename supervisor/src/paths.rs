//! Every path the supervisor uses on a node, as one value ([`NodePaths`]) that the command
//! line makes and every part takes. The folders are flags (tests point them elsewhere);
//! what lies in them is named here, or by the one module that owns a folder's inside.
//!
//! ```text
//! /boot/firmware/pimesh.toml       the seed; its folder is the boot partition
//! /boot/firmware/pimesh-trust/     a site root or anchor the operator put on the card
//! /etc/pimesh/                     the active configuration
//!     supervisor.toml              the supervisor's own (units, heal, OTA)
//!     cluster.toml                 the active site configuration
//!     authorized_keys/<user>       the SSH keys the seed grants
//! /var/lib/pimesh/                 what the node keeps across boots
//!     trust -> trust.d/<n>/        the site's trust root (inside: `trust::store`)
//!     identity/                    the node credential (inside: `credential`)
//!     ota/                         journal, revisions, outbox (inside: `ota`)
//!     join/state.json              the node's join: role, servers (inside: `join`)
//!     clock                        the last sane time seen (the clock's floor)
//! /var/lib/pimesh-control/         the control replicas' (their join records: joins.jsonl)
//!     kubeconfig                   on a K3s server: a copy of K3s's admin kubeconfig,
//!                                  theirs (0600 pimesh-control; inside: `k3s::kubeconfig`)
//! /run/pimesh/                     what other units read at their start
//!     proxy.env, control.env       the proxy's and the replicas' arguments
//!     chrony/                      the site's time servers and a server's directives
//! /usr/share/pimesh/manifest.json  what the image holds
//! /usr/local/bin/k3s               K3s, when the image has it
//! /etc/rancher/k3s/                K3s's configuration folder (inside: `k3s`)
//!     config.yaml                  rendered by the supervisor for the node's K3s role
//!     config.yaml.d/               the user's own K3s settings, never written
//!     k3s.yaml                     K3s's admin kubeconfig (written by K3s on a server)
//! /var/lib/rancher/k3s/            K3s's data (agent/kubelet.kubeconfig on every node)
//!     server/manifests/pimesh-*    a server's: the site's [k3s.manifests] (`k3s::manifests`)
//! /var/lib/pimesh/k3s/token        the site's K3s token on a joined node
//! ```

use std::path::{Path, PathBuf};

/// K3s's configuration folder.
pub const RANCHER_ETC: &str = "/etc/rancher/k3s";
/// K3s's data folder.
pub const RANCHER_DATA: &str = "/var/lib/rancher/k3s";

/// The seed, on the boot partition.
pub const SEED: &str = "/boot/firmware/pimesh.toml";
/// The active configuration.
pub const ETC_DIR: &str = "/etc/pimesh";
/// The supervisor's own configuration.
pub const SUPERVISOR_CONFIG: &str = pimesh_schema::supervisor::DEFAULT_PATH;
/// Keys, revisions, reports.
pub const STATE_DIR: &str = "/var/lib/pimesh";
/// Runtime files for other units.
pub const RUN_DIR: &str = "/run/pimesh";
/// The image manifest.
pub const MANIFEST: &str = "/usr/share/pimesh/manifest.json";
/// Where K3s is installed.
pub const K3S_BIN: &str = "/usr/local/bin/k3s";

/// Where the boot partition is when the seed's path names no folder.
const BOOT_DIR: &str = "/boot/firmware";

/// The supervisor's paths on this node. See the module doc for the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePaths {
    pub seed: PathBuf,
    pub supervisor_config: PathBuf,
    pub etc_dir: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub manifest: PathBuf,
    pub k3s_bin: PathBuf,
    /// K3s's configuration folder (`/etc/rancher/k3s`).
    pub rancher_etc: PathBuf,
    /// K3s's data folder (`/var/lib/rancher/k3s`).
    pub rancher_data: PathBuf,
}

impl NodePaths {
    /// The boot partition: the seed's folder.
    pub fn boot_dir(&self) -> &Path {
        self.seed.parent().unwrap_or(Path::new(BOOT_DIR))
    }

    /// `pimesh-trust/` on the boot partition: what `pimeshctl image configure --trust`
    /// writes (the site's anchor, and on the `init` node its issuer).
    pub fn boot_trust_dir(&self) -> PathBuf {
        self.boot_dir().join("pimesh-trust")
    }

    /// `cluster.toml`: the site configuration the node runs.
    pub fn active_site_config(&self) -> PathBuf {
        self.etc_dir.join("cluster.toml")
    }

    /// Where sshd looks for the keys that the seed grants to `user` (see the image's
    /// `sshd_config.d/pimesh.conf`).
    pub fn authorized_keys(&self, user: &str) -> PathBuf {
        self.etc_dir.join("authorized_keys").join(user)
    }

    /// The node credential's folder.
    pub fn identity_dir(&self) -> PathBuf {
        self.state_dir.join("identity")
    }

    /// The OTA client's folder: journal, stored revisions, outbox.
    pub fn ota_dir(&self) -> PathBuf {
        self.state_dir.join("ota")
    }

    /// chrony's `sourcedir` and `confdir` (`join::time`; see the image's chrony settings).
    pub fn chrony_dir(&self) -> PathBuf {
        self.run_dir.join("chrony")
    }

    /// The node's join record (`join::record`).
    pub fn join_record(&self) -> PathBuf {
        self.state_dir.join("join").join("state.json")
    }

    /// The last sane time this node saw (`join::clock`).
    pub fn clock_file(&self) -> PathBuf {
        self.state_dir.join("clock")
    }

    /// The control replicas' state folder, beside the supervisor's
    /// (`/var/lib/pimesh-control`): the joins they answered.
    pub fn control_state_dir(&self) -> PathBuf {
        self.state_dir.with_file_name("pimesh-control")
    }

    /// The control replicas' copy of K3s's admin kubeconfig (`--kubeconfig` of the
    /// replicas on a K3s server), in their state folder.
    pub fn control_kubeconfig(&self) -> PathBuf {
        self.control_state_dir().join("kubeconfig")
    }

    /// `PIMESH_PROXY_ARGS`, read by `pimesh-proxy.service` at its start.
    pub fn proxy_env(&self) -> PathBuf {
        self.run_dir.join("proxy.env")
    }

    /// `PIMESH_CONTROL_ARGS`, read by each `pimesh-control@.service` at its start.
    pub fn control_env(&self) -> PathBuf {
        self.run_dir.join("control.env")
    }

    /// K3s's `config.yaml`, rendered for the node's role.
    pub fn k3s_config(&self) -> PathBuf {
        self.rancher_etc.join("config.yaml")
    }

    /// The admin kubeconfig K3s writes on a server.
    pub fn k3s_admin_kubeconfig(&self) -> PathBuf {
        self.rancher_etc.join("k3s.yaml")
    }

    /// The kubelet's kubeconfig K3s writes on every node.
    pub fn k3s_kubelet_kubeconfig(&self) -> PathBuf {
        self.rancher_data.join("agent").join("kubelet.kubeconfig")
    }

    /// K3s's auto-deploy folder on a server, where the site's manifests go.
    pub fn k3s_manifests_dir(&self) -> PathBuf {
        self.rancher_data.join("server").join("manifests")
    }

    /// The site's K3s token as a joined node keeps it.
    pub fn k3s_token(&self) -> PathBuf {
        self.state_dir.join("k3s").join("token")
    }

    /// Every folder under `root`, laid out as on a node: for tests.
    #[cfg(test)]
    pub fn under(root: &Path) -> NodePaths {
        NodePaths {
            seed: root.join("boot/firmware/pimesh.toml"),
            supervisor_config: root.join("etc/pimesh/supervisor.toml"),
            etc_dir: root.join("etc/pimesh"),
            state_dir: root.join("var/lib/pimesh"),
            run_dir: root.join("run/pimesh"),
            manifest: root.join("usr/share/pimesh/manifest.json"),
            k3s_bin: root.join("usr/local/bin/k3s"),
            rancher_etc: root.join("etc/rancher/k3s"),
            rancher_data: root.join("var/lib/rancher/k3s"),
        }
    }
}
