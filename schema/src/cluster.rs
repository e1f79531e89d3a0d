//! The site configuration, `cluster.toml`: the desired state of a site — its services,
//! where they run, how traffic to them is split, delayed or aborted, who may call them —
//! plus the control plane, K3s, join and proxy settings. The operator validates it with
//! `pimeshctl`, the central server serves it signed, and the supervisor, the control
//! replicas and the proxies all read it through these types.

use crate::ValueError;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::position::{key_name, locate};
use crate::routes::Route;
use crate::{parse_toml, ConfigError, DnsLabel, SpiffeId};

/// A validated site configuration. Holding one means every cross-reference holds: split
/// backends are services with endpoints, authorization names identities of this site,
/// counts are in range.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub site: DnsLabel,
    pub control: ControlSettings,
    pub k3s: K3sSettings,
    pub proxy: ProxySettings,
    /// `[join]`: the join tokens the site accepts, when the site config says so.
    pub join: JoinSettings,
    /// Where each node's proxy accepts mesh traffic. A node placed in a service but absent
    /// here has no known address until discovery supplies one.
    pub nodes: BTreeMap<DnsLabel, Node>,
    pub services: BTreeMap<DnsLabel, Service>,
    /// `[[routes]]`: request matching for services (see [`crate::routes`]).
    pub routes: Vec<Route>,
    /// `[rollout]`: how the central server hands this revision to the site's nodes.
    pub rollout: RolloutSettings,
}

/// The port a node's proxy accepts mTLS mesh traffic on unless its address says otherwise.
pub const DEFAULT_INBOUND_PORT: u16 = 4143;

/// A node of the site, as proxies reach it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// `IP` (port 4143) or `IP:PORT` of the node's proxy inbound listener.
    pub address: NodeAddress,
}

/// A node's mesh address: an IP with the inbound port, written `IP` or `IP:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct NodeAddress(pub SocketAddr);

