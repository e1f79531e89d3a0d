//! Quorum-aware healing: on a K3s server node of a site with several servers (embedded
//! etcd), taking this node's K3s down — restarting it, or rebooting the node — is held
//! back while the site's other servers could not keep a majority without it.
//!
//! Before the keeper takes a K3s server down (and every [`EVERY`] for the status), the
//! node reads the site's servers from its own Kubernetes API
//! (`GET /api/v1/nodes`, the nodes labelled `node-role.kubernetes.io/control-plane`, at
//! their `InternalIP`; the last list read is kept while the API does not answer, beside
//! the servers the join record lists) and asks each of the others `GET /readyz` with the
//! admin kubeconfig's credentials (the site's servers share K3s's cluster CA). With `n`
//! servers, a majority is `n / 2 + 1`; the hold is on while fewer than that many others
//! answer ready.
//!
//! The periodic task also looks for the node's address on the site's network every tick, so that
//! K3s, which waits for it, is configured once DHCP has given one (and rendered again
//! when it changes; K3s takes a new address at its next start).
//!
//! When the quorum allows it, a server node of a site with several servers also takes the
//! site's restart lock before it goes down: the Lease [`LEASE_NAME`] in [`LEASE_NAMESPACE`]
//! (`coordination.k8s.io/v1`), held for [`LEASE_FOR`], taken through another server's API
//! (this node's own K3s is likely the one that hangs). Another holder holds the heal back
//! ("pi-b is restarting its K3s server"), so two servers that both see every other one
//! ready never go down together. The lease is given back (by the periodic task, through
//! this node's own API) once the keeper has seen a K3s process that it first probed
//! after the take answer its readiness probe ([`DisruptionGuard::back_up`]): the process
//! that was restarted, never the one still running when the lease was taken. After the
//! supervisor starts, a lease this node may have held before is given back once any K3s
//! process here is ready; so is a lease taken for a restart that did not happen
//! ([`DisruptionGuard::not_taken_down`]). A release that fails is tried again every [`EVERY`];
//! unreleased, the lease expires.
//!
//! Invariants: the hold never blocks starting a unit that is down (the heal policy's
//! rule); an agent, a single-server site and a node without K3s never hold; the reason is
//! one sentence naming the counts or the lease's holder, shown in the status of the unit
//! held back and in the node status's `k3s.quorum`.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::{info, warn};

use super::config::{api_url, API_PORT};
use super::readiness::{Check, Readiness};
use crate::status::{QuorumReport, ServerHealth, StatusHandle};
use crate::units::heal::DisruptionGuard;
use crate::units::managed_set::ManagedSet;
use pimesh_kube::lease::{release, try_acquire, LeaseOutcome};
use pimesh_kube::KubeClient;

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

/// The longest a heal waits for a fresh view of the quorum; without one it is held back.
pub const HOLD_TIMEOUT: Duration = Duration::from_secs(5);

/// The site's restart lock: a Lease in K3s's own namespace.
pub const LEASE_NAMESPACE: &str = "kube-system";
pub const LEASE_NAME: &str = "pimesh-k3s-restart";
/// How long the lock lasts unreleased: K3s's startup grace and a minute, so that a node
/// that took it and then rebooted does not hold the site for long.
pub const LEASE_FOR: Duration =
    Duration::from_secs(crate::units::heal::K3S_STARTUP_GRACE.as_secs() + 60);

/// The quorum view of this node: asked afresh by the keeper before a disruptive heal, and
/// every [`EVERY`] for the status. Cheap to clone.
#[derive(Clone)]
pub struct Quorum(Arc<Inner>);

struct Inner {
    readiness: Readiness,
    /// The managed set, whose placement knows the node's address and the servers the join
    /// record lists.
    units: Arc<ManagedSet>,
    admin_kubeconfig: PathBuf,
    /// Every server seen, by address, with its node name when the API gave it: kept while
    /// the API does not answer (a hung K3s is exactly when the view matters).
    known: Mutex<BTreeMap<IpAddr, Option<String>>>,
    /// This node's name: the lease's holder identity.
    node: String,
    /// Where this node stands with the site's restart lease.
    lease: Mutex<LeaseHold>,
    /// Held through every take and release: a release never undoes a take made while it
    /// was under way.
    lease_calls: tokio::sync::Mutex<()>,
}

/// This node's part in the site's restart lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseHold {
    /// Not held (as far as this node knows).
    Free,
    /// The supervisor started: a lease taken before may still be held.
    MaybeFromBefore,
    /// Taken (or renewed) at `at` for a restart that has not come back ready yet;
    /// `earlier`: when it was taken for a restart still pending when it was renewed.
    Taken {
        at: Instant,
        earlier: Option<Instant>,
    },
    /// The restarted K3s is ready: to be given back.
    Due,
}

impl LeaseHold {
    /// The state once a K3s process first probed at `first_probed` answered ready.
    fn back_up(self, first_probed: Instant) -> LeaseHold {
        match self {
            LeaseHold::MaybeFromBefore => LeaseHold::Due,
            LeaseHold::Taken { at, .. } if first_probed > at => LeaseHold::Due,
            other => other,
        }
    }

