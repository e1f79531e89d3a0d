//! The set of units the supervisor keeps running, and how it follows the site
//! configuration.
//!
//! With the default set (`supervisor.toml` lists no `[[unit]]`) a server node runs control
//! replicas `1..=N`, N being the active site configuration's `[control] replicas` (the
//! default set's three while there is none); a set the file lists stays as listed. Which
//! replicas may run at all, and where the proxy finds them, is [`placement`]'s call.
//!
//! Invariants: the published set, the node status's `control` report and the units'
//! environment files always describe the same replicas; the set changes only through
//! [`ManagedSet::follow`], which the OTA client calls whenever it makes a site
//! configuration active, and [`ManagedSet::replace_placement`], which the join calls when
//! the node's place in its site changes; the keeper starts what joins the set and stops
//! what leaves it.

use pimesh_schema::cluster::ClusterConfig;
use pimesh_schema::{ManagedUnit, SupervisorConfig};
use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;
use tracing::info;

use crate::k3s::K3sPlacementReport;
use crate::status::ControlReport;
use crate::units::placement::{self, Placement};

/// Where each new [`ControlReport`] and K3s placement report go (the node status).
pub type ReportSink = Box<dyn Fn(ControlReport, K3sPlacementReport) + Send + Sync>;

/// The managed set: the units the keeper keeps running, as they change.
pub struct ManagedSet {
    configured: Vec<ManagedUnit>,
    replicas_follow_site: bool,
    placement: Mutex<Placement>,
    /// The site configuration the set was last placed for.
    active: Mutex<Option<ClusterConfig>>,
    report: ReportSink,
    set: watch::Sender<Vec<ManagedUnit>>,
}

impl ManagedSet {
    /// The set for the site configuration `active` (the node's `cluster.toml`, if any),
    /// with its environment files written and its report given to `report`.
    pub fn new(
        config: &SupervisorConfig,
        placement: Placement,
        active: Option<&ClusterConfig>,
        report: ReportSink,
    ) -> ManagedSet {
        let (set, _) = watch::channel(Vec::new());
        let units = ManagedSet {
            configured: config.units.clone(),
            replicas_follow_site: config.replicas_follow_site,
            placement: Mutex::new(placement),
            active: Mutex::new(active.cloned()),
            report,
            set,
        };
        let first = units.place(active);
        units.set.send_replace(first);
        units
    }

    /// The set as it changes; the receiver has not seen the current value yet.
    pub fn subscribe(&self) -> watch::Receiver<Vec<ManagedUnit>> {
        let mut receiver = self.set.subscribe();
        receiver.mark_changed();
        receiver
    }

    /// Looks for the node's address on the site's network again ([`crate::k3s::node_ip`]);
    /// when it changed, K3s is placed again for it. Returns whether it changed.
    pub fn follow_node_address(&self) -> bool {
        let (current, interfaces) = {
            let placement = self
                .placement
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            (placement.k3s.node_ip, placement.k3s.interfaces.clone())
        };
        let found = crate::k3s::node_ip(interfaces.as_deref());
        if found.is_none() || found == current {
            return false;
        }
        info!(address = ?found, before = ?current, "the node's address on the site's network changed");
        self.replace_placement(|placement| placement.k3s.node_ip = found);
        true
    }

    /// The node's address on the site's network, once known.
    pub fn node_address(&self) -> Option<std::net::IpAddr> {
        self.placement
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .k3s
            .node_ip
    }

    /// The K3s servers the node's join record lists.
    pub fn k3s_servers(&self) -> Vec<std::net::IpAddr> {
        self.placement
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .k3s
            .servers
            .clone()
    }

    /// The set now.
    pub fn current(&self) -> Vec<ManagedUnit> {
        self.set.borrow().clone()
    }

    /// Makes the set the one for the site configuration `site` (`None`: none is active).
    /// Returns whether it changed.
    pub fn follow(&self, site: Option<&ClusterConfig>) -> bool {
        if !self.replicas_follow_site {
            return false;
        }
        *self.active.lock().unwrap_or_else(PoisonError::into_inner) = site.cloned();
        let units = self.place(site);
        self.publish(units, "the managed set follows the site configuration")
    }