impl TryFrom<String> for NodeAddress {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(NodeAddress(addr));
        }
        text.parse::<IpAddr>()
            .map(|ip| NodeAddress(SocketAddr::new(ip, DEFAULT_INBOUND_PORT)))
            .map_err(|_| {
                ValueError(format!(
                    "expected an IP address or IP:PORT such as \"192.168.1.20\", found {text:?}"
                ))
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSettings {
    /// Control replicas per server node (`pimesh-control@1..N`), 1 to 9.
    pub replicas: u8,
}

impl Default for ControlSettings {
    fn default() -> Self {
        ControlSettings { replicas: 3 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct K3sSettings {
    /// How many nodes are K3s servers (embedded etcd quorum): 1, 3 or 5. Later nodes join
    /// as agents.
    pub servers: u8,
    /// Packaged K3s components to turn off (`--disable`).
    pub disable: Vec<String>,
    /// The Kubernetes Services' addresses (every server's `service-cidr`); K3s's own
    /// default. Every node redirects TCP to it to its proxy's outbound port.
    pub service_cidr: Ipv4Cidr,
    /// `[k3s.manifests]`: Kubernetes objects the site's K3s servers deploy (K3s's
    /// auto-deploy folder), by a name of the operator's choosing. Validated by
    /// [`ClusterConfig::parse`]: see [`K3sManifest`].
    pub manifests: BTreeMap<DnsLabel, K3sManifest>,
}

impl Default for K3sSettings {
    fn default() -> Self {
        K3sSettings {
            servers: 3,
            disable: vec!["traefik".to_owned()],
            service_cidr: Ipv4Cidr::K3S_DEFAULT_SERVICES,
            manifests: BTreeMap::new(),
        }
    }
}

/// The outbound port of every node's proxy (`pimesh-proxy --outbound`'s default port):
/// where local apps, and the K3s Services' redirect, send what the mesh should carry.
pub const PROXY_OUTBOUND_PORT: u16 = 4140;

/// An IPv4 network, written `a.b.c.d/prefix`.
///
/// Invariant: the prefix is within [`Ipv4Cidr::PREFIXES`] and the address has no bit set
/// past it (it is the network's first address, as K3s wants it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Ipv4Cidr {
    address: std::net::Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// K3s's default `service-cidr`.
    pub const K3S_DEFAULT_SERVICES: Ipv4Cidr = Ipv4Cidr {
        address: std::net::Ipv4Addr::new(10, 43, 0, 0),
        prefix: 16,
    };

    /// The prefixes a Services range may have: the Kubernetes API server refuses a range
    /// wider than /12, and K3s takes the 10th address for its DNS service (so /28 at most).
    pub const PREFIXES: std::ops::RangeInclusive<u8> = 12..=28;

    /// The network's first address.
    pub fn address(&self) -> std::net::Ipv4Addr {
        self.address
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the network.
    pub fn contains(&self, ip: std::net::Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        u32::from(ip) & mask == u32::from(self.address)
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        let (low, high) = (Ipv4Cidr::PREFIXES.start(), Ipv4Cidr::PREFIXES.end());
        let expected = format!(
            "expected an IPv4 network such as \"10.43.0.0/16\" (prefix {low} to {high}), found {text:?}"
        );
        let (address, prefix) = text
            .split_once('/')
            .and_then(|(address, prefix)| {
                Some((
                    address.parse::<std::net::Ipv4Addr>().ok()?,
                    prefix.parse::<u8>().ok()?,
                ))
            })
            .ok_or_else(|| ValueError(expected.clone()))?;
        if !Ipv4Cidr::PREFIXES.contains(&prefix) {
            return Err(ValueError(expected));
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        let network = std::net::Ipv4Addr::from(u32::from(address) & mask);
        if network != address {
            return Err(ValueError(format!(
                "expected the network's first address, {network}/{prefix}, found {text:?}"
            )));
        }
        Ok(Ipv4Cidr { address, prefix })
    }
}

/// One manifest of `[k3s.manifests]`: YAML text of one or more documents (separated by
/// `---`), kept exactly as written.
///
/// Invariant, once part of a [`ClusterConfig`]: the text parses as YAML, holds at least
/// one object, and every document is empty or a mapping with string `apiVersion`, `kind`
/// and `metadata.name` (what K3s's deploy controller needs to apply it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct K3sManifest(String);

/// What is wrong with a manifest: in document `document` (counted from 0), at `field` when
/// one field is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFault {
    pub document: usize,
    pub field: Option<&'static str>,
    pub message: String,
}

impl K3sManifest {
    /// `text` as a manifest, when it holds Kubernetes objects (see the type's invariant).
    pub fn parse(text: String) -> Result<K3sManifest, ManifestFault> {
        check_manifest(&text)?;
        Ok(K3sManifest(text))
    }

    /// The YAML text as written.
    pub fn text(&self) -> &str {
        &self.0
    }
}

/// Checks `text` against [`K3sManifest`]'s invariant; returns the number of objects.
fn check_manifest(text: &str) -> Result<usize, ManifestFault> {
    use serde::Deserialize as _;
    use serde_yaml_ng::Value;
    let mut objects = 0;
    for (document, part) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let fault = |field, message| ManifestFault {
            document,
            field,
            message,
        };
        let value = Value::deserialize(part).map_err(|err| {
            fault(
                None,
                format!("expected YAML (lines counted within the manifest): {err}"),
            )
        })?;
        let object = match value {
            // An empty document (a `---` with nothing after it): nothing to deploy.
            Value::Null => continue,
            Value::Mapping(_) => value,
            other => {
                return Err(fault(
                    None,
                    format!(
                        "expected a Kubernetes object (a mapping with apiVersion, kind and \
                         metadata.name), found {}",
                        yaml_kind(&other)
                    ),
                ))
            }
        };
        for (field, path) in [
            ("apiVersion", &["apiVersion"][..]),
            ("kind", &["kind"][..]),
            ("metadata.name", &["metadata", "name"][..]),
        ] {
            match path.iter().try_fold(&object, |value, key| value.get(*key)) {
                Some(Value::String(text)) if !text.trim().is_empty() => {}
                other => {
                    return Err(fault(
                        Some(field),
                        format!(
                            "expected a non-empty string, found {}",
                            other.map_or("nothing", yaml_kind)
                        ),
                    ))
                }
            }
        }
        objects += 1;
    }
    if objects == 0 {
        return Err(ManifestFault {
            document: 0,
            field: None,
            message: "expected at least one Kubernetes object, found none".into(),
        });
    }
    Ok(objects)
}

/// What a YAML value is, for errors.
fn yaml_kind(value: &serde_yaml_ng::Value) -> &'static str {
    use serde_yaml_ng::Value;
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(text) if text.trim().is_empty() => "an empty string",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// `[join]`: how nodes join the site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JoinSettings {
    /// `tokens = [{ sha256 = "<hex>", expires = "RFC 3339" }]`: when present (even empty),
    /// the join tokens the site accepts, replacing the trust folder's `join.json` list (a
    /// rotation over the air). `None`: the site config says nothing about tokens.
    pub tokens: Option<Vec<JoinToken>>,
}

/// One accepted join token: the SHA-256 of its secret and, optionally, when it expires.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    pub sha256: TokenDigest,
    #[serde(default)]
    pub expires: Option<Rfc3339>,
}

/// A SHA-256 digest written as 64 hex digits (kept as written, lower-cased).
///
/// Invariant: exactly 64 ASCII hex digits, lower case.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct TokenDigest(String);

impl TokenDigest {
    /// The 64 lower-case hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TokenDigest {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(TokenDigest(text.to_ascii_lowercase()))
        } else {
            Err(ValueError(format!(
                "expected the SHA-256 of the token's secret as 64 hex digits, found {text:?}"
            )))
        }
    }
}

