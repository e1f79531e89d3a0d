//! The routing table: the site config compiled into what the data path looks up per
//! request — services by name, their split, faults, timeouts, retries and authorization,
//! and a balancer over the nodes each concrete service runs on.
//!
//! A table is immutable once built. A config reload builds a new one and swaps it in; a
//! request or connection keeps the table it started with to the end, so a reload never
//! changes the rules under an open stream. Balancer state (latency estimates, ejections)
//! starts afresh with each table.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use pimesh_schema::cluster::{ClusterConfig, Fault, Protocol, ProxySettings, Service};
use pimesh_schema::kube_services::{KubeMesh, KubeService, CLUSTER_DOMAIN};
use pimesh_schema::routes::Route;
use pimesh_schema::{DnsLabel, SpiffeId};
use tokio::sync::Semaphore;

use super::http_routes::HttpRoutes;
use crate::outbound::balance::Balancer;
use crate::outbound::budget::RetryBudget;
use crate::outbound::metrics::PolicyMetrics;
use crate::telemetry::labels::Direction;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::requests::{RouteMetrics, RouteName};
use crate::telemetry::trace::SpanSink;
use crate::transport::metrics::{TcpMetrics, UpgradeMetrics};

/// Retries allowed per second whatever the traffic, so that a quiet service can retry.
const RETRY_FLOOR_PER_SECOND: u32 = 10;
/// The window over which the retry budget compares retries with requests.
const RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Requests in flight to one service from one proxy's clients; more are answered `503`
/// at once (Envoy's default `max_requests` per cluster). Streams to a peer node run out
/// only past several times this (see `transport::peers`).
pub const MAX_REQUESTS_IN_FLIGHT: usize = 1024;

/// The DNS suffix of mesh names: `<service>.<site>.pimesh`.
pub const MESH_SUFFIX: &str = "pimesh";

/// Where a concrete service runs: a node and that node's proxy inbound address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub node: DnsLabel,
    pub addr: SocketAddr,
}

/// Where the inbound side delivers a service's traffic on this node: `127.0.0.1:<port>`
/// for a service of the site config, a pod's address for a Kubernetes Service.
#[derive(Debug, Clone)]
pub struct App {
    pub addr: SocketAddr,
    /// `addr` as an authority, made once here, not per request.
    pub authority: http::uri::Authority,
}

impl App {
    fn at(addr: SocketAddr) -> Option<App> {
        let authority = http::uri::Authority::try_from(addr.to_string()).ok()?;
        Some(App { addr, authority })
    }
}

/// One service of the site (of its config, or a meshed Kubernetes Service), as the data
/// path needs it.
pub struct ServiceRoute {
    /// The service's name in the site config, or `<service>.<namespace>[:<port>]` for a
    /// Kubernetes Service: the name in metrics, logs and the `pimesh-dst` header.
    pub name: String,
    /// The host name a request or tunnel names when its client gave none:
    /// `<service>.<site>.pimesh`, or `<service>.<namespace>.svc.cluster.local`.
    pub host: String,
    pub protocol: Protocol,
    /// The port the service listens on: at each of its nodes for a site config service,
    /// the Service port (at its cluster IP) for a Kubernetes Service.
    pub port: Option<u16>,
    /// Where the inbound side delivers on this node; empty when the service does not run
    /// here (or, placed here, has no port).
    pub apps: Vec<App>,
    /// The name as the `pimesh-dst` header value that tells the inbound side which
    /// service a request is for.
    pub dst_header: http::HeaderValue,
    /// Weighted backends (apex services); empty when the service is concrete.
    pub split: Vec<(Arc<ServiceRoute>, u32)>,
    split_total: u64,
    pub fault: Option<Fault>,
    /// How long a request waits for its response's head: the service's `timeout`, else
    /// the site's `[proxy] default_timeout`.
    pub timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub retries: u8,
    /// `None`: any identity of the site may call.
    pub allow: Option<Vec<SpiffeId>>,
    /// The nodes with a known address; empty when placement names only unknown nodes.
    pub endpoints: Balancer<Endpoint>,
    /// Requests of this proxy's clients in flight to this (concrete) service, at most
    /// [`MAX_REQUESTS_IN_FLIGHT`]: one service whose answers stall cannot take every
    /// stream of the connections to its nodes from the other services.
    pub in_flight: Arc<Semaphore>,
    pub outbound: RouteMetrics,
    pub inbound: RouteMetrics,
    /// The outbound side's faults and retries.
    pub policy: PolicyMetrics,
    pub tcp_outbound: TcpMetrics,
    pub tcp_inbound: TcpMetrics,
    /// Upgraded HTTP connections (WebSocket, extended CONNECT) from this node's clients.
    pub upgrade_outbound: UpgradeMetrics,
    /// Upgraded HTTP connections delivered to the app on this node.
    pub upgrade_inbound: UpgradeMetrics,
}

