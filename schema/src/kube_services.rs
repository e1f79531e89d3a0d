//! Kubernetes Services the mesh carries, as the control replicas hand them to the
//! proxies in the discovery document (`"kube_services"`): one entry per Service port of a
//! namespace labelled [`MESH_LABEL`]`=`[`MESH_ENABLED`].
//!
//! Invariant: an entry's `endpoints` are the ready endpoints of the Service's
//! EndpointSlices whose node is named, each with the address and port the workload
//! listens on there (the slice's port of the same name, else the Service's
//! `targetPort`); entries are ordered by `name` and endpoints by `(node, address)`, so
//! that equal inputs give equal documents.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::cluster::Protocol;
use crate::DnsLabel;

/// The namespace label that puts a namespace's Services into the mesh.
pub const MESH_LABEL: &str = "pimesh.dev/mesh";
/// The value of [`MESH_LABEL`] that does.
pub const MESH_ENABLED: &str = "enabled";
/// The DNS suffix of Services inside the cluster: `<service>.<namespace>.svc.cluster.local`.
pub const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// One port of one meshed Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeService {
    /// `<service>.<namespace>` for a Service with one port, `<service>.<namespace>:<port>`
    /// for each port of one with several: the route's name in metrics and logs.
    pub name: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// `http` when the port's `appProtocol` says HTTP (`http`, `kubernetes.io/h2c`),
    /// `tcp` for any other declared protocol, `auto` when none is declared.
    pub protocol: Protocol,
    pub endpoints: Vec<KubeEndpoint>,
}

/// A ready endpoint of a [`KubeService`]: the node it runs on and where it listens.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeEndpoint {
    pub node: DnsLabel,
    pub address: SocketAddr,
}

impl KubeService {
    /// The in-cluster host name of the Service: `<service>.<namespace>.svc.cluster.local`.
    pub fn host(&self) -> String {
        let base = self.name.split(':').next().unwrap_or(&self.name);
        format!("{base}.{CLUSTER_DOMAIN}")
    }
}