/// An instant written in RFC 3339 (`2027-01-31T12:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Rfc3339(pub std::time::SystemTime);

impl TryFrom<String> for Rfc3339 {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        humantime::parse_rfc3339_weak(&text)
            .map(Rfc3339)
            .map_err(|err| {
                ValueError(format!(
                    "expected an RFC 3339 time such as \"2027-01-31T12:00:00Z\", found {text:?} ({err})"
                ))
            })
    }
}

/// `[rollout]`: the waves in which the central server offers a revision to the site's
/// nodes. Nodes never read it; the central server reads it from the revision it serves.
///
/// Invariant (after [`ClusterConfig::parse`]): `waves` is non-empty, strictly increasing,
/// each within 1 to 100, and ends at 100; `canary` names no node twice; `offline_after`
/// is within [`limits::ROLLOUT_OFFLINE_AFTER`]; `fleet_waves` obeys the rules of `waves`,
/// `fleet_canary` names no site twice, and either names a `release` unless both are left
/// at their defaults; `release` is 1 to 64 of `A-Z a-z 0-9 . _ -`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutSettings {
    /// Nodes that take the revision first, before any percentage wave.
    pub canary: Vec<DnsLabel>,
    /// Then the share of the site's nodes holding the revision after each wave, in
    /// percent, cumulative: `[10, 50, 100]`. The default, `[100]`, is every node at once.
    pub waves: Vec<u8>,
    /// More nodes than this rolling the revision back, reverting it or refusing it halts
    /// the rollout: no further wave starts and no node that does not hold it yet gets it.
    pub max_failed: u32,
    /// A node of a started wave that the central server has not heard from for this long
    /// does not hold its wave back; it takes the revision when it returns.
    pub offline_after: HumanDuration,
    /// The name of the change this revision carries on every site it is published to (each
    /// site's revision signed with its own key): the central server orders the sites that
    /// carry it by `fleet_canary` and `fleet_waves`.
    pub release: Option<String>,
    /// Sites that take the release first, before any percentage of the fleet.
    pub fleet_canary: Vec<DnsLabel>,
    /// Then the share of the central server's sites offered the release, in percent,
    /// cumulative, sites in name order: a site's first node wave starts only when the sites
    /// before it completed the release. The default, `[100]`, is every site at once.
    pub fleet_waves: Vec<u8>,
}

impl Default for RolloutSettings {
    fn default() -> Self {
        RolloutSettings {
            canary: Vec::new(),
            waves: vec![100],
            max_failed: 0,
            offline_after: HumanDuration(Duration::from_secs(600)),
            release: None,
            fleet_canary: Vec::new(),
            fleet_waves: vec![100],
        }
    }
}

impl RolloutSettings {
    /// Whether every node takes the revision at once (no canary, one wave).
    pub fn is_all_at_once(&self) -> bool {
        self.canary.is_empty() && self.waves.len() == 1
    }
}

