//! A joined node finds its site's servers again when none of the addresses it knows
//! answers.
//!
//! A LAN can renumber under a site — a DHCP server that came after the boards joined over
//! link-local, a replaced router, a lost lease that brings link-local back — and then every
//! address a join recorded leads nowhere at once. The proxy dials the recorded replicas
//! and learns the other servers from them, so without this it would stay cut off.
//!
//! Every [`CHECK_EVERY`] the node tries a TCP connection to each recorded replica of the
//! other server nodes. When none connects it browses mDNS as a join does (the same site,
//! the same pin; an answer is a hint, since the proxy still checks each replica's
//! certificate), and when a server found there connects, the record takes the servers
//! found, each at the address where one of its replicas connected (`reach::reachable`:
//! an answer may still carry an address its server held before), and the units are
//! placed for them. A running proxy keeps the replica list it started with, plus the
//! replicas discovery told it of: when it already knows one of the servers found (the
//! site lost the server its node joined through, and the proxy learnt the others from
//! discovery) it fails over by itself and reads the new list at its next start;
//! otherwise (the LAN renumbered: every address it knows is stale) it is restarted to
//! read it now. A server the round missed is found by the servers themselves
//! (`in_touch`). With the seed's `servers` (the operator's addresses) or without mDNS,
//! nothing is done.
//!
//! Invariants: the record changes only to servers of which at least one connected, so a
//! check made while the node itself is cut off (no answer from the LAN) changes nothing;
//! the proxy is restarted unless its `/config` names a replica of a server found.

use std::time::Duration;

use pimesh_join::ServerEntry;
use tracing::{debug, info, warn};

use crate::join::reach::{self, first_connecting};
use crate::join::record::{JoinRecord, Via};
use crate::join::{discover, JoinContext};

/// How often a joined node checks that a server it knows answers.
pub const CHECK_EVERY: Duration = Duration::from_secs(15);

/// Checks, and finds the servers again when none answers, for the node's life.
pub async fn run(context: &JoinContext) {
    if !context.mdns || !context.seed_servers.is_empty() {
        return;
    }
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        let record = match JoinRecord::load(&context.record_file) {
            Ok(Some(record)) => record,
            Ok(None) => continue,
            Err(err) => {
                warn!(%err, "cannot read the join record to check the site's servers");
                continue;
            }
        };
        let mut known = record.replicas_of_others(&context.node);
        known.retain(|addr| !addr.ip().is_loopback() && !addr.ip().is_unspecified());
        if known.is_empty() || first_connecting(known).await.is_some() {
            continue;
        }
        info!("none of the site's servers answers at its recorded address; looking for them on the LAN");
        if let Some(record) = relocated(context, record).await {
            let holds_issuer = context.trust.holds_issuer();
            (context.on_joined)(&record, holds_issuer);
            let found = record.replicas_of_others(&context.node);
            match reach::proxy_replicas(&context.proxy_config_url).await {
                Ok(known) => match found.iter().find(|addr| known.contains(addr)) {
                    Some(replica) => info!(
                        %replica,
                        "the proxy already knows a server found again: it fails over by itself and takes the new list at its next start"
                    ),
                    None => reach::restart_proxy().await,
                },
                Err(err) => {
                    debug!(url = %context.proxy_config_url, %err, "cannot read the replicas the proxy knows");
                    reach::restart_proxy().await;
                }
            }
        }
    }
}

/// The record with the servers announced on the LAN now, stored, when one of them
/// connects; `None` (and the record unchanged) otherwise.
async fn relocated(context: &JoinContext, record: JoinRecord) -> Option<JoinRecord> {
    // The whole round: the servers found are all this node will know of them.
    let found = match context.browse(discover::Listen::Whole).await {
        Ok(found) => found,
        Err(err) => {
            warn!(%err, "cannot look for the site's servers on the LAN");
            return None;
        }
    };
    let mut servers: Vec<ServerEntry> = Vec::new();
    for candidate in &found {
        if let Some(server) = reach::reachable(candidate).await {
            if server.node != context.node {
                servers.push(server);
            }
        }
    }
    let Some((via_node, answering)) = servers.first().and_then(|server| {
        let replica = reach::replicas_of(server).next()?;
        Some((server.node.to_string(), replica))
    }) else {
        info!(
            announced = found.len(),
            "no server of the site answers on the LAN yet"
        );
        return None;
    };
    // This node's own entry stays (a server lists itself), at whatever address it had.
    let own = record
        .servers
        .iter()
        .filter(|server| server.node == context.node)
        .cloned();
    let record = JoinRecord {
        via: Via {
            node: Some(via_node),
            address: answering,
        },
        servers: own.chain(servers).collect(),
        ..record
    };
    if let Err(err) = record.store(&context.record_file) {
        warn!(%err, "cannot keep the servers found on the LAN");
        return None;
    }
    info!(via = %answering, servers = ?record.servers.iter().map(|s| s.address).collect::<Vec<_>>(),
        "the site's servers found again at new addresses");
    Some(record)
}
