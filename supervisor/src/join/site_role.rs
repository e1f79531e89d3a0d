//! What the node does as a member of its site once its role is known: re-place its units
//! (the proxy and, on a server node, the control replicas), take its time from the site's
//! servers (`time`), and on a server node serve time, announce itself on the LAN (saying
//! so when the LAN shows no DHCP server, `lease`), keep its proxy in touch with the other
//! servers announced there (`in_touch`) and show the joins its replicas answered.
//!
//! Off a node (`on_node` false: the supervisor's tests on a development host) nothing
//! leaves the process: no mDNS, no chrony restart.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pimesh_join::{anchor_pin, Announcement};
use pimesh_schema::supervisor::CONTROL_BASE_PORT;
use pimesh_schema::{DnsLabel, ProbeUrl, Seed};
use tracing::{info, warn};

use crate::join::announce::Announcer;
use crate::join::in_touch::InTouch;
use crate::join::lease::{self, LinkLocalClock};
use crate::join::plan::placed;
use crate::join::record::JoinRecord;
use crate::join::time::{self, TimePlan};
use crate::join::OnJoined;
use crate::paths::NodePaths;
use crate::status::StatusHandle;
use crate::units::managed_set::ManagedSet;
use crate::units::placement;

/// How often a server node reads its replicas' join records for the status.
const JOINS_EVERY: Duration = Duration::from_secs(5);
/// How many join records the status shows.
const JOINS_SHOWN: usize = 50;
/// How often a server node reads its addresses to tell whether its LAN has DHCP.
const LAN_CHECK_EVERY: Duration = Duration::from_secs(2);

/// The node's part in its site; cheap to clone (one shared state).
#[derive(Clone)]
pub struct SiteRole(Arc<Inner>);