impl ServiceRoute {
    /// Chooses the concrete service for one request or connection: a weighted random
    /// backend of the split, or the service itself when it has no split.
    pub fn choose_backend(self: &Arc<Self>) -> Arc<ServiceRoute> {
        if self.split.is_empty() {
            return Arc::clone(self);
        }
        let mut ticket = fastrand::u64(0..self.split_total.max(1));
        for (backend, weight) in &self.split {
            let weight = u64::from(*weight);
            if ticket < weight {
                return Arc::clone(backend);
            }
            ticket -= weight;
        }
        // Unreachable while split_total is the sum of the weights; the last backend is a
        // safe answer either way.
        self.split
            .last()
            .map_or_else(|| Arc::clone(self), |(backend, _)| Arc::clone(backend))
    }

    /// The app on this node that takes the next request or connection: one of `apps` at
    /// random; `None` when the service does not run here.
    pub fn local_app(&self) -> Option<&App> {
        match self.apps.len() {
            0 => None,
            1 => self.apps.first(),
            n => self.apps.get(fastrand::usize(0..n)),
        }
    }

    /// Whether a caller holding `ids` may call this service.
    pub fn allows(&self, ids: &[SpiffeId]) -> bool {
        match &self.allow {
            None => true,
            Some(allowed) => ids.iter().any(|id| allowed.contains(id)),
        }
    }
}

/// The compiled site config, or the empty table before any config arrived.
pub struct RouteTable {
    pub site: Option<DnsLabel>,
    pub settings: ProxySettings,
    /// Shared by every service of the table: retries add at most
    /// `proxy.retry_budget_percent` to the requests sent.
    pub budget: RetryBudget,
    /// Where finished spans go, when `proxy.zipkin_url` is set.
    pub spans: Option<SpanSink>,
    services: HashMap<String, Arc<ServiceRoute>>,
    /// `(node address IP, service port)` → service, for transparently intercepted
    /// connections; `by_port` answers when the address is not a known node's.
    by_addr: HashMap<(IpAddr, u16), Arc<ServiceRoute>>,
    by_port: HashMap<u16, Arc<ServiceRoute>>,
    /// `local_port` → service: the proxy listens on each.
    pub local_bindings: Vec<(u16, Arc<ServiceRoute>)>,
    /// Service name → its `[[routes]]`; a service absent here sends every request to
    /// itself (or its split).
    http_routes: HashMap<String, HttpRoutes>,
}

impl RouteTable {
    pub fn empty() -> RouteTable {
        let settings = ProxySettings::default();
        RouteTable {
            site: None,
            budget: retry_budget(&settings),
            settings,
            spans: None,
            services: HashMap::new(),
            by_addr: HashMap::new(),
            by_port: HashMap::new(),
            local_bindings: Vec::new(),
            http_routes: HashMap::new(),
        }
    }

