//! What the replica reads from K3s's API on this server node: the Kubernetes Services the
//! mesh carries, the Gateway API routes of their namespaces, and K3s's server nodes.
//!
//! Every [`POLL`] the replica lists Namespaces, Services, EndpointSlices, HTTPRoutes,
//! GRPCRoutes and Nodes with the kubeconfig the supervisor keeps for it (`--kubeconfig`,
//! a copy of K3s's admin kubeconfig), [`compile`]s the Services of namespaces labelled
//! `pimesh.dev/mesh=enabled` into the discovery document's `kube_services` and
//! [`compile_routes`] the routes of those namespaces into its `kube_routes`, and keeps
//! the control-plane nodes in [`KubeServers`] for the placement of joins (`grants`).
//!
//! Invariants: without a kubeconfig file (no K3s, or not yet started) the set is empty;
//! when the API cannot be read the last set read stays (an edge site's API server
//! restarting must not take routes away from the proxies), and the failure is logged
//! once per distinct cause. A cluster without the Gateway API's CRDs (K3s ships none)
//! has no routes, not an error. A route the proxies could not follow (a parent or
//! backend that is not a meshed Service of its namespace, a form not supported) is left
//! out and logged, with the object and field, once per distinct refusal; the others of
//! its Service still apply. Lists, not watches: a change reaches the proxies within one
//! poll.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pimesh_kube::objects::{
    EndpointSlice, List, Namespace, Node, Service, ServicePort, TargetPort, ENDPOINT_SLICES,
    GATEWAY_V1, GRPC_ROUTES, HTTP_ROUTES, NAMESPACES, NODES, SERVICES,
};
use pimesh_kube::{ApiError, KubeClient, KubeconfigError};
use pimesh_schema::cluster::Protocol;
use pimesh_schema::kube_services::{
    KubeEndpoint, KubeMesh, KubeRoute, KubeService, NamespaceServices, MESH_ENABLED, MESH_LABEL,
};
use pimesh_schema::routes::{self, gateway};
use pimesh_schema::DnsLabel;
use tracing::{info, warn};

use crate::discovery::Discovery;
use crate::state::State;

/// How often the API is listed.
pub const POLL: Duration = Duration::from_secs(3);
/// How long one request to the API may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest list read.
const MAX_LIST_BYTES: usize = 8 * 1024 * 1024;

/// The names of the namespaces labelled for the mesh.
fn meshed_namespaces(namespaces: &[Namespace]) -> BTreeSet<&str> {
    namespaces
        .iter()
        .filter(|ns| ns.metadata.labels.get(MESH_LABEL).map(String::as_str) == Some(MESH_ENABLED))
        .map(|ns| ns.metadata.name.as_str())
        .collect()
}

/// The meshed Services of `namespaces`, `services` and `slices` (see the module doc and
/// [`KubeService`]'s invariant).
pub fn compile(
    namespaces: &[Namespace],
    services: &[Service],
    slices: &[EndpointSlice],
) -> Vec<KubeService> {
    let meshed = meshed_namespaces(namespaces);
    let mut compiled = Vec::new();
    for service in services {
        let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
        if !meshed.contains(namespace) {
            continue;
        }
        let Some(cluster_ip) = service
            .spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok())
        else {
            continue; // headless or ExternalName: nothing to intercept
        };
        let ports: Vec<&ServicePort> = service
            .spec
            .ports
            .iter()
            .filter(|p| p.protocol == "TCP")
            .collect();
        let base = format!("{}.{namespace}", service.metadata.name);
        let own_slices: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| s.metadata.namespace.as_deref().unwrap_or("default") == namespace)
            .filter(|s| s.service_name() == Some(service.metadata.name.as_str()))
            .collect();
        for port in &ports {
            let name = if ports.len() == 1 {
                base.clone()
            } else {
                format!("{base}:{}", port.port)
            };
            let mut endpoints: Vec<KubeEndpoint> = own_slices
                .iter()
                .flat_map(|slice| endpoints_of(slice, port))
                .collect();
            endpoints.sort();
            endpoints.dedup();
            compiled.push(KubeService {
                name,
                cluster_ip,
                port: port.port,
                protocol: protocol_of(port.app_protocol.as_deref()),
                endpoints,
            });
        }
    }
    compiled.sort_by(|a, b| a.name.cmp(&b.name));
    compiled
}

