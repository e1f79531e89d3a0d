//! Routes: how requests to one service of the site are matched and where each match
//! sends them — the typed model behind every form an operator may write routes in.
//!
//! Forms:
//! - `[[routes]]` tables in `cluster.toml` (this module's types, as they deserialize);
//! - Kubernetes Gateway API `HTTPRoute` and `GRPCRoute` (`gateway.networking.k8s.io/v1`,
//!   a Service as `parentRef`, Linkerd's `retry.linkerd.io/*` and `timeout.linkerd.io/*`
//!   annotations) and the legacy SMI `TrafficSplit`, as YAML files (see [`gateway`]).
//!
//! `pimeshctl config publish` turns YAML files into `[[routes]]` tables appended to the
//! signed `cluster.toml`, so every node reads one form.
//!
//! Invariants of a [`Route`] inside a validated `ClusterConfig` (checked by [`check`]):
//! - its `service` is a service of the site without a `split` of its own, and no other
//!   route of the same service has its `name`;
//! - every backend names a service placed on nodes (no split), at most once per rule,
//!   and a rule with backends has one whose weight is above 0; a rule without backends
//!   sends to the route's service, which is then placed on nodes;
//! - every path starts with `/`, every method, header name and header value is valid
//!   HTTP, no match or edit touches a `pimesh-*` header or a pseudo-header;
//! - durations are within `cluster::limits::REQUEST_TIMEOUT`, `retries` is 0 to 5.
//!
//! Precedence between the matches of all routes of one service is Gateway API's (see
//! [`RouteMatch::precedence`]); a request that matches none is answered `404`.

pub mod gateway;
pub mod site_folder;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cluster::{limits, HumanDuration, Service};
use crate::{DnsLabel, ValueError};

/// One route: the rules for requests to `service`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique among the routes of its service; named in metrics and errors.
    pub name: DnsLabel,
    /// The service whose requests this route decides (Gateway API's `parentRef`).
    pub service: DnsLabel,
    /// The form the route was written in, so that a conversion writes it back alike.
    #[serde(default, skip_serializing_if = "RouteKind::is_http")]
    pub kind: RouteKind,
    /// Extra attempts for a request whose answer is one of `retry_on` (or that could not
    /// be sent), within the site's retry budget; `retry.linkerd.io/limit`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u8,
    /// Which answers are retried: HTTP statuses and ranges (`5xx`, `503`, `500-504`,
    /// `gateway-error`), gRPC codes (`unavailable`, ...); `retry.linkerd.io/http|grpc`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<RetryOn>,
    /// Each attempt's limit when retrying; `retry.linkerd.io/timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_timeout: Option<HumanDuration>,
    /// The whole request's limit for rules that set none; `timeout.linkerd.io/request`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// Each attempt's limit (until the response head) for rules that set none;
    /// `timeout.linkerd.io/response`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout: Option<HumanDuration>,
    pub rules: Vec<RouteRule>,
}

/// The form a route came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteKind {
    #[default]
    Http,
    Grpc,
    /// SMI `TrafficSplit`: one rule, no matches, weighted backends.
    TrafficSplit,
}

impl RouteKind {
    fn is_http(&self) -> bool {
        *self == RouteKind::Http
    }
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// Requests that match one of `matches` (or every request, when there are none) go to
/// `backends` after `request_headers` is applied.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    /// Weighted services; none means the route's own service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<WeightedBackend>,
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub request_headers: HeaderEdits,
    /// The whole request's limit, retries included (Gateway API `timeouts.request`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// Each attempt's limit (Gateway API `timeouts.backendRequest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_timeout: Option<HumanDuration>,
}

/// A match: every condition given must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// A gRPC service and optionally method: the path `/<service>/<method>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcMethod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Header name (any case) → the exact value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Query parameter name → the exact value of its first occurrence.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum PathMatch {
    Exact(String),
    /// Whole path segments: `/api` matches `/api` and `/api/x`, not `/apis`.
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMethod {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedBackend {
    pub service: DnsLabel,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Gateway API's `RequestHeaderModifier`: set replaces, add appends, remove deletes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// An answer that a route retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum RetryOn {
    /// HTTP statuses `low..=high`.
    Status { low: u16, high: u16 },
    /// A gRPC status code (in the response head: a trailers-only answer).
    Grpc(GrpcCode),
}

/// The gRPC codes Linkerd's `retry.linkerd.io/grpc` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcCode {
    Cancelled = 1,
    DeadlineExceeded = 4,
    ResourceExhausted = 8,
    Internal = 13,
    Unavailable = 14,
}

