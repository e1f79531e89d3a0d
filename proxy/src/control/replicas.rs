//! The live set of control replicas the proxy fails over between: the start list
//! (`--control`) plus every replica of every server node the latest accepted discovery
//! document lists (`servers`, see the join design: "proxies dial every server's
//! replicas").
//!
//! Invariants: the start list entries always come first, in their order, and are never
//! removed; the discovered entries follow in the document's order (servers by node name,
//! then their ports), without duplicates, and are replaced as a whole by each new
//! document; the set holds at most [`MAX_REPLICAS`] entries (or the start list alone when
//! that is longer). The discovery watch, the heartbeats and the enrollment read the set
//! from a `watch`, so that each sees every change.

use std::net::SocketAddr;
use std::sync::Arc;

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
        let list = merge(&self.start, discovered);
        let wanted = merge_up_to(&self.start, discovered, usize::MAX).len();
        if list.len() < wanted {
            warn!(
                listed = discovered.len(),
                kept = list.len(),
                max = MAX_REPLICAS,
                "the discovery document lists more control replicas than are followed; ignoring the rest"
            );
        }
        let old = self.current();
        if *old == *list {
            return false;
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