/// Limits and defaults of every proxy on the site.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    /// Open connections a proxy accepts before refusing new ones, counted apart for local
    /// apps and for other nodes' proxies. Each needs two open files; the default fits
    /// common hard limits (systemd's 524288, containers' 20000) with room to spare.
    pub max_connections: u32,
    /// Largest request head (request line and headers) accepted, in bytes.
    pub max_header_bytes: u32,
    /// A client must send its request head within this time.
    pub header_timeout: HumanDuration,
    /// The `timeout` of every service that sets none: how long a request may wait for
    /// the head of its response.
    pub default_timeout: HumanDuration,
    /// Retries may add at most this percentage to the requests sent (0 to 100).
    pub retry_budget_percent: u8,
    /// Where spans are exported (Zipkin v2 JSON over HTTP), if anywhere.
    pub zipkin_url: Option<String>,
    /// Where spans are exported as OTLP/HTTP protobuf (`http://collector:4318/v1/traces`),
    /// if anywhere; beside `zipkin_url` or instead of it. Only `http://` with a host.
    pub otlp_url: Option<String>,
    /// Where each proxy keeps the batches of spans its collectors do not take for now
    /// (unreachable, 5xx, 429, no answer in time), to send them when they are back: an
    /// absolute path on the node, writable by the proxy. Absent: `spans/` in the
    /// proxy's state directory (`--state-dir`, the only one its unit may write).
    pub span_queue_dir: Option<PathBuf>,
    /// The most bytes of spans kept on disk, shared by the configured exporters; when
    /// full the oldest batches are dropped first. 0: nothing is kept (a batch the
    /// collector does not take is dropped).
    pub span_queue_max_bytes: u64,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            max_connections: 4_096,
            max_header_bytes: 16 * 1024,
            header_timeout: HumanDuration(Duration::from_secs(10)),
            default_timeout: HumanDuration(Duration::from_secs(30)),
            retry_budget_percent: 20,
            zipkin_url: None,
            otlp_url: None,
            span_queue_dir: None,
            span_queue_max_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A service: endpoints (a port on each node it is placed on), or a traffic split over
/// other services (SMI TrafficSplit: the apex service has no endpoints of its own), or
/// both (the split then decides), with its policies.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The port the service listens on, on each of its nodes.
    pub port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
    /// The nodes the service is placed on.
    #[serde(default)]
    pub nodes: Vec<DnsLabel>,
    /// Every proxy listens on `127.0.0.1:<local_port>` and sends what arrives there to this
    /// service: a way in for local apps that cannot use the HTTP proxy port.
    pub local_port: Option<u16>,
    /// Weighted backends; empty means no split.
    #[serde(default)]
    pub split: Vec<Backend>,
    pub fault: Option<Fault>,
    /// How long a request may wait for the head of its response (`504` after);
    /// `[proxy] default_timeout` when absent.
    pub timeout: Option<HumanDuration>,
    /// A connection idle this long is closed: an opaque TCP tunnel (never when absent),
    /// or an upgraded HTTP connection such as a WebSocket (an hour when absent).
    pub idle_timeout: Option<HumanDuration>,
    /// Extra attempts for idempotent requests and connect failures (0 to 5), within the
    /// site's retry budget.
    #[serde(default)]
    pub retries: u8,
    /// Identities allowed to call the service; absent means any identity of the site.
    pub allow: Option<Vec<SpiffeRef>>,
}

/// How the proxy treats a service's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Detect HTTP/1.1, HTTP/2 or opaque TCP per connection.
    #[default]
    Auto,
    Http,
    /// Opaque TCP, never inspected.
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub service: DnsLabel,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub abort: Option<Abort>,
    pub delay: Option<Delay>,
}

/// Answer a share of requests with `status` without sending them on.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abort {
    pub status: ErrorStatus,
    pub percent: Percent,
}

/// Hold a share of requests for `duration` before sending them on.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delay {
    pub duration: HumanDuration,
    pub percent: Percent,
}

/// A duration written for humans: `250ms`, `5s`, `1m 30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct HumanDuration(pub Duration);

impl From<HumanDuration> for String {
    fn from(duration: HumanDuration) -> String {
        humantime::format_duration(duration.0).to_string()
    }
}

impl TryFrom<String> for HumanDuration {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|err| {
                ValueError(format!(
                    "expected a duration such as \"250ms\" or \"5s\", found {text:?} ({err})"
                ))
            })
    }
}

/// A share of requests, 0 to 100.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "f64")]
pub struct Percent(pub f64);

impl TryFrom<f64> for Percent {
    type Error = ValueError;

    fn try_from(value: f64) -> Result<Self, ValueError> {
        if (0.0..=100.0).contains(&value) {
            Ok(Percent(value))
        } else {
            Err(ValueError(format!(
                "expected a percentage from 0 to 100, found {value}"
            )))
        }
    }
}

/// An HTTP error status, 400 to 599.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u16")]
pub struct ErrorStatus(pub u16);

impl TryFrom<u16> for ErrorStatus {
    type Error = ValueError;

