//! The Kubernetes objects the fixture serves besides Nodes: Namespaces (`v1`), Services
//! (`v1`) and EndpointSlices (`discovery.k8s.io/v1`), as the manifests (see `manifests`)
//! create them. Checked and defaulted as kube-apiserver does, in part:
//! - every object: `metadata.name` required; a namespaced object's namespace defaults to
//!   `default`; labels and annotations kept (string values only); `uid`,
//!   `creationTimestamp` and `resourceVersion` (a store-wide counter) added;
//! - Namespace: label `kubernetes.io/metadata.name`, `spec.finalizers`, `status.phase`;
//! - Service: ClusterIP only; `clusterIP` kept (must be in the service CIDR and free) or
//!   allocated (hash of namespace/name, never the network, `.1` or broadcast address),
//!   `clusterIPs`, port `protocol` TCP, `targetPort` = `port`, `sessionAffinity` None,
//!   single-stack IPv4;
//! - EndpointSlice: `addressType` and each endpoint's `addresses` required; port
//!   `protocol` TCP and `name` "" by default; the rest kept as given;
//! - CustomResourceDefinition (`apiextensions.k8s.io/v1`): `spec.group`,
//!   `spec.names.plural` and `spec.scope` required, the name `<plural>.<group>`;
//! - HTTPRoute and GRPCRoute (`gateway.networking.k8s.io/v1`, custom resources: K3s ships
//!   no Gateway API CRDs): `spec` kept as given (kube-apiserver would check it against
//!   the CRD's schema; the fixture does not), served — get and list, with `kind` and
//!   `apiVersion` in list items as for every custom resource — only while the CRD
//!   `<resource>.gateway.networking.k8s.io` is stored, 404 before, as without the CRDs.
//!
//! The store starts with the four system namespaces and the `kubernetes` Service. An
//! object whose namespace has no Namespace object is stored all the same (kube-apiserver
//! would refuse it). Deleting a Namespace deletes the objects in it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::{json, Map, Value};

/// Namespaces every cluster has; kube-apiserver refuses to delete them.
const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-node-lease", "kube-public", "kube-system"];

/// The kinds the fixture stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Service,
    EndpointSlice,
    CustomResourceDefinition,
    HttpRoute,
    GrpcRoute,
}

impl Kind {
    fn named(kind: &str) -> Option<Kind> {
        match kind {
            "Namespace" => Some(Kind::Namespace),
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "CustomResourceDefinition" => Some(Kind::CustomResourceDefinition),
            "HTTPRoute" => Some(Kind::HttpRoute),
            "GRPCRoute" => Some(Kind::GrpcRoute),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::CustomResourceDefinition => "CustomResourceDefinition",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::CustomResourceDefinition => "apiextensions.k8s.io/v1",
            Kind::HttpRoute | Kind::GrpcRoute => "gateway.networking.k8s.io/v1",
            Kind::Namespace | Kind::Service => "v1",
        }
    }

    /// The resource name in URLs and `NotFound` messages.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::CustomResourceDefinition => "customresourcedefinitions",
            Kind::HttpRoute => "httproutes",
            Kind::GrpcRoute => "grpcroutes",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::CustomResourceDefinition)
    }

    /// The CustomResourceDefinition a custom resource is served under; `None` for the
    /// kinds kube-apiserver serves itself.
    pub fn definition(self) -> Option<String> {
        match self {
            Kind::HttpRoute | Kind::GrpcRoute => {
                Some(format!("{}.gateway.networking.k8s.io", self.resource()))
            }
            _ => None,
        }
    }
}

/// A checked and defaulted object, without the metadata the store adds.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    kind: Kind,
    /// Empty for a Namespace.
    namespace: String,
    name: String,
    value: Value,
}

/// What a manifest document is.
#[derive(Debug)]
pub enum Parsed {
    Object(Object),
    /// A kind the fixture does not store.
    Unsupported(String),
}