    /// Changes where the units run (the node joined its site, or now holds the issuer)
    /// and places the set again for the last site configuration. Returns whether the set
    /// changed.
    pub fn replace_placement(&self, change: impl FnOnce(&mut Placement)) -> bool {
        change(
            &mut self
                .placement
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let active = self
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let units = self.place(active.as_ref());
        self.publish(
            units,
            "the managed set follows the node's place in its site",
        )
    }

    fn publish(&self, units: Vec<ManagedUnit>, why: &'static str) -> bool {
        let changed = self.set.send_if_modified(|current| {
            if *current == units {
                return false;
            }
            *current = units;
            true
        });
        if changed {
            let names: Vec<String> = self
                .set
                .borrow()
                .iter()
                .map(|u| u.name.to_string())
                .collect();
            info!(units = ?names, "{why}");
        }
        changed
    }

    /// The units for `site`, placed, with the environment files and the status's control
    /// report brought in line with them.
    fn place(&self, site: Option<&ClusterConfig>) -> Vec<ManagedUnit> {
        let mut units = desired(&self.configured, self.replicas_follow_site, site);
        let placement = self
            .placement
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let report = placement.apply(&mut units);
        // A node waiting to join has no role yet: K3s's placement says it waits for it.
        let k3s = placement.k3s.apply(
            placement.role,
            placement.node.as_ref(),
            site,
            &placement.paths,
            &mut units,
        );
        drop(placement);
        (self.report)(report, k3s);
        units
    }
}

/// The configured units, with the control replicas numbered after `site`'s `[control]
/// replicas` when they follow the site and a site configuration is active.
fn desired(
    configured: &[ManagedUnit],
    replicas_follow_site: bool,
    site: Option<&ClusterConfig>,
) -> Vec<ManagedUnit> {
    let (true, Some(site)) = (replicas_follow_site, site) else {
        return configured.to_vec();
    };
    configured
        .iter()
        .filter(|unit| !placement::is_replica(unit))
        .cloned()
        .chain(
            (1..=u16::from(site.control.replicas)).map(pimesh_schema::supervisor::control_replica),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::paths::NodePaths;

    fn site(replicas: u8) -> ClusterConfig {
        let text = format!("site = \"lab\"\n[control]\nreplicas = {replicas}\n");
        ClusterConfig::parse(Path::new("cluster.toml"), &text).expect("valid")
    }

    fn names(units: &[ManagedUnit]) -> Vec<&str> {
        units.iter().map(|unit| unit.name.as_str()).collect()
    }

    #[test]
    fn the_default_set_runs_as_many_replicas_as_the_site_asks() {
        let config = SupervisorConfig::default();
        let one = desired(&config.units, true, Some(&site(1)));
        assert_eq!(
            names(&one),
            ["pimesh-proxy.service", "pimesh-control@1.service"]
        );
        let five = desired(&config.units, true, Some(&site(5)));
        assert_eq!(five.len(), 6);
        assert_eq!(five[5].name.as_str(), "pimesh-control@5.service");
        assert_eq!(
            desired(&config.units, true, None),
            config.units,
            "no site configuration: the default three"
        );
    }

    #[test]
    fn a_listed_set_stays_as_listed() {
        let config = SupervisorConfig::default();
        assert_eq!(desired(&config.units, false, Some(&site(1))), config.units);
    }

    #[test]
    fn following_the_site_rewrites_what_the_proxy_is_told() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = NodePaths::under(dir.path());
        let reported = std::sync::Arc::new(std::sync::Mutex::new(ControlReport::default()));
        let sink = std::sync::Arc::clone(&reported);
        let units = ManagedSet::new(
            &SupervisorConfig::default(),
            Placement::for_tests(&paths),
            Some(&site(2)),
            Box::new(move |report, _k3s| {
                if let Ok(mut reported) = sink.lock() {
                    *reported = report;
                }
            }),
        );
        let mut set = units.subscribe();
        assert!(
            set.has_changed().unwrap_or(false),
            "a new subscriber sees the set"
        );
        assert_eq!(names(&set.borrow_and_update()).len(), 3);
        let env = || std::fs::read_to_string(paths.proxy_env()).expect("written");
        assert!(env().contains("--control 127.0.0.1:8086,127.0.0.1:8087\n"));

        assert!(units.follow(Some(&site(3))));
        assert!(set.has_changed().unwrap_or(false));
        assert_eq!(set.borrow_and_update().len(), 4);
        assert!(env().contains("--control 127.0.0.1:8086,127.0.0.1:8087,127.0.0.1:8088\n"));
        let replicas = reported
            .lock()
            .map(|r| r.replicas.len())
            .unwrap_or_default();
        assert_eq!(replicas, 3, "the status reports the new replicas");
        assert!(
            !units.follow(Some(&site(3))),
            "the same count changes nothing"
        );
    }
}