    fn try_from(code: u16) -> Result<Self, ValueError> {
        if (400..=599).contains(&code) {
            Ok(ErrorStatus(code))
        } else {
            Err(ValueError(format!(
                "expected an HTTP error status from 400 to 599, found {code}"
            )))
        }
    }
}

/// A SPIFFE ID in an authorization list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SpiffeRef(pub SpiffeId);

impl TryFrom<String> for SpiffeRef {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        text.parse().map(SpiffeRef)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    site: DnsLabel,
    #[serde(default)]
    control: ControlSettings,
    #[serde(default)]
    k3s: K3sSettings,
    #[serde(default)]
    proxy: ProxySettings,
    #[serde(default)]
    join: JoinSettings,
    #[serde(default)]
    nodes: BTreeMap<DnsLabel, Node>,
    #[serde(default)]
    services: BTreeMap<DnsLabel, Service>,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default)]
    rollout: RolloutSettings,
}

/// The most control replicas a server node runs (`[control] replicas`).
pub const MAX_REPLICAS: u8 = 9;

/// Ports a node's own daemons hold, which a service's `local_port` must not take; the
/// proxy's two traffic ports first (no service's `port` either).
const RESERVED_PORTS: &[(u16, &str)] = &[
    (4140, "the proxy's outbound port"),
    (4143, "the proxy's inbound port"),
    (4191, "the proxy's admin port"),
    (4200, "the supervisor's status port"),
];

/// The bounds of the site's limits and durations: every value inside them is one the
/// proxies can use as it is (no overflow when added to a clock, no listener that refuses
/// everything), so a validated revision cannot crash or silence a site.
pub mod limits {
    use std::ops::RangeInclusive;
    use std::time::Duration;

    /// `[proxy] max_connections` (each takes two open files).
    pub const MAX_CONNECTIONS: RangeInclusive<u32> = 1..=262_144;
    /// `[proxy] max_header_bytes`.
    pub const MAX_HEADER_BYTES: RangeInclusive<u32> = 1_024..=1_048_576;
    /// `[proxy] header_timeout`.
    pub const HEADER_TIMEOUT: RangeInclusive<Duration> =
        Duration::from_millis(100)..=Duration::from_secs(600);
    /// A service's `timeout` and `[proxy] default_timeout` (until the response head).
    pub const REQUEST_TIMEOUT: RangeInclusive<Duration> =
        Duration::from_millis(1)..=Duration::from_secs(86_400);
    /// A service's `idle_timeout`.
    pub const IDLE_TIMEOUT: RangeInclusive<Duration> =
        Duration::from_secs(1)..=Duration::from_secs(86_400);
    /// A fault's `delay.duration`.
    pub const FAULT_DELAY: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(3_600);
    /// `[proxy] span_queue_max_bytes` (1 GiB: a fair share of a Pi's SD card).
    pub const SPAN_QUEUE_MAX_BYTES: RangeInclusive<u64> = 0..=1024 * 1024 * 1024;
    /// `[rollout] offline_after`.
    pub const ROLLOUT_OFFLINE_AFTER: RangeInclusive<Duration> =
        Duration::from_secs(10)..=Duration::from_secs(7 * 86_400);
}

/// Checks every limit and duration of `raw` (read from `text` of `file`) against
/// [`limits`].
fn check_limits(file: &Path, text: &str, raw: &RawCluster, errors: &mut Vec<ConfigError>) {
    let mut fail = |path: &[&str], OutOfBounds(message)| {
        errors.push(ConfigError::at_path(file, text, path, message));
    };
    let proxy = &raw.proxy;
    within(
        proxy.max_connections,
        &limits::MAX_CONNECTIONS,
        u32::to_string,
    )
    .unwrap_or_else(|message| fail(&["proxy", "max_connections"], message));
    within(
        proxy.max_header_bytes,
        &limits::MAX_HEADER_BYTES,
        u32::to_string,
    )
    .unwrap_or_else(|message| fail(&["proxy", "max_header_bytes"], message));
    within(proxy.header_timeout.0, &limits::HEADER_TIMEOUT, show)
        .unwrap_or_else(|message| fail(&["proxy", "header_timeout"], message));
    within(proxy.default_timeout.0, &limits::REQUEST_TIMEOUT, show)
        .unwrap_or_else(|message| fail(&["proxy", "default_timeout"], message));
    within(
        proxy.span_queue_max_bytes,
        &limits::SPAN_QUEUE_MAX_BYTES,
        u64::to_string,
    )
    .unwrap_or_else(|message| fail(&["proxy", "span_queue_max_bytes"], message));
    within(
        raw.rollout.offline_after.0,
        &limits::ROLLOUT_OFFLINE_AFTER,
        show,
    )
    .unwrap_or_else(|message| fail(&["rollout", "offline_after"], message));
    for (name, service) in &raw.services {
        let name = name.as_str();
        if let Some(timeout) = service.timeout {
            within(timeout.0, &limits::REQUEST_TIMEOUT, show)
                .unwrap_or_else(|message| fail(&["services", name, "timeout"], message));
        }
        if let Some(idle) = service.idle_timeout {
            within(idle.0, &limits::IDLE_TIMEOUT, show)
                .unwrap_or_else(|message| fail(&["services", name, "idle_timeout"], message));
        }
        if let Some(delay) = service
            .fault
            .as_ref()
            .and_then(|fault| fault.delay.as_ref())
        {
            within(delay.duration.0, &limits::FAULT_DELAY, show).unwrap_or_else(|message| {
                fail(&["services", name, "fault", "delay", "duration"], message)
            });
        }
    }
}

