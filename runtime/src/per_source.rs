//! Open connections counted per source address, so that one host cannot take a whole
//! listener's share.
//!
//! Invariant: a [`SourceCount`] holds one count for its address from [`Sources::admit`] to
//! its drop, and an address whose count falls to zero leaves the map (the map holds only
//! addresses with a connection open, so it cannot grow with the addresses seen).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// The open connections of each source address, and the most one address may hold.
#[derive(Debug, Clone)]
pub struct Sources {
    most: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Sources {
    /// At most `most` connections open at once from one address.
    pub fn new(most: usize) -> Sources {
        Sources {
            most,
            open: Arc::default(),
        }
    }

    /// Counts one more connection from `source`, or `None` when it already holds
    /// [`Sources::new`]'s `most`. IPv4-mapped IPv6 addresses count as their IPv4 address.
    pub fn admit(&self, source: IpAddr) -> Option<SourceCount> {
        let source = source.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(source).or_insert(0);
        if *count >= self.most {
            return None;
        }
        *count += 1;
        Some(SourceCount {
            source,
            open: Arc::clone(&self.open),
        })
    }
}

/// One open connection of an address; dropping it ends the count.
#[derive(Debug)]
pub struct SourceCount {
    source: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for SourceCount {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_holds_at_most_its_share_and_leaves_the_map_when_done() {
        let sources = Sources::new(2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = sources.admit(a).expect("first");
        let second = sources.admit(mapped).expect("second, the same host");
        assert!(sources.admit(a).is_none(), "a third from the same host");
        let other = sources.admit(b).expect("another host is not held back");
        drop(first);
        let again = sources.admit(a).expect("a slot freed");
        drop((second, again, other));
        assert!(sources.open.lock().expect("lock").is_empty());
    }
}