/// The routes among `objects` (HTTPRoutes and GRPCRoutes as the API lists them) of the
/// namespaces of `namespaces` labelled for the mesh, checked against the meshed
/// `services` of their own namespace; and, for each route left out, why (the object, the
/// field, what was expected). Ordered by namespace, parent and name.
pub fn compile_routes(
    namespaces: &[Namespace],
    services: &[KubeService],
    objects: &[serde_json::Value],
) -> (Vec<KubeRoute>, Vec<String>) {
    let meshed = meshed_namespaces(namespaces);
    let mut routes = Vec::new();
    let mut refused = Vec::new();
    let mut taken = std::collections::BTreeMap::<String, BTreeSet<_>>::new();
    for object in objects {
        let text = |field: &str| object.get(field).and_then(serde_json::Value::as_str);
        let meta = |field: &str| {
            object
                .get("metadata")
                .and_then(|m| m.get(field))
                .and_then(serde_json::Value::as_str)
        };
        let namespace = meta("namespace").unwrap_or("default");
        if !meshed.contains(namespace) {
            continue;
        }
        let origin = format!(
            "{} {namespace}/{}",
            text("kind").unwrap_or("route").to_ascii_lowercase(),
            meta("name").unwrap_or("?")
        );
        let parsed = gateway::parse_object(std::path::Path::new(&origin), &object.to_string());
        let (namespace, parsed) = match parsed {
            Ok(read) => read,
            Err(err) => {
                refused.push(err.to_string());
                continue;
            }
        };
        let set = NamespaceServices {
            namespace: &namespace,
            services,
        };
        let taken = taken.entry(namespace.to_string()).or_default();
        for route in parsed {
            if let Err(fault) = routes::check(&route, &set, taken) {
                refused.push(format!(
                    "{origin}: {}: {}",
                    fault.field.join("."),
                    fault.message
                ));
                continue;
            }
            routes.push(KubeRoute {
                namespace: namespace.clone(),
                route,
            });
        }
    }
    routes.sort_by(|a, b| {
        (&a.namespace, &a.route.service, &a.route.name).cmp(&(
            &b.namespace,
            &b.route.service,
            &b.route.name,
        ))
    });
    (routes, refused)
}

/// The ready endpoints of `slice` for the Service port `port`, on named nodes.
fn endpoints_of(slice: &EndpointSlice, port: &ServicePort) -> Vec<KubeEndpoint> {
    let by_name = slice
        .ports
        .iter()
        .find(|p| p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or(""))
        .and_then(|p| p.port);
    let target = by_name.or(match &port.target_port {
        None => Some(port.port),
        Some(TargetPort::Number(n)) => Some(*n),
        Some(TargetPort::Name(_)) => None,
    });
    let Some(target) = target else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .filter(|e| e.is_ready())
        .filter_map(|e| {
            let node = DnsLabel::try_from(e.node_name.clone()?).ok()?;
            Some(
                e.addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(move |ip| KubeEndpoint {
                        node: node.clone(),
                        address: SocketAddr::new(ip, target),
                    }),
            )
        })
        .flatten()
        .collect()
}

/// How the proxy treats a port, from its `appProtocol`.
fn protocol_of(app_protocol: Option<&str>) -> Protocol {
    match app_protocol {
        None => Protocol::Auto,
        Some(p) if p.eq_ignore_ascii_case("http") || p == "kubernetes.io/h2c" => Protocol::Http,
        Some(_) => Protocol::Tcp,
    }
}

/// K3s's server nodes (labelled control-plane, ready or not), as last read; empty without
/// K3s. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct KubeServers(Arc<Mutex<BTreeSet<String>>>);

