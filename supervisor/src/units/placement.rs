//! Where the node's control plane is: whether this node runs control replicas, and which
//! replicas its proxy asks for identity and discovery.
//!
//! A control replica signs leaves with the site's issuer, so it runs only on a node that
//! holds the issuer (a server node: the `init` node, or one the operator gave the trust
//! folder). On any other node the replica units of the managed set are left out — never
//! started, so never healed in a loop for want of a key — and the status says why.
//!
//! The proxy learns its replicas from `/run/pimesh/proxy.env` (`PIMESH_PROXY_ARGS`, read
//! by `pimesh-proxy.service` at its start), and the replicas the seed's site from
//! `/run/pimesh/control.env` (`PIMESH_CONTROL_ARGS`: they serve node identities before
//! any site config arrives, and on a K3s server read the Kubernetes API with
//! `--kubeconfig`), both written before any unit is started and again whenever
//! the managed set changes (`crate::units::managed_set`). Invariant: the proxy's file names
//! exactly the replicas this node runs, or on a node without the issuer those the seed's
//! servers run; with none it says so by an empty value, and the proxy keeps to its file
//! configuration. A running proxy keeps the list it started with: a replica that leaves it
//! is failed over, one that joins it is asked from the proxy's next start.

use std::net::{IpAddr, SocketAddr};

use pimesh_join::Role;
use pimesh_schema::supervisor::CONTROL_BASE_PORT;
use pimesh_schema::{DnsLabel, ManagedUnit};
use tracing::{info, warn};

use crate::paths::NodePaths;
use crate::status::ControlReport;
use crate::units::role::UnitRole;

/// What decides where this node's replicas run. It changes when the node joins its site
/// (`crate::join`), through `ManagedSet::replace_placement`.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Whether this node holds the site issuer (a server node).
    pub holds_issuer: bool,
    /// The seed's `servers`, whose replicas a node without the issuer asks.
    pub servers: Vec<String>,
    /// The seed's site, passed to the replicas.
    pub site: Option<DnsLabel>,
    /// This node's name, passed to the replicas (they count it among the site's servers).
    pub node: Option<DnsLabel>,
    /// A node that joins by token and has not joined yet: no unit runs (the proxy would
    /// have no credential, the replicas no issuer).
    pub waiting_to_join: bool,
    /// The node's role on its site, once known: the proxy heartbeats it.
    pub role: Option<Role>,
    /// The replicas of the site's server nodes that the join answer listed.
    pub joined_replicas: Vec<SocketAddr>,
    /// On a server node: the replicas of the other servers announced on the LAN, once its
    /// proxy was found not to know one of them (`crate::join::in_touch`); not kept across
    /// a reboot, where the check finds them again.
    pub announced_replicas: Vec<SocketAddr>,
    /// A server node that joined (not the site's first): its replicas answer joins only
    /// once they have heard the site's live nodes ([`JOIN_WARMUP_SECS`]), so that two
    /// boards joining at once through two servers do not both take the last seat.
    pub join_warmup: bool,
    /// Where the units' environment files go.
    pub paths: NodePaths,
    /// K3s's part: whether and as what K3s runs here (`crate::k3s`).
    pub k3s: crate::k3s::K3sPlace,
}

impl Placement {
    /// Places the control replicas of `units` ([`place`]) and tells the proxy and the
    /// replicas ([`write_unit_env`]); returns the status's control report.
    pub fn apply(&self, units: &mut Vec<ManagedUnit>) -> ControlReport {
        if self.waiting_to_join {
            units.clear();
            return ControlReport {
                note: Some(
                    "waiting to join the site (see `join` in the status): no unit runs before \
                     the node holds its certificate"
                        .into(),
                ),
                ..ControlReport::default()
            };
        }
        let mut report = place(units, self.holds_issuer, &self.servers);
        for addr in self.joined_replicas.iter().chain(&self.announced_replicas) {
            let addr = addr.to_string();
            if !report.proxy_control.contains(&addr) {
                report.proxy_control.push(addr);
            }
        }
        if self.holds_issuer {
            // Its own replicas on loopback come first; the others' follow for failover.
        } else if !self.joined_replicas.is_empty() {
            report.note = Some(
                "an agent node: it runs no control replicas; its proxy asks those of the \
                 site's server nodes"
                    .into(),
            );
        }
        write_unit_env(self, &mut report);
        report
    }
}