/// Why a document is not a valid object: the field and what is wrong with it.
#[derive(Debug, PartialEq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Checks and defaults one manifest document.
pub fn parse(doc: Value, cidr: &Cidr) -> Result<Parsed, Invalid> {
    let Value::Object(doc) = doc else {
        return Err(invalid("(document)", "not an object"));
    };
    let text = |key: &str| {
        doc.get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let kind_name = text("kind").ok_or_else(|| invalid("kind", "Required value"))?;
    let api_version = text("apiVersion").ok_or_else(|| invalid("apiVersion", "Required value"))?;
    let Some(kind) = Kind::named(kind_name) else {
        return Ok(Parsed::Unsupported(kind_name.to_owned()));
    };
    if api_version != kind.api_version() {
        return Err(invalid(
            "apiVersion",
            format!("the fixture serves {kind_name} as {}", kind.api_version()),
        ));
    }
    let meta = doc
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("metadata", "Required value"))?;
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("metadata.name", "Required value"))?
        .to_owned();
    let name_ok = match kind {
        Kind::Namespace | Kind::Service => dns_label(&name),
        _ => dns_subdomain(&name),
    };
    if !name_ok {
        return Err(invalid("metadata.name", format!("invalid name {name:?}")));
    }
    let mut metadata = Map::new();
    metadata.insert("name".into(), name.clone().into());
    let namespace = if kind.namespaced() {
        let namespace = match meta.get("namespace") {
            None | Some(Value::Null) => "default",
            Some(Value::String(ns)) if dns_label(ns) => ns.as_str(),
            Some(other) => {
                return Err(invalid("metadata.namespace", format!("invalid {other}")));
            }
        };
        metadata.insert("namespace".into(), namespace.into());
        namespace.to_owned()
    } else {
        String::new()
    };
    for key in ["labels", "annotations"] {
        match meta.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) if map.values().all(Value::is_string) => {
                metadata.insert(key.into(), Value::Object(map.clone()));
            }
            Some(_) => return Err(invalid(format!("metadata.{key}"), "values must be strings")),
        }
    }
    if kind == Kind::Namespace {
        let labels = metadata.entry("labels").or_insert_with(|| json!({}));
        labels["kubernetes.io/metadata.name"] = name.clone().into();
    }
    let mut object = Map::new();
    object.insert("metadata".into(), Value::Object(metadata));
    match kind {
        Kind::Namespace => {
            object.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
            object.insert("status".into(), json!({"phase": "Active"}));
        }
        Kind::Service => service(&doc, &mut object, cidr)?,
        Kind::EndpointSlice => endpoint_slice(&doc, &mut object)?,
        Kind::CustomResourceDefinition => definition(&doc, &name, &mut object)?,
        Kind::HttpRoute | Kind::GrpcRoute => {
            let spec = doc
                .get("spec")
                .filter(|spec| spec.is_object())
                .ok_or_else(|| invalid("spec", "Required value"))?;
            object.insert("spec".into(), spec.clone());
        }
    }
    Ok(Parsed::Object(Object {
        kind,
        namespace,
        name,
        value: Value::Object(object),
    }))
}

/// A CustomResourceDefinition: its group, plural and scope, and the name they make.
fn definition(
    doc: &Map<String, Value>,
    name: &str,
    object: &mut Map<String, Value>,
) -> Result<(), Invalid> {
    let spec = doc
        .get("spec")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("spec", "Required value"))?;
    let text = |value: Option<&Value>, field: &str| {
        value
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| invalid(field, "Required value"))
    };
    let group = text(spec.get("group"), "spec.group")?;
    let plural = text(
        spec.get("names").and_then(|n| n.get("plural")),
        "spec.names.plural",
    )?;
    let scope = text(spec.get("scope"), "spec.scope")?;
    if scope != "Namespaced" && scope != "Cluster" {
        return Err(invalid(
            "spec.scope",
            format!("Unsupported value {scope:?}"),
        ));
    }
    if name != format!("{plural}.{group}") {
        return Err(invalid(
            "metadata.name",
            format!("must be spec.names.plural+\".\"+spec.group: {plural}.{group}"),
        ));
    }
    object.insert("spec".into(), Value::Object(spec.clone()));
    Ok(())
}