    /// Compiles `config` and the meshed Kubernetes Services and routes `kube` for the
    /// proxy of `node` (`None` before the proxy has an identity: then no service counts
    /// as local). `own_inbound` is where this proxy takes mesh traffic: the address of its
    /// own node when the config does not list it. A Kubernetes Service whose name is also
    /// a service of the config is left out, and so are its routes: the config's wins. A
    /// Kubernetes route applies to every port of its parent Service (a `parentRef`
    /// without a port); a backend is the Service of that name in the route's namespace,
    /// on the same port when it has several.
    pub fn build(
        config: &ClusterConfig,
        kube: &KubeMesh,
        node: Option<&DnsLabel>,
        own_inbound: SocketAddr,
        metrics: &Metrics,
        spans: Option<SpanSink>,
    ) -> RouteTable {
        let address_of = |name: &DnsLabel| -> Option<SocketAddr> {
            match config.nodes.get(name) {
                Some(entry) => Some(entry.address.0),
                None if Some(name) == node => Some(own_inbound),
                None => None,
            }
        };
        let site = config.site.clone();
        let compile_service = |name: &DnsLabel,
                               service: &Service,
                               split: Vec<(Arc<ServiceRoute>, u32)>|
         -> Arc<ServiceRoute> {
            let endpoints = service
                .nodes
                .iter()
                .filter_map(|n| {
                    address_of(n).map(|addr| Endpoint {
                        node: n.clone(),
                        addr,
                    })
                })
                .collect();
            let local = node.is_some_and(|n| service.nodes.contains(n));
            let apps = service
                .port
                .filter(|_| local)
                .and_then(|port| App::at(SocketAddr::from((Ipv4Addr::LOCALHOST, port))))
                .into_iter()
                .collect();
            Arc::new(ServiceRoute {
                host: format!("{name}.{site}.{MESH_SUFFIX}"),
                protocol: service.protocol,
                port: service.port,
                apps,
                fault: service.fault.clone(),
                timeout: service
                    .timeout
                    .map_or(config.proxy.default_timeout.0, |d| d.0),
                idle_timeout: service.idle_timeout.map(|d| d.0),
                retries: service.retries,
                allow: service
                    .allow
                    .as_ref()
                    .map(|ids| ids.iter().map(|id| id.0.clone()).collect()),
                ..ServiceRoute::bare(
                    RouteName {
                        namespace: site.as_str(),
                        service: name.as_str(),
                    },
                    split,
                    endpoints,
                    metrics,
                )
            })
        };
        // Concrete services first: the schema guarantees split backends are concrete.
        let mut services: HashMap<String, Arc<ServiceRoute>> = config
            .services
            .iter()
            .filter(|(_, s)| s.split.is_empty())
            .map(|(name, service)| {
                (
                    name.as_str().to_owned(),
                    compile_service(name, service, Vec::new()),
                )
            })
            .collect();
        for (name, service) in config.services.iter().filter(|(_, s)| !s.split.is_empty()) {
            let split: Vec<_> = service
                .split
                .iter()
                .filter(|b| b.weight > 0)
                .filter_map(|b| {
                    services
                        .get(b.service.as_str())
                        .map(|route| (Arc::clone(route), b.weight))
                })
                .collect();
            let apex = compile_service(name, service, split);
            services.insert(name.as_str().to_owned(), apex);
        }
        let mut by_addr = HashMap::new();
        let mut by_port = HashMap::new();
        let mut local_bindings = Vec::new();
        for (name, service) in &config.services {
            let Some(route) = services.get(name.as_str()) else {
                continue;
            };
            if let Some(port) = service.port {
                by_port.entry(port).or_insert_with(|| Arc::clone(route));
                for node in &service.nodes {
                    if let Some(addr) = address_of(node) {
                        by_addr.insert((addr.ip(), port), Arc::clone(route));
                    }
                }
            }
            if let Some(port) = service.local_port {
                local_bindings.push((port, Arc::clone(route)));
            }
        }
        let mut kube_names = Vec::new();
        for kube_service in &kube.services {
            if services.contains_key(&kube_service.name) {
                continue;
            }
            kube_names.push((kube_service.name.clone(), kube_service.port));
            let route =
                compile_kube_service(kube_service, node, &address_of, &config.proxy, metrics);
            by_addr.insert(
                (kube_service.cluster_ip, kube_service.port),
                Arc::clone(&route),
            );
            services.insert(kube_service.name.clone(), route);
        }
        let mut http_routes = HashMap::new();
        let routed: std::collections::BTreeSet<&str> =
            config.routes.iter().map(|r| r.service.as_str()).collect();
        for service in routed {
            let routes = config
                .routes
                .iter()
                .filter(|r| r.service.as_str() == service);
            let compiled = HttpRoutes::compile(
                routes,
                service,
                |name| services.get(name).cloned(),
                &metrics.outbound,
            );
            http_routes.insert(service.to_owned(), compiled);
        }
        for (name, port) in &kube_names {
            let base = name.split(':').next().unwrap_or(name);
            let routes: Vec<(&Route, &DnsLabel)> = kube
                .routes
                .iter()
                .filter(|r| r.mesh_name(&r.route.service) == base)
                .map(|r| (&r.route, &r.namespace))
                .collect();
            let Some((_, namespace)) = routes.first() else {
                continue;
            };
            let compiled = HttpRoutes::compile(
                routes.iter().map(|(route, _)| *route),
                name,
                |backend| {
                    let base = format!("{backend}.{namespace}");
                    services
                        .get(&base)
                        .or_else(|| services.get(&format!("{base}:{port}")))
                        .cloned()
                },
                &metrics.outbound,
            );
            http_routes.insert(name.clone(), compiled);
        }
        RouteTable {
            site: Some(config.site.clone()),
            settings: config.proxy.clone(),
            budget: retry_budget(&config.proxy),
            spans,
            services,
            by_addr,
            by_port,
            local_bindings,
            http_routes,
        }
    }

