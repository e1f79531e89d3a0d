//! The units Pimesh ships, told apart by name: the one place that knows how the mesh
//! proxy's unit and the control replicas' template are spelled. The managed set, replica
//! placement, the OTA rollout and its health gate ask a unit's [`UnitRole`].

use pimesh_schema::UnitName;

/// The mesh proxy's unit.
pub const PROXY: &str = "pimesh-proxy.service";
/// The control replicas' template unit, before the instance: `pimesh-control@<n>.service`.
pub const CONTROL_TEMPLATE: &str = "pimesh-control@";
/// K3s on a server node, as K3s's install script names it.
pub const K3S_SERVER: &str = "k3s.service";
/// K3s on an agent node, as K3s's install script names it.
pub const K3S_AGENT: &str = "k3s-agent.service";
const SERVICE: &str = ".service";

/// What a managed unit is to Pimesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitRole {
    /// The mesh proxy (`pimesh-proxy.service`).
    Proxy,
    /// A control replica (`pimesh-control@<instance>.service`); `replica` is the instance
    /// when it is a number, which places the replica on port `CONTROL_BASE_PORT + replica`.
    ControlReplica { replica: Option<u16> },
    /// K3s as a server (`k3s.service`): an etcd member on a site of 3 or 5 servers.
    K3sServer,
    /// K3s as an agent (`k3s-agent.service`).
    K3sAgent,
    /// A unit the supervisor's configuration lists for its own reasons.
    Other,
}

impl UnitRole {
    pub fn of(name: &UnitName) -> UnitRole {
        let name = name.as_str();
        match name {
            PROXY => return UnitRole::Proxy,
            K3S_SERVER => return UnitRole::K3sServer,
            K3S_AGENT => return UnitRole::K3sAgent,
            _ => {}
        }
        match name.strip_prefix(CONTROL_TEMPLATE) {
            Some(instance) => UnitRole::ControlReplica {
                replica: instance.strip_suffix(SERVICE).and_then(|n| n.parse().ok()),
            },
            None => UnitRole::Other,
        }
    }

    pub fn is_control_replica(self) -> bool {
        matches!(self, UnitRole::ControlReplica { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(name: &str) -> UnitRole {
        UnitRole::of(&UnitName::try_from(name.to_owned()).expect("unit name"))
    }

    #[test]
    fn the_shipped_units_are_told_apart_by_name() {
        assert_eq!(role("pimesh-proxy.service"), UnitRole::Proxy);
        assert_eq!(
            role("pimesh-control@2.service"),
            UnitRole::ControlReplica { replica: Some(2) }
        );
        assert_eq!(
            role("pimesh-control@two.service"),
            UnitRole::ControlReplica { replica: None }
        );
        assert_eq!(role("pimesh-proxy-debug.service"), UnitRole::Other);
        assert_eq!(role("k3s.service"), UnitRole::K3sServer);
        assert_eq!(role("k3s-agent.service"), UnitRole::K3sAgent);
        assert_eq!(role("k3s-other.service"), UnitRole::Other);
        for unit in pimesh_schema::SupervisorConfig::default().units {
            assert_ne!(UnitRole::of(&unit.name), UnitRole::Other, "{}", unit.name);
        }
    }
}
