//! The mDNS responder and browser the join uses (crate `mdns-sd`), limited to the seed's
//! `mdns_interfaces` when it names any.
//!
//! Invariant: the interface limits are queued before any announcement or query, so no
//! packet leaves on an interface the seed left out.

use mdns_sd::{IfKind, ServiceDaemon};
use pimesh_schema::InterfaceName;

/// A daemon on `interfaces` (`None`: every interface).
pub fn daemon(interfaces: Option<&[InterfaceName]>) -> Result<ServiceDaemon, mdns_sd::Error> {
    let daemon = ServiceDaemon::new()?;
    if let Some(names) = interfaces {
        daemon.disable_interface(IfKind::All)?;
        for name in names {
            daemon.enable_interface(IfKind::Name(name.as_str().to_owned()))?;
        }
    }
    Ok(daemon)
}