const GRPC_CODES: &[(&str, GrpcCode)] = &[
    ("cancelled", GrpcCode::Cancelled),
    ("deadline-exceeded", GrpcCode::DeadlineExceeded),
    ("resource-exhausted", GrpcCode::ResourceExhausted),
    ("internal", GrpcCode::Internal),
    ("unavailable", GrpcCode::Unavailable),
];

impl RetryOn {
    /// Whether an answer with `status` (and `grpc_status` from its head, when present)
    /// is retried.
    pub fn matches(&self, status: u16, grpc_status: Option<u32>) -> bool {
        match *self {
            RetryOn::Status { low, high } => (low..=high).contains(&status),
            RetryOn::Grpc(code) => grpc_status == Some(code as u32),
        }
    }

    /// Parses one element of a comma-separated list such as `5xx,429` or `unavailable`.
    pub fn parse(text: &str) -> Result<RetryOn, ValueError> {
        let text = text.trim();
        let status = |s: &str| -> Option<u16> {
            s.parse::<u16>()
                .ok()
                .filter(|code| (100..=599).contains(code))
        };
        if let Some((_, code)) = GRPC_CODES.iter().find(|(name, _)| *name == text) {
            return Ok(RetryOn::Grpc(*code));
        }
        if text == "gateway-error" {
            return Ok(RetryOn::Status {
                low: 502,
                high: 504,
            });
        }
        if let Some(class) = text
            .strip_suffix("xx")
            .and_then(|d| d.parse::<u16>().ok())
            .filter(|d| (1..=5).contains(d))
        {
            return Ok(RetryOn::Status {
                low: class * 100,
                high: class * 100 + 99,
            });
        }
        if let Some(code) = status(text) {
            return Ok(RetryOn::Status {
                low: code,
                high: code,
            });
        }
        if let Some((low, high)) = text.split_once('-') {
            if let (Some(low), Some(high)) = (status(low), status(high)) {
                if low <= high {
                    return Ok(RetryOn::Status { low, high });
                }
            }
        }
        let grpc: Vec<&str> = GRPC_CODES.iter().map(|(name, _)| *name).collect();
        Err(ValueError(format!(
            "expected an HTTP status (\"503\"), a class (\"5xx\"), a range (\"500-504\"), \
             \"gateway-error\" or a gRPC code ({}), found {text:?}",
            grpc.join(", ")
        )))
    }
}

impl TryFrom<String> for RetryOn {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        RetryOn::parse(&text)
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RetryOn::Status { low, high } if low == high => write!(f, "{low}"),
            RetryOn::Status { low, high } if low % 100 == 0 && high == low + 99 => {
                write!(f, "{}xx", low / 100)
            }
            RetryOn::Status { low, high } => write!(f, "{low}-{high}"),
            RetryOn::Grpc(code) => {
                let name = GRPC_CODES
                    .iter()
                    .find(|(_, c)| *c == code)
                    .map_or("unknown", |(name, _)| *name);
                f.write_str(name)
            }
        }
    }
}

impl From<RetryOn> for String {
    fn from(value: RetryOn) -> String {
        value.to_string()
    }
}

/// How specific a match is, by Gateway API's precedence: an exact path before any
/// prefix, a longer prefix before a shorter one, then a match with a method, then more
/// header matches, then more query matches. Larger sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Precedence {
    exact_path: bool,
    prefix_len: usize,
    has_method: bool,
    headers: usize,
    query: usize,
}

impl RouteMatch {
    /// The path this match requires: its `path`, or the path of its gRPC method.
    pub fn effective_path(&self) -> Option<PathMatch> {
        if let Some(path) = &self.path {
            return Some(path.clone());
        }
        let grpc = self.grpc.as_ref()?;
        Some(match &grpc.method {
            Some(method) => PathMatch::Exact(format!("/{}/{method}", grpc.service)),
            None => PathMatch::Prefix(format!("/{}", grpc.service)),
        })
    }

    pub fn precedence(&self) -> Precedence {
        let path = self.effective_path();
        Precedence {
            exact_path: matches!(path, Some(PathMatch::Exact(_))),
            prefix_len: match &path {
                Some(PathMatch::Prefix(prefix)) => prefix.trim_end_matches('/').len(),
                Some(PathMatch::Exact(exact)) => exact.len(),
                None => 0,
            },
            has_method: self.method.is_some(),
            headers: self.headers.len(),
            query: self.query.len(),
        }
    }
}

impl PathMatch {
    /// Whether `path` (without its query) matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Prefix(prefix) => {
                let prefix = prefix.trim_end_matches('/');
                match path.strip_prefix(prefix) {
                    Some(rest) => rest.is_empty() || rest.starts_with('/'),
                    None => false,
                }
            }
        }
    }
}

/// What is wrong with a route: the field (dotted, relative to the route: `rules[0].
/// backends[1].service`) and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFault {
    pub field: Vec<String>,
    pub message: String,
}

