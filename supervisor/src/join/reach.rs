//! What keeping a site's servers within reach is made of: which addresses take a
//! connection, which address of an announced server answers, which replicas the running
//! proxy knows, and restarting the proxy so that it reads a new replica list.
//!
//! Invariant: an announced server becomes a [`ServerEntry`] only at an address where one
//! of its replicas took a TCP connection just now, so an answer that still carries an
//! address the server held before a renumbering is never recorded at that address.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use pimesh_join::ServerEntry;
use pimesh_schema::{DnsLabel, ProbeUrl};
use tokio::task::JoinSet;
use tracing::warn;

use crate::join::discover::Candidate;
use crate::units::probe;
use crate::units::role::PROXY;
use crate::units::systemd::Systemd;

/// How long one TCP connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long reading the proxy's `/config` may take.
const PROXY_CONFIG_TIMEOUT: Duration = Duration::from_secs(2);

/// The first of `addrs` (tried together) to take a TCP connection, if any does within
/// [`CONNECT_TIMEOUT`].
pub async fn first_connecting(addrs: Vec<SocketAddr>) -> Option<SocketAddr> {
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

/// The server an mDNS answer announces, at the first of its addresses (in the answer's
/// order: leased before link-local, IPv4 before IPv6) where one of its replicas takes a
/// connection now, with its replicas' ports there, the one that answered first; `None`
/// for an answer without a node name or when no address answers.
pub async fn reachable(candidate: &Candidate) -> Option<ServerEntry> {
    let node = DnsLabel::try_from(candidate.node.clone()?).ok()?;
    for address in addresses(candidate) {
        let replicas: Vec<SocketAddr> = candidate
            .replicas
            .iter()
            .copied()
            .filter(|replica| replica.ip() == address)
            .collect();
        if let Some(answered) = first_connecting(replicas.clone()).await {
            let mut ports: Vec<u16> = vec![answered.port()];
            ports.extend(
                replicas
                    .iter()
                    .map(SocketAddr::port)
                    .filter(|port| *port != answered.port()),
            );
            return Some(ServerEntry {
                node,
                address,
                replicas: ports,
            });
        }
    }
    None
}

/// The distinct addresses of `candidate`'s replicas, in its order.
fn addresses(candidate: &Candidate) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for replica in &candidate.replicas {
        if !out.contains(&replica.ip()) {
            out.push(replica.ip());
        }
    }
    out
}

/// The replicas of `server` at its address.
pub fn replicas_of(server: &ServerEntry) -> impl Iterator<Item = SocketAddr> + '_ {
    server
        .replicas
        .iter()
        .map(|port| SocketAddr::new(server.address, *port))
}

/// The control replicas the running proxy knows (its `/config` at `url`,
/// `control.replicas`).
pub async fn proxy_replicas(url: &ProbeUrl) -> Result<Vec<SocketAddr>, probe::JsonProbeError> {
    let config = probe::fetch_json(url, PROXY_CONFIG_TIMEOUT).await?;
    Ok(replicas_in(&config))
}

/// `control.replicas` of a proxy's `/config` answer; entries that are not addresses are
/// left out, and a missing or odd list is empty.
pub fn replicas_in(config: &serde_json::Value) -> Vec<SocketAddr> {
    config
        .pointer("/control/replicas")
        .and_then(serde_json::Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|entry| entry.as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Restarts the proxy so that it reads the replicas of its new environment file; a
/// failure is logged (the proxy takes them at its next start).
pub async fn restart_proxy() {
    if let Err(err) = Systemd::try_restart(PROXY).await {
        warn!(%err, "cannot restart the proxy; it takes the new servers at its next start");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("addr")
    }

    #[test]
    fn the_proxys_replicas_are_read_from_its_config_and_odd_shapes_give_none() {
        let config = serde_json::json!({"control": {"replicas": [
            "192.168.1.5:8086", "192.168.1.8:8086"
        ]}});
        assert_eq!(
            replicas_in(&config),
            [addr("192.168.1.5:8086"), addr("192.168.1.8:8086")]
        );
        for odd in [
            serde_json::json!({}),
            serde_json::json!({"control": {"replicas": "192.168.1.8:8086"}}),
        ] {
            assert!(replicas_in(&odd).is_empty(), "{odd}");
        }
        let mixed =
            serde_json::json!({"control": {"replicas": [8086, "not an address", "10.0.0.1:8086"]}});
        assert_eq!(replicas_in(&mixed), [addr("10.0.0.1:8086")]);
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

    #[tokio::test]
    async fn an_announced_server_is_taken_at_the_address_where_a_replica_answers() {
        // 127.0.0.2 stands for the address the server held before (nothing listens there);
        // 127.0.0.1 for its new one.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let candidate = Candidate {
            node: Some("pi-c".into()),
            replicas: vec![
                SocketAddr::new("127.0.0.2".parse().expect("ip"), port),
                SocketAddr::new("127.0.0.1".parse().expect("ip"), port),
            ],
            lan_without_dhcp: false,
        };
        let entry = reachable(&candidate).await.expect("reachable");
        assert_eq!(entry.node.as_str(), "pi-c");
        assert_eq!(entry.address.to_string(), "127.0.0.1");
        assert_eq!(entry.replicas, vec![port]);
        drop(listener);
        assert!(reachable(&candidate).await.is_none(), "no address answers");
        let unnamed = Candidate {
            node: None,
            replicas: candidate.replicas.clone(),
            lan_without_dhcp: false,
        };
        assert!(reachable(&unnamed).await.is_none());
    }
}
