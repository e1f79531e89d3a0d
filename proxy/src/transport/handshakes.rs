//! The budget of inbound TLS handshakes in progress, kept apart from
//! `proxy.max_connections`: a connection from another node counts against the mesh limit
//! only once its peer is authenticated, so connections that open and never finish their
//! handshake cannot lock the site's other nodes out.
//!
//! Invariants: at most [`MAX_HANDSHAKES`] handshakes are in progress at once, at most
//! [`MAX_HANDSHAKES_PER_SOURCE`] of them from one address; a connection beyond either is
//! closed as soon as it is accepted (counted as `handshake_limit`). A slot is held from
//! the accept to the end of the handshake (at most the handshake timeout).

use std::net::IpAddr;
use std::sync::Arc;

use pimesh_runtime::per_source::{SourceCount, Sources};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Inbound handshakes in progress at once, whatever their source.
pub const MAX_HANDSHAKES: usize = 256;
/// Inbound handshakes in progress at once from one address: a peer proxy opens a few
/// connections at a time.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 32;

/// The handshakes in progress.
#[derive(Debug, Clone)]
pub struct Handshakes {
    slots: Arc<Semaphore>,
    sources: Sources,
}

/// One handshake in progress; dropping it frees its slot.
#[derive(Debug)]
pub struct HandshakeSlot {
    _slot: OwnedSemaphorePermit,
    _source: SourceCount,
}

impl Default for Handshakes {
    fn default() -> Self {
        Handshakes {
            slots: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            sources: Sources::new(MAX_HANDSHAKES_PER_SOURCE),
        }
    }
}

impl Handshakes {
    /// A slot for a handshake with `peer`, unless the budget or `peer`'s share is spent.
    pub fn begin(&self, peer: IpAddr) -> Option<HandshakeSlot> {
        let source = self.sources.admit(peer)?;
        let slot = Arc::clone(&self.slots).try_acquire_owned().ok()?;
        Some(HandshakeSlot {
            _slot: slot,
            _source: source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_takes_its_share_and_the_rest_stays_for_others() {
        let handshakes = Handshakes::default();
        let one: IpAddr = "10.0.0.1".parse().expect("ip");
        let held: Vec<HandshakeSlot> = (0..MAX_HANDSHAKES_PER_SOURCE)
            .map(|_| handshakes.begin(one).expect("within the share"))
            .collect();
        assert!(handshakes.begin(one).is_none(), "past the share");
        let mut others = Vec::new();
        for n in 0..(MAX_HANDSHAKES - MAX_HANDSHAKES_PER_SOURCE) {
            let ip = IpAddr::from([10, 1, (n / 256) as u8, (n % 256) as u8]);
            others.push(handshakes.begin(ip).expect("the rest of the budget"));
        }
        let late: IpAddr = "10.2.0.1".parse().expect("ip");
        assert!(handshakes.begin(late).is_none(), "the budget is spent");
        drop(held);
        assert!(
            handshakes.begin(late).is_some(),
            "freed slots are taken again"
        );
    }
}