/// `--join-warmup` of a joined server's replicas: one heartbeat TTL (three of the proxies'
/// heartbeat intervals).
pub const JOIN_WARMUP_SECS: u64 = 30;

/// The replica number of a control replica unit (`pimesh-control@N.service`).
fn replica_number(unit: &ManagedUnit) -> Option<u16> {
    match UnitRole::of(&unit.name) {
        UnitRole::ControlReplica { replica } => replica,
        UnitRole::Proxy | UnitRole::K3sServer | UnitRole::K3sAgent | UnitRole::Other => None,
    }
}

/// Whether `unit` is a control replica (`pimesh-control@N.service`).
pub fn is_replica(unit: &ManagedUnit) -> bool {
    UnitRole::of(&unit.name).is_control_replica()
}

/// Leaves the control replicas out of `units` unless the node holds the issuer, and
/// returns which replicas run and where the proxy finds them: this node's replicas on
/// 127.0.0.1, else the same replica ports on each of the seed's `servers` given as an IP
/// (a server named by host name is skipped: the proxy dials addresses).
pub fn place(
    units: &mut Vec<ManagedUnit>,
    holds_issuer: bool,
    servers: &[String],
) -> ControlReport {
    let ports: Vec<u16> = units
        .iter()
        .filter(|unit| is_replica(unit))
        .filter_map(replica_number)
        .map(|n| CONTROL_BASE_PORT + n)
        .collect();
    if !holds_issuer {
        let before = units.len();
        units.retain(|unit| !is_replica(unit));
        if before > units.len() {
            info!(
                left_out = before - units.len(),
                "this node holds no site issuer: its control replicas are not run"
            );
        }
        let proxy_control = servers
            .iter()
            .filter_map(|server| server_ip(server))
            .flat_map(|ip| {
                ports
                    .iter()
                    .map(move |port| SocketAddr::new(ip, *port).to_string())
            })
            .collect();
        return ControlReport {
            proxy_control,
            note: Some(
                "this node holds no site issuer (not a server node): it runs no control \
                 replicas; its proxy asks those of the seed's servers"
                    .into(),
            ),
            ..ControlReport::default()
        };
    }
    ControlReport {
        runs_replicas: !ports.is_empty(),
        replicas: units
            .iter()
            .filter(|unit| is_replica(unit))
            .map(|unit| unit.name.as_str().to_owned())
            .collect(),
        proxy_control: ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect(),
        note: None,
    }
}