/// Checks `[rollout]`'s waves, canaries and release (its duration is checked with the
/// limits).
fn check_rollout(rollout: &RolloutSettings, fail: &mut dyn FnMut(&[&str], String)) {
    check_waves(&rollout.waves, "waves", fail);
    check_no_twice(&rollout.canary, "canary", "node", fail);
    check_waves(&rollout.fleet_waves, "fleet_waves", fail);
    check_no_twice(&rollout.fleet_canary, "fleet_canary", "site", fail);
    match &rollout.release {
        Some(release) => {
            let fits = (1..=64).contains(&release.len())
                && release
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !fits {
                fail(
                    &["rollout", "release"],
                    format!(
                        "expected 1 to 64 letters, digits, '.', '_' or '-', such as \
                         \"2026.12-tls\", found {release:?}"
                    ),
                );
            }
        }
        None => {
            if !rollout.fleet_canary.is_empty() || rollout.fleet_waves != [100] {
                let field = if rollout.fleet_canary.is_empty() {
                    "fleet_waves"
                } else {
                    "fleet_canary"
                };
                fail(
                    &["rollout", field],
                    "a fleet rollout needs a `release` name, the same on every site it is \
                     published to"
                        .to_owned(),
                );
            }
        }
    }
}

/// Checks cumulative wave percentages (`[rollout] <field>`).
fn check_waves(waves: &[u8], field: &str, fail: &mut dyn FnMut(&[&str], String)) {
    let expected =
        "expected increasing percentages of 1 to 100 ending at 100, such as [10, 50, 100]";
    match waves.last() {
        None => fail(&["rollout", field], format!("{expected}, found none")),
        Some(&last) if last != 100 => fail(
            &["rollout", field],
            format!("{expected}, found a last wave of {last}"),
        ),
        Some(_) => {}
    }
    let mut before = 0;
    for (i, &percent) in waves.iter().enumerate() {
        if percent == 0 || percent > 100 || percent <= before {
            fail(
                &["rollout", field, &i.to_string()],
                format!("{expected}, found {percent} after {before}"),
            );
        }
        before = percent;
    }
}

/// Checks that `[rollout] <field>` names no `what` (node, site) twice.
fn check_no_twice(
    names: &[DnsLabel],
    field: &str,
    what: &str,
    fail: &mut dyn FnMut(&[&str], String),
) {
    let mut seen = BTreeSet::new();
    for (i, name) in names.iter().enumerate() {
        if !seen.insert(name) {
            fail(
                &["rollout", field, &i.to_string()],
                format!("{what} {name} is listed twice"),
            );
        }
    }
}

/// A span collector's URL as the proxy posts to it: `http://host[:port][/path]`, without
/// credentials (the proxy speaks plain HTTP to a collector on the node or the LAN).
fn check_collector_url(text: &str) -> Result<(), String> {
    let expected =
        "expected an http:// URL with a host, such as \"http://collector:4318/v1/traces\"";
    let url = url::Url::parse(text).map_err(|err| format!("{expected}, found {text:?} ({err})"))?;
    if url.scheme() != "http" {
        return Err(format!(
            "{expected}, found scheme {:?} (only http:// is supported)",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{expected}, found {text:?}"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{expected}, found credentials in {text:?}, which are not supported"
        ));
    }
    Ok(())
}

/// A value outside the bounds of its field.
struct OutOfBounds(String);