impl RouteFault {
    fn at<S: AsRef<str>>(field: &[S], message: impl Into<String>) -> RouteFault {
        RouteFault {
            field: field.iter().map(|s| s.as_ref().to_owned()).collect(),
            message: message.into(),
        }
    }
}

/// The services a route may name, wherever they come from: the site's `[services]`, or
/// the meshed Kubernetes Services of the route's namespace.
pub trait ServiceSet {
    /// `Err(why)` when `name` cannot be a route's parent.
    fn parent(&self, name: &DnsLabel) -> Result<(), String>;
    /// Whether the parent `name` runs somewhere: a rule without backends sends to it.
    fn parent_placed(&self, name: &DnsLabel) -> bool;
    /// `Err(why)` when `name` cannot be a backend.
    fn backend(&self, name: &DnsLabel) -> Result<(), String>;
}

impl ServiceSet for BTreeMap<DnsLabel, Service> {
    fn parent(&self, name: &DnsLabel) -> Result<(), String> {
        let Some(parent) = self.get(name) else {
            return Err(format!(
                "expected the name of a service of the site, found {name}"
            ));
        };
        if !parent.split.is_empty() {
            return Err(format!(
                "{name} has a `split`; a service takes a split or routes, not both (a split is \
                 a route with one rule)"
            ));
        }
        Ok(())
    }

    fn parent_placed(&self, name: &DnsLabel) -> bool {
        self.get(name).is_some_and(|s| !s.nodes.is_empty())
    }

    fn backend(&self, name: &DnsLabel) -> Result<(), String> {
        let Some(target) = self.get(name) else {
            return Err(format!(
                "expected the name of a service of the site, found {name}"
            ));
        };
        if !target.split.is_empty() || target.nodes.is_empty() {
            return Err(format!(
                "{name} is placed on no node (a backend must be a service that runs \
                 somewhere, not a split)"
            ));
        }
        Ok(())
    }
}

