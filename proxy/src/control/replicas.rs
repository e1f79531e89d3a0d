//! The live set of control replicas the proxy fails over between: the start list
//! (`--control`), every replica of every server node the latest accepted discovery
//! document lists (`servers`, see the join design: "proxies dial every server's
//! replicas"), and every replica of the server nodes the replicas in the set last said
//! they hear from (their heartbeat answers).
//!
//! The third part is what makes the site whole again after a partition: a replica lists
//! only the servers whose proxies heartbeat it, so a server that joined while another was
//! away and that one, once back, would each keep listing the others but never each other.
//! Every server is heard by some replica both know, so both learn each other's replicas
//! from that replica's answer, heartbeat them, and from then on are listed directly.
//!
//! Invariants: the start list entries always come first, in their order, and are never
//! removed; the discovered entries follow in the document's order (servers by node name,
//! then their ports), without duplicates, and are replaced as a whole by each new
//! document; the heard entries follow, per answering replica in address order, each
//! replica's part replaced by its next answer and dropped when a heartbeat to it fails or
//! it leaves the set, so nothing is kept that no live replica vouches for; the set holds
//! at most [`MAX_REPLICAS`] entries (or the start list alone when that is longer). The
//! discovery watch, the heartbeats and the enrollment read the set from a `watch`, so that
//! each sees every change.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tracing::{info, warn};

/// The most replicas the set holds: a site has a few server nodes of a few replicas each,
/// so a document listing more is wrong, and not followed beyond this.
pub const MAX_REPLICAS: usize = 64;

/// The replicas in use, shared by the control clients.
#[derive(Debug)]
pub struct ReplicaSet {
    start: Vec<SocketAddr>,
    /// The document's part and the heard part, from which `current` is made.
    learned: Mutex<Learned>,
    current: watch::Sender<Arc<[SocketAddr]>>,
    /// `pimesh_control_replicas`: the size of the set.
    size: Gauge,
}

impl ReplicaSet {
    /// The set of `start` alone; `size` is kept equal to its length.
    pub fn new(start: Vec<SocketAddr>, size: Gauge) -> ReplicaSet {
        let list = merge(&start, &[]);
        size.set(gauge_value(list.len()));
        ReplicaSet {
            start,
            learned: Mutex::default(),
            current: watch::Sender::new(Arc::from(list)),
            size,
        }
    }

    /// The replicas now.
    pub fn current(&self) -> Arc<[SocketAddr]> {
        self.current.borrow().clone()
    }

    /// The replicas now and every later change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<[SocketAddr]>> {
        self.current.subscribe()
    }

    /// Replaces the discovered replicas by `discovered` (those of the latest accepted
    /// document); `true` when the set changed. Changes are logged.
    pub fn discovered(&self, discovered: &[SocketAddr]) -> bool {
        self.learn(|learned| learned.discovered = discovered.to_vec())
    }

    /// Replaces what `replica` last said it hears (the replicas of the servers its
    /// heartbeat answer listed; empty: it said nothing, failed, or left the set); `true`
    /// when the set changed.
    pub fn heard(&self, replica: SocketAddr, servers: Vec<SocketAddr>) -> bool {
        self.learn(|learned| {
            if servers.is_empty() {
                learned.heard.remove(&replica);
            } else {
                learned.heard.insert(replica, servers);
            }
        })
    }

    fn learn(&self, change: impl FnOnce(&mut Learned)) -> bool {
        let mut learned = self.learned.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut learned);
        let discovered: Vec<SocketAddr> = learned
            .discovered
            .iter()
            .chain(learned.heard.values().flatten())
            .copied()
            .collect();
        // Under the lock, so that two changes publish in the order they were made.
        self.publish(&discovered)
    }

    fn publish(&self, discovered: &[SocketAddr]) -> bool {
        let list = merge(&self.start, discovered);
        let old = self.current();
        if *old == *list {
            return false;
        }
        let wanted = merge_up_to(&self.start, discovered, usize::MAX).len();
        if list.len() < wanted {
            warn!(
                listed = discovered.len(),
                kept = list.len(),
                max = MAX_REPLICAS,
                "the discovery document and the replicas' answers list more control replicas \
                 than are followed; ignoring the rest"
            );
        }
        let added: Vec<String> = list
            .iter()
            .filter(|r| !old.contains(r))
            .map(ToString::to_string)
            .collect();
        let removed: Vec<String> = old
            .iter()
            .filter(|r| !list.contains(r))
            .map(ToString::to_string)
            .collect();
        info!(
            ?added,
            ?removed,
            replicas = list.len(),
            "the control replicas in use changed"
        );
        self.size.set(gauge_value(list.len()));
        self.current.send_replace(Arc::from(list));
        true
    }
}

/// What the set learned beyond its start list.
#[derive(Debug, Default)]
struct Learned {
    /// The latest accepted document's server replicas.
    discovered: Vec<SocketAddr>,
    /// Per answering replica, the server replicas its last heartbeat answer listed.
    heard: BTreeMap<SocketAddr, Vec<SocketAddr>>,
}

