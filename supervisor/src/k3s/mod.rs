//! K3s on this node: which role it plays, its `config.yaml`, its unit in the managed set,
//! its readiness, and the quorum that decides whether a K3s server may be taken down.
//!
//! - [`config`]: the rendered `/etc/rancher/k3s/config.yaml` per role (pure);
//! - [`token`]: the site's K3s token, made by the init node and carried by the join;
//! - [`readiness`]: K3s's own answer to "ready?", through the node's
//!   kubeconfig, served to the keeper as a probe;
//! - [`quorum`]: the other servers' health, and the hold on disruptive heals;
//! - [`manifests`]: the site's `[k3s.manifests]` in a server's auto-deploy folder;
//! - [`redirect`]: the node's connections to a Service address, through the proxy;
//! - [`kubeconfig`]: the control replicas' copy of a server's admin kubeconfig;
//! - [`upkeep`]: the task that keeps the last two, checked every few seconds;
//! - [`datastore`]: K3s's data folder on a USB or NVMe disk, and its disk's `fsync` time.
//!
//! K3s joins the managed set (`k3s.service` on a server, `k3s-agent.service` on an agent,
//! as K3s's install script names them) only when all of these hold: the binary is
//! installed, K3s's data folder is settled ([`datastore::Gate`]), the node knows its role
//! (the init node is the first server; a joined node is what its join record says), the
//! site's K3s token is on the node, and the config file was written. Otherwise the status
//! says which one is missing, and the mesh runs without K3s. Each time the placement is
//! applied (a join, a new site configuration over the air, a new address) a server's
//! manifests are brought in line at once, and the upkeep is told whether to redirect the
//! Services' range and whether the replicas get a kubeconfig.

pub mod config;
pub mod datastore;
pub mod kubeconfig;
pub mod manifests;
pub mod quorum;
pub mod readiness;
pub mod redirect;
pub mod token;
pub mod upkeep;

use std::net::IpAddr;
use std::path::PathBuf;

use pimesh_join::Role;
use pimesh_schema::cluster::{ClusterConfig, K3sSettings};
use pimesh_schema::{DnsLabel, ManagedUnit, ProbeUrl, UnitName};
use tracing::{info, warn};

use crate::paths::NodePaths;
pub use crate::status::K3sPlacementReport;
use crate::units::role::{K3S_AGENT, K3S_SERVER};
use config::{K3sInputs, K3sRole};
use readiness::{Check, Readiness};
use redirect::Rules;
use token::K3sToken;
use upkeep::{Upkeep, Wanted};

/// What the node knows of its place in K3s; part of the units' placement.
#[derive(Debug, Clone, Default)]
pub struct K3sPlace {
    /// The K3s binary is installed.
    pub installed: bool,
    /// The node is the site's first server (seed `role = "init"`).
    pub first_server: bool,
    /// The server whose replica answered the join: K3s's first contact.
    pub via: Option<IpAddr>,
    /// Every server address the join record lists.
    pub servers: Vec<IpAddr>,
    /// This node's address on the site's network ([`node_ip`]), once it has one; K3s
    /// waits for it (its API certificate names it, and the other nodes reach it there).
    pub node_ip: Option<IpAddr>,
    /// The seed's `mdns_interfaces`: where [`node_ip`] looks first.
    pub interfaces: Option<Vec<String>>,
    /// The site's K3s token in the trust folder (a server node's, read by its replicas).
    pub trust_token: PathBuf,
    /// The keeper's probe of K3s's readiness (the status API's `/k3s/ready`).
    pub probe_url: Option<ProbeUrl>,
    /// Where the status API's readiness check looks.
    pub readiness: Readiness,
    /// What the upkeep task keeps: the redirect and the replicas' kubeconfig.
    pub upkeep: Upkeep,
    /// Open once K3s's data folder is where it stays for this boot (its own disk or the
    /// SD card): K3s waits for it.
    pub datastore: datastore::Gate,
}