fn service(
    doc: &Map<String, Value>,
    object: &mut Map<String, Value>,
    cidr: &Cidr,
) -> Result<(), Invalid> {
    let mut spec = doc
        .get("spec")
        .and_then(Value::as_object)
        .cloned()
        .ok_or_else(|| invalid("spec", "Required value"))?;
    if *spec.entry("type").or_insert_with(|| "ClusterIP".into()) != "ClusterIP" {
        return Err(invalid(
            "spec.type",
            "the fixture serves only ClusterIP Services",
        ));
    }
    let given = spec
        .get("clusterIP")
        .or_else(|| spec.get("clusterIPs").and_then(|ips| ips.get(0)))
        .cloned();
    match given.as_ref().map(|ip| (ip, ip.as_str())) {
        None | Some((_, Some(""))) => {
            // Allocated by the store.
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
        }
        Some((_, Some("None"))) => {
            spec.insert("clusterIP".into(), "None".into());
            spec.insert("clusterIPs".into(), json!(["None"]));
        }
        Some((ip, text)) => {
            let usable = text
                .and_then(|t| t.parse::<Ipv4Addr>().ok())
                .is_some_and(|ip| cidr.usable(ip));
            if !usable {
                return Err(invalid(
                    "spec.clusterIP",
                    format!("{ip} is not an IP address in the service CIDR {cidr}"),
                ));
            }
            spec.insert("clusterIP".into(), ip.clone());
            spec.insert("clusterIPs".into(), json!([ip]));
        }
    }
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    match spec.get_mut("ports") {
        Some(Value::Array(ports)) if !ports.is_empty() => service_ports(ports)?,
        None if headless => {}
        _ => return Err(invalid("spec.ports", "Required value")),
    }
    for (key, value) in [
        ("sessionAffinity", json!("None")),
        ("ipFamilies", json!(["IPv4"])),
        ("ipFamilyPolicy", json!("SingleStack")),
        ("internalTrafficPolicy", json!("Cluster")),
    ] {
        spec.entry(key).or_insert(value);
    }
    object.insert("spec".into(), Value::Object(spec));
    object.insert("status".into(), json!({"loadBalancer": {}}));
    Ok(())
}

fn service_ports(ports: &mut [Value]) -> Result<(), Invalid> {
    let several = ports.len() > 1;
    let mut names = BTreeSet::new();
    for (i, port) in ports.iter_mut().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let port = port
            .as_object_mut()
            .ok_or_else(|| invalid(format!("spec.ports[{i}]"), "not an object"))?;
        let number =
            port_number(port.get("port")).ok_or_else(|| invalid(field("port"), PORT_RANGE))?;
        protocol(port, &field("protocol"))?;
        let target = port.get("targetPort").cloned().unwrap_or(Value::Null);
        let default = match &target {
            Value::Null => true,
            Value::Number(n) if n.as_u64() == Some(0) => true,
            Value::String(s) if s.is_empty() => true,
            Value::Number(_) if port_number(Some(&target)).is_some() => false,
            Value::String(s) if service_port_name(s) => false,
            other => return Err(invalid(field("targetPort"), format!("invalid {other}"))),
        };
        if default {
            port.insert("targetPort".into(), number.into());
        }
        match port.get("name") {
            None | Some(Value::Null) if several => {
                return Err(invalid(field("name"), "Required value"))
            }
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if dns_label(s) || (s.is_empty() && !several) => {
                if !names.insert(s.clone()) {
                    return Err(invalid(field("name"), format!("Duplicate value {s:?}")));
                }
            }
            Some(other) => return Err(invalid(field("name"), format!("invalid {other}"))),
        }
    }
    Ok(())
}

fn endpoint_slice(
    doc: &Map<String, Value>,
    object: &mut Map<String, Value>,
) -> Result<(), Invalid> {
    let family = doc
        .get("addressType")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("addressType", "Required value"))?;
    let address_ok = |a: &str| match family {
        "IPv4" => a.parse::<Ipv4Addr>().is_ok(),
        "IPv6" => a.parse::<Ipv6Addr>().is_ok(),
        _ => dns_subdomain(a),
    };
    if !["IPv4", "IPv6", "FQDN"].contains(&family) {
        return Err(invalid(
            "addressType",
            format!("Unsupported value {family:?}"),
        ));
    }
    let mut endpoints = doc.get("endpoints").cloned().unwrap_or(Value::Null);
    if let Some(list) = endpoints.as_array_mut() {
        for (i, endpoint) in list.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses");
            let addresses = endpoint
                .get("addresses")
                .and_then(Value::as_array)
                .filter(|a| (1..=100).contains(&a.len()))
                .ok_or_else(|| invalid(field.clone(), "must have 1 to 100 addresses"))?;
            for address in addresses {
                if !address.as_str().is_some_and(address_ok) {
                    return Err(invalid(
                        field,
                        format!("{address} is not a valid {family} address"),
                    ));
                }
            }
        }
    } else if !endpoints.is_null() {
        return Err(invalid("endpoints", "must be a list"));
    }
    let mut ports = doc.get("ports").cloned().unwrap_or(Value::Null);
    if let Some(list) = ports.as_array_mut() {
        for (i, port) in list.iter_mut().enumerate() {
            let field = |f: &str| format!("ports[{i}].{f}");
            let port = port
                .as_object_mut()
                .ok_or_else(|| invalid(format!("ports[{i}]"), "not an object"))?;
            if !matches!(port.get("port"), None | Some(Value::Null))
                && port_number(port.get("port")).is_none()
            {
                return Err(invalid(field("port"), PORT_RANGE));
            }
            protocol(port, &field("protocol"))?;
            port.entry("name").or_insert_with(|| "".into());
        }
    } else if !ports.is_null() {
        return Err(invalid("ports", "must be a list"));
    }
    object.insert("addressType".into(), family.into());
    object.insert("endpoints".into(), endpoints);
    object.insert("ports".into(), ports);
    Ok(())
}