/// `Err` with "expected <low> to <high>, found <found>" when `found` is outside `range`.
fn within<T: PartialOrd + Copy>(
    found: T,
    range: &std::ops::RangeInclusive<T>,
    show: impl Fn(&T) -> String,
) -> Result<(), OutOfBounds> {
    if range.contains(&found) {
        return Ok(());
    }
    Err(OutOfBounds(format!(
        "expected {} to {}, found {}",
        show(range.start()),
        show(range.end()),
        show(&found)
    )))
}

/// A duration as the config writes it (`10m`, `1day`).
fn show(duration: &Duration) -> String {
    humantime::format_duration(*duration).to_string()
}

impl ClusterConfig {
    /// Validates `text`, the contents of `file`: the first error found.
    pub fn parse(file: &Path, text: &str) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::parse_all(file, text).map_err(|errors| {
            errors
                .into_iter()
                .next()
                .unwrap_or_else(|| ConfigError::file(file, "invalid site configuration"))
        })
    }

    /// Validates `text`, the contents of `file`, reporting every error found (at least one
    /// when `Err`), in the order of the checks: a file that is not TOML of the right
    /// shape stops at that one error.
    pub fn parse_all(file: &Path, text: &str) -> Result<ClusterConfig, Vec<ConfigError>> {
        let raw: RawCluster = parse_toml(file, text).map_err(|err| vec![err])?;
        let fail = |path: &[&str], message: String| {
            ConfigError::at_key(file, text, locate(text, path), &key_name(path), message)
        };
        let mut errors: Vec<ConfigError> = Vec::new();
        if !(1..=MAX_REPLICAS).contains(&raw.control.replicas) {
            let found = raw.control.replicas;
            errors.push(fail(
                &["control", "replicas"],
                format!("expected 1 to {MAX_REPLICAS} replicas, found {found}"),
            ));
        }
        if ![1, 3, 5].contains(&raw.k3s.servers) {
            let found = raw.k3s.servers;
            errors.push(fail(
                &["k3s", "servers"],
                format!("expected 1, 3 or 5 servers (an odd quorum), found {found}"),
            ));
        }
        for (name, manifest) in &raw.k3s.manifests {
            if let Err(fault) = check_manifest(manifest.text()) {
                let document = fault.document.to_string();
                let mut key = vec!["k3s", "manifests", name.as_str(), document.as_str()];
                key.extend(fault.field.iter().flat_map(|field| field.split('.')));
                errors.push(ConfigError::at_key(
                    file,
                    text,
                    locate(text, &["k3s", "manifests", name.as_str()]),
                    &key_name(&key),
                    fault.message,
                ));
            }
        }
        if raw.proxy.retry_budget_percent > 100 {
            let found = raw.proxy.retry_budget_percent;
            errors.push(fail(
                &["proxy", "retry_budget_percent"],
                format!("expected 0 to 100, found {found}"),
            ));
        }
        check_limits(file, text, &raw, &mut errors);
        for (key, url) in [
            ("otlp_url", &raw.proxy.otlp_url),
            ("zipkin_url", &raw.proxy.zipkin_url),
        ] {
            if let Some(Err(message)) = url.as_deref().map(check_collector_url) {
                errors.push(fail(&["proxy", key], message));
            }
        }
        if let Some(dir) = &raw.proxy.span_queue_dir {
            if !dir.is_absolute() {
                errors.push(fail(
                    &["proxy", "span_queue_dir"],
                    format!("expected an absolute path, found {:?}", dir.display()),
                ));
            }
        }
        let mut local_ports = BTreeMap::new();
        for (name, service) in &raw.services {
            let name = name.as_str();
            if let Some(port) = service.local_port {
                let at = ["services", name, "local_port"];
                if let Some((_, owner)) = RESERVED_PORTS.iter().find(|(p, _)| *p == port) {
                    errors.push(fail(&at, format!("port {port} is {owner}")));
                }
                let replicas = crate::supervisor::CONTROL_BASE_PORT + 1
                    ..=crate::supervisor::CONTROL_BASE_PORT + u16::from(MAX_REPLICAS);
                if replicas.contains(&port) || port == 0 {
                    let (first, last) = (replicas.start(), replicas.end());
                    errors.push(fail(
                        &at,
                        format!("expected a free port (1 to 65535, not {first} to {last} of the control replicas), found {port}"),
                    ));
                }
                if let Some(other) = local_ports.insert(port, name) {
                    errors.push(fail(
                        &at,
                        format!("port {port} is already the local port of {other}"),
                    ));
                }
            }
            if let Some(port) = service.port {
                let at = ["services", name, "port"];
                // The proxy's traffic ports would deliver a request back into the proxy.
                // Its admin port and the supervisor's status port are HTTP APIs that a
                // service may mesh (a site's status pages, its proxies' metrics).
                let looping = RESERVED_PORTS[..2].iter().find(|(p, _)| *p == port);
                if let Some((_, owner)) = looping {
                    errors.push(fail(
                        &at,
                        format!(
                            "port {port} is {owner}: requests delivered there would come back \
                             into the proxy"
                        ),
                    ));
                }
            }
            let has_endpoints = !service.nodes.is_empty();
            if has_endpoints && service.port.is_none() {
                errors.push(fail(
                    &["services", name, "nodes"],
                    "a service placed on nodes needs a `port`".into(),
                ));
            }
            if !has_endpoints && service.split.is_empty() {
                errors.push(fail(
                    &["services", name],
                    "expected `nodes` and `port` (where it runs) or `split` (the services it sends to)".into(),
                ));
            }
            let mut seen_nodes = BTreeSet::new();
            for (i, node) in service.nodes.iter().enumerate() {
                if !seen_nodes.insert(node) {
                    errors.push(fail(
                        &["services", name, "nodes", &i.to_string()],
                        format!("node {node} is listed twice"),
                    ));
                }
            }
            if service.retries > 5 {
                errors.push(fail(
                    &["services", name, "retries"],
                    format!("expected 0 to 5, found {}", service.retries),
                ));
            }
            let mut seen_backends = BTreeSet::new();
            for (i, backend) in service.split.iter().enumerate() {
                let at = ["services", name, "split", &i.to_string(), "service"];
                let Some(target) = raw.services.get(&backend.service) else {
                    errors.push(fail(
                        &at,
                        format!(
                            "expected the name of a service in this file, found {}",
                            backend.service
                        ),
                    ));
                    continue;
                };
                if !target.split.is_empty() {
                    errors.push(fail(
                        &at,
                        format!("{} has a split itself; splits do not nest", backend.service),
                    ));
                }
                if target.nodes.is_empty() {
                    errors.push(fail(
                        &at,
                        format!("{} is placed on no node", backend.service),
                    ));
                }
                if !seen_backends.insert(&backend.service) {
                    errors.push(fail(&at, format!("{} is listed twice", backend.service)));
                }
            }
            if !service.split.is_empty() && service.split.iter().all(|b| b.weight == 0) {
                errors.push(fail(
                    &["services", name, "split"],
                    "expected at least one backend with a weight above 0".into(),
                ));
            }
            for (i, id) in service.allow.iter().flatten().enumerate() {
                if id.0.site != raw.site {
                    errors.push(fail(
                        &["services", name, "allow", &i.to_string()],
                        format!("expected an identity of site {}, found {}", raw.site, id.0),
                    ));
                }
            }
        }
        let mut taken = BTreeSet::new();
        for (i, route) in raw.routes.iter().enumerate() {
            if let Err(fault) = crate::routes::check(route, &raw.services, &mut taken) {
                let index = i.to_string();
                let mut path = vec!["routes", index.as_str()];
                path.extend(fault.field.iter().map(String::as_str));
                errors.push(fail(&path, fault.message));
            }
        }
        check_rollout(&raw.rollout, &mut |path, message| {
            errors.push(fail(path, message))
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(ClusterConfig {
            site: raw.site,
            control: raw.control,
            k3s: raw.k3s,
            proxy: raw.proxy,
            join: raw.join,
            nodes: raw.nodes,
            services: raw.services,
            routes: raw.routes,
            rollout: raw.rollout,
        })
    }

    /// Reads and validates the site configuration at `file`.
    pub fn load(file: &Path) -> Result<ClusterConfig, ConfigError> {
        let text = crate::seed::read_small(file)?;
        ClusterConfig::parse(file, &text)
    }

    /// The identities a node may hold: its own and those of the services placed on it.
    pub fn identities_of_node(&self, node: &DnsLabel) -> BTreeSet<SpiffeId> {
        let mut ids = BTreeSet::from([SpiffeId::node(&self.site, node)]);
        for (name, service) in &self.services {
            if service.nodes.contains(node) {
                ids.insert(SpiffeId::service(&self.site, name));
            }
        }
        ids
    }
}
