//! Node heartbeats: soft state with a time to live.
//!
//! A proxy posts `{"port": P}` every few seconds; the node is the one its client
//! certificate names and its mesh address is the connection's peer IP with port `P`. A
//! heartbeat may also say ([`About`]) which key the node's credential has (`credential`:
//! what a join under the node's name is compared with), whether the node is a server or
//! an agent (`role`), and the ports of a server's control replicas (`replicas`).
//! Nothing is persisted: a restarted replica knows every live node again after one
//! heartbeat interval, which is what makes replicas interchangeable.
//!
//! A proxy on the replica's own node calls it over loopback, which no other node could
//! dial: once the replica has seen its own address on a connection from another node
//! ([`Heartbeats::learn_own_ip`]), such a heartbeat is recorded at that address instead.
//!
//! Invariant: [`Heartbeats::live`] lists exactly the nodes whose last heartbeat is younger
//! than the TTL as of the last [`Heartbeats::expire`] or [`Heartbeats::beat`], and
//! [`Heartbeats::servers`] those of them whose last heartbeat said `role: server`; a
//! refresh that keeps a node's address, role and replica ports does not count as a
//! change (the credential is not part of the discovery document).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use pimesh_join::Role;
use pimesh_schema::DnsLabel;
use tracing::info;

/// What a heartbeat says about its node beyond its address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct About {
    /// Lower-case hex SHA-256 of the node credential's SubjectPublicKeyInfo.
    pub credential: Option<String>,
    pub role: Option<Role>,
    /// The ports of the node's control replicas (server nodes), sorted, no duplicates.
    pub replicas: Vec<u16>,
}

/// A live server node, as discovery lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub address: IpAddr,
    pub replicas: Vec<u16>,
}

/// The heartbeats a replica has seen, with their expiry.
#[derive(Debug)]
pub struct Heartbeats {
    ttl: Duration,
    nodes: Mutex<HashMap<DnsLabel, Beat>>,
    /// This node's address as other nodes dial it, once one has.
    own_ip: Mutex<Option<IpAddr>>,
}

#[derive(Debug, Clone)]
struct Beat {
    addr: SocketAddr,
    about: About,
    expires: Instant,
}

impl Heartbeats {
    pub fn new(ttl: Duration) -> Heartbeats {
        Heartbeats {
            ttl,
            nodes: Mutex::new(HashMap::new()),
            own_ip: Mutex::new(None),
        }
    }

    /// Notes the local address of a connection from `peer`: when neither is loopback,
    /// `local` is how other nodes reach this one.
    pub fn learn_own_ip(&self, local: SocketAddr, peer: SocketAddr) {
        let usable = |ip: IpAddr| !ip.is_loopback() && !ip.is_unspecified();
        if usable(local.ip()) && usable(peer.ip()) {
            let mut own = self.own_ip.lock().unwrap_or_else(PoisonError::into_inner);
            if *own != Some(local.ip()) {
                info!(ip = %local.ip(), "this node's address, as other nodes dial it");
                *own = Some(local.ip());
            }
        }
    }