    /// The state once the lease was taken (or renewed) at `at`.
    fn taken(self, at: Instant) -> LeaseHold {
        let earlier = match self {
            LeaseHold::Taken { at, .. } => Some(at),
            _ => None,
        };
        LeaseHold::Taken { at, earlier }
    }

    /// The state once the disruption of the latest take did not happen.
    fn not_taken_down(self) -> LeaseHold {
        match self {
            LeaseHold::Taken {
                earlier: Some(at), ..
            } => LeaseHold::Taken { at, earlier: None },
            LeaseHold::Taken { earlier: None, .. } => LeaseHold::Due,
            other => other,
        }
    }
}

impl Quorum {
    pub fn new(
        readiness: Readiness,
        units: Arc<ManagedSet>,
        admin_kubeconfig: PathBuf,
        node: String,
    ) -> Quorum {
        Quorum(Arc::new(Inner {
            readiness,
            units,
            admin_kubeconfig,
            known: Mutex::default(),
            node,
            lease: Mutex::new(LeaseHold::MaybeFromBefore),
            lease_calls: tokio::sync::Mutex::new(()),
        }))
    }

    /// Every [`EVERY`]: follows the node's address (K3s waits for it, and its config
    /// follows it), and shows K3s's readiness and the quorum in the status.
    pub async fn run(self, status: StatusHandle) {
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_hold: Option<String> = None;
        loop {
            every.tick().await;
            self.0.units.follow_node_address();
            let readiness = match self.0.readiness.current() {
                Some(_) => Some(self.0.readiness.check().await),
                None => None,
            };
            let report = self.assess().await;
            if report.hold != last_hold {
                match &report.hold {
                    Some(why) => {
                        warn!(reason = %why, "K3s quorum: restarts of this K3s server and reboots are held back")
                    }
                    None => info!("K3s quorum: heals may take this server down again"),
                }
                last_hold.clone_from(&report.hold);
            }
            if matches!(readiness, Some(Ok(_))) && self.lease() == LeaseHold::Due {
                self.release_lease().await;
            }
            status.update(|status| {
                status.k3s.ready = readiness.as_ref().map(Result::is_ok);
                status.k3s.readiness = readiness.map(|answer| answer.unwrap_or_else(|why| why));
                status.k3s.quorum = report;
            });
        }
    }