impl K3sPlace {
    /// Adds the K3s unit to `units` when K3s can run here (see the module doc), writing
    /// its config for `site`'s `[k3s]` first; says why not otherwise.
    pub fn apply(
        &self,
        role: Option<Role>,
        node: Option<&DnsLabel>,
        site: Option<&ClusterConfig>,
        paths: &NodePaths,
        units: &mut Vec<ManagedUnit>,
    ) -> K3sPlacementReport {
        let mut report = K3sPlacementReport::default();
        let k3s_role = self.role(role);
        report.role = k3s_role.as_ref().map(K3sRole::as_str);
        let not_running = |report: K3sPlacementReport, note: String| {
            self.readiness.set(None);
            self.upkeep.want(Wanted {
                redirect: None,
                admin_kubeconfig: None,
                control_kubeconfig: paths.control_kubeconfig(),
            });
            K3sPlacementReport {
                note: Some(note),
                ..report
            }
        };
        if !self.installed {
            return not_running(
                report,
                format!(
                    "K3s is not installed in this image ({} is absent); the mesh runs without it",
                    paths.k3s_bin.display()
                ),
            );
        }
        if !self.datastore.is_open() {
            return not_running(
                report,
                "waiting for the datastore disk (k3s.datastore says which) before configuring K3s"
                    .into(),
            );
        }
        let (Some(k3s_role), Some(node)) = (k3s_role, node) else {
            return not_running(
                report,
                "waiting for the node's role in its site (the join) before configuring K3s".into(),
            );
        };
        let Some(node_ip) = self.node_ip else {
            return not_running(
                report,
                "waiting for the node's address on the site's network before configuring K3s"
                    .into(),
            );
        };
        let token = match self.load_token(paths, k3s_role.is_server()) {
            Ok(Some(token)) => token,
            Ok(None) => {
                return not_running(
                    report,
                    "no K3s token on this node yet (the init node makes it; a joining node \
                     receives it with its certificate)"
                        .into(),
                )
            }
            Err(err) => return not_running(report, err.to_string()),
        };
        let defaults = K3sSettings::default();
        let settings = site.map_or(&defaults, |site| &site.k3s);
        let mut server_addresses = self.servers.clone();
        if k3s_role.is_server() {
            server_addresses.push(node_ip);
        }
        let text = config::render(&K3sInputs {
            role: k3s_role.clone(),
            token: &token,
            node,
            node_ip: Some(node_ip),
            server_addresses,
            settings,
        });
        let file = paths.k3s_config();
        match config::write(&file, &text) {
            Ok(true) => {
                info!(file = %file.display(), role = k3s_role.as_str(), "K3s configuration written")
            }
            Ok(false) => {}
            Err(err) => {
                warn!(file = %file.display(), %err, "cannot write the K3s configuration");
                return not_running(report, format!("cannot write {}: {err}", file.display()));
            }
        }
        report.config = Some(file.display().to_string());
        if k3s_role.is_server() {
            let dir = paths.k3s_manifests_dir();
            match manifests::sync(&dir, &settings.manifests) {
                Ok(names) => report.manifests = names,
                Err(err) => {
                    warn!(%err, "cannot bring the K3s manifests in line with the site configuration");
                    report.manifests_note = Some(err.to_string());
                }
            }
        }
        let (unit, check) = if k3s_role.is_server() {
            (
                K3S_SERVER,
                Check::Server {
                    kubeconfig: paths.k3s_admin_kubeconfig(),
                },
            )
        } else {
            (
                K3S_AGENT,
                Check::Agent {
                    kubeconfig: paths.k3s_kubelet_kubeconfig(),
                    node: node.clone(),
                },
            )
        };
        self.readiness.set(Some(check));
        self.upkeep.want(Wanted {
            redirect: Some(Rules::for_proxy(settings.service_cidr)),
            admin_kubeconfig: k3s_role.is_server().then(|| paths.k3s_admin_kubeconfig()),
            control_kubeconfig: paths.control_kubeconfig(),
        });
        if let Ok(name) = UnitName::try_from(unit.to_owned()) {
            units.push(ManagedUnit {
                name,
                ready_url: self.probe_url.clone(),
                dependencies: Vec::new(),
            });
            report.unit = Some(unit.to_owned());
        }
        report
    }
}

impl K3sPlace {
    /// This node's K3s role, from the join's `role` and what the node knows of its site;
    /// `None` while it waits for its join.
    pub fn role(&self, role: Option<Role>) -> Option<K3sRole> {
        match (self.first_server, role, self.via) {
            (true, _, _) => Some(K3sRole::FirstServer),
            (false, Some(Role::Server), Some(via)) => Some(K3sRole::Server { via }),
            (false, Some(Role::Agent), Some(via)) => Some(K3sRole::Agent { via }),
            _ => None,
        }
    }

    /// Whether K3s is installed and this node is (or is about to run as) a K3s server:
    /// its control replicas then read the Kubernetes API with [`NodePaths::control_kubeconfig`].
    pub fn serves(&self, role: Option<Role>) -> bool {
        self.installed && self.role(role).is_some_and(|role| role.is_server())
    }