    /// The routes of service `name`, when it has any.
    pub fn http_routes(&self, name: &str) -> Option<&HttpRoutes> {
        // Most sites have no routes: no hashing of the name on every request then.
        if self.http_routes.is_empty() {
            return None;
        }
        self.http_routes.get(name)
    }

    /// The service an HTTP authority names: `<service>`, `<service>.<site>.pimesh`, either
    /// with an optional `:port`.
    pub fn by_authority(&self, authority: &str) -> Option<&Arc<ServiceRoute>> {
        let host = strip_port(authority);
        if let Some(service) = host
            .trim_end_matches('.')
            .strip_suffix(CLUSTER_DOMAIN)
            .and_then(|rest| rest.strip_suffix('.'))
        {
            return self.by_name(service);
        }
        let name = match (&self.site, host.split_once('.')) {
            (_, None) => host,
            (Some(site), Some((service, rest))) => {
                let (site_part, suffix) = rest.split_once('.')?;
                if !site_part.eq_ignore_ascii_case(site.as_str())
                    || !suffix
                        .trim_end_matches('.')
                        .eq_ignore_ascii_case(MESH_SUFFIX)
                {
                    return None;
                }
                service
            }
            (None, Some(_)) => return None,
        };
        self.by_name(name)
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<ServiceRoute>> {
        self.services
            .get(name)
            .or_else(|| self.services.get(&name.to_ascii_lowercase()))
    }

    /// The service a transparently intercepted connection was headed for.
    pub fn by_original_dst(&self, dst: SocketAddr) -> Option<&Arc<ServiceRoute>> {
        self.by_addr
            .get(&(dst.ip(), dst.port()))
            .or_else(|| self.by_port.get(&dst.port()))
    }
}

impl ServiceRoute {
    /// A route named `name` with the given split and endpoints, its metrics, and every
    /// policy at its default; the caller fills in the rest.
    fn bare(
        route: RouteName<'_>,
        split: Vec<(Arc<ServiceRoute>, u32)>,
        endpoints: Vec<Endpoint>,
        metrics: &Metrics,
    ) -> ServiceRoute {
        let name = route.service;
        ServiceRoute {
            name: name.to_owned(),
            host: name.to_owned(),
            protocol: Protocol::Auto,
            port: None,
            apps: Vec::new(),
            dst_header: crate::transport::mesh_http::header_value(name),
            split_total: split.iter().map(|(_, w)| u64::from(*w)).sum(),
            split,
            fault: None,
            timeout: ProxySettings::default().default_timeout.0,
            idle_timeout: None,
            retries: 0,
            allow: None,
            endpoints: Balancer::new(endpoints),
            in_flight: Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT)),
            outbound: metrics.requests.route(Direction::Outbound, route),
            inbound: metrics.requests.route(Direction::Inbound, route),
            policy: metrics.outbound.route(route),
            tcp_outbound: metrics.connections.tcp(Direction::Outbound, route),
            tcp_inbound: metrics.connections.tcp(Direction::Inbound, route),
            upgrade_outbound: metrics.connections.upgrades(Direction::Outbound, route),
            upgrade_inbound: metrics.connections.upgrades(Direction::Inbound, route),
        }
    }
}

