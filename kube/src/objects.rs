//! The fields of the Kubernetes objects Pimesh reads, typed: a Namespace's labels, a
//! Service's cluster IP and ports, an EndpointSlice's addresses, nodes and readiness.
//! Every other field is ignored, so newer API versions with more fields still parse.
//!
//! Invariant: a missing optional field takes the value the Kubernetes API documents for
//! it (an endpoint with no `ready` condition is ready, a port with no `protocol` is TCP),
//! so callers never guess.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `GET /api/v1/namespaces`.
pub const NAMESPACES: &str = "/api/v1/namespaces";
/// `GET /api/v1/services` (every namespace).
pub const SERVICES: &str = "/api/v1/services";
/// `GET /apis/discovery.k8s.io/v1/endpointslices` (every namespace).
pub const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
/// `GET /apis/gateway.networking.k8s.io/v1/httproutes` (every namespace; served once the
/// Gateway API's CRDs are installed, 404 before).
pub const HTTP_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";
/// `GET /apis/gateway.networking.k8s.io/v1/grpcroutes` (as [`HTTP_ROUTES`]).
pub const GRPC_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/grpcroutes";
/// The `apiVersion` of the Gateway API's routes.
pub const GATEWAY_V1: &str = "gateway.networking.k8s.io/v1";
/// `GET /api/v1/nodes`.
pub const NODES: &str = "/api/v1/nodes";
/// The label K3s puts on its server nodes.
pub const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A `*List` answer: its items.
#[derive(Debug, Deserialize)]
pub struct List<T> {
    #[serde(default = "Vec::new")]
    pub items: Vec<T>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

/// A Node: its name and labels.
#[derive(Debug, Clone, Deserialize)]
pub struct Node {
    pub metadata: ObjectMeta,
}

impl Node {
    /// A K3s server (labelled control-plane), ready or not.
    pub fn is_server(&self) -> bool {
        self.metadata
            .labels
            .get(CONTROL_PLANE_LABEL)
            .is_some_and(|v| v == "true")
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// An IP, `"None"` for a headless Service, absent for ExternalName ones.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    /// `TCP` when absent.
    #[serde(default = "tcp")]
    pub protocol: String,
    /// A number, a port name of the endpoints, or absent (then `port`).
    #[serde(default)]
    pub target_port: Option<TargetPort>,
    /// `http`, `kubernetes.io/h2c`, `kubernetes.io/ws`...: how the port speaks.
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// `targetPort`: an int-or-string.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

impl EndpointSlice {
    /// The Service this slice belongs to (its `kubernetes.io/service-name` label).
    pub fn service_name(&self) -> Option<&str> {
        self.metadata
            .labels
            .get(SERVICE_NAME_LABEL)
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub conditions: Conditions,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Conditions {
    /// Absent means ready (the API's documented reading of an unknown state).
    #[serde(default)]
    pub ready: Option<bool>,
}

impl Endpoint {
    pub fn is_ready(&self) -> bool {
        self.conditions.ready.unwrap_or(true)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_fields_take_the_api_defaults() {
        let services: List<Service> = serde_json::from_str(
            r#"{"kind":"ServiceList","items":[{"metadata":{"name":"web","namespace":"fleet"},
                "spec":{"clusterIP":"10.43.0.9","ports":[{"port":80,"targetPort":"http"},{"port":81}]}}]}"#,
        )
        .expect("parses");
        let ports = &services.items[0].spec.ports;
        assert_eq!(ports[0].protocol, "TCP");
        assert_eq!(ports[0].target_port, Some(TargetPort::Name("http".into())));
        assert_eq!(ports[1].target_port, None);
        let slices: List<EndpointSlice> = serde_json::from_str(
            r#"{"items":[{"metadata":{"name":"web-1","labels":{"kubernetes.io/service-name":"web"}},
                "addressType":"IPv4","endpoints":[{"addresses":["10.42.0.5"]},
                {"addresses":["10.42.0.6"],"conditions":{"ready":false}}]}]}"#,
        )
        .expect("parses");
        let slice = &slices.items[0];
        assert_eq!(slice.service_name(), Some("web"));
        assert!(slice.endpoints[0].is_ready());
        assert!(!slice.endpoints[1].is_ready());
    }
}