impl KubeServers {
    pub fn current(&self) -> BTreeSet<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, servers: BTreeSet<String>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = servers;
    }
}

/// Why one poll read nothing.
#[derive(Debug)]
enum PollError {
    Kubeconfig(KubeconfigError),
    Api(ApiError),
}

impl std::fmt::Display for PollError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PollError::Kubeconfig(err) => err.fmt(f),
            PollError::Api(err) => err.fmt(f),
        }
    }
}

/// The client of the kubeconfig at `path`, made again only when the file changes.
struct Client {
    path: PathBuf,
    loaded: Option<(Vec<u8>, KubeClient)>,
}

impl Client {
    /// `Ok(None)` when there is no kubeconfig file.
    fn current(&mut self) -> Result<Option<&KubeClient>, PollError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                self.loaded = None;
                return Ok(None);
            }
            Err(source) => {
                return Err(PollError::Kubeconfig(KubeconfigError::Unreadable {
                    path: self.path.clone(),
                    source,
                }))
            }
        };
        if self.loaded.as_ref().map(|(seen, _)| seen) != Some(&text) {
            let client =
                KubeClient::load(&self.path, REQUEST_TIMEOUT).map_err(PollError::Kubeconfig)?;
            self.loaded = Some((text, client));
        }
        Ok(self.loaded.as_ref().map(|(_, client)| client))
    }
}

/// K3s's server nodes in a Node list.
fn servers_of(nodes: &[Node]) -> BTreeSet<String> {
    nodes
        .iter()
        .filter(|node| node.is_server())
        .map(|node| node.metadata.name.clone())
        .collect()
}

/// One poll's reading of the API.
struct Read {
    mesh: KubeMesh,
    /// Why each route left out was.
    refused: Vec<String>,
    servers: BTreeSet<String>,
}

async fn read(client: &KubeClient) -> Result<Read, PollError> {
    let selector = format!(
        "{NAMESPACES}?labelSelector={}%3D{MESH_ENABLED}",
        escape(MESH_LABEL)
    );
    let namespaces: List<Namespace> = client
        .get_json(&selector, MAX_LIST_BYTES)
        .await
        .map_err(PollError::Api)?;
    let services: List<Service> = client
        .get_json(SERVICES, MAX_LIST_BYTES)
        .await
        .map_err(PollError::Api)?;
    let slices: List<EndpointSlice> = client
        .get_json(ENDPOINT_SLICES, MAX_LIST_BYTES)
        .await
        .map_err(PollError::Api)?;
    let mut route_objects = route_list(client, HTTP_ROUTES, "HTTPRoute").await?;
    route_objects.extend(route_list(client, GRPC_ROUTES, "GRPCRoute").await?);
    let nodes: List<Node> = client
        .get_json(NODES, MAX_LIST_BYTES)
        .await
        .map_err(PollError::Api)?;
    let services = compile(&namespaces.items, &services.items, &slices.items);
    let (routes, refused) = compile_routes(&namespaces.items, &services, &route_objects);
    Ok(Read {
        mesh: KubeMesh { services, routes },
        refused,
        servers: servers_of(&nodes.items),
    })
}

/// The routes of the list at `path`, each with its `kind` and `apiVersion` (a list may
/// serve its items without them); none when the cluster does not serve the resource (no
/// Gateway API CRDs: 404).
async fn route_list(
    client: &KubeClient,
    path: &str,
    kind: &str,
) -> Result<Vec<serde_json::Value>, PollError> {
    let list: List<serde_json::Value> = match client.get_json(path, MAX_LIST_BYTES).await {
        Ok(list) => list,
        Err(ApiError::Status { status: 404, .. }) => return Ok(Vec::new()),
        Err(err) => return Err(PollError::Api(err)),
    };
    Ok(list
        .items
        .into_iter()
        .map(|mut item| {
            if let Some(object) = item.as_object_mut() {
                object.entry("kind").or_insert_with(|| kind.into());
                object
                    .entry("apiVersion")
                    .or_insert_with(|| GATEWAY_V1.into());
            }
            item
        })
        .collect())
}

