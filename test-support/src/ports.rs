//! Free TCP ports on the loopback interface.
//!
//! Ports come from below the kernel's ephemeral range (`ip_local_port_range`, 32768 and
//! up on Debian): a port learnt free and bound a moment later can otherwise be taken in
//! between by the kernel for some client socket, and `bind` then fails with "address
//! already in use". Within one process no port is handed out twice (a cursor walks the
//! range from a random start), and a port is handed out only while nothing at all is
//! bound to it.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The lowest port handed out: above the well-known ports and Pimesh's own defaults.
const LOWEST: u16 = 15_000;
/// One past the highest port handed out when the kernel's ephemeral range cannot be read.
const EPHEMERAL_START: u16 = 32_768;

/// A loopback port nothing was bound to a moment ago.
///
/// # Panics
/// When no port of the range is free.
pub fn free_port() -> u16 {
    let range = range();
    let span = u32::from(range.1 - range.0);
    for _ in 0..span {
        let offset = cursor().fetch_add(1, Ordering::Relaxed) % span;
        let port = range.0 + u16::try_from(offset).unwrap_or(0);
        // Bound on every address: a listener on 127.0.0.1, 127.0.0.2 or 0.0.0.0 all show.
        if TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free port between {} and {}",
        range.0,
        range.1.saturating_sub(1)
    );
}

/// `127.0.0.1` and a [`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// `[LOWEST, start of the ephemeral range)`.
fn range() -> (u16, u16) {
    static RANGE: OnceLock<(u16, u16)> = OnceLock::new();
    *RANGE.get_or_init(|| {
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(EPHEMERAL_START);
        (LOWEST, ephemeral.clamp(LOWEST + 1_000, EPHEMERAL_START))
    })
}

/// Starts at a random offset, so that test processes running side by side rarely walk
/// the same ports.
fn cursor() -> &'static AtomicU32 {
    static CURSOR: OnceLock<AtomicU32> = OnceLock::new();
    CURSOR.get_or_init(|| {
        use std::hash::{BuildHasher as _, Hasher as _};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        AtomicU32::new(u32::try_from(hasher.finish() % 1_000_000).unwrap_or(0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_never_repeat_in_a_process() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let (low, high) = range();
        assert!(ports.iter().all(|p| (low..high).contains(p)), "{ports:?}");
        assert!(high <= EPHEMERAL_START);
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
    }
}
