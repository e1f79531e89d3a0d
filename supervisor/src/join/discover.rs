//! Where a joining node looks for its site's servers: the seed's `servers` when it lists
//! any (an override: nothing else is asked), else the mDNS/DNS-SD service
//! `_pimesh._tcp.local.` that every server node announces ([`pimesh_join::Announcement`]).
//!
//! An answer is a hint, never trust: a candidate whose TXT names another site or another
//! anchor is skipped, and every candidate still has to hand out a bundle that matches the
//! join token's pin before the node sends it anything secret (`exchange`). mDNS runs only
//! when the seed lists no server, so a node given addresses sends no multicast at all.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use pimesh_join::{Announcement, SERVICE_TYPE};
use pimesh_schema::supervisor::CONTROL_BASE_PORT;
use pimesh_schema::DnsLabel;
use tracing::{debug, info};

/// A server node to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The server node's name, when the answer carried one.
    pub node: Option<String>,
    /// Its control replicas, first replica first.
    pub replicas: Vec<SocketAddr>,
    /// Its announcement said that its LAN has no DHCP server (`dhcp=none`; see
    /// `join::lease`); false for the seed's servers.
    pub lan_without_dhcp: bool,
}

/// The first replica's port, where the seed's `servers` entry gives none.
pub const DEFAULT_PORT: u16 = CONTROL_BASE_PORT + 1;

/// How long one mDNS round listens for announcements at most.
pub const BROWSE_FOR: Duration = Duration::from_secs(3);

/// For a join: once a server of the site answered, how much longer the round listens
/// for the others (they answer the same query, within milliseconds of each other on a
/// LAN), rather than keeping a node that could join waiting; the join's answer lists
/// every live server anyway. A relocation listens the whole round: the servers it finds
/// are all the node will know of them.
pub const GATHER_AFTER_FIRST: Duration = Duration::from_millis(400);

/// How long a round listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// The whole [`BROWSE_FOR`].
    Whole,
    /// Until [`GATHER_AFTER_FIRST`] after the first server of the site answered, at
    /// most [`BROWSE_FOR`].
    UntilFirst,
}

/// The candidates of the seed's `servers` entries (`host` or `host:port`): an IP host as
/// is, a host name resolved (its first address). An entry that does not resolve is
/// skipped and logged.
pub async fn from_seed(servers: &[String]) -> Vec<Candidate> {
    let mut out = Vec::new();
    for entry in servers {
        match resolve(entry).await {
            Some(addr) => out.push(Candidate {
                node: None,
                replicas: vec![addr],
                lan_without_dhcp: false,
            }),
            None => info!(server = %entry, "a server of the seed does not resolve; skipped"),
        }
    }
    out
}

async fn resolve(entry: &str) -> Option<SocketAddr> {
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Some(addr);
    }
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let with_port = if entry.contains(':') {
        entry.to_owned()
    } else {
        format!("{entry}:{DEFAULT_PORT}")
    };
    tokio::net::lookup_host(with_port).await.ok()?.next()
}

/// Why the LAN could not be asked.
#[derive(Debug)]
pub struct BrowseError(mdns_sd::Error);

impl std::fmt::Display for BrowseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot browse {SERVICE_TYPE} by mDNS: {}", self.0)
    }
}

impl std::error::Error for BrowseError {}

/// The server nodes of `site` whose anchor prefix matches `pin` that announce themselves
/// on `interfaces` (`None`: every one), in the order they answered, heard as `listen`
/// says.
pub async fn browse(
    site: &DnsLabel,
    pin: &[u8; 32],
    interfaces: Option<&[pimesh_schema::InterfaceName]>,
    listen: Listen,
) -> Result<Vec<Candidate>, BrowseError> {
    let daemon = crate::join::mdns::daemon(interfaces).map_err(BrowseError)?;
    let events = daemon.browse(SERVICE_TYPE).map_err(BrowseError)?;
    let mut found: Vec<Candidate> = Vec::new();
    let mut deadline = tokio::time::Instant::now() + BROWSE_FOR;
    while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, events.recv_async()).await {
        let mdns_sd::ServiceEvent::ServiceResolved(service) = event else {
            continue;
        };
        let instance = service
            .fullname
            .strip_suffix(SERVICE_TYPE)
            .map(|name| name.trim_end_matches('.'))
            .unwrap_or(&service.fullname);
        let txt = service
            .txt_properties
            .iter()
            .map(|property| (property.key(), property.val_str()));
        let announcement = match Announcement::parse(instance, service.port, txt) {
            Ok(announcement) => announcement,
            Err(err) => {
                debug!(instance, %err, "an mDNS answer that is no Pimesh announcement; skipped");
                continue;
            }
        };
        if !announcement.matches(site, pin) {
            debug!(instance, site = %announcement.site, "a server of another site or anchor; skipped");
            continue;
        }
        // Every address the answer gives, IPv4 first: a node with several links (or a
        // VM with a NAT card every VM shares) may announce one that leads elsewhere, and
        // a wrong one costs a refused connection.
        let ips = usable_ips(service.addresses.iter().map(|ip| ip.to_ip_addr()));
        if ips.is_empty() {
            continue;
        }
        let replicas = ips
            .iter()
            .flat_map(|ip| {
                announcement
                    .replica_ports()
                    .map(move |port| SocketAddr::new(*ip, port))
            })
            .collect();
        let candidate = Candidate {
            node: Some(announcement.node.to_string()),
            replicas,
            lan_without_dhcp: announcement.lan_without_dhcp,
        };
        let first = found.is_empty();
        if take_answer(&mut found, candidate) {
            debug!(node = %announcement.node, addresses = ?ips, "server announced on the LAN");
            if first && listen == Listen::UntilFirst {
                deadline = deadline.min(tokio::time::Instant::now() + GATHER_AFTER_FIRST);
            }
        }
    }
    let _ = daemon.shutdown();
    Ok(found)
}