/// A meshed Kubernetes Service as a route: balanced over the nodes its endpoints run on,
/// delivered on this node to its endpoints here, under the site's default timeout.
fn compile_kube_service(
    service: &KubeService,
    node: Option<&DnsLabel>,
    address_of: &dyn Fn(&DnsLabel) -> Option<SocketAddr>,
    settings: &ProxySettings,
    metrics: &Metrics,
) -> Arc<ServiceRoute> {
    let mut endpoints: Vec<Endpoint> = Vec::new();
    for endpoint in &service.endpoints {
        if endpoints.iter().any(|e| e.node == endpoint.node) {
            continue;
        }
        if let Some(addr) = address_of(&endpoint.node) {
            endpoints.push(Endpoint {
                node: endpoint.node.clone(),
                addr,
            });
        }
    }
    let apps: Vec<App> = service
        .endpoints
        .iter()
        .filter(|e| Some(&e.node) == node)
        .filter_map(|e| App::at(e.address))
        .collect();
    Arc::new(ServiceRoute {
        host: service.host(),
        protocol: service.protocol,
        port: Some(service.port),
        apps,
        timeout: settings.default_timeout.0,
        ..ServiceRoute::bare(
            RouteName {
                namespace: service.namespace(),
                service: &service.name,
            },
            Vec::new(),
            endpoints,
            metrics,
        )
    })
}

/// `host` of `host:port` (and of `[v6]:port`); the input unchanged when it has no port.
fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map_or(authority, |(host, _)| host);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

