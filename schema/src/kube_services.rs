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
use crate::routes::{Route, ServiceSet};
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

/// What the replicas read from the cluster for the proxies: the meshed Services and the
/// routes of their namespaces, each in its invariant order (Services by `name`, routes by
/// `(namespace, route.service, route.name)`), so equal inputs give equal documents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeMesh {
    pub services: Vec<KubeService>,
    pub routes: Vec<KubeRoute>,
}

/// A route read from the cluster: an `HTTPRoute` or `GRPCRoute` of a meshed namespace.
///
/// Invariant: `route.service` and every backend name a Service of `namespace` (a
/// Kubernetes name, not a mesh name: see [`KubeRoute::mesh_name`]), and the route passed
/// [`crate::routes::check`] against that namespace's meshed Services when the replica
/// read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeRoute {
    pub namespace: DnsLabel,
    pub route: Route,
}

impl KubeRoute {
    /// The name [`KubeService`] gives the Service `service` of this route's namespace:
    /// `<service>.<namespace>` (the port suffix of a Service with several ports aside).
    pub fn mesh_name(&self, service: &DnsLabel) -> String {
        format!("{service}.{}", self.namespace)
    }
}

/// The meshed Services of one namespace, as the routes of that namespace may name them.
pub struct NamespaceServices<'a> {
    pub namespace: &'a DnsLabel,
    pub services: &'a [KubeService],
}

impl NamespaceServices<'_> {
    fn has(&self, name: &DnsLabel) -> bool {
        let base = format!("{name}.{}", self.namespace);
        self.services.iter().any(|s| {
            s.name == base
                || s.name
                    .strip_prefix(base.as_str())
                    .is_some_and(|rest| rest.starts_with(':'))
        })
    }
}

impl ServiceSet for NamespaceServices<'_> {
    fn parent(&self, name: &DnsLabel) -> Result<(), String> {
        if self.has(name) {
            Ok(())
        } else {
            Err(format!(
                "expected a Service with a cluster IP in the meshed namespace {}, found {name}",
                self.namespace
            ))
        }
    }

    /// A Service sends to its endpoints, however many are ready right now.
    fn parent_placed(&self, _name: &DnsLabel) -> bool {
        true
    }

    fn backend(&self, name: &DnsLabel) -> Result<(), String> {
        self.parent(name)
    }
}

impl KubeService {
    /// The in-cluster host name of the Service: `<service>.<namespace>.svc.cluster.local`.
    pub fn host(&self) -> String {
        let base = self.name.split(':').next().unwrap_or(&self.name);
        format!("{base}.{CLUSTER_DOMAIN}")
    }

    /// The Service's namespace: what `name` holds between its first `.` and a `:`.
    pub fn namespace(&self) -> &str {
        let base = self.name.split(':').next().unwrap_or(&self.name);
        base.split_once('.').map_or("", |(_, namespace)| namespace)
    }
}
