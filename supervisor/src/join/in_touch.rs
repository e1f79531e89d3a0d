//! A server node keeps its proxy in touch with every server node the LAN announces.
//!
//! The servers of a site know each other through their replicas: a proxy heartbeats
//! every replica it knows, a replica lists the servers whose proxies heartbeat it, and a
//! proxy learns the replicas of the servers listed. So the site stays one while every
//! server's proxy knows a replica that the others know too. A renumbered LAN can break
//! that for a server that the others' relocation rounds (`relocate`) missed — unplugged,
//! or still on its old lease, during the round — since the init node keeps no join record
//! and never relocates, and a joined node browses again only when none of its recorded
//! servers answers. That server and the rest would then be two sites that never meet.
//!
//! Every [`CHECK_EVERY`] a server node browses mDNS (its site, its anchor's pin), and
//! for each other server announced whose replicas its proxy does not know at any
//! announced address (`/config`), tries them; when one of those connects and the proxy
//! still does not know it [`CONFIRM_AFTER`] later (a server that has just joined is
//! learnt through discovery within a heartbeat interval), the replicas of every server
//! announced and reachable are placed as the proxy's announced replicas
//! (`Placement::announced_replicas`, after its own and its join's) and the proxy is
//! restarted to read them. Invariant: at most one restart per [`RESTART_AT_MOST_EVERY`],
//! so a server the proxy cannot learn for another reason costs a restart per that
//! period, never a loop; nothing is done while the proxy's `/config` cannot be read
//! (the keeper heals a proxy that does not answer).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pimesh_schema::{DnsLabel, InterfaceName, ProbeUrl};
use tracing::{debug, info, warn};

use crate::join::discover::{self, Candidate};
use crate::join::reach;
use crate::units::managed_set::ManagedSet;

/// How often a server node looks at the servers announced on the LAN.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);

/// How long a server found unknown to the proxy may take to become known through
/// discovery before the proxy is restarted: a heartbeat interval and a half.
pub const CONFIRM_AFTER: Duration = Duration::from_secs(15);

/// The shortest time between two restarts of the proxy for servers it did not know.
pub const RESTART_AT_MOST_EVERY: Duration = Duration::from_secs(120);

/// What the check needs, fixed for the node's life.
pub struct InTouch {
    pub site: DnsLabel,
    pub node: DnsLabel,
    /// The SHA-256 of the site's anchor, as announcements carry its prefix.
    pub pin: [u8; 32],
    /// The seed's `mdns_interfaces` (`None`: every interface).
    pub interfaces: Option<Vec<InterfaceName>>,
    pub units: Arc<ManagedSet>,
    /// The proxy's `/config`, which lists the replicas it knows.
    pub proxy_config_url: ProbeUrl,
}

impl InTouch {
    /// Checks every [`CHECK_EVERY`], for the node's life.
    pub async fn run(self) {
        let mut every = tokio::time::interval(CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        let mut last_restart: Option<tokio::time::Instant> = None;
        let mut browse_failing = false;
        loop {
            every.tick().await;
            if last_restart.is_some_and(|at| at.elapsed() < RESTART_AT_MOST_EVERY) {
                continue;
            }
            if self.check(&mut browse_failing).await {
                last_restart = Some(tokio::time::Instant::now());
            }
        }
    }

    /// One check; `true` when the proxy was restarted. `browse_failing` says whether the
    /// last browse failed (a failure is a warning once, then debug until one succeeds).
    async fn check(&self, browse_failing: &mut bool) -> bool {
        let announced = match discover::browse(
            &self.site,
            &self.pin,
            self.interfaces.as_deref(),
            discover::Listen::Whole,
        )
        .await
        {
            Ok(found) => {
                *browse_failing = false;
                found
            }
            Err(err) => {
                if *browse_failing {
                    debug!(%err, "cannot look for the site's other servers on the LAN");
                } else {
                    warn!(%err, "cannot look for the site's other servers on the LAN (said once until it can)");
                }
                *browse_failing = true;
                return false;
            }
        };
        let others: Vec<&Candidate> = announced
            .iter()
            .filter(|candidate| candidate.node.as_deref() != Some(self.node.as_str()))
            .collect();
        if others.is_empty() {
            return false;
        }
        let known = match reach::proxy_replicas(&self.proxy_config_url).await {
            Ok(known) => known,
            Err(err) => {
                debug!(url = %self.proxy_config_url, %err, "cannot read the replicas the proxy knows");
                return false;
            }
        };
        if others.iter().all(|candidate| knows(&known, candidate)) {
            return false;
        }
        let mut announced_replicas: Vec<SocketAddr> = Vec::new();
        let mut unknown_reachable = Vec::new();
        for candidate in others {
            if let Some(server) = reach::reachable(candidate).await {
                announced_replicas.extend(reach::replicas_of(&server));
                if !knows(&known, candidate) {
                    unknown_reachable.push((server, candidate));
                }
            }
        }
        if unknown_reachable.is_empty() {
            return false;
        }
        // A server that has just joined announces itself before its proxy's heartbeats
        // have told the replicas (and so this proxy) of it: give discovery its time.
        tokio::time::sleep(CONFIRM_AFTER).await;
        match reach::proxy_replicas(&self.proxy_config_url).await {
            Ok(known) => unknown_reachable.retain(|(_, candidate)| !knows(&known, candidate)),
            Err(err) => {
                debug!(url = %self.proxy_config_url, %err, "cannot read the replicas the proxy knows");
                return false;
            }
        }
        if unknown_reachable.is_empty() {
            return false;
        }
        info!(
            servers = ?unknown_reachable.iter().map(|(s, _)| format!("{}@{}", s.node, s.address)).collect::<Vec<_>>(),
            "servers announced on the LAN that this node's proxy does not know: it is restarted to heartbeat them"
        );
        self.units
            .replace_placement(|placement| placement.announced_replicas = announced_replicas);
        reach::restart_proxy().await;
        true
    }
}

/// Whether `known` (the proxy's replicas) holds a replica of `candidate` at any of its
/// announced addresses.
fn knows(known: &[SocketAddr], candidate: &Candidate) -> bool {
    candidate
        .replicas
        .iter()
        .any(|replica| known.contains(replica))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_is_known_at_any_of_its_announced_addresses() {
        let addr = |text: &str| -> SocketAddr { text.parse().expect("addr") };
        let candidate = Candidate {
            node: Some("pi-b".into()),
            replicas: vec![addr("192.168.1.8:8086"), addr("10.9.0.8:8086")],
            lan_without_dhcp: false,
        };
        assert!(knows(
            &[addr("127.0.0.1:8086"), addr("10.9.0.8:8086")],
            &candidate
        ));
        assert!(!knows(
            &[addr("127.0.0.1:8086"), addr("192.168.1.58:8086")],
            &candidate
        ));
        assert!(!knows(&[], &candidate));
    }
}