const PORT_RANGE: &str = "must be between 1 and 65535, inclusive";

fn port_number(value: Option<&Value>) -> Option<u64> {
    value?.as_u64().filter(|p| (1..=65_535).contains(p))
}

/// Defaults `protocol` to TCP and checks it.
fn protocol(port: &mut Map<String, Value>, field: &str) -> Result<(), Invalid> {
    let protocol = port.entry("protocol").or_insert_with(|| "TCP".into());
    if protocol
        .as_str()
        .is_some_and(|p| ["TCP", "UDP", "SCTP"].contains(&p))
    {
        Ok(())
    } else {
        Err(invalid(field, format!("Unsupported value {protocol}")))
    }
}

/// An RFC 1123 label: 1 to 63 lowercase letters, digits and `-`, alphanumeric at both ends.
fn dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub(crate) fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

/// An IANA service name (a named `targetPort`): up to 15 characters, a letter among them.
fn service_port_name(s: &str) -> bool {
    dns_label(s) && s.len() <= 15 && s.bytes().any(|b| b.is_ascii_lowercase()) && !s.contains("--")
}

/// An IPv4 service CIDR (`service-cidr`; K3s's default is 10.43.0.0/16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    base: u32,
    prefix: u32,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl Cidr {
    /// The first IPv4 CIDR of the `service-cidr` values (each may be a comma-separated
    /// dual-stack pair), or 10.43.0.0/16.
    pub fn from_flag(values: &[String]) -> Result<Cidr, String> {
        let mut cidrs = values
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty());
        let Some(first) = cidrs.clone().next() else {
            return Ok(Cidr {
                base: 0x0a2b_0000,
                prefix: 16,
            });
        };
        cidrs
            .find(|c| !c.contains(':'))
            .map(|c| Cidr::parse(c).ok_or_else(|| format!("invalid service-cidr {c:?}")))
            .unwrap_or_else(|| {
                Err(format!(
                    "the k3s fixture needs an IPv4 service-cidr, not {first:?}"
                ))
            })
    }

    fn parse(text: &str) -> Option<Cidr> {
        let (ip, prefix) = text.split_once('/')?;
        let ip: Ipv4Addr = ip.parse().ok()?;
        let prefix: u32 = prefix.parse().ok().filter(|p| *p <= 30)?;
        let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
        Some(Cidr {
            base: u32::from(ip) & mask,
            prefix,
        })
    }

    fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }

    /// The address `n` past the network address.
    pub fn nth(&self, n: u64) -> Ipv4Addr {
        Ipv4Addr::from(self.base.wrapping_add(u32::try_from(n).unwrap_or(0)))
    }

    /// In the CIDR, and neither its network nor its broadcast address.
    fn usable(&self, ip: Ipv4Addr) -> bool {
        let offset = u64::from(u32::from(ip).wrapping_sub(self.base));
        offset > 0 && offset < self.size() - 1
    }

    /// A free address for `seed` (namespace/name): from its hash on, the first one not
    /// `taken`, never the network, `.1` (the `kubernetes` Service) or broadcast address.
    fn allocate(&self, seed: &str, taken: impl Fn(Ipv4Addr) -> bool) -> Option<Ipv4Addr> {
        let digest = ring::digest::digest(&ring::digest::SHA256, seed.as_bytes());
        let start = digest
            .as_ref()
            .iter()
            .take(8)
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let size = self.size();
        (0..size)
            .map(|i| (start % size + i) % size)
            .filter(|offset| *offset >= 2 && *offset < size - 1)
            .map(|offset| self.nth(offset))
            .find(|ip| !taken(*ip))
    }
}

type Key = (Kind, String, String);

struct Entry {
    /// The AddOn (manifest) that applied it; `None` for the built-in objects.
    addon: Option<String>,
    /// What was applied, to tell an unchanged re-apply.
    applied: Value,
    /// As served.
    object: Value,
}