    /// The quorum now: on a K3s server, the other servers asked now; elsewhere nothing to
    /// hold.
    pub async fn assess(&self) -> QuorumReport {
        if !matches!(self.0.readiness.current(), Some(Check::Server { .. })) {
            return QuorumReport::default();
        }
        let admin = match KubeClient::load(&self.0.admin_kubeconfig, ASK_TIMEOUT) {
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
        let listed = match admin.get("/api/v1/nodes", MAX_ANSWER).await {
            Ok((200, body)) => serde_json::from_str::<NodeList>(&body).ok(),
            _ => None,
        };
        let own = self.0.units.node_address();
        let others: Vec<(IpAddr, Option<String>)> = {
            let mut known = self.0.known.lock().unwrap_or_else(PoisonError::into_inner);
            for node in listed
                .iter()
                .flat_map(|list| &list.items)
                .filter(|n| n.is_server())
            {
                if let Some(address) = node.internal_ip() {
                    known.insert(address, Some(node.metadata.name.clone()));
                }
            }
            for address in self.0.units.k3s_servers() {
                known.entry(address).or_insert(None);
            }
            known
                .iter()
                .filter(|(address, _)| Some(**address) != own)
                .map(|(address, name)| (*address, name.clone()))
                .collect()
        };
        let asks = others.into_iter().map(|(address, name)| {
            let admin = &admin;
            async move {
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
                ServerHealth {
                    address,
                    name,
                    ready: result.is_ok(),
                    error: result.err(),
                }
            }
        });
        let health = futures_util::future::join_all(asks).await;
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

impl Quorum {
    /// Takes (or renews) the site's restart lease through a ready other server: `Err`
    /// says why this server may not go down now.
    async fn take_lease(&self, report: &QuorumReport) -> Result<(), String> {
        let _call = self.0.lease_calls.lock().await;
        let admin = KubeClient::load(&self.0.admin_kubeconfig, ASK_TIMEOUT)
            .map_err(|err| format!("the site's restart lease cannot be taken: {err}"))?;
        let mut last = String::from("no other K3s server is ready");
        for other in report.others.iter().filter(|other| other.ready) {
            let client = match admin.for_server(api_url(other.address), ASK_TIMEOUT) {
                Ok(client) => client,
                Err(err) => {
                    last = err.to_string();
                    continue;
                }
            };
            match try_acquire(
                &client,
                LEASE_NAMESPACE,
                LEASE_NAME,
                &self.0.node,
                LEASE_FOR,
            )
            .await
            {
                Ok(LeaseOutcome::Acquired { .. } | LeaseOutcome::Renewed { .. }) => {
                    self.update_lease(|hold| hold.taken(Instant::now()));
                    info!(
                        lease = LEASE_NAME,
                        via = %other.address,
                        "took the site's K3s restart lease"
                    );
                    return Ok(());
                }
                Ok(LeaseOutcome::Held { holder, until }) => {
                    let left = until
                        .duration_since(std::time::SystemTime::now())
                        .unwrap_or_default()
                        .as_secs();
                    return Err(format!(
                        "{holder} holds the site's K3s restart lease (another server is \
                         restarting its K3s; at most {left} s more)"
                    ));
                }
                Err(err) => last = err.to_string(),
            }
        }
        Err(format!(
            "the site's K3s restart lease cannot be taken: {last}"
        ))
    }

    fn lease(&self) -> LeaseHold {
        *self.0.lease.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_lease(&self, hold: LeaseHold) {
        self.update_lease(|_| hold);
    }

    /// Moves the lease state by `step`, under one lock.
    fn update_lease(&self, step: impl FnOnce(LeaseHold) -> LeaseHold) {
        let mut hold = self.0.lease.lock().unwrap_or_else(PoisonError::into_inner);
        *hold = step(*hold);
    }

    /// Gives the site's restart lease back (it is due); through this node's own API,
    /// which answers now that K3s is ready here. Stays due when the API cannot say.
    async fn release_lease(&self) {
        if !matches!(self.0.readiness.current(), Some(Check::Server { .. })) {
            return;
        }
        let _call = self.0.lease_calls.lock().await;
        if self.lease() != LeaseHold::Due {
            return; // taken again meanwhile
        }
        let admin = match KubeClient::load(&self.0.admin_kubeconfig, ASK_TIMEOUT) {
            Ok(admin) => admin,
            Err(err) => {
                warn!(%err, "cannot release the site's K3s restart lease yet");
                return;
            }
        };
        match release(&admin, LEASE_NAMESPACE, LEASE_NAME, &self.0.node).await {
            Ok(released) => {
                self.set_lease(LeaseHold::Free);
                if released {
                    info!(lease = LEASE_NAME, "released the site's K3s restart lease");
                }
            }
            Err(err) => warn!(%err, "cannot release the site's K3s restart lease yet"),
        }
    }
}

impl DisruptionGuard for Quorum {
    fn back_up(&self, first_probed: Instant) {
        self.update_lease(|hold| hold.back_up(first_probed));
    }

    fn not_taken_down(&self) {
        self.update_lease(LeaseHold::not_taken_down);
    }

    fn hold(&self) -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>> {
        Box::pin(async move {
            let report = match tokio::time::timeout(HOLD_TIMEOUT, self.assess()).await {
                Ok(report) => report,
                Err(_) => {
                    return Some(format!(
                        "the other K3s servers could not be asked within {} s",
                        HOLD_TIMEOUT.as_secs()
                    ))
                }
            };
            if report.hold.is_some() || report.servers <= 1 {
                return report.hold;
            }
            match tokio::time::timeout(HOLD_TIMEOUT, self.take_lease(&report)).await {
                Ok(Ok(())) => None,
                Ok(Err(why)) => Some(why),
                Err(_) => Some(format!(
                    "the site's K3s restart lease could not be taken within {} s",
                    HOLD_TIMEOUT.as_secs()
                )),
            }
        })
    }
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
    fn the_lease_is_due_back_only_once_a_process_started_after_the_take_is_ready() {
        let start = Instant::now();
        let taken = LeaseHold::Taken {
            at: start + Duration::from_secs(10),
            earlier: None,
        };
        // The process that was running when the lease was taken answers ready: that is
        // not the restart coming back.
        assert_eq!(taken.back_up(start), taken);
        assert_eq!(taken.back_up(start + Duration::from_secs(10)), taken);
        assert_eq!(
            taken.back_up(start + Duration::from_secs(11)),
            LeaseHold::Due
        );
        // After the supervisor starts, any ready K3s gives back what may have been held.
        assert_eq!(LeaseHold::MaybeFromBefore.back_up(start), LeaseHold::Due);
        assert_eq!(LeaseHold::Free.back_up(start), LeaseHold::Free);
        assert_eq!(LeaseHold::Due.back_up(start), LeaseHold::Due);
    }

    #[test]
    fn a_take_whose_restart_did_not_happen_is_given_back_unless_one_is_pending() {
        let start = Instant::now();
        let later = start + Duration::from_secs(30);
        let alone = LeaseHold::Taken {
            at: start,
            earlier: None,
        };
        assert_eq!(alone.not_taken_down(), LeaseHold::Due);
        // Renewed while an earlier restart had not come back: that one still holds it.
        assert_eq!(LeaseHold::Free.taken(start), alone);
        assert_eq!(LeaseHold::Due.taken(start), alone);
        let renewed = alone.taken(later);
        assert_eq!(
            renewed,
            LeaseHold::Taken {
                at: later,
                earlier: Some(start),
            }
        );
        assert_eq!(renewed.not_taken_down(), alone);
        for other in [LeaseHold::Free, LeaseHold::MaybeFromBefore, LeaseHold::Due] {
            assert_eq!(other.not_taken_down(), other);
        }
    }

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
