//! DHCP leases and IPv4 link-local addresses on the site LAN: what a joining board waits
//! for, and what a server node tells the boards plugged in after it.
//!
//! A board on a LAN with a DHCP server gets a lease within seconds; on a bare switch it
//! gives itself an IPv4 link-local address (networkd, once DHCPv4 went unanswered for a
//! few tries). A lease removes the 169.254 address (RFC 3927), so a site formed over
//! link-local addresses just before a late DHCP server (a router still booting after a
//! power cut) answers would have to find itself again. Hence, during [`LEASE_GRACE`] after
//! the supervisor's start ([`in_grace`]):
//! - a joining board holding only link-local addresses waits for its lease, unless a
//!   server of its site announces `dhcp=none` (`pimesh_join::Announcement::lan_without_dhcp`):
//!   that server has itself held only a link-local address for a whole grace, so the LAN
//!   has no DHCP server and waiting is for nothing;
//! - a joining board holding a lease skips the servers' link-local replicas (their own
//!   leases are coming).
//!
//! A server node keeps a [`LinkLocalClock`] to decide what it announces.
//!
//! "The site LAN" is the seed's `mdns_interfaces` when it names any, else every interface:
//! a VM's NAT card or a K3s bridge is not the LAN the site forms on.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use pimesh_schema::InterfaceName;

use crate::join::discover::Candidate;

/// How long after the supervisor's start a joining board holding only link-local IPv4
/// addresses waits for a DHCP lease before it joins over link-local (unless a server says
/// the LAN has none), and how long a server node holds only a link-local address before it
/// says so.
pub const LEASE_GRACE: Duration = Duration::from_secs(60);

/// The IPv4 addresses of `interfaces` (`None`: every interface) now, with the interface
/// each is on, sorted; empty when the interfaces cannot be read.
pub fn addresses(interfaces: Option<&[InterfaceName]>) -> Vec<(String, Ipv4Addr)> {
    let mut found: Vec<(String, Ipv4Addr)> = crate::node::interfaces::addresses()
        .into_iter()
        .filter(|address| {
            interfaces
                .is_none_or(|names| names.iter().any(|name| name.as_str() == address.interface))
        })
        .filter_map(|address| match address.ip {
            IpAddr::V4(ip) => Some((address.interface, ip)),
            IpAddr::V6(_) => None,
        })
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// This node's IPv4 addresses on `interfaces` (`None`: every interface) now, sorted.
pub fn own_ipv4(interfaces: Option<&[InterfaceName]>) -> Vec<Ipv4Addr> {
    let mut ipv4: Vec<Ipv4Addr> = addresses(interfaces)
        .into_iter()
        .map(|(_, ip)| ip)
        .collect();
    ipv4.sort_unstable();
    ipv4.dedup();
    ipv4
}

/// Whether a node with the IPv4 addresses `ipv4` is on link-local fallback: loopback
/// aside, it holds link-local addresses and nothing else. A node with a leased or fixed
/// address, or with none yet, is not.
pub fn only_link_local(ipv4: &[Ipv4Addr]) -> bool {
    let mut outside = ipv4.iter().filter(|ip| !ip.is_loopback()).peekable();
    outside.peek().is_some() && outside.all(Ipv4Addr::is_link_local)
}

/// Whether `ipv4` holds a leased or fixed address (not loopback, not link-local).
fn leased(ipv4: &[Ipv4Addr]) -> bool {
    ipv4.iter()
        .any(|ip| !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified())
}

/// What a join round within [`LEASE_GRACE`] does with the servers it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InGrace {
    /// Join through the candidates (a leased node's were left without the servers'
    /// link-local replicas).
    Join,
    /// Join over this node's link-local address: the server `told_by` announced that the
    /// LAN has no DHCP server.
    OverLinkLocal { told_by: String },
    /// Wait for this node's own lease: it holds only link-local addresses and no server
    /// said the LAN has no DHCP server.
    AwaitOwnLease,
    /// Wait for the servers' leases: this node holds one, and the servers announced only
    /// link-local addresses.
    AwaitServersLeases,
}

/// Decides a round within the grace for a node whose site-LAN addresses are `own`, and
/// drops from `candidates` what a leased node must not use (the servers' link-local
/// replicas; a server whose link-local address goes away with its coming lease would
/// be one the node must find again a minute later).
pub fn in_grace(own: &[Ipv4Addr], candidates: &mut Vec<Candidate>) -> InGrace {
    if only_link_local(own) {
        return match candidates.iter().find(|c| c.lan_without_dhcp) {
            Some(server) => InGrace::OverLinkLocal {
                told_by: server.node.clone().unwrap_or_else(|| "a server".into()),
            },
            None => InGrace::AwaitOwnLease,
        };
    }
    if !leased(own) || candidates.is_empty() {
        return InGrace::Join;
    }
    for candidate in candidates.iter_mut() {
        candidate
            .replicas
            .retain(|replica| !matches!(replica.ip(), IpAddr::V4(v4) if v4.is_link_local()));
    }
    candidates.retain(|candidate| !candidate.replicas.is_empty());
    if candidates.is_empty() {
        InGrace::AwaitServersLeases
    } else {
        InGrace::Join
    }
}

/// How long each interface of a server node has held only link-local IPv4 addresses, as
/// seen by [`LinkLocalClock::observe`] calls (the clock starts with its first call: what
/// happened before the supervisor started is not known).
///
/// Invariant: an interface is in `since` exactly while every IPv4 address it held at
/// each observation since that instant was link-local.
#[derive(Debug, Default)]
pub struct LinkLocalClock {
    since: BTreeMap<String, Instant>,
}