/// The objects, by kind, namespace and name.
pub struct Store {
    entries: BTreeMap<Key, Entry>,
    version: u64,
    cidr: Cidr,
}

impl Store {
    /// The system namespaces and the `kubernetes` Service (the CIDR's `.1`).
    pub fn new(cidr: Cidr) -> Store {
        let mut store = Store {
            entries: BTreeMap::new(),
            version: 0,
            cidr,
        };
        let mut docs: Vec<Value> = SYSTEM_NAMESPACES
            .iter()
            .map(
                |name| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
            )
            .collect();
        docs.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default",
                "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"clusterIP": cidr.nth(1).to_string(),
                "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}}));
        for doc in docs {
            if let Ok(Parsed::Object(object)) = parse(doc, &cidr) {
                let _ = store.put(None, object);
            }
        }
        store
    }

    /// Applies the objects of AddOn `addon` as K3s's deploy controller does: each object
    /// is created or updated, and the objects `addon` applied before that are not among
    /// them are deleted. The errors, with the index each object came with.
    pub fn apply(&mut self, addon: &str, objects: Vec<(usize, Object)>) -> Vec<(usize, String)> {
        let mut errors = Vec::new();
        let mut applied = BTreeSet::new();
        for (index, object) in objects {
            match self.put(Some(addon), object) {
                Ok(key) => {
                    applied.insert(key);
                }
                Err(err) => errors.push((index, err)),
            }
        }
        let stale: Vec<Key> = self
            .entries
            .iter()
            .filter(|(key, entry)| entry.addon.as_deref() == Some(addon) && !applied.contains(*key))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.delete(&key);
        }
        errors
    }

    fn put(&mut self, addon: Option<&str>, mut object: Object) -> Result<Key, String> {
        let key = (object.kind, object.namespace.clone(), object.name.clone());
        if object.kind == Kind::Service {
            self.assign_ip(&key, &mut object.value)?;
        }
        let addon = addon.map(str::to_owned);
        let (uid, created) = match self.entries.get_mut(&key) {
            Some(entry) if entry.applied == object.value => {
                entry.addon = addon;
                return Ok(key);
            }
            Some(entry) => (
                entry.object["metadata"]["uid"].clone(),
                entry.object["metadata"]["creationTimestamp"].clone(),
            ),
            None => (
                crate::nodes::uuid().into(),
                crate::log::rfc3339(crate::log::now_secs()).into(),
            ),
        };
        self.version += 1;
        let mut served = object.value.clone();
        if let Some(meta) = served.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("uid".into(), uid);
            meta.insert("creationTimestamp".into(), created);
            meta.insert("resourceVersion".into(), self.version.to_string().into());
        }
        self.entries.insert(
            key.clone(),
            Entry {
                addon,
                applied: object.value,
                object: served,
            },
        );
        Ok(key)
    }

    /// Keeps a Service's cluster IP (given, or the one it had) or allocates one.
    fn assign_ip(&self, key: &Key, service: &mut Value) -> Result<(), String> {
        let used: BTreeSet<Ipv4Addr> = self
            .entries
            .iter()
            .filter(|(k, _)| k.0 == Kind::Service && *k != key)
            .filter_map(|(_, e)| e.applied["spec"]["clusterIP"].as_str()?.parse().ok())
            .collect();
        let Some(spec) = service.get_mut("spec").and_then(Value::as_object_mut) else {
            return Ok(());
        };
        let ip = match spec.get("clusterIP").and_then(Value::as_str) {
            Some("None") => return Ok(()),
            Some(ip) => {
                let ip: Ipv4Addr = ip
                    .parse()
                    .map_err(|_| format!("spec.clusterIP: invalid {ip:?}"))?;
                if used.contains(&ip) {
                    return Err(format!(
                        "spec.clusterIP: {ip}: provided IP is already allocated"
                    ));
                }
                ip
            }
            None => {
                let previous = self
                    .entries
                    .get(key)
                    .and_then(|e| {
                        e.applied["spec"]["clusterIP"]
                            .as_str()?
                            .parse::<Ipv4Addr>()
                            .ok()
                    })
                    .filter(|ip| !used.contains(ip));
                match previous {
                    Some(ip) => ip,
                    None => self
                        .cidr
                        .allocate(&format!("{}/{}", key.1, key.2), |ip| used.contains(&ip))
                        .ok_or_else(|| format!("spec.clusterIP: no free IP in {}", self.cidr))?,
                }
            }
        };
        spec.insert("clusterIP".into(), ip.to_string().into());
        spec.insert("clusterIPs".into(), json!([ip.to_string()]));
        Ok(())
    }

    /// Deletes an object; a Namespace takes the objects in it along.
    fn delete(&mut self, key: &Key) {
        if key.0 == Kind::Namespace && SYSTEM_NAMESPACES.contains(&key.2.as_str()) {
            return;
        }
        if self.entries.remove(key).is_some() {
            self.version += 1;
        }
        if key.0 == Kind::Namespace {
            let before = self.entries.len();
            self.entries
                .retain(|k, _| !k.0.namespaced() || k.1 != key.2);
            if self.entries.len() != before {
                self.version += 1;
            }
        }
    }

    /// Whether the API serves `kind`: always, but for a custom resource whose
    /// CustomResourceDefinition is not stored.
    pub fn serves(&self, kind: Kind) -> bool {
        kind.definition().is_none_or(|name| {
            self.entries
                .contains_key(&(Kind::CustomResourceDefinition, String::new(), name))
        })
    }

    /// One object, with its `kind` and `apiVersion`.
    pub fn get(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Option<Value> {
        let key = (
            kind,
            namespace.unwrap_or_default().to_owned(),
            name.to_owned(),
        );
        let mut object = self.entries.get(&key)?.object.clone();
        if let Some(map) = object.as_object_mut() {
            map.insert("kind".into(), kind.name().into());
            map.insert("apiVersion".into(), kind.api_version().into());
        }
        Some(object)
    }

    /// A `<Kind>List` body: the objects of `kind` (in `namespace`, when given) that
    /// `selector` selects, sorted by namespace and name, without `kind`/`apiVersion` of
    /// their own as kube-apiserver serves typed lists (with them, for custom resources).
    pub fn list(&self, kind: Kind, namespace: Option<&str>, selector: &Selector) -> String {
        let items: Vec<Value> = self
            .entries
            .iter()
            .filter(|(key, entry)| {
                key.0 == kind
                    && namespace.is_none_or(|ns| key.1 == ns)
                    && selector.matches(entry.object["metadata"]["labels"].as_object())
            })
            .map(|(_, entry)| {
                let mut object = entry.object.clone();
                if let (Some(_), Some(map)) = (kind.definition(), object.as_object_mut()) {
                    map.insert("kind".into(), kind.name().into());
                    map.insert("apiVersion".into(), kind.api_version().into());
                }
                object
            })
            .collect();
        format!(
            "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{}\"}},\"items\":{}}}",
            kind.name(),
            kind.api_version(),
            self.version,
            Value::Array(items)
        )
    }
}