    /// Records a heartbeat of `node` at `addr` saying `about`; `true` when the set of live
    /// nodes, an address, a role or a server's replica ports changed, `false` for a plain
    /// refresh.
    pub fn beat(&self, node: &DnsLabel, addr: SocketAddr, about: About, now: Instant) -> bool {
        let addr = match *self.own_ip.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(own) if addr.ip().is_loopback() => SocketAddr::new(own, addr.port()),
            _ => addr,
        };
        let expires = now + self.ttl;
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = Beat {
            addr,
            about,
            expires,
        };
        let same_listing = |beat: &Beat| {
            beat.addr == seen.addr
                && beat.about.role == seen.about.role
                && beat.about.replicas == seen.about.replicas
        };
        let previous = nodes.insert(node.clone(), seen.clone());
        match previous {
            Some(beat) if same_listing(&beat) && beat.expires > now => false,
            Some(beat) if beat.addr == addr && beat.expires > now => {
                info!(%node, role = ?seen.about.role, replicas = ?seen.about.replicas, "node's role changed");
                true
            }
            Some(beat) if beat.expires > now => {
                info!(%node, from = %beat.addr, to = %addr, "node moved");
                true
            }
            _ => {
                info!(%node, %addr, "node live");
                true
            }
        }
    }

    /// Forgets the nodes whose TTL has run out at `now`; `true` when any was forgotten.
    pub fn expire(&self, now: Instant) -> bool {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let before = nodes.len();
        nodes.retain(|node, beat| {
            let live = beat.expires > now;
            if !live {
                info!(%node, addr = %beat.addr, "heartbeat expired");
            }
            live
        });
        nodes.len() != before
    }

    /// The live server nodes (last heartbeat said `role: server`), ordered by name.
    pub fn servers(&self) -> BTreeMap<String, Server> {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .iter()
            .filter(|(_, beat)| beat.about.role == Some(Role::Server))
            .map(|(node, beat)| {
                let server = Server {
                    address: beat.addr.ip(),
                    replicas: beat.about.replicas.clone(),
                };
                (node.as_str().to_owned(), server)
            })
            .collect()
    }

    /// What the heartbeat of `node` said, when it is younger than the TTL at `now`.
    pub fn about(&self, node: &DnsLabel, now: Instant) -> Option<About> {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .get(node)
            .filter(|beat| beat.expires > now)
            .map(|beat| beat.about.clone())
    }

    /// The live nodes and their addresses, ordered by node name.
    pub fn live(&self) -> BTreeMap<String, String> {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .iter()
            .map(|(node, beat)| (node.as_str().to_owned(), beat.addr.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    #[test]
    fn a_node_is_live_until_its_ttl_runs_out_and_only_moves_count_as_changes() {
        let beats = Heartbeats::new(Duration::from_secs(30));
        let start = Instant::now();
        let a: SocketAddr = "10.0.0.1:4143".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:4143".parse().expect("addr");
        assert!(beats.beat(&label("pi-a"), a, About::default(), start));
        assert!(!beats.beat(
            &label("pi-a"),
            a,
            About::default(),
            start + Duration::from_secs(20)
        ));
        assert!(beats.beat(
            &label("pi-a"),
            b,
            About::default(),
            start + Duration::from_secs(21)
        ));
        assert_eq!(
            beats.live(),
            BTreeMap::from([("pi-a".to_owned(), "10.0.0.2:4143".to_owned())])
        );
        assert!(!beats.expire(start + Duration::from_secs(50)));
        assert!(beats.expire(start + Duration::from_secs(51)));
        assert!(beats.live().is_empty());
        // Back after expiry: a change again.
        assert!(beats.beat(
            &label("pi-a"),
            b,
            About::default(),
            start + Duration::from_secs(52)
        ));
    }

    #[test]
    fn a_local_proxy_is_published_at_the_address_other_nodes_dial() {
        let beats = Heartbeats::new(Duration::from_secs(30));
        let now = Instant::now();
        let node = DnsLabel::try_from("pi-a".to_owned()).expect("label");
        let loopback: SocketAddr = "127.0.0.1:4143".parse().expect("addr");
        assert!(beats.beat(&node, loopback, About::default(), now));
        assert_eq!(
            beats.live()["pi-a"],
            "127.0.0.1:4143",
            "all on one host: kept"
        );

        // Loopback connections teach nothing; one from another node does.
        beats.learn_own_ip(
            "127.0.0.1:8086".parse().expect("addr"),
            "127.0.0.1:50000".parse().expect("addr"),
        );
        assert!(!beats.beat(&node, loopback, About::default(), now));
        beats.learn_own_ip(
            "192.168.1.10:8086".parse().expect("addr"),
            "192.168.1.20:50000".parse().expect("addr"),
        );
        assert!(
            beats.beat(&node, loopback, About::default(), now),
            "the node moved to its LAN address"
        );
        assert_eq!(beats.live()["pi-a"], "192.168.1.10:4143");
        let remote: SocketAddr = "192.168.1.20:4143".parse().expect("addr");
        let other = DnsLabel::try_from("pi-b".to_owned()).expect("label");
        assert!(beats.beat(&other, remote, About::default(), now));
        assert_eq!(
            beats.live()["pi-b"],
            "192.168.1.20:4143",
            "others keep their own"
        );
    }

    #[test]
    fn servers_are_the_live_nodes_that_say_so_and_a_role_change_is_a_change() {
        let beats = Heartbeats::new(Duration::from_secs(30));
        let now = Instant::now();
        let a: SocketAddr = "10.0.0.1:4143".parse().expect("addr");
        let server = About {
            credential: Some("ab".repeat(32)),
            role: Some(Role::Server),
            replicas: vec![8086, 8087],
        };
        assert!(beats.beat(&label("pi-a"), a, About::default(), now));
        assert!(beats.servers().is_empty());
        assert!(
            beats.beat(&label("pi-a"), a, server.clone(), now),
            "now a server"
        );
        assert_eq!(
            beats.servers()["pi-a"],
            Server {
                address: a.ip(),
                replicas: vec![8086, 8087]
            }
        );
        let other_key = About {
            credential: Some("cd".repeat(32)),
            ..server.clone()
        };
        assert!(
            !beats.beat(&label("pi-a"), a, other_key, now),
            "the credential is not in the document"
        );
        assert_eq!(
            beats
                .about(&label("pi-a"), now)
                .and_then(|about| about.credential),
            Some("cd".repeat(32))
        );
        assert_eq!(
            beats.about(&label("pi-a"), now + Duration::from_secs(30)),
            None
        );
        assert_eq!(beats.about(&label("pi-b"), now), None);
    }
}