/// `/` in a label key, escaped for a query string.
fn escape(key: &str) -> String {
    key.replace('/', "%2F")
}

/// Follows the meshed Services and K3s's servers with the kubeconfig at `path` until the
/// task is dropped, handing each new set of Services to `discovery` and the servers to
/// `servers`.
pub async fn follow(
    path: &Path,
    discovery: Arc<Discovery>,
    state: Arc<State>,
    servers: KubeServers,
) {
    let mut client = Client {
        path: path.to_path_buf(),
        loaded: None,
    };
    let mut last_error: Option<String> = None;
    let mut last_refused: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = match client.current() {
            Ok(None) => Ok(Read {
                mesh: KubeMesh::default(),
                refused: Vec::new(),
                servers: BTreeSet::new(),
            }),
            Ok(Some(kube)) => read(kube).await,
            Err(err) => Err(err),
        };
        match result {
            Ok(read) => {
                servers.set(read.servers);
                if last_error.take().is_some() {
                    info!("the Kubernetes API answers again");
                }
                if read.refused != last_refused {
                    for why in read
                        .refused
                        .iter()
                        .filter(|why| !last_refused.contains(why))
                    {
                        warn!(refusal = %why, "a Kubernetes route is left out");
                    }
                    last_refused = read.refused;
                }
                if discovery.set_kube(read.mesh, &state) {
                    let kube = discovery.kube();
                    info!(
                        services = kube.services.len(),
                        routes = kube.routes.len(),
                        "meshed Kubernetes Services or routes changed"
                    );
                }
            }
            Err(err) => {
                let text = err.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    warn!(error = %text, "cannot read the Kubernetes API; the meshed Services stay as last read");
                    last_error = Some(text);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list<T: serde::de::DeserializeOwned>(json: &str) -> Vec<T> {
        serde_json::from_str::<List<T>>(json).expect("list").items
    }

    #[test]
    fn only_meshed_namespaces_and_ready_endpoints_on_named_nodes_are_carried() {
        let namespaces = list::<Namespace>(
            r#"{"items":[{"metadata":{"name":"fleet","labels":{"pimesh.dev/mesh":"enabled"}}},
                {"metadata":{"name":"other"}}]}"#,
        );
        let services = list::<Service>(
            r#"{"items":[
              {"metadata":{"name":"tracker","namespace":"fleet"},
               "spec":{"clusterIP":"10.43.100.10","ports":[{"name":"http","port":80,"targetPort":8080,"appProtocol":"http"}]}},
              {"metadata":{"name":"queue","namespace":"fleet"},
               "spec":{"clusterIP":"10.43.100.11","ports":[{"name":"amqp","port":5672},{"name":"admin","port":15672,"targetPort":"admin"},{"port":53,"protocol":"UDP"}]}},
              {"metadata":{"name":"headless","namespace":"fleet"},"spec":{"clusterIP":"None","ports":[{"port":1}]}},
              {"metadata":{"name":"web","namespace":"other"},"spec":{"clusterIP":"10.43.0.5","ports":[{"port":80}]}}]}"#,
        );
        let slices = list::<EndpointSlice>(
            r#"{"items":[
              {"metadata":{"name":"tracker-1","namespace":"fleet","labels":{"kubernetes.io/service-name":"tracker"}},
               "addressType":"IPv4","ports":[{"name":"http","port":8080}],
               "endpoints":[{"addresses":["10.42.3.7"],"nodeName":"pi-c"},
                            {"addresses":["10.42.1.2"],"nodeName":"pi-a","conditions":{"ready":false}},
                            {"addresses":["10.42.9.9"]}]},
              {"metadata":{"name":"queue-1","namespace":"fleet","labels":{"kubernetes.io/service-name":"queue"}},
               "addressType":"IPv4","ports":[{"name":"amqp","port":5672},{"name":"admin","port":9999}],
               "endpoints":[{"addresses":["10.42.2.4"],"nodeName":"pi-b"}]}]}"#,
        );
        let compiled = compile(&namespaces, &services, &slices);
        let names: Vec<&str> = compiled.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["queue.fleet:15672", "queue.fleet:5672", "tracker.fleet"]
        );
        let tracker = &compiled[2];
        assert_eq!(tracker.cluster_ip.to_string(), "10.43.100.10");
        assert_eq!(tracker.protocol, Protocol::Http);
        assert_eq!(tracker.host(), "tracker.fleet.svc.cluster.local");
        let endpoints: Vec<String> = tracker
            .endpoints
            .iter()
            .map(|e| format!("{}@{}", e.address, e.node))
            .collect();
        assert_eq!(endpoints, ["10.42.3.7:8080@pi-c"]);
        // A named targetPort resolves through the slice's port of the same name.
        assert_eq!(
            compiled[0].endpoints[0].address.to_string(),
            "10.42.2.4:9999"
        );
        assert_eq!(compiled[0].protocol, Protocol::Auto);
    }

    #[test]
    fn k3s_servers_are_its_control_plane_nodes_ready_or_not() {
        let nodes = list::<Node>(
            r#"{"items":[
              {"metadata":{"name":"pi-a","labels":{"node-role.kubernetes.io/control-plane":"true"}}},
              {"metadata":{"name":"pi-d","labels":{}}},
              {"metadata":{"name":"pi-b","labels":{"node-role.kubernetes.io/control-plane":"true"}}}]}"#,
        );
        let servers: Vec<String> = servers_of(&nodes).into_iter().collect();
        assert_eq!(servers, ["pi-a", "pi-b"]);
    }

    #[test]
    fn a_missing_kubeconfig_is_no_services_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut client = Client {
            path: dir.path().join("kubeconfig"),
            loaded: None,
        };
        assert!(client.current().expect("no file is fine").is_none());
        std::fs::write(dir.path().join("kubeconfig"), "clusters: [").expect("write");
        let err = client.current().expect_err("not a kubeconfig");
        assert!(err.to_string().contains("kubeconfig"), "{err}");
    }

    #[test]
    fn routes_of_meshed_namespaces_are_carried_and_the_others_named_as_left_out() {
        let namespaces = list::<Namespace>(
            r#"{"items":[{"metadata":{"name":"fleet","labels":{"pimesh.dev/mesh":"enabled"}}},
                {"metadata":{"name":"other"}}]}"#,
        );
        let service = |name: &str| KubeService {
            name: name.to_owned(),
            cluster_ip: "10.43.100.10".parse().expect("ip"),
            port: 80,
            protocol: Protocol::Http,
            endpoints: Vec::new(),
        };
        let services = [service("tracker.fleet"), service("tracker-canary.fleet")];
        let route = |namespace: &str, name: &str, backend: &str| {
            serde_json::json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": "7"},
                "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "tracker"}],
                         "rules": [{"matches": [{"headers": [{"name": "x-canary", "value": "1"}]}],
                                    "backendRefs": [{"name": backend, "port": 80}]},
                                   {"backendRefs": [{"name": "tracker", "port": 80}]}]}})
        };
        let grpc = serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": "by-method", "namespace": "fleet"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "tracker"}],
                     "rules": [{"matches": [{"method": {"service": "fleet.v1.Tracker"}}],
                                "backendRefs": [{"name": "tracker-canary"}]}]}});
        let objects = [
            route("fleet", "canary", "tracker-canary"),
            route("other", "ignored", "tracker-canary"),
            route("fleet", "dangling", "tracker-v9"),
            grpc,
        ];
        let (routes, refused) = compile_routes(&namespaces, &services, &objects);
        let names: Vec<String> = routes
            .iter()
            .map(|r| format!("{}/{}", r.namespace, r.route.name))
            .collect();
        assert_eq!(names, ["fleet/by-method", "fleet/canary"]);
        assert_eq!(
            routes[1].mesh_name(&routes[1].route.service),
            "tracker.fleet"
        );
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].starts_with("httproute fleet/dangling: rules.0.backends.0.service:")
                && refused[0].contains("tracker-v9"),
            "{refused:?}"
        );
    }
}
