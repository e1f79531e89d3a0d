//! The mDNS responder and browser the join uses (crate `mdns-sd`), limited to the seed's
//! `mdns_interfaces` when it names any.
//!
//! Invariants: the interface limits are queued before any announcement or query, so no
//! packet leaves on an interface the seed left out; the daemon looks at the node's
//! addresses every [`ADDRESS_CHECK_SECS`], so a server whose DHCP lease just came announces
//! the new address (and joiners can reach it) within that, not mdns-sd's default 5 s.

use mdns_sd::{IfKind, ServiceDaemon};
use pimesh_schema::InterfaceName;

/// How often the daemon reads the node's addresses (one netlink dump each time).
pub const ADDRESS_CHECK_SECS: u32 = 1;

/// A daemon on `interfaces` (`None`: every interface).
pub fn daemon(interfaces: Option<&[InterfaceName]>) -> Result<ServiceDaemon, mdns_sd::Error> {
    let daemon = ServiceDaemon::new()?;
    daemon.set_ip_check_interval(ADDRESS_CHECK_SECS)?;
    if let Some(names) = interfaces {
        daemon.disable_interface(IfKind::All)?;
        for name in names {
            daemon.enable_interface(IfKind::Name(name.as_str().to_owned()))?;
        }
    }
    Ok(daemon)
}