    /// The site's K3s token: the trust folder's on a server node, else the one the join
    /// gave.
    fn load_token(
        &self,
        paths: &NodePaths,
        server: bool,
    ) -> Result<Option<K3sToken>, token::TokenError> {
        if server {
            if let Some(token) = K3sToken::load(&self.trust_token)? {
                return Ok(Some(token));
            }
        }
        K3sToken::load(&paths.k3s_token())
    }
}

/// This node's address on the site's network: the address of the first interface that
/// is up, not a loopback, and not one K3s or a container runtime makes (so that K3s's
/// own interfaces never change the answer), IPv4 first, link-local addresses (what an
/// interface has before DHCP answers) never; `None` when there is none yet.
pub fn node_ip(preferred_interfaces: Option<&[String]>) -> Option<IpAddr> {
    const NOT_THE_LAN: [&str; 10] = [
        "lo", "cni", "flannel", "veth", "vxlan", "kube", "docker", "cali", "tunl", "wg",
    ];
    let mut found: Vec<(bool, String, IpAddr)> = Vec::new();
    for address in crate::node::interfaces::addresses() {
        let name = address.interface;
        if !address.up || NOT_THE_LAN.iter().any(|prefix| name.starts_with(prefix)) {
            continue;
        }
        if preferred_interfaces.is_some_and(|wanted| !wanted.contains(&name)) {
            continue;
        }
        let ip = address.ip;
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            // A link-local address needs its scope to be dialled; K3s wants a routable one.
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        };
        if link_local || ip.is_loopback() || ip.is_unspecified() {
            continue;
        }
        found.push((ip.is_ipv6(), name, ip));
    }
    found.sort();
    found.first().map(|(_, _, ip)| *ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(dir: &std::path::Path) -> (K3sPlace, NodePaths) {
        let paths = NodePaths::under(dir);
        std::fs::create_dir_all(paths.k3s_bin.parent().expect("parent")).expect("mkdir");
        std::fs::write(&paths.k3s_bin, "").expect("k3s");
        let place = K3sPlace {
            installed: true,
            first_server: false,
            via: Some("10.0.0.1".parse().expect("ip")),
            servers: vec!["10.0.0.1".parse().expect("ip")],
            node_ip: Some("10.0.0.4".parse().expect("ip")),
            interfaces: None,
            trust_token: paths.state_dir.join("trust/k3s-token"),
            probe_url: None,
            readiness: Readiness::default(),
            upkeep: Upkeep::default(),
            datastore: datastore::Gate::default(),
        };
        (place, paths)
    }

    #[test]
    fn an_agent_with_its_token_runs_k3s_agent_and_one_without_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (place, paths) = place(dir.path());
        let node = DnsLabel::try_from("pi-d".to_owned()).expect("label");
        let mut units = Vec::new();
        let report = place.apply(Some(Role::Agent), Some(&node), None, &paths, &mut units);
        assert!(units.is_empty());
        assert!(report.note.unwrap_or_default().contains("no K3s token"));
        assert!(place.readiness.current().is_none());

        K3sToken::new("s3cret".into())
            .store(&paths.k3s_token())
            .expect("stored");
        let report = place.apply(Some(Role::Agent), Some(&node), None, &paths, &mut units);
        assert_eq!(report.role, Some("agent"));
        assert_eq!(report.unit.as_deref(), Some("k3s-agent.service"));
        assert_eq!(units.len(), 1);
        let text = std::fs::read_to_string(paths.k3s_config()).expect("written");
        assert!(text.contains("server: https://10.0.0.1:6443"), "{text}");
        assert!(matches!(
            place.readiness.current(),
            Some(Check::Agent { .. })
        ));
    }

    #[test]
    fn a_server_deploys_the_site_manifests_and_wants_the_redirect_and_the_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut place, paths) = place(dir.path());
        place.first_server = true;
        K3sToken::new("s3cret".into())
            .store(&place.trust_token)
            .expect("stored");
        let site = ClusterConfig::parse(
            std::path::Path::new("cluster.toml"),
            "site = \"lab\"\n[k3s]\nservice_cidr = \"10.96.0.0/12\"\n[k3s.manifests]\n\
             web = \"apiVersion: v1\\nkind: Namespace\\nmetadata: {name: web}\\n\"\n",
        )
        .expect("valid");
        let node = DnsLabel::try_from("pi-a".to_owned()).expect("label");
        let mut units = Vec::new();
        let report = place.apply(None, Some(&node), Some(&site), &paths, &mut units);
        assert_eq!(report.unit.as_deref(), Some("k3s.service"), "{report:?}");
        assert_eq!(report.manifests, ["web"]);
        assert!(paths.k3s_manifests_dir().join("pimesh-web.yaml").exists());
        let text = std::fs::read_to_string(paths.k3s_config()).expect("written");
        assert!(text.contains("service-cidr: 10.96.0.0/12"), "{text}");
        let wanted = place.upkeep.wanted().expect("wanted");
        assert_eq!(
            wanted.redirect.map(|rules| rules.service_cidr.to_string()),
            Some("10.96.0.0/12".to_owned())
        );
        assert_eq!(wanted.admin_kubeconfig, Some(paths.k3s_admin_kubeconfig()));
        assert!(place.serves(None));

        // The manifest leaves the site configuration (over the air): its file is emptied,
        // so that K3s prunes its objects.
        let site = ClusterConfig::parse(std::path::Path::new("cluster.toml"), "site = \"lab\"\n")
            .expect("valid");
        let report = place.apply(None, Some(&node), Some(&site), &paths, &mut units);
        assert!(report.manifests.is_empty());
        let emptied = std::fs::read_to_string(paths.k3s_manifests_dir().join("pimesh-web.yaml"))
            .expect("still there");
        assert_eq!(emptied, manifests::EMPTIED);
    }

    #[test]
    fn an_agent_writes_no_manifest_and_gets_no_kubeconfig_but_the_redirect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (place, paths) = place(dir.path());
        K3sToken::new("s3cret".into())
            .store(&paths.k3s_token())
            .expect("stored");
        let site = ClusterConfig::parse(
            std::path::Path::new("cluster.toml"),
            "site = \"lab\"\n[k3s.manifests]\n\
             web = \"apiVersion: v1\\nkind: Namespace\\nmetadata: {name: web}\\n\"\n",
        )
        .expect("valid");
        let node = DnsLabel::try_from("pi-d".to_owned()).expect("label");
        let mut units = Vec::new();
        let report = place.apply(
            Some(Role::Agent),
            Some(&node),
            Some(&site),
            &paths,
            &mut units,
        );
        assert_eq!(report.unit.as_deref(), Some("k3s-agent.service"));
        assert!(report.manifests.is_empty());
        assert!(!paths.k3s_manifests_dir().exists());
        let text = std::fs::read_to_string(paths.k3s_config()).expect("written");
        assert!(!text.contains("service-cidr"), "{text}");
        let wanted = place.upkeep.wanted().expect("wanted");
        assert!(wanted.redirect.is_some());
        assert_eq!(wanted.admin_kubeconfig, None);
        assert!(!place.serves(Some(Role::Agent)));

        // Without its token K3s is not placed: no redirect either.
        std::fs::remove_file(paths.k3s_token()).expect("removed");
        place.apply(
            Some(Role::Agent),
            Some(&node),
            Some(&site),
            &paths,
            &mut units,
        );
        assert_eq!(place.upkeep.wanted().and_then(|w| w.redirect), None);
    }

    #[test]
    fn without_the_binary_or_a_role_k3s_is_left_out_and_the_status_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut place, paths) = place(dir.path());
        let node = DnsLabel::try_from("pi-d".to_owned()).expect("label");
        let mut units = Vec::new();
        let report = place.apply(None, Some(&node), None, &paths, &mut units);
        assert!(report
            .note
            .unwrap_or_default()
            .contains("waiting for the node's role"));
        place.installed = false;
        let report = place.apply(Some(Role::Agent), Some(&node), None, &paths, &mut units);
        assert!(report.note.unwrap_or_default().contains("not installed"));
        assert!(units.is_empty());
        assert!(!paths.k3s_config().exists());
    }

    #[test]
    fn k3s_waits_for_the_datastore_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut place, paths) = place(dir.path());
        K3sToken::new("s3cret".into())
            .store(&paths.k3s_token())
            .expect("stored");
        let datastore =
            datastore::Datastore::new(&paths, Some(pimesh_schema::DatastoreChoice::Auto), true);
        place.datastore = datastore.gate();
        let node = DnsLabel::try_from("pi-d".to_owned()).expect("label");
        let mut units = Vec::new();
        let report = place.apply(Some(Role::Agent), Some(&node), None, &paths, &mut units);
        assert!(
            report
                .note
                .unwrap_or_default()
                .contains("waiting for the datastore disk"),
            "K3s is not placed before its data folder is settled"
        );
        assert!(units.is_empty());
        assert!(!paths.k3s_config().exists());
    }
}
