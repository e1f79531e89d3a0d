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
//! found and the units are placed for them. A running proxy keeps the replica list it
//! started with, plus the replicas discovery told it of: when it already knows one of the
//! servers found (the site lost the server its node joined through, and the proxy learnt
//! the others from discovery) it fails over by itself and reads the new list at its next
//! start; otherwise (the LAN renumbered: every address it knows is stale) it is restarted
//! to read it now. With the seed's `servers` (the operator's addresses) or without mDNS,
//! nothing is done.
//!
//! Invariants: the record changes only to servers of which at least one connected, so a
//! check made while the node itself is cut off (no answer from the LAN) changes nothing;
//! the proxy is restarted unless its `/config` names a replica of a server found.

use std::net::SocketAddr;
use std::time::Duration;

use pimesh_join::ServerEntry;
use pimesh_schema::{DnsLabel, ProbeUrl};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::join::discover::{self, Candidate};
use crate::join::record::{JoinRecord, Via};
use crate::join::JoinContext;
use crate::units::probe;
use crate::units::role::PROXY;
use crate::units::systemd::Systemd;

/// How often a joined node checks that a server it knows answers.
pub const CHECK_EVERY: Duration = Duration::from_secs(15);

/// How long one TCP connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long reading the proxy's `/config` may take.
const PROXY_CONFIG_TIMEOUT: Duration = Duration::from_secs(2);

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
            match proxy_knows_one_of(&context.proxy_config_url, &found).await {
                Ok(Some(replica)) => info!(
                    %replica,
                    "the proxy already knows a server found again: it fails over by itself and takes the new list at its next start"
                ),
                Ok(None) => restart_proxy().await,
                Err(err) => {
                    debug!(url = %context.proxy_config_url, %err, "cannot read the replicas the proxy knows");
                    restart_proxy().await;
                }
            }
        }
    }
}

/// The first of `addrs` (tried together) to take a TCP connection, if any does within
/// [`CONNECT_TIMEOUT`].
async fn first_connecting(addrs: Vec<SocketAddr>) -> Option<SocketAddr> {
    let mut attempts = JoinSet::new();
    for addr in addrs {
        attempts.spawn(async move {
            let connected =
                tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await;
            matches!(connected, Ok(Ok(_))).then_some(addr)
        });
    }
    while let Some(done) = attempts.join_next().await {
        if let Ok(Some(addr)) = done {
            return Some(addr);
        }
    }
    None
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
    let servers: Vec<ServerEntry> = found
        .iter()
        .filter_map(server_entry)
        .filter(|server| server.node != context.node)
        .collect();
    let replicas: Vec<SocketAddr> = servers
        .iter()
        .flat_map(|server| {
            server
                .replicas
                .iter()
                .map(|port| SocketAddr::new(server.address, *port))
        })
        .collect();
    let Some(answering) = first_connecting(replicas).await else {
        info!(
            announced = servers.len(),
            "no server of the site answers on the LAN yet"
        );
        return None;
    };
    let via_node = servers
        .iter()
        .find(|server| server.address == answering.ip())
        .map(|server| server.node.to_string());
    // This node's own entry stays (a server lists itself), at whatever address it had.
    let own = record
        .servers
        .iter()
        .filter(|server| server.node == context.node)
        .cloned();
    let record = JoinRecord {
        via: Via {
            node: via_node,
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

/// A server node as an mDNS answer shows it: its name, its first usable address (leased
/// before link-local, see `discover`), and its replicas' ports there.
fn server_entry(candidate: &Candidate) -> Option<ServerEntry> {
    let node = DnsLabel::try_from(candidate.node.clone()?).ok()?;
    let address = candidate.replicas.first()?.ip();
    let replicas = candidate
        .replicas
        .iter()
        .filter(|replica| replica.ip() == address)
        .map(SocketAddr::port)
        .collect();
    Some(ServerEntry {
        node,
        address,
        replicas,
    })
}

/// The first of `found` that the running proxy's `/config` at `url` lists among the
/// control replicas it knows (`control.replicas`), if any.
async fn proxy_knows_one_of(
    url: &ProbeUrl,
    found: &[SocketAddr],
) -> Result<Option<SocketAddr>, probe::JsonProbeError> {
    let config = probe::fetch_json(url, PROXY_CONFIG_TIMEOUT).await?;
    Ok(known_of(&config, found))
}

/// The first of `found` listed in the proxy's `config` (its `/config` answer) under
/// `control.replicas`.
fn known_of(config: &serde_json::Value, found: &[SocketAddr]) -> Option<SocketAddr> {
    let known: Vec<SocketAddr> = config
        .pointer("/control/replicas")
        .and_then(serde_json::Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|entry| entry.as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    found.iter().copied().find(|addr| known.contains(addr))
}

/// Restarts the proxy so that it reads the replicas of its new environment file; a
/// failure is logged (the proxy takes them at its next start).
async fn restart_proxy() {
    if let Err(err) = Systemd::try_restart(PROXY).await {
        warn!(%err, "cannot restart the proxy; it takes the new servers at its next start");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(text: &str) -> DnsLabel {
        DnsLabel::try_from(text.to_owned()).expect("label")
    }

    #[test]
    fn the_proxy_knows_a_server_found_when_its_config_lists_one_of_its_replicas() {
        let addr = |text: &str| -> SocketAddr { text.parse().expect("addr") };
        let found = [addr("192.168.1.7:8086"), addr("192.168.1.8:8086")];
        // Lost the init node (.5): the proxy learnt .8 from discovery.
        let config = serde_json::json!({"control": {"replicas": [
            "192.168.1.5:8086", "192.168.1.5:8087", "192.168.1.8:8086"
        ]}});
        assert_eq!(known_of(&config, &found), Some(found[1]));
        // The LAN renumbered: every address the proxy knows is stale.
        let stale = serde_json::json!({"control": {"replicas": ["10.0.0.5:8086"]}});
        assert_eq!(known_of(&stale, &found), None);
        // Not the shape expected, or no list: not known (the caller restarts the proxy).
        for odd in [
            serde_json::json!({}),
            serde_json::json!({"control": {"replicas": "192.168.1.8:8086"}}),
            serde_json::json!({"control": {"replicas": [8086, "not an address"]}}),
        ] {
            assert_eq!(known_of(&odd, &found), None, "{odd}");
        }
    }

    #[test]
    fn an_answer_becomes_a_server_entry_at_its_first_address() {
        let candidate = Candidate {
            node: Some("pi-c".into()),
            replicas: ["192.168.1.7:8086", "192.168.1.7:8087", "169.254.3.4:8086"]
                .iter()
                .map(|addr| addr.parse().expect("addr"))
                .collect(),
        };
        let entry = server_entry(&candidate).expect("entry");
        assert_eq!(entry.node, label("pi-c"));
        assert_eq!(entry.address.to_string(), "192.168.1.7");
        assert_eq!(entry.replicas, vec![8086, 8087]);
        assert!(server_entry(&Candidate {
            node: None,
            replicas: candidate.replicas.clone()
        })
        .is_none());
    }

    #[tokio::test]
    async fn a_listening_address_connects_and_a_closed_one_does_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = listener.local_addr().expect("addr");
        let closed = {
            let spare = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            spare.local_addr().expect("addr")
        };
        assert_eq!(first_connecting(vec![closed, open]).await, Some(open));
        assert_eq!(first_connecting(vec![closed]).await, None);
    }
}