impl LinkLocalClock {
    /// Takes the node's `(interface, address)` pairs at `now` and says whether some
    /// interface has held only link-local IPv4 addresses for at least [`LEASE_GRACE`]:
    /// a DHCP server would have answered in that time, so that LAN has none.
    pub fn observe(&mut self, now: Instant, addresses: &[(String, Ipv4Addr)]) -> bool {
        let mut by_interface: BTreeMap<&str, bool> = BTreeMap::new();
        for (interface, ip) in addresses.iter().filter(|(_, ip)| !ip.is_loopback()) {
            let only = by_interface.entry(interface.as_str()).or_insert(true);
            *only &= ip.is_link_local();
        }
        self.since.retain(|interface, _| {
            by_interface
                .get(interface.as_str())
                .copied()
                .unwrap_or(false)
        });
        for (interface, only) in by_interface {
            if only {
                self.since.entry(interface.to_owned()).or_insert(now);
            }
        }
        self.since
            .values()
            .any(|since| now.saturating_duration_since(*since) >= LEASE_GRACE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().expect("ip")
    }

    fn candidate(node: &str, replicas: &[&str], lan_without_dhcp: bool) -> Candidate {
        Candidate {
            node: Some(node.into()),
            replicas: replicas
                .iter()
                .map(|addr| addr.parse().expect("addr"))
                .collect(),
            lan_without_dhcp,
        }
    }

    #[test]
    fn link_local_fallback_is_only_link_local_beside_loopback() {
        assert!(only_link_local(&[ip("127.0.0.1"), ip("169.254.3.4")]));
        assert!(!only_link_local(&[ip("169.254.3.4"), ip("192.168.1.20")]));
        assert!(
            !only_link_local(&[ip("127.0.0.1")]),
            "no address yet is not a fallback"
        );
        assert!(!only_link_local(&[]));
    }

    #[test]
    fn a_leased_node_skips_the_link_local_replicas_of_servers_still_waiting_for_a_lease() {
        let found = vec![
            candidate("pi-a", &["169.254.6.45:8086", "169.254.6.45:8087"], false),
            candidate("pi-b", &["192.168.1.8:8086", "169.254.9.9:8086"], false),
        ];
        let mut leased = found.clone();
        assert_eq!(
            in_grace(&[ip("127.0.0.1"), ip("192.168.1.20")], &mut leased),
            InGrace::Join
        );
        assert_eq!(
            leased,
            vec![candidate("pi-b", &["192.168.1.8:8086"], false)]
        );
        let mut only_link_local = vec![found[0].clone()];
        assert_eq!(
            in_grace(&[ip("192.168.1.20")], &mut only_link_local),
            InGrace::AwaitServersLeases
        );
        // A node with no address yet takes every candidate.
        let mut kept = found.clone();
        assert_eq!(in_grace(&[ip("127.0.0.1")], &mut kept), InGrace::Join);
        assert_eq!(kept, found);
    }

    #[test]
    fn a_link_local_node_waits_for_its_lease_unless_a_server_says_the_lan_has_none() {
        let own = [ip("127.0.0.1"), ip("169.254.1.2")];
        let mut waiting = vec![candidate("pi-a", &["169.254.6.45:8086"], false)];
        assert_eq!(in_grace(&own, &mut waiting), InGrace::AwaitOwnLease);
        assert_eq!(in_grace(&own, &mut Vec::new()), InGrace::AwaitOwnLease);
        let found = vec![
            candidate("pi-a", &["169.254.6.45:8086"], false),
            candidate("pi-b", &["169.254.9.9:8086"], true),
        ];
        let mut told = found.clone();
        assert_eq!(
            in_grace(&own, &mut told),
            InGrace::OverLinkLocal {
                told_by: "pi-b".into()
            }
        );
        assert_eq!(told, found, "every server is tried, link-local as it is");
    }

    #[test]
    fn a_server_says_the_lan_has_no_dhcp_after_a_whole_grace_on_link_local() {
        let at = Instant::now();
        let second = |n: u64| at + Duration::from_secs(n);
        let grace = LEASE_GRACE.as_secs();
        let link_local = vec![
            ("lo".to_owned(), ip("127.0.0.1")),
            ("eth1".to_owned(), ip("169.254.7.8")),
            // A NAT card's or a K3s bridge's address is another interface's.
            ("eth0".to_owned(), ip("10.0.2.15")),
        ];
        let mut clock = LinkLocalClock::default();
        assert!(!clock.observe(second(0), &link_local));
        assert!(!clock.observe(second(grace - 1), &link_local));
        assert!(clock.observe(second(grace), &link_local));
        // The lease came: eth1 holds it beside (or instead of) link-local.
        let leased = vec![
            ("eth1".to_owned(), ip("169.254.7.8")),
            ("eth1".to_owned(), ip("192.168.1.9")),
        ];
        assert!(!clock.observe(second(grace + 1), &leased));
        // Lost again: the clock starts over.
        assert!(!clock.observe(second(grace + 2), &link_local));
        assert!(!clock.observe(second(2 * grace + 1), &link_local));
        assert!(clock.observe(second(2 * grace + 2), &link_local));
        // The interface went away.
        assert!(!clock.observe(second(2 * grace + 3), &[]));
    }

    #[test]
    fn a_node_with_no_link_local_address_never_says_so() {
        let at = Instant::now();
        let leased = vec![("eth0".to_owned(), ip("192.168.1.9"))];
        let mut clock = LinkLocalClock::default();
        assert!(!clock.observe(at, &leased));
        assert!(!clock.observe(at + LEASE_GRACE * 2, &leased));
        assert!(!clock.observe(at + LEASE_GRACE * 3, &[]));
    }
}