/// `start`, then the entries of `discovered` not seen before, up to [`MAX_REPLICAS`]
/// entries in all (never fewer than `start`'s).
pub fn merge(start: &[SocketAddr], discovered: &[SocketAddr]) -> Vec<SocketAddr> {
    merge_up_to(start, discovered, MAX_REPLICAS)
}

/// [`merge`] with `max` for [`MAX_REPLICAS`].
fn merge_up_to(start: &[SocketAddr], discovered: &[SocketAddr], max: usize) -> Vec<SocketAddr> {
    let mut list: Vec<SocketAddr> = Vec::with_capacity(start.len() + discovered.len());
    for replica in start {
        if !list.contains(replica) {
            list.push(*replica);
        }
    }
    for replica in discovered {
        if list.len() >= max {
            break;
        }
        if !list.contains(replica) {
            list.push(*replica);
        }
    }
    list
}

fn gauge_value(len: usize) -> i64 {
    i64::try_from(len).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().expect("addr")).collect()
    }

    #[test]
    fn the_start_list_is_kept_and_discovered_replicas_are_replaced() {
        let gauge = Gauge::default();
        let set = ReplicaSet::new(addrs(&["127.0.0.1:8086", "127.0.0.1:8087"]), gauge.clone());
        assert_eq!(gauge.get(), 2);
        let mut seen = set.subscribe();
        assert!(!set.discovered(&[]), "nothing discovered: no change");
        assert!(set.discovered(&addrs(&[
            "10.0.0.1:8086",
            "127.0.0.1:8087",
            "10.0.0.1:8086",
            "10.0.0.2:8086",
        ])));
        assert!(seen.has_changed().expect("open"));
        assert_eq!(
            **seen.borrow_and_update(),
            *addrs(&[
                "127.0.0.1:8086",
                "127.0.0.1:8087",
                "10.0.0.1:8086",
                "10.0.0.2:8086"
            ])
        );
        assert_eq!(gauge.get(), 4);
        assert!(!set.discovered(&addrs(&["10.0.0.1:8086", "10.0.0.2:8086"])));
        assert!(!seen.has_changed().expect("open"));
        // A new document replaces the discovered part; the start list stays.
        assert!(set.discovered(&addrs(&["10.0.0.3:8088"])));
        assert_eq!(
            *set.current(),
            *addrs(&["127.0.0.1:8086", "127.0.0.1:8087", "10.0.0.3:8088"])
        );
        assert!(set.discovered(&[]));
        assert_eq!(
            *set.current(),
            *addrs(&["127.0.0.1:8086", "127.0.0.1:8087"])
        );
        assert_eq!(gauge.get(), 2);
    }

    #[test]
    fn heard_replicas_follow_the_document_and_leave_with_the_replica_that_vouched() {
        let set = ReplicaSet::new(addrs(&["127.0.0.1:8086"]), Gauge::default());
        set.discovered(&addrs(&["10.0.0.2:8086"]));
        // 10.0.0.2's replica hears a server the document does not list.
        assert!(set.heard(
            "10.0.0.2:8086".parse().expect("addr"),
            addrs(&["10.0.0.2:8086", "10.0.0.5:8086", "10.0.0.5:8087"])
        ));
        assert_eq!(
            *set.current(),
            *addrs(&[
                "127.0.0.1:8086",
                "10.0.0.2:8086",
                "10.0.0.5:8086",
                "10.0.0.5:8087"
            ])
        );
        // A new document keeps what is heard.
        assert!(set.discovered(&addrs(&["10.0.0.3:8086"])));
        assert_eq!(
            *set.current(),
            *addrs(&[
                "127.0.0.1:8086",
                "10.0.0.3:8086",
                "10.0.0.2:8086",
                "10.0.0.5:8086",
                "10.0.0.5:8087"
            ])
        );
        // The same answer again changes nothing; a failed heartbeat forgets it.
        assert!(!set.heard(
            "10.0.0.2:8086".parse().expect("addr"),
            addrs(&["10.0.0.2:8086", "10.0.0.5:8086", "10.0.0.5:8087"])
        ));
        assert!(set.heard("10.0.0.2:8086".parse().expect("addr"), Vec::new()));
        assert_eq!(*set.current(), *addrs(&["127.0.0.1:8086", "10.0.0.3:8086"]));
    }

    #[test]
    fn the_set_is_bounded_but_never_drops_the_start_list() {
        let many: Vec<SocketAddr> = (1..=200)
            .map(|port| SocketAddr::from(([10, 0, 0, 1], port)))
            .collect();
        let start = addrs(&["127.0.0.1:8086"]);
        let list = merge(&start, &many);
        assert_eq!(list.len(), MAX_REPLICAS);
        assert_eq!(list[0], start[0]);
        assert_eq!(list[1], many[0]);
        let long_start = merge(&many, &start);
        assert_eq!(long_start, many, "a long start list is kept whole");
    }
}