/// An equality-based label selector: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated,
/// all of which must hold.
#[derive(Debug, PartialEq)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, String> {
        if text.trim().is_empty() {
            return Ok(Selector(Vec::new()));
        }
        let key = |k: &str| {
            let k = k.trim();
            let (prefix, name) = k.rsplit_once('/').unwrap_or(("", k));
            if label_part(name, 1)
                && (prefix.is_empty() || dns_subdomain(prefix))
                && !k.starts_with('/')
            {
                Ok(k.to_owned())
            } else {
                Err(format!(
                    "unable to parse requirement: invalid label key {k:?}"
                ))
            }
        };
        let value = |v: &str| {
            let v = v.trim();
            if label_part(v, 0) {
                Ok(v.to_owned())
            } else {
                Err(format!(
                    "unable to parse requirement: invalid label value {v:?}"
                ))
            }
        };
        text.split(',')
            .map(|term| {
                let term = term.trim();
                Ok(if let Some(k) = term.strip_prefix('!') {
                    Requirement::Absent(key(k)?)
                } else if let Some((k, v)) = term.split_once("!=") {
                    Requirement::NotEquals(key(k)?, value(v)?)
                } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('='))
                {
                    Requirement::Equals(key(k)?, value(v)?)
                } else {
                    Requirement::Exists(key(term)?)
                })
            })
            .collect::<Result<_, String>>()
            .map(Selector)
    }

    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let label = |k: &String| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::Absent(k) => label(k).is_none(),
        })
    }
}

/// A label name or value: at least `min` and at most 63 of `[A-Za-z0-9_.-]`, alphanumeric
/// at both ends.
fn label_part(s: &str, min: usize) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    (min..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && (s.is_empty() || (alnum(s.chars().next()) && alnum(s.chars().last())))
}

