//! Entry points for the fuzz targets (`fuzz/fuzz_targets/control_*.rs`): each takes the
//! raw bytes a peer could send, runs them through the parser the replica runs them
//! through, and panics only when a property of that parser breaks. Not an API: nothing in
//! the replica calls these.

use crate::discovery;

/// A heartbeat body from a node's proxy. Properties: an accepted heartbeat names a port
/// other than 0, a credential of 64 lowercase hex digits, and at most 16 replica ports,
/// none 0, sorted and without repeats (what the discovery documents then list).
pub fn heartbeat_body(data: &[u8]) {
    let Ok((port, about)) = discovery::heartbeat_body(data) else {
        return;
    };
    assert_ne!(port, 0);
    if let Some(credential) = &about.credential {
        assert_eq!(credential.len(), 64);
        assert!(credential
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
    assert!(about.replicas.len() <= 16);
    assert!(about.replicas.iter().all(|port| *port != 0));
    assert!(about.replicas.windows(2).all(|pair| pair[0] < pair[1]));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed seed is accepted (a fuzzer that starts from refused seeds explores
    /// only the refusals) and holds the properties.
    #[test]
    fn the_seed_is_a_heartbeat() {
        let seed = include_bytes!("../../fuzz/seeds/control_heartbeat/server");
        let (port, about) = discovery::heartbeat_body(seed).expect("the seed is accepted");
        assert_eq!((port, about.replicas), (4143, vec![8086, 8087]));
        heartbeat_body(seed);
    }
}