/// Checks `route` against `services` (see the module's invariants). `taken` holds the
/// `(service, name)` pairs of the routes checked before; this route's is added.
pub fn check(
    route: &Route,
    services: &impl ServiceSet,
    taken: &mut BTreeSet<(DnsLabel, DnsLabel)>,
) -> Result<(), RouteFault> {
    services
        .parent(&route.service)
        .map_err(|why| RouteFault::at(&["service"], why))?;
    if !taken.insert((route.service.clone(), route.name.clone())) {
        return Err(RouteFault::at(
            &["name"],
            format!(
                "another route of service {} is named {}",
                route.service, route.name
            ),
        ));
    }
    if route.retries > 5 {
        return Err(RouteFault::at(
            &["retries"],
            format!("expected 0 to 5, found {}", route.retries),
        ));
    }
    for (field, duration) in [
        ("retry_timeout", route.retry_timeout),
        ("timeout", route.timeout),
        ("response_timeout", route.response_timeout),
    ] {
        check_duration(&[field], duration)?;
    }
    if route.rules.is_empty() {
        return Err(RouteFault::at(&["rules"], "expected at least one rule"));
    }
    for (r, rule) in route.rules.iter().enumerate() {
        let r = r.to_string();
        let at = |rest: &[&str]| -> Vec<String> {
            ["rules", r.as_str()]
                .iter()
                .chain(rest)
                .map(|s| (*s).to_owned())
                .collect()
        };
        check_duration(&at(&["timeout"]), rule.timeout)?;
        check_duration(&at(&["backend_timeout"]), rule.backend_timeout)?;
        if rule.backends.is_empty() && !services.parent_placed(&route.service) {
            return Err(RouteFault::at(
                &at(&["backends"]),
                format!(
                    "expected backends: the route's service {} is placed on no node",
                    route.service
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for (b, backend) in rule.backends.iter().enumerate() {
            let b = b.to_string();
            let field = at(&["backends", b.as_str(), "service"]);
            services
                .backend(&backend.service)
                .map_err(|why| RouteFault::at(&field, why))?;
            if !seen.insert(&backend.service) {
                return Err(RouteFault::at(
                    &field,
                    format!("{} is listed twice", backend.service),
                ));
            }
        }
        if !rule.backends.is_empty() && rule.backends.iter().all(|b| b.weight == 0) {
            return Err(RouteFault::at(
                &at(&["backends"]),
                "expected at least one backend with a weight above 0 (with every weight 0, \
                 every request would fail)",
            ));
        }
        for (m, matched) in rule.matches.iter().enumerate() {
            let m = m.to_string();
            check_match(matched, &at(&["matches", m.as_str()]))?;
        }
        check_edits(&rule.request_headers, &at(&["request_headers"]))?;
    }
    Ok(())
}

fn check_duration<S: AsRef<str>>(
    field: &[S],
    duration: Option<HumanDuration>,
) -> Result<(), RouteFault> {
    let Some(duration) = duration else {
        return Ok(());
    };
    let range = &limits::REQUEST_TIMEOUT;
    if range.contains(&duration.0) {
        return Ok(());
    }
    let show = |d: &std::time::Duration| humantime::format_duration(*d).to_string();
    Err(RouteFault::at(
        field,
        format!(
            "expected {} to {}, found {}",
            show(range.start()),
            show(range.end()),
            show(&duration.0)
        ),
    ))
}

fn check_match(matched: &RouteMatch, at: &[String]) -> Result<(), RouteFault> {
    let field = |rest: &[&str]| -> Vec<String> {
        at.iter()
            .map(String::as_str)
            .chain(rest.iter().copied())
            .map(str::to_owned)
            .collect()
    };
    if matched.path.is_some() && matched.grpc.is_some() {
        return Err(RouteFault::at(
            &field(&["grpc"]),
            "expected `path` or `grpc`, not both",
        ));
    }
    if let Some(path) = &matched.path {
        let (kind, text) = match path {
            PathMatch::Exact(text) => ("exact", text),
            PathMatch::Prefix(text) => ("prefix", text),
        };
        let valid = text.starts_with('/')
            && http::uri::PathAndQuery::try_from(text.as_str()).is_ok_and(|p| p.query().is_none());
        if !valid {
            return Err(RouteFault::at(
                &field(&["path", kind]),
                format!("expected a path starting with `/` (no query, no spaces), found {text:?}"),
            ));
        }
    }
    if let Some(grpc) = &matched.grpc {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
        };
        if !name_ok(&grpc.service) {
            return Err(RouteFault::at(
                &field(&["grpc", "service"]),
                format!(
                    "expected a gRPC service name such as \"fleet.v1.Staff\", found {:?}",
                    grpc.service
                ),
            ));
        }
        if let Some(method) = &grpc.method {
            if !name_ok(method) || method.contains('.') {
                return Err(RouteFault::at(
                    &field(&["grpc", "method"]),
                    format!("expected a gRPC method name such as \"GetDriver\", found {method:?}"),
                ));
            }
        }
    }
    if let Some(method) = &matched.method {
        let valid = http::Method::from_bytes(method.as_bytes()).is_ok()
            && !method.is_empty()
            && method.chars().all(|c| c.is_ascii_uppercase());
        if !valid {
            return Err(RouteFault::at(
                &field(&["method"]),
                format!("expected an HTTP method in capitals such as \"GET\", found {method:?}"),
            ));
        }
    }
    for (name, value) in &matched.headers {
        check_header(name, Some(value), &field(&["headers", name]))?;
    }
    for name in matched.query.keys() {
        if name.is_empty() {
            return Err(RouteFault::at(
                &field(&["query"]),
                "expected a query parameter name, found an empty one",
            ));
        }
    }
    Ok(())
}

fn check_edits(edits: &HeaderEdits, at: &[String]) -> Result<(), RouteFault> {
    let field = |rest: &[&str]| -> Vec<String> {
        at.iter()
            .map(String::as_str)
            .chain(rest.iter().copied())
            .map(str::to_owned)
            .collect()
    };
    for (kind, map) in [("set", &edits.set), ("add", &edits.add)] {
        for (name, value) in map {
            check_header(name, Some(value), &field(&[kind, name]))?;
        }
    }
    for (i, name) in edits.remove.iter().enumerate() {
        let i = i.to_string();
        check_header(name, None, &field(&["remove", &i]))?;
    }
    Ok(())
}

/// A header a route may match or edit: a valid name that is not the mesh's own
/// (`pimesh-*`) nor a connection-level one, and a valid value.
fn check_header(name: &str, value: Option<&str>, field: &[String]) -> Result<(), RouteFault> {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() || name.starts_with(':') {
        return Err(RouteFault::at(
            field,
            format!("expected an HTTP header name (letters, digits, `-`), found {name:?}"),
        ));
    }
    let lower = name.to_ascii_lowercase();
    let reserved = lower.starts_with("pimesh-")
        || [
            "connection",
            "upgrade",
            "transfer-encoding",
            "te",
            "keep-alive",
            "host",
        ]
        .contains(&lower.as_str());
    if reserved {
        return Err(RouteFault::at(
            field,
            format!("{name} is a header the mesh or the connection owns; a route cannot use it"),
        ));
    }
    if let Some(value) = value {
        if http::HeaderValue::from_str(value).is_err() {
            return Err(RouteFault::at(
                field,
                format!(
                    "expected a header value of visible ASCII and spaces (no line breaks or \
                     control characters), found {value:?}"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