/// The kind, namespace and name an API path names: `None` for paths of other resources.
pub fn route(path: &str) -> Option<(Kind, Option<&str>, Option<&str>)> {
    let groups = [
        "/api/v1/",
        "/apis/discovery.k8s.io/v1/",
        "/apis/apiextensions.k8s.io/v1/",
        "/apis/gateway.networking.k8s.io/v1/",
    ];
    let (group, rest) = groups
        .iter()
        .enumerate()
        .find_map(|(i, prefix)| Some((i, path.strip_prefix(prefix)?)))?;
    let core = group == 0;
    let kind = |resource: &str| match (group, resource) {
        (0, "namespaces") => Some(Kind::Namespace),
        (0, "services") => Some(Kind::Service),
        (1, "endpointslices") => Some(Kind::EndpointSlice),
        (2, "customresourcedefinitions") => Some(Kind::CustomResourceDefinition),
        (3, "httproutes") => Some(Kind::HttpRoute),
        (3, "grpcroutes") => Some(Kind::GrpcRoute),
        _ => None,
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [resource] => Some((kind(resource)?, None, None)),
        ["namespaces", name] if core && !name.is_empty() => {
            Some((Kind::Namespace, None, Some(name)))
        }
        ["customresourcedefinitions", name] if group == 2 && !name.is_empty() => {
            Some((Kind::CustomResourceDefinition, None, Some(name)))
        }
        ["namespaces", ns, resource] if *resource != "namespaces" => {
            Some((kind(resource)?, Some(ns), None))
        }
        ["namespaces", ns, resource, name] if *resource != "namespaces" && !name.is_empty() => {
            Some((kind(resource)?, Some(ns), Some(name)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr() -> Cidr {
        Cidr::from_flag(&[]).unwrap()
    }

    fn object(doc: Value) -> Object {
        match parse(doc, &cidr()) {
            Ok(Parsed::Object(object)) => object,
            other => panic!("{other:?}"),
        }
    }

    fn service(name: &str, spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "fleet"}, "spec": spec})
    }

    #[test]
    fn services_are_defaulted_as_the_api_server_does() {
        let svc = object(service(
            "tracker",
            json!({"clusterIP": "10.43.100.10",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}]}),
        ));
        let spec = &svc.value["spec"];
        assert_eq!(spec["type"], "ClusterIP");
        assert_eq!(spec["clusterIPs"], json!(["10.43.100.10"]));
        assert_eq!(
            spec["ports"][0],
            json!({"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "appProtocol": "http"})
        );
        assert_eq!(spec["sessionAffinity"], "None");
        let plain = object(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": [{"port": 53, "protocol": "UDP"}]}}),
        );
        assert_eq!(plain.namespace, "default");
        assert_eq!(plain.value["spec"]["ports"][0]["targetPort"], 53);
        assert!(
            plain.value["spec"].get("clusterIP").is_none(),
            "the store allocates it"
        );
    }

    #[test]
    fn invalid_documents_name_the_field() {
        let svc = |spec: Value| service("a", spec);
        let slice = |extra: Value| {
            let mut doc = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice"});
            doc["metadata"] = json!({"name": "s-1"});
            doc.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            doc
        };
        let v4 = |endpoints: Value| json!({"addressType": "IPv4", "endpoints": endpoints});
        let cases = [
            (
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {}}),
                "metadata.name",
            ),
            (
                service("A", json!({"ports": [{"port": 1}]})),
                "metadata.name",
            ),
            (
                svc(json!({"ports": [{"port": 70000}]})),
                "spec.ports[0].port",
            ),
            (
                svc(json!({"clusterIP": "10.44.0.5", "ports": [{"port": 1}]})),
                "spec.clusterIP",
            ),
            (
                svc(json!({"ports": [{"port": 1}, {"port": 2}]})),
                "spec.ports[0].name",
            ),
            (
                svc(json!({"ports": [{"port": 1, "targetPort": "8080"}]})),
                "spec.ports[0].targetPort",
            ),
            (svc(json!({"ports": []})), "spec.ports"),
            (slice(json!({})), "addressType"),
            (
                slice(v4(json!([{"addresses": ["fd00::1"]}]))),
                "endpoints[0].addresses",
            ),
            (
                slice(v4(json!([{"nodeName": "a"}]))),
                "endpoints[0].addresses",
            ),
            (
                slice(json!({"addressType": "IPv4", "ports": [{"port": 0}]})),
                "ports[0].port",
            ),
            (
                json!({"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice"}),
                "apiVersion",
            ),
        ];
        for (doc, field) in cases {
            let got = parse(doc.clone(), &cidr()).err().map(|e| e.field);
            assert_eq!(got.as_deref(), Some(field), "{doc}");
        }
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment"});
        assert!(
            matches!(parse(deployment, &cidr()), Ok(Parsed::Unsupported(k)) if k == "Deployment")
        );
    }

    #[test]
    fn the_store_allocates_keeps_and_prunes() {
        let mut store = Store::new(cidr());
        let ns = object(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fleet", "labels": {"pimesh.dev/mesh": "enabled"}}}),
        );
        let web = object(service("web", json!({"ports": [{"port": 80}]})));
        let taken = object(service(
            "taken",
            json!({"clusterIP": "10.43.0.1", "ports": [{"port": 80}]}),
        ));
        let errors = store.apply("a", vec![(1, ns.clone()), (2, web.clone()), (3, taken)]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, 3);
        let served = store.get(Kind::Service, Some("fleet"), "web").unwrap();
        let ip: Ipv4Addr = served["spec"]["clusterIP"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(cidr().usable(ip) && ip != cidr().nth(1), "{ip}");
        assert_eq!(served["kind"], "Service");
        let version = store.version;
        assert!(store
            .apply("a", vec![(1, ns.clone()), (2, web.clone())])
            .is_empty());
        assert_eq!(
            store.version, version,
            "an unchanged re-apply changes nothing"
        );
        assert_eq!(
            store.get(Kind::Service, Some("fleet"), "web").unwrap(),
            served
        );

        let list = |store: &Store, sel: &str| -> Value {
            serde_json::from_str(&store.list(Kind::Namespace, None, &Selector::parse(sel).unwrap()))
                .unwrap()
        };
        let mesh = list(&store, "pimesh.dev/mesh=enabled");
        assert_eq!(mesh["kind"], "NamespaceList");
        assert_eq!(mesh["items"].as_array().unwrap().len(), 1);
        assert!(mesh["items"][0].get("kind").is_none());
        assert_eq!(
            mesh["items"][0]["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "fleet"
        );
        assert_eq!(
            list(&store, "")
                .get("items")
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            5
        );

        // The namespace leaves the manifest: it goes, and the Service in it with it.
        assert!(store.apply("a", vec![(2, web)]).is_empty());
        assert!(store.get(Kind::Service, Some("fleet"), "web").is_none());
        assert!(store
            .get(Kind::Service, Some("default"), "kubernetes")
            .is_some());
        store.apply("b", vec![(1, object(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})))]);
        store.apply("b", Vec::new());
        assert!(
            store.get(Kind::Namespace, None, "default").is_some(),
            "system namespaces stay"
        );
    }

    #[test]
    fn selectors_are_equality_based() {
        let labels = json!({"app": "web", "tier": "front"});
        let labels = labels.as_object();
        let matches = |text: &str| Selector::parse(text).unwrap().matches(labels);
        assert!(matches("app=web,tier==front"));
        assert!(matches("app, !db , tier!=back"));
        assert!(!matches("app=db"));
        assert!(!matches("!app"));
        assert!(matches(""));
        for bad in ["app in (web)", "a=b,", "=x", "a=b=c", "-a", "a/b/c=d"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_and_cidrs() {
        assert_eq!(
            route("/api/v1/namespaces"),
            Some((Kind::Namespace, None, None))
        );
        assert_eq!(
            route("/api/v1/namespaces/fleet"),
            Some((Kind::Namespace, None, Some("fleet")))
        );
        assert_eq!(
            route("/api/v1/namespaces/fleet/services/x"),
            Some((Kind::Service, Some("fleet"), Some("x")))
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/fleet/endpointslices"),
            Some((Kind::EndpointSlice, Some("fleet"), None))
        );
        assert_eq!(route("/api/v1/nodes"), None);
        assert_eq!(route("/api/v1/endpointslices"), None);
        let dual = Cidr::from_flag(&["fd00:43::/112,10.96.0.0/12".to_owned()]).unwrap();
        assert_eq!(dual.to_string(), "10.96.0.0/12");
        assert!(Cidr::from_flag(&["fd00:43::/112".to_owned()]).is_err());
        assert!(Cidr::from_flag(&["10.43.0.0/33".to_owned()]).is_err());
        let tiny = Cidr::parse("10.0.0.0/30").unwrap();
        assert_eq!(
            tiny.allocate("a/b", |_| false),
            Some(Ipv4Addr::new(10, 0, 0, 2))
        );
        assert_eq!(tiny.allocate("a/b", |_| true), None);
    }
}