/// The IP of a seed's `servers` entry (`host` or `host:port`), when the host is one.
fn server_ip(server: &str) -> Option<IpAddr> {
    server
        .parse::<IpAddr>()
        .ok()
        .or_else(|| server.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
}

/// Writes the proxy's and the replicas' environment files (see the module doc). A
/// failure is noted in the report; the units then start without these arguments.
pub fn write_unit_env(placement: &Placement, report: &mut ControlReport) {
    let mut proxy_args = Vec::new();
    if !report.proxy_control.is_empty() {
        proxy_args.push(format!("--control {}", report.proxy_control.join(",")));
    }
    if let Some(role) = placement.role {
        proxy_args.push(format!("--role {role}"));
        let own: Vec<String> = report
            .proxy_control
            .iter()
            .filter_map(|addr| addr.strip_prefix("127.0.0.1:"))
            .map(str::to_owned)
            .collect();
        if role == Role::Server && !own.is_empty() {
            proxy_args.push(format!("--server-replicas {}", own.join(",")));
        }
    }
    let mut control_args = Vec::new();
    if let Some(site) = &placement.site {
        control_args.push(format!("--site {site}"));
    }
    if let Some(node) = &placement.node {
        control_args.push(format!("--node {node}"));
    }
    if placement.join_warmup {
        control_args.push(format!("--join-warmup {JOIN_WARMUP_SECS}"));
    }
    // On a K3s server the replicas read the Kubernetes API with their copy of the admin
    // kubeconfig (`crate::k3s::kubeconfig`); they wait for it while K3s has not written it.
    if placement.k3s.serves(placement.role) {
        control_args.push(format!(
            "--kubeconfig {}",
            placement.paths.control_kubeconfig().display()
        ));
    }
    let files = [
        (
            placement.paths.proxy_env(),
            "PIMESH_PROXY_ARGS",
            "the control replicas of this node",
            proxy_args.join(" "),
        ),
        (
            placement.paths.control_env(),
            "PIMESH_CONTROL_ARGS",
            "the seed's site",
            control_args.join(" "),
        ),
    ];
    for (path, variable, what, args) in files {
        let text = format!("# Written by pimesh-supervisor: {what}.\n{variable}={args}\n");
        if let Err(err) = pimesh_runtime::atomic_file::replace(&path, text.as_bytes(), 0o644) {
            warn!(path = %path.display(), %err, "cannot write a unit's environment: {what}");
            report.note = Some(format!("cannot write {}: {err}", path.display()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units() -> Vec<ManagedUnit> {
        pimesh_schema::SupervisorConfig::default().units
    }

    impl Placement {
        pub fn for_tests(paths: &NodePaths) -> Placement {
            Placement {
                holds_issuer: true,
                servers: Vec::new(),
                site: None,
                node: None,
                waiting_to_join: false,
                role: None,
                joined_replicas: Vec::new(),
                announced_replicas: Vec::new(),
                join_warmup: false,
                paths: paths.clone(),
                k3s: crate::k3s::K3sPlace::default(),
            }
        }
    }

    #[test]
    fn a_node_waiting_to_join_runs_nothing_and_a_joined_agent_asks_the_servers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = NodePaths::under(dir.path());
        let waiting = Placement {
            holds_issuer: false,
            waiting_to_join: true,
            ..Placement::for_tests(&paths)
        };
        let mut set = units();
        let report = waiting.apply(&mut set);
        assert!(set.is_empty(), "{set:?}");
        assert!(report.note.unwrap_or_default().contains("waiting to join"));

        let agent = Placement {
            holds_issuer: false,
            role: Some(Role::Agent),
            node: Some(DnsLabel::try_from("pi-c".to_owned()).expect("label")),
            site: Some(DnsLabel::try_from("lab".to_owned()).expect("label")),
            joined_replicas: vec![
                "10.0.0.1:8086".parse().expect("addr"),
                "10.0.0.2:8086".parse().expect("addr"),
            ],
            ..Placement::for_tests(&paths)
        };
        let mut set = units();
        let report = agent.apply(&mut set);
        assert_eq!(set.len(), 1, "the proxy alone");
        assert_eq!(report.proxy_control, ["10.0.0.1:8086", "10.0.0.2:8086"]);
        let env = std::fs::read_to_string(paths.proxy_env()).expect("written");
        assert!(
            env.contains("PIMESH_PROXY_ARGS=--control 10.0.0.1:8086,10.0.0.2:8086 --role agent\n"),
            "{env}"
        );
        let env = std::fs::read_to_string(paths.control_env()).expect("written");
        assert!(
            env.contains("PIMESH_CONTROL_ARGS=--site lab --node pi-c\n"),
            "{env}"
        );

        let server = Placement {
            role: Some(Role::Server),
            holds_issuer: true,
            join_warmup: true,
            ..agent
        };
        let mut set = units();
        let report = server.apply(&mut set);
        assert_eq!(set.len(), 4);
        assert_eq!(
            report.proxy_control[..3],
            ["127.0.0.1:8086", "127.0.0.1:8087", "127.0.0.1:8088"]
        );
        let env = std::fs::read_to_string(paths.proxy_env()).expect("written");
        assert!(
            env.contains("--role server --server-replicas 8086,8087,8088\n"),
            "{env}"
        );
        // The servers announced on the LAN follow the join's, once each.
        let in_touch = Placement {
            announced_replicas: vec![
                "10.0.0.2:8086".parse().expect("addr"),
                "10.0.0.3:8086".parse().expect("addr"),
            ],
            ..server.clone()
        };
        let report = in_touch.apply(&mut units());
        assert_eq!(
            report.proxy_control[3..],
            ["10.0.0.1:8086", "10.0.0.2:8086", "10.0.0.3:8086"]
        );
        let env = std::fs::read_to_string(paths.control_env()).expect("written");
        assert!(!env.contains("--kubeconfig"), "no K3s here: {env}");

        // With K3s installed, a K3s server's replicas get their kubeconfig; an agent's none.
        let mut k3s_server = Placement {
            k3s: crate::k3s::K3sPlace {
                installed: true,
                via: Some("10.0.0.1".parse().expect("ip")),
                ..crate::k3s::K3sPlace::default()
            },
            ..server
        };
        k3s_server.apply(&mut units());
        let env = std::fs::read_to_string(paths.control_env()).expect("written");
        let kubeconfig = paths.control_kubeconfig();
        assert!(
            env.contains(&format!(
                "--join-warmup 30 --kubeconfig {}\n",
                kubeconfig.display()
            )),
            "{env}"
        );
        k3s_server.role = Some(Role::Agent);
        k3s_server.apply(&mut units());
        let env = std::fs::read_to_string(paths.control_env()).expect("written");
        assert!(!env.contains("--kubeconfig"), "{env}");
    }

    #[test]
    fn a_node_without_the_issuer_runs_no_replica_and_says_why() {
        let mut units = units();
        let servers = [
            "10.0.0.10".to_owned(),
            "pi-b.local".to_owned(),
            "10.0.0.11:6443".to_owned(),
        ];
        let report = place(&mut units, false, &servers);
        let names: Vec<&str> = units.iter().map(|unit| unit.name.as_str()).collect();
        assert_eq!(names, ["pimesh-proxy.service"]);
        assert!(!report.runs_replicas);
        assert_eq!(
            report.proxy_control,
            [
                "10.0.0.10:8086",
                "10.0.0.10:8087",
                "10.0.0.10:8088",
                "10.0.0.11:8086",
                "10.0.0.11:8087",
                "10.0.0.11:8088"
            ],
            "the replicas of the seed's servers given by IP"
        );
        assert!(report.note.unwrap_or_default().contains("no site issuer"));
    }

    #[test]
    fn a_server_node_runs_its_replicas_and_its_proxy_is_told_their_ports() {
        let mut units = units();
        let report = place(&mut units, true, &["10.0.0.10".to_owned()]);
        assert_eq!(units.len(), 4);
        assert_eq!(
            report.proxy_control,
            ["127.0.0.1:8086", "127.0.0.1:8087", "127.0.0.1:8088"]
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = NodePaths::under(dir.path());
        let mut report = report;
        let site = DnsLabel::try_from("lab".to_owned()).expect("label");
        let placement = Placement {
            site: Some(site),
            ..Placement::for_tests(&paths)
        };
        write_unit_env(&placement, &mut report);
        let env = std::fs::read_to_string(paths.proxy_env()).expect("written");
        assert!(env.contains(
            "PIMESH_PROXY_ARGS=--control 127.0.0.1:8086,127.0.0.1:8087,127.0.0.1:8088\n"
        ));
        let env = std::fs::read_to_string(paths.control_env()).expect("written");
        assert!(env.contains("PIMESH_CONTROL_ARGS=--site lab\n"));
        assert!(report.note.is_none());
    }
}
