//! The names the mesh dials by and the reserved identity of the control replicas.
//!
//! Mesh peers are dialled by address; the TLS server name only carries which node the
//! client means to reach: `<node>.<site>.pimesh`, which [`crate::Expected::DialledNode`]
//! maps back to `spiffe://<site>/node/<node>`. Nothing resolves these names. Control
//! replicas are known by their SPIFFE ID alone, whatever name is dialled.

use std::net::{IpAddr, Ipv4Addr};

use pimesh_schema::{DnsLabel, NameError, SpiffeId, Workload};
use rustls::pki_types::{DnsName, ServerName};

/// The service name every control replica of a site serves under:
/// `spiffe://<site>/svc/pimesh-control`. Reserved: no node may hold it.
pub const CONTROL_SERVICE: &str = "pimesh-control";

/// The DNS suffix of the names [`mesh_server_name`] makes.
const MESH_NAME_SUFFIX: &str = "pimesh";

/// `spiffe://<site>/svc/pimesh-control`, the identity of `site`'s control replicas.
pub fn control_id(site: &DnsLabel) -> Result<SpiffeId, NameError> {
    let service = DnsLabel::try_from(CONTROL_SERVICE.to_owned())?;
    Ok(SpiffeId::service(site, &service))
}

/// Whether `id` is the control replicas' identity (of any site).
pub(crate) fn is_control_id(id: &SpiffeId) -> bool {
    matches!(&id.workload, Workload::Service(name) if name.as_str() == CONTROL_SERVICE)
}

/// The name sent as SNI to a control replica: `pimesh-control`. The replica's certificate
/// is not checked against it (see [`crate::control_client`]).
pub fn control_server_name() -> ServerName<'static> {
    match DnsName::try_from(CONTROL_SERVICE) {
        Ok(name) => ServerName::DnsName(name.to_owned()),
        // Unreachable for this constant; an IP address sends no SNI at all.
        Err(_) => ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into()),
    }
}

/// The name to dial node `node` of `site` by: the DNS name `<node>.<site>.pimesh`, which
/// the client's verifier maps back to `spiffe://<site>/node/<node>`. (It is also sent as
/// SNI; nothing resolves it.)
pub fn mesh_server_name(site: &DnsLabel, node: &DnsLabel) -> ServerName<'static> {
    let name = format!("{node}.{site}.{MESH_NAME_SUFFIX}");
    match DnsName::try_from(name) {
        Ok(name) => ServerName::DnsName(name),
        // Unreachable for DNS labels; an IP address is a name no peer can match.
        Err(_) => ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into()),
    }
}

/// The node ID that `name`, `<node>.<site>.pimesh`, stands for; `None` for any other
/// name (another site's, an address, another shape).
pub(crate) fn dialled_node(site: &DnsLabel, name: &ServerName<'_>) -> Option<SpiffeId> {
    let ServerName::DnsName(name) = name else {
        return None;
    };
    let suffix = format!(".{site}.{MESH_NAME_SUFFIX}");
    let node = name.as_ref().strip_suffix(suffix.as_str())?;
    let node = DnsLabel::try_from(node.to_owned()).ok()?;
    Some(SpiffeId::node(site, &node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::label;

    #[test]
    fn a_mesh_name_maps_back_to_its_node_of_its_site_only() {
        let (site, node) = (label("depot-7"), label("pi-a"));
        let name = mesh_server_name(&site, &node);
        assert_eq!(name.to_str(), "pi-a.depot-7.pimesh");
        assert_eq!(
            dialled_node(&site, &name),
            Some(SpiffeId::node(&site, &node))
        );
        assert_eq!(dialled_node(&label("depot-8"), &name), None);
        let stranger = ServerName::try_from("pi-a.depot-7.example").expect("name");
        assert_eq!(dialled_node(&site, &stranger), None);
        let address = ServerName::try_from("127.0.0.1").expect("address");
        assert_eq!(dialled_node(&site, &address), None);
    }

    #[test]
    fn the_control_identity_is_the_reserved_service() {
        let site = label("depot-7");
        let id = control_id(&site).expect("a DNS label");
        assert_eq!(id.to_string(), "spiffe://depot-7/svc/pimesh-control");
        assert!(is_control_id(&id));
        assert!(!is_control_id(&SpiffeId::node(
            &site,
            &label("pimesh-control")
        )));
        assert_eq!(control_server_name().to_str(), "pimesh-control");
    }
}
