//! A server node announces itself on the LAN (`_pimesh._tcp`, see
//! `pimesh_join::Announcement`) so that joining nodes find it with nothing but their seed.
//! The responder answers on every interface with the node's current addresses (mdns-sd's
//! automatic addresses), for as long as the [`Announcer`] lives.

use pimesh_join::{Announcement, SERVICE_TYPE};
use tracing::info;

/// A running announcement; dropping it withdraws it.
pub struct Announcer {
    daemon: mdns_sd::ServiceDaemon,
}

/// Why the node cannot announce itself.
#[derive(Debug)]
pub struct AnnounceError(mdns_sd::Error);

impl std::fmt::Display for AnnounceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot announce {SERVICE_TYPE} by mDNS: {}", self.0)
    }
}

impl std::error::Error for AnnounceError {}

impl Announcer {
    /// Starts answering for `announcement` on `interfaces` (`None`: every one).
    pub fn start(
        announcement: &Announcement,
        interfaces: Option<&[pimesh_schema::InterfaceName]>,
    ) -> Result<Announcer, AnnounceError> {
        let daemon = crate::join::mdns::daemon(interfaces).map_err(AnnounceError)?;
        daemon
            .register(service_info(announcement)?)
            .map_err(AnnounceError)?;
        info!(
            node = %announcement.node,
            site = %announcement.site,
            port = announcement.port,
            "announcing this server node on the LAN"
        );
        Ok(Announcer { daemon })
    }

    /// Answers for `announcement` from now on, in place of what was announced (the same
    /// instance: mDNS caches take the new TXT record at once, it is a unique record).
    pub fn update(&self, announcement: &Announcement) -> Result<(), AnnounceError> {
        self.daemon
            .register(service_info(announcement)?)
            .map_err(AnnounceError)
    }
}

/// The DNS-SD instance of `announcement`, answered with the node's current addresses.
fn service_info(announcement: &Announcement) -> Result<mdns_sd::ServiceInfo, AnnounceError> {
    let host = format!("{}.local.", announcement.node);
    let txt: Vec<(String, String)> = announcement.txt();
    let info = mdns_sd::ServiceInfo::new(
        SERVICE_TYPE,
        announcement.node.as_str(),
        &host,
        "",
        announcement.port,
        txt.as_slice(),
    )
    .map_err(AnnounceError)?;
    Ok(info.enable_addr_auto())
}

impl Drop for Announcer {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}