/// Adds an mDNS answer to `found`, one candidate per server node: a node that answers
/// again (mDNS resolves a service anew as its addresses come in) keeps its place and
/// gains the replicas it did not have, in [`usable_ips`] order, and its latest word on the
/// LAN's DHCP. Whether `found` gained a candidate or a replica.
fn take_answer(found: &mut Vec<Candidate>, candidate: Candidate) -> bool {
    let Some(known) = found
        .iter_mut()
        .find(|known| known.node.is_some() && known.node == candidate.node)
    else {
        found.push(candidate);
        return true;
    };
    known.lan_without_dhcp = candidate.lan_without_dhcp;
    let before = known.replicas.len();
    for replica in candidate.replicas {
        if !known.replicas.contains(&replica) {
            known.replicas.push(replica);
        }
    }
    if known.replicas.len() == before {
        return false;
    }
    let order = usable_ips(known.replicas.iter().map(SocketAddr::ip));
    known
        .replicas
        .sort_by_key(|replica| order.iter().position(|ip| *ip == replica.ip()));
    true
}

/// IPv4 first (the mesh's addresses), a leased or fixed address before a link-local one
/// (which may be one the node held before its DHCP lease came), then IPv6; never
/// loopback, and never an IPv6 link-local address: an answer gives it without the
/// interface it is reachable through, and without one it cannot be dialled.
fn usable_ips(addresses: impl Iterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut usable: Vec<IpAddr> = addresses
        .filter(|ip| !ip.is_loopback())
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .collect();
    usable.sort_by_key(|ip| {
        let link_local = matches!(ip, IpAddr::V4(v4) if v4.is_link_local());
        (ip.is_ipv6(), link_local, *ip)
    });
    usable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn seed_entries_become_candidates_with_the_default_port() {
        let found = from_seed(&["10.0.0.5".into(), "10.0.0.6:9000".into()]).await;
        let addrs: Vec<SocketAddr> = found.iter().flat_map(|c| c.replicas.clone()).collect();
        assert_eq!(
            addrs,
            [
                "10.0.0.5:8086".parse::<SocketAddr>().expect("addr"),
                "10.0.0.6:9000".parse().expect("addr")
            ]
        );
    }

    #[test]
    fn a_node_that_answers_again_stays_one_candidate_with_every_address() {
        let addrs = |list: &[&str]| -> Vec<SocketAddr> {
            list.iter()
                .map(|addr| addr.parse().expect("addr"))
                .collect()
        };
        let answer = |node: &str, replicas: &[&str]| Candidate {
            node: Some(node.into()),
            replicas: addrs(replicas),
            lan_without_dhcp: false,
        };
        let mut found = Vec::new();
        assert!(take_answer(
            &mut found,
            answer("pi-a", &["169.254.3.4:8086", "169.254.3.4:8087"])
        ));
        assert!(take_answer(
            &mut found,
            answer("pi-b", &["192.168.1.8:8086"])
        ));
        assert!(take_answer(
            &mut found,
            answer("pi-a", &["169.254.3.4:8086", "192.168.1.7:8086"])
        ));
        assert!(
            !take_answer(&mut found, answer("pi-b", &["192.168.1.8:8086"])),
            "the same answer again changes nothing"
        );
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].node.as_deref(), Some("pi-a"));
        assert_eq!(
            found[0].replicas,
            addrs(&["192.168.1.7:8086", "169.254.3.4:8086", "169.254.3.4:8087"]),
            "a leased address before link-local, the first replica first"
        );
        assert_eq!(found[1].replicas, addrs(&["192.168.1.8:8086"]));
    }

    #[test]
    fn ipv4_comes_first_and_loopback_is_never_taken() {
        let ips: Vec<IpAddr> = vec![
            "fd00::7".parse().expect("ip"),
            "127.0.0.1".parse().expect("ip"),
            "169.254.3.4".parse().expect("ip"),
            "192.168.1.7".parse().expect("ip"),
        ];
        assert_eq!(
            usable_ips(ips.into_iter()),
            [
                "192.168.1.7".parse::<IpAddr>().expect("ip"),
                "169.254.3.4".parse().expect("ip"),
                "fd00::7".parse().expect("ip")
            ]
        );
        assert!(usable_ips(["::1".parse().expect("ip")].into_iter()).is_empty());
    }

    #[test]
    fn an_ipv6_link_local_address_is_never_a_candidate() {
        // An answer's fe80:: address comes without its interface: dialling it fails
        // with EINVAL, and the round would report that instead of the real cause.
        let ips = ["fe80::24f9:33ff:fe4e:3dbf", "169.254.3.4"]
            .map(|ip| ip.parse::<IpAddr>().expect("ip"));
        assert_eq!(
            usable_ips(ips.into_iter()),
            ["169.254.3.4".parse::<IpAddr>().expect("ip")]
        );
    }
}
