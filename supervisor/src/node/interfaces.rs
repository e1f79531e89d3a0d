//! The node's interface addresses as the kernel lists them (`getifaddrs`): one reader
//! for the join's lease checks and K3s's node address, each of which filters what it
//! needs.

use std::net::IpAddr;

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub interface: String,
    /// The interface is administratively up (`IFF_UP`).
    pub up: bool,
    pub ip: IpAddr,
}

/// Every IPv4 and IPv6 address of every interface now, in the kernel's order; empty
/// when the interfaces cannot be read.
pub fn addresses() -> Vec<InterfaceAddress> {
    let Ok(all) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    all.filter_map(|entry| {
        let address = entry.address?;
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else {
            IpAddr::V6(address.as_sockaddr_in6()?.ip())
        };
        Some(InterfaceAddress {
            up: entry.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP),
            interface: entry.interface_name,
            ip,
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_address_is_listed_up() {
        let found = addresses();
        assert!(
            found
                .iter()
                .any(|a| a.interface == "lo" && a.up && a.ip.is_loopback()),
            "{found:?}"
        );
    }
}