struct Inner {
    site: Option<DnsLabel>,
    node: Option<DnsLabel>,
    /// The join token's pin, else none (the anchor of the trust folder is used).
    pin: Option<[u8; 32]>,
    trust_anchor: PathBuf,
    joins_file: PathBuf,
    on_node: bool,
    /// The seed's `mdns_interfaces`.
    mdns_interfaces: Option<Vec<pimesh_schema::InterfaceName>>,
    /// Whether the seed lists the site's servers (then the operator's addresses are kept
    /// to, and the LAN is not browsed).
    seed_lists_servers: bool,
    /// The proxy's `/config`, which lists the control replicas it knows.
    proxy_config_url: ProbeUrl,
    chrony_dir: PathBuf,
    time: Mutex<TimePlan>,
    units: Arc<ManagedSet>,
    status: StatusHandle,
    /// The announcement's task ([`announce`]), which owns the responder: ending it
    /// withdraws the announcement.
    announce_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    joins_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    in_touch_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl SiteRole {
    pub fn new(
        paths: &NodePaths,
        seed: Option<&Seed>,
        node: Option<DnsLabel>,
        on_node: bool,
        units: Arc<ManagedSet>,
        status: StatusHandle,
        proxy_config_url: ProbeUrl,
    ) -> SiteRole {
        SiteRole(Arc::new(Inner {
            site: seed.map(|seed| seed.site.clone()),
            node,
            pin: seed
                .and_then(|seed| seed.join_token.as_ref())
                .map(|token| *token.anchor_sha256()),
            trust_anchor: paths.state_dir.join("trust").join("anchor.pem"),
            joins_file: paths.control_state_dir().join("joins.jsonl"),
            on_node,
            mdns_interfaces: seed.and_then(|seed| seed.mdns_interfaces.clone()),
            seed_lists_servers: seed.is_some_and(|seed| !seed.servers.is_empty()),
            proxy_config_url,
            chrony_dir: paths.chrony_dir(),
            time: Mutex::new(TimePlan::default()),
            units,
            status,
            announce_task: Mutex::new(None),
            joins_task: Mutex::new(None),
            in_touch_task: Mutex::new(None),
        }))
    }

    /// What the join calls when the node joined, and again when it holds the issuer.
    pub fn on_joined(&self) -> OnJoined {
        let role = self.clone();
        Box::new(move |record: &JoinRecord, holds_issuer: bool| {
            role.0
                .units
                .replace_placement(|placement| placed(placement, record, holds_issuer));
            let own = role.0.node.as_ref();
            let sources = record
                .servers
                .iter()
                .filter(|server| Some(&server.node) != own)
                .map(|server| server.address)
                .collect();
            role.time(|plan| plan.sources = sources);
            if holds_issuer {
                role.serve_as_server();
            }
        })
    }

    /// What the join calls when the node was enrolled by hand meanwhile.
    pub fn on_manual(&self) -> crate::join::OnManual {
        let role = self.clone();
        Box::new(move || {
            role.0
                .units
                .replace_placement(|placement| placement.waiting_to_join = false);
        })
    }

    /// On a server node: serves time, announces the node on the LAN, keeps its proxy in
    /// touch with the other servers announced there and shows the joins its replicas
    /// answer. Idempotent.
    pub fn serve_as_server(&self) {
        self.time(|plan| plan.serve = true);
        let inner = &self.0;
        let mut announce_task = inner
            .announce_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if announce_task.is_none() && inner.on_node {
            match self.announcement() {
                Some(announcement) => {
                    match Announcer::start(&announcement, inner.mdns_interfaces.as_deref()) {
                        Ok(announcer) => {
                            *announce_task = Some(tokio::spawn(announce(
                                announcer,
                                announcement,
                                inner.mdns_interfaces.clone(),
                                inner.status.clone(),
                            )));
                        }
                        Err(err) => warn!(%err, "joining nodes will need the seed's servers"),
                    }
                }
                None => warn!("no site, node name or anchor to announce this server with"),
            }
        }
        drop(announce_task);
        let mut task = inner
            .joins_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if task.is_none() {
            *task = Some(tokio::spawn(show_joins(
                inner.joins_file.clone(),
                inner.status.clone(),
            )));
        }
        drop(task);
        if inner.on_node && !inner.seed_lists_servers {
            let mut task = inner
                .in_touch_task
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if task.is_none() {
                *task = self.in_touch().map(|check| tokio::spawn(check.run()));
            }
        }
    }

    /// The check that keeps the proxy in touch with the other servers; `None` without a
    /// site, node name or anchor.
    fn in_touch(&self) -> Option<InTouch> {
        let inner = &self.0;
        Some(InTouch {
            site: inner.site.clone()?,
            node: inner.node.clone()?,
            pin: self.pin()?,
            interfaces: inner.mdns_interfaces.clone(),
            units: Arc::clone(&inner.units),
            proxy_config_url: inner.proxy_config_url.clone(),
        })
    }

    /// The SHA-256 of the site's anchor: the join token's pin, else that of the trust
    /// folder's anchor.
    fn pin(&self) -> Option<[u8; 32]> {
        let inner = &self.0;
        inner.pin.or_else(|| {
            let pem = std::fs::read(&inner.trust_anchor).ok()?;
            let anchors = pimesh_meshtls::pem::certificates(&pem).ok()?;
            anchors.first().map(|anchor| anchor_pin(anchor))
        })
    }

    /// Changes what chrony is told, shows it in the status, and (on a node) applies it.
    fn time(&self, change: impl FnOnce(&mut TimePlan)) {
        let inner = &self.0;
        let plan = {
            let mut plan = inner.time.lock().unwrap_or_else(PoisonError::into_inner);
            change(&mut plan);
            plan.clone()
        };
        inner
            .status
            .update(|status| status.join.clock.sources = plan.describe());
        if inner.on_node {
            tokio::spawn(time::apply(inner.chrony_dir.clone(), plan));
        }
    }

    fn announcement(&self) -> Option<Announcement> {
        let inner = &self.0;
        let pin = self.pin()?;
        let replicas = inner
            .units
            .current()
            .iter()
            .filter(|unit| placement::is_replica(unit))
            .count();
        Some(Announcement::server(
            inner.site.clone()?,
            inner.node.clone()?,
            &pin,
            CONTROL_BASE_PORT + 1,
            u8::try_from(replicas.max(1)).unwrap_or(u8::MAX),
        ))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in [
            &mut self.announce_task,
            &mut self.joins_task,
            &mut self.in_touch_task,
        ] {
            if let Some(task) = task
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
            {
                task.abort();
            }
        }
    }
}

/// Keeps `announced` on the LAN through `announcer`, reading the node's addresses on
/// `interfaces` every [`LAN_CHECK_EVERY`]: when whether the LAN has shown a DHCP server
/// changes ([`LinkLocalClock`]), announces it and shows it in the status.
async fn announce(
    announcer: Announcer,
    mut announced: Announcement,
    interfaces: Option<Vec<pimesh_schema::InterfaceName>>,
    status: StatusHandle,
) {
    let mut clock = LinkLocalClock::default();
    let mut every = tokio::time::interval(LAN_CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let addresses = lease::addresses(interfaces.as_deref());
        let without_dhcp = clock.observe(std::time::Instant::now(), &addresses);
        if without_dhcp == announced.lan_without_dhcp {
            continue;
        }
        let mut changed = announced.clone();
        changed.lan_without_dhcp = without_dhcp;
        if let Err(err) = announcer.update(&changed) {
            // Tried again at the next check.
            warn!(%err, "cannot announce whether the LAN has DHCP");
            continue;
        }
        announced = changed;
        if without_dhcp {
            info!(
                grace_s = lease::LEASE_GRACE.as_secs(),
                "the LAN has shown no DHCP server for the lease grace: announcing it, so \
                 boards plugged in join over link-local at once"
            );
        } else {
            info!("a DHCP lease came: no longer announcing a LAN without DHCP");
        }
        status.update(|status| status.join.lan_without_dhcp = without_dhcp);
    }
}

/// Shows the last [`JOINS_SHOWN`] records of `file` (one JSON object per line) in the
/// status, every [`JOINS_EVERY`]; a line that is not JSON is skipped.
async fn show_joins(file: PathBuf, status: StatusHandle) {
    let mut every = tokio::time::interval(JOINS_EVERY);
    loop {
        every.tick().await;
        let Ok(text) = tokio::fs::read_to_string(&file).await else {
            continue;
        };
        let records: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        let skip = records.len().saturating_sub(JOINS_SHOWN);
        let records: Vec<_> = records.into_iter().skip(skip).collect();
        status.update(|status| status.joins = records);
    }
}