fn retry_budget(settings: &ProxySettings) -> RetryBudget {
    RetryBudget::new(
        settings.retry_budget_percent,
        RETRY_FLOOR_PER_SECOND,
        RETRY_BUDGET_WINDOW,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn table(text: &str, node: &str) -> RouteTable {
        table_with(text, &[], node)
    }

    fn table_with(text: &str, kube: &[KubeService], node: &str) -> RouteTable {
        let kube = KubeMesh {
            services: kube.to_vec(),
            routes: Vec::new(),
        };
        table_with_routes(text, &kube, node)
    }

    fn table_with_routes(text: &str, kube: &KubeMesh, node: &str) -> RouteTable {
        let config = ClusterConfig::parse(Path::new("cluster.toml"), text)
            .unwrap_or_else(|err| panic!("{err}"));
        let node = DnsLabel::try_from(node.to_owned()).expect("label");
        RouteTable::build(
            &config,
            kube,
            Some(&node),
            "127.0.0.1:4143".parse().expect("addr"),
            &Metrics::new(),
            None,
        )
    }

    const SITE: &str = r#"
site = "depot"
[nodes.a]
address = "10.0.0.1"
[nodes.b]
address = "10.0.0.2:5000"
[services.web]
port = 8080
nodes = ["a", "b"]
local_port = 18080
[services.stable]
port = 8082
nodes = ["b"]
[services.canary]
port = 8083
nodes = ["c"]
[services.staff]
split = [{ service = "stable", weight = 90 }, { service = "canary", weight = 10 }]
"#;

    #[test]
    fn authorities_name_services_with_or_without_the_mesh_suffix() {
        let table = table(SITE, "a");
        for authority in ["web", "web:80", "web.depot.pimesh", "WEB.depot.pimesh:8080"] {
            let route = table.by_authority(authority).expect(authority);
            assert_eq!(route.name.as_str(), "web");
        }
        for authority in ["web.other.pimesh", "web.depot.example", "nope", "web.depot"] {
            assert!(table.by_authority(authority).is_none(), "{authority}");
        }
    }

    #[test]
    fn endpoints_come_from_node_addresses() {
        let table = table(SITE, "a");
        let web = table.by_name("web").expect("web");
        assert_eq!(
            web.local_app().map(|app| app.addr),
            Some("127.0.0.1:8080".parse().expect("addr"))
        );
        assert_eq!(web.endpoints.len(), 2);
        let stable = table.by_name("stable").expect("stable");
        assert!(stable.local_app().is_none());
        let pick = stable.endpoints.pick().expect("one endpoint");
        assert_eq!(pick.endpoint.addr, "10.0.0.2:5000".parse().expect("addr"));
        // Node c has no address: no endpoints, but the service is known.
        assert_eq!(table.by_name("canary").expect("canary").endpoints.len(), 0);
        assert_eq!(table.local_bindings.len(), 1);
        assert_eq!(
            table
                .by_original_dst("10.0.0.2:8082".parse().expect("addr"))
                .map(|r| r.name.as_str()),
            Some("stable")
        );
    }

    #[test]
    fn the_split_follows_the_weights() {
        let table = table(SITE, "a");
        let staff = table.by_name("staff").expect("staff");
        let canary = (0..10_000)
            .filter(|_| staff.choose_backend().name.as_str() == "canary")
            .count();
        // 10 % of 10 000: mean 1000, standard deviation 30; 6 sigma either side.
        assert!((820..=1180).contains(&canary), "{canary}");
        let web = table.by_name("web").expect("web");
        assert_eq!(web.choose_backend().name.as_str(), "web");
    }

    fn kube_service(json: &str) -> KubeService {
        serde_json::from_str(json).expect("a KubeService")
    }

    #[test]
    fn kube_services_are_found_by_cluster_ip_and_cluster_name_and_delivered_to_local_pods() {
        let tracker = kube_service(
            r#"{"name":"tracker.fleet","cluster_ip":"10.43.100.10","port":80,"protocol":"http",
                "endpoints":[{"node":"a","address":"10.42.0.7:8080"},
                             {"node":"b","address":"10.42.1.7:8080"},
                             {"node":"b","address":"10.42.1.8:8080"},
                             {"node":"z","address":"10.42.9.9:8080"}]}"#,
        );
        // A Kubernetes Service named like a config service does not replace it.
        let shadow = kube_service(
            r#"{"name":"web","cluster_ip":"10.43.0.2","port":80,"protocol":"auto","endpoints":[]}"#,
        );
        let on_b = table_with(SITE, &[tracker.clone(), shadow.clone()], "b");
        let route = on_b
            .by_original_dst("10.43.100.10:80".parse().expect("addr"))
            .expect("by cluster IP");
        assert_eq!(route.name, "tracker.fleet");
        assert_eq!(route.host, "tracker.fleet.svc.cluster.local");
        // One endpoint per node with an address (z has none).
        assert_eq!(route.endpoints.len(), 2);
        let mut local: Vec<String> = route.apps.iter().map(|a| a.addr.to_string()).collect();
        local.sort();
        assert_eq!(local, ["10.42.1.7:8080", "10.42.1.8:8080"]);
        assert!(on_b
            .by_authority("tracker.fleet.svc.cluster.local:80")
            .is_some());
        assert!(on_b
            .by_original_dst("10.43.0.2:80".parse().expect("addr"))
            .is_none());
        let on_c = table_with(SITE, &[tracker], "c");
        let route = on_c.by_name("tracker.fleet").expect("by name");
        assert!(route.local_app().is_none(), "no pod of it runs on c");
    }

    #[test]
    fn route_series_carry_the_namespace_and_tls_labels_linkerd_dashboards_select_on() {
        let tracker = kube_service(
            r#"{"name":"tracker.fleet:8080","cluster_ip":"10.43.100.10","port":8080,
                "protocol":"http","endpoints":[]}"#,
        );
        let config = ClusterConfig::parse(Path::new("cluster.toml"), SITE).expect("config");
        let metrics = Metrics::new();
        let kube = KubeMesh {
            services: vec![tracker],
            routes: Vec::new(),
        };
        let node = DnsLabel::try_from("b".to_owned()).expect("label");
        let own: SocketAddr = "127.0.0.1:4143".parse().expect("addr");
        let table = RouteTable::build(&config, &kube, Some(&node), own, &metrics, None);
        for name in ["web", "tracker.fleet:8080"] {
            table.by_name(name).expect("a route").inbound.request();
        }
        let text = metrics.encode();
        for series in [
            r#"request_total{direction="inbound",dst_service="web",namespace="depot",tls="true"} 1"#,
            r#"request_total{direction="inbound",dst_service="tracker.fleet:8080",namespace="fleet",tls="true"} 1"#,
        ] {
            assert!(text.contains(series), "{series} not in:\n{text}");
        }
    }

    #[test]
    fn kube_routes_decide_for_every_port_of_their_parent_with_backends_of_its_namespace() {
        let service = |name: &str, ip: &str, port: u16| {
            kube_service(&format!(
                r#"{{"name":"{name}","cluster_ip":"{ip}","port":{port},"protocol":"http",
                    "endpoints":[{{"node":"a","address":"10.42.0.7:8080"}}]}}"#
            ))
        };
        let route: pimesh_schema::kube_services::KubeRoute = serde_json::from_str(
            r#"{"namespace":"fleet","route":{"name":"canary","service":"tracker",
                "rules":[{"matches":[{"headers":{"x-canary":"1"}}],
                          "backends":[{"service":"tracker-canary"}]},
                         {"backends":[{"service":"tracker"}]}]}}"#,
        )
        .expect("a KubeRoute");
        let kube = KubeMesh {
            services: vec![
                service("tracker.fleet:80", "10.43.100.10", 80),
                service("tracker.fleet:81", "10.43.100.10", 81),
                service("tracker-canary.fleet:80", "10.43.100.11", 80),
                service("tracker-canary.fleet:81", "10.43.100.11", 81),
                // The same name in another namespace is not the route's backend.
                service("tracker-canary.shop", "10.43.100.12", 80),
            ],
            routes: vec![route],
        };
        let table = table_with_routes(SITE, &kube, "b");
        for port in [80, 81] {
            let parent_name = format!("tracker.fleet:{port}");
            let parent = table.by_name(&parent_name).expect("the parent");
            let routes = table.http_routes(&parent_name).expect("routed");
            let request = |canary: bool| {
                let mut builder = http::Request::get("/positions");
                if canary {
                    builder = builder.header("x-canary", "1");
                }
                builder.body(()).expect("request").into_parts().0
            };
            let chosen = routes
                .select(&request(true))
                .expect("the canary rule")
                .choose(parent);
            assert_eq!(chosen.name, format!("tracker-canary.fleet:{port}"));
            let chosen = routes
                .select(&request(false))
                .expect("the default rule")
                .choose(parent);
            assert_eq!(chosen.name, parent_name);
        }
        assert!(table.http_routes("tracker-canary.fleet:80").is_none());
    }
}
