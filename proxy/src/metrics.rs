//! The proxy's Prometheus metrics, served at `/metrics` in the OpenMetrics text format.
//!
//! Names and labels follow Linkerd where Linkerd has the metric (`request_total`,
//! `response_total`, `response_latency_ms`, `tcp_*`, `tls_handshake_failure_total`);
//! metrics of our own are prefixed `pimesh_`.
//!
//! Cost model: looking a label set up takes the family's lock and, the first time, allocates
//! the labels. That happens once per route ([`Metrics::route`], [`Metrics::tcp`]) and the
//! caller keeps the handles; recording through a handle is an atomic add (a histogram
//! observation takes an uncontended lock) and never allocates after the first response of each
//! status code. Label sets are never removed, so every series lives as long as the process:
//! the number of series is bounded by the routes and reasons the config and code can name.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{
    EncodeLabel, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::trace::SpanCounters;

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `response_latency_ms` buckets (milliseconds): Linkerd's.
const LATENCY_BUCKETS_MS: [f64; 25] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
    1_000.0, 2_000.0, 3_000.0, 4_000.0, 5_000.0, 10_000.0, 20_000.0, 30_000.0, 40_000.0, 50_000.0,
];

/// Which side of the proxy traffic is on; label `direction="inbound"|"outbound"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// An injected fault; label `kind="abort"|"delay"`.
#[derive(Clone, Copy, Debug)]
pub enum FaultKind {
    Abort,
    Delay,
}

impl FaultKind {
    fn as_str(self) -> &'static str {
        match self {
            FaultKind::Abort => "abort",
            FaultKind::Delay => "delay",
        }
    }
}

/// A label value from the config (service names): escaped as the exposition format requires
/// (`\\`, `\"`, `\n`), since prometheus-client writes label values verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Name(String);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        let mut rest = self.0.as_str();
        while let Some(at) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..at])?;
            encoder.write_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[at + 1..];
        }
        encoder.write_str(rest)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct RouteLabels {
    direction: Direction,
    dst_service: Name,
}

/// `response_total`'s labels. Like Linkerd, a request that got no response has no
/// `status_code` label at all (rather than an empty one).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ResponseLabels {
    route: RouteLabels,
    /// `None`: no response (an error).
    status_code: Option<u16>,
}

impl EncodeLabelSet for ResponseLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        self.route.encode(encoder)?;
        if let Some(code) = self.status_code {
            ("status_code", code).encode(encoder.encode_label())?;
        }
        ("classification", classification(self.status_code)).encode(encoder.encode_label())
    }
}

/// Linkerd's default HTTP classification: a 5xx or no response is a failure.
fn classification(status_code: Option<u16>) -> &'static str {
    match status_code {
        Some(code) if code < 500 => "success",
        _ => "failure",
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct ReasonLabels {
    direction: Direction,
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct RetrySkippedLabels {
    direction: Direction,
    dst_service: Name,
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct FaultLabels {
    dst_service: Name,
    kind: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct SplitLabels {
    service: Name,
    backend: Name,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_MS)
}

/// The families, cloned into the handles (a family clone shares its series).
#[derive(Clone)]
struct Families {
    requests: Family<RouteLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    latency: HistogramFamily<RouteLabels>,
    faults: Family<FaultLabels, Counter>,
    retries: Family<RouteLabels, Counter>,
    retries_skipped: Family<RetrySkippedLabels, Counter>,
    tcp_open: Family<RouteLabels, Counter>,
    tcp_close: Family<RouteLabels, Counter>,
    tcp_read_bytes: Family<RouteLabels, Counter>,
    tcp_write_bytes: Family<RouteLabels, Counter>,
    tls_failures: Family<ReasonLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    splits: Family<SplitLabels, Counter>,
    open_connections: Family<DirectionLabels, Gauge>,
    config_reloads: Family<ResultLabels, Counter>,
}

/// All of the proxy's metrics; share it as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    /// The identity's renewals and expiry (`enroll::metrics`).
    pub identity: crate::control::enroll::IdentityMetrics,
    families: Families,
    spans: SpanCounters,
    /// The control plane client's metrics (see `discovery`).
    pub control: ControlMetrics,
    /// `split`'s counters by apex then backend, so that a split decision looks its counter up
    /// by `&str` without allocating.
    split_cache: Mutex<HashMap<String, HashMap<String, Counter>>>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let families = Families {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            faults: Family::default(),
            retries: Family::default(),
            retries_skipped: Family::default(),
            tcp_open: Family::default(),
            tcp_close: Family::default(),
            tcp_read_bytes: Family::default(),
            tcp_write_bytes: Family::default(),
            tls_failures: Family::default(),
            rejected: Family::default(),
            splits: Family::default(),
            open_connections: Family::default(),
            config_reloads: Family::default(),
        };
        let spans = SpanCounters {
            exported: Counter::default(),
            dropped: Counter::default(),
            failed: Counter::default(),
        };
        let control = ControlMetrics::default();
        let f = &families;
        let mut registry = Registry::default();
        registry.register(
            "pimesh_control_failovers",
            "Times the discovery watch left a control replica (error, end, silence) for the next",
            control.failovers.clone(),
        );
        registry.register(
            "pimesh_discovery_updates",
            "Discovery documents put in use",
            control.updates.clone(),
        );
        registry.register(
            "pimesh_discovery_rejected",
            "Discovery documents refused (the last good one stays in use)",
            control.rejected.clone(),
        );
        registry.register(
            "pimesh_control_heartbeat_failures",
            "Heartbeats to a control replica that failed",
            control.heartbeat_failures.clone(),
        );
        registry.register(
            "pimesh_control_connected",
            "1 while a discovery watch to a control replica is open",
            control.connected.clone(),
        );
        // Counter names are registered without `_total`: the encoder appends it.
        registry.register(
            "request",
            "HTTP requests received, by route",
            f.requests.clone(),
        );
        registry.register(
            "response",
            "HTTP responses (or failures to respond), by status code and classification",
            f.responses.clone(),
        );
        registry.register(
            "response_latency_ms",
            "Time from receiving a request to its response headers, in milliseconds",
            f.latency.clone(),
        );
        registry.register(
            "tcp_open",
            "Connections opened, by destination service",
            f.tcp_open.clone(),
        );
        registry.register(
            "tcp_close",
            "Connections closed, by destination service",
            f.tcp_close.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from closed connections' peers",
            f.tcp_read_bytes.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to closed connections' peers",
            f.tcp_write_bytes.clone(),
        );
        registry.register(
            "tls_handshake_failure",
            "TLS handshakes that failed, by reason",
            f.tls_failures.clone(),
        );
        registry.register(
            "pimesh_rejected",
            "Connections or requests refused for bad input or limits, by reason",
            f.rejected.clone(),
        );
        registry.register(
            "pimesh_split",
            "Traffic split decisions, by apex service and chosen backend",
            f.splits.clone(),
        );
        registry.register(
            "pimesh_fault_injected",
            "Faults injected, by destination service and kind",
            f.faults.clone(),
        );
        registry.register("pimesh_retry", "Retries sent, by route", f.retries.clone());
        registry.register(
            "pimesh_retry_skipped",
            "Retries not sent, by route and reason",
            f.retries_skipped.clone(),
        );
        registry.register(
            "pimesh_spans_exported",
            "Trace spans exported",
            spans.exported.clone(),
        );
        registry.register(
            "pimesh_spans_dropped",
            "Trace spans dropped because the export queue was full",
            spans.dropped.clone(),
        );
        registry.register(
            "pimesh_span_export_failures",
            "Failed span export attempts",
            spans.failed.clone(),
        );
        registry.register(
            "pimesh_open_connections",
            "Connections currently open",
            f.open_connections.clone(),
        );
        registry.register(
            "pimesh_config_reloads",
            "Site config reload attempts, by result",
            f.config_reloads.clone(),
        );
        let identity = crate::control::enroll::IdentityMetrics::register(&mut registry);
        Metrics {
            registry,
            identity,
            families,
            spans,
            control,
            split_cache: Mutex::new(HashMap::new()),
        }
    }

    /// The OpenMetrics text exposition (ends with `# EOF`); see [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail; an encoder error would leave a truncated body,
        // which a scraper rejects for lack of `# EOF`.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Handles for one route: call once per (direction, dst_service) and keep the result.
    /// Calling it again (e.g. after a config reload) returns handles to the same series.
    pub fn route(&self, direction: Direction, dst_service: &str) -> RouteMetrics {
        let labels = RouteLabels {
            direction,
            dst_service: Name(dst_service.to_owned()),
        };
        RouteMetrics {
            inner: Arc::new(RouteInner {
                requests: self.families.requests.get_or_create_owned(&labels),
                labels,
                families: self.families.clone(),
                latency: OnceLock::new(),
                statuses: Mutex::new(Vec::new()),
                faults: [OnceLock::new(), OnceLock::new()],
                retries: OnceLock::new(),
                retries_skipped: OnceLock::new(),
            }),
        }
    }

    /// Handles for opaque TCP and connection counts of one (direction, dst_service);
    /// `dst_service` is `""` for connections not yet routed. Call once and keep the result.
    pub fn tcp(&self, direction: Direction, dst_service: &str) -> TcpMetrics {
        let labels = RouteLabels {
            direction,
            dst_service: Name(dst_service.to_owned()),
        };
        let f = &self.families;
        TcpMetrics {
            inner: Arc::new(TcpInner {
                open: f.tcp_open.get_or_create_owned(&labels),
                close: f.tcp_close.get_or_create_owned(&labels),
                read_bytes: f.tcp_read_bytes.get_or_create_owned(&labels),
                write_bytes: f.tcp_write_bytes.get_or_create_owned(&labels),
            }),
        }
    }

    /// Counts `tls_handshake_failure_total{direction, reason}`. Does not allocate after the
    /// first failure with this reason.
    pub fn tls_handshake_failure(&self, direction: Direction, reason: &'static str) {
        self.families
            .tls_failures
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    /// Counts `pimesh_rejected_total{direction, reason}`: bad input or a limit hit, e.g.
    /// `malformed_http`, `header_too_large`, `header_timeout`, `connection_limit`, `not_tls`,
    /// `unknown_service`, `no_endpoints`, `unauthorized`, `detect_timeout`. Does not allocate
    /// after the first rejection with this reason.
    pub fn rejected(&self, direction: Direction, reason: &'static str) {
        self.families
            .rejected
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    /// Counts one split decision: `pimesh_split_total{service=apex, backend}`. Does not
    /// allocate after the first decision for this (apex, backend).
    pub fn split(&self, apex: &str, backend: &str) {
        let mut cache = self.split_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(counter) = cache.get(apex).and_then(|backends| backends.get(backend)) {
            counter.inc();
            return;
        }
        let counter = self.families.splits.get_or_create_owned(&SplitLabels {
            service: Name(apex.to_owned()),
            backend: Name(backend.to_owned()),
        });
        counter.inc();
        cache
            .entry(apex.to_owned())
            .or_default()
            .insert(backend.to_owned(), counter);
    }

    /// The counters the span exporter updates.
    pub fn span_counters(&self) -> SpanCounters {
        self.spans.clone()
    }

    /// Counts one open connection in `pimesh_open_connections{direction}` until the guard is
    /// dropped.
    pub fn open_connection(&self, direction: Direction) -> ConnectionGuard {
        let gauge = self
            .families
            .open_connections
            .get_or_create_owned(&DirectionLabels { direction });
        gauge.inc();
        ConnectionGuard { gauge }
    }

    /// Counts `pimesh_config_reloads_total{result="ok"|"error"}`.
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.families
            .config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The control plane client's metrics: `pimesh_control_failovers_total`,
/// `pimesh_discovery_updates_total`, `pimesh_discovery_rejected_total`,
/// `pimesh_control_heartbeat_failures_total`, `pimesh_control_connected`.
#[derive(Clone, Default)]
pub struct ControlMetrics {
    pub failovers: Counter,
    pub updates: Counter,
    pub rejected: Counter,
    pub heartbeat_failures: Counter,
    pub connected: Gauge,
}

/// Decrements `pimesh_open_connections{direction}` when dropped.
pub struct ConnectionGuard {
    gauge: Gauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// One route's handles (cheap to clone: one `Arc`). Series other than `request_total` appear
/// in the exposition only once first recorded, so routes without retries or faults add no
/// zero-valued lines.
#[derive(Clone)]
pub struct RouteMetrics {
    inner: Arc<RouteInner>,
}

struct RouteInner {
    labels: RouteLabels,
    families: Families,
    requests: Counter,
    latency: OnceLock<Histogram>,
    /// `response_total` by status code (0: no response), filled on first use. A route sees a
    /// handful of codes, so a linear scan beats hashing.
    statuses: Mutex<Vec<(u16, Counter)>>,
    /// Indexed by `FaultKind as usize`.
    faults: [OnceLock<Counter>; 2],
    retries: OnceLock<Counter>,
    retries_skipped: OnceLock<Counter>,
}

impl RouteMetrics {
    /// Counts `request_total{direction, dst_service}`.
    pub fn request(&self) {
        self.inner.requests.inc();
    }

    /// Records a response: `response_total{direction, dst_service, status_code,
    /// classification}` and `response_latency_ms{direction, dst_service}`.
    ///
    /// `status` 0 means no response (the request failed): counted without a `status_code`
    /// label and classified `failure`, like Linkerd. Any other status is classified `failure`
    /// when it is 5xx, `success` otherwise. `latency` is time to the response headers (or to
    /// the failure).
    pub fn response(&self, status: u16, latency: Duration) {
        let inner = &*self.inner;
        {
            let mut statuses = inner.statuses.lock().unwrap_or_else(|e| e.into_inner());
            match statuses.iter().find(|(code, _)| *code == status) {
                Some((_, counter)) => {
                    counter.inc();
                }
                None => {
                    let counter = inner
                        .families
                        .responses
                        .get_or_create_owned(&ResponseLabels {
                            route: inner.labels.clone(),
                            status_code: (status != 0).then_some(status),
                        });
                    counter.inc();
                    statuses.push((status, counter));
                }
            }
        }
        inner
            .latency
            .get_or_init(|| inner.families.latency.get_or_create_owned(&inner.labels))
            .observe(latency.as_secs_f64() * 1_000.0);
    }

    /// Counts `pimesh_fault_injected_total{dst_service, kind}`.
    pub fn fault(&self, kind: FaultKind) {
        let inner = &*self.inner;
        inner.faults[kind as usize]
            .get_or_init(|| {
                inner.families.faults.get_or_create_owned(&FaultLabels {
                    dst_service: inner.labels.dst_service.clone(),
                    kind: kind.as_str(),
                })
            })
            .inc();
    }

    /// Counts `pimesh_retry_total{direction, dst_service}`: one per retry sent.
    pub fn retry(&self) {
        let inner = &*self.inner;
        inner
            .retries
            .get_or_init(|| inner.families.retries.get_or_create_owned(&inner.labels))
            .inc();
    }

    /// Counts `pimesh_retry_skipped_total{direction, dst_service, reason="budget"}`: a retry
    /// the retry budget refused.
    pub fn retry_budget_exhausted(&self) {
        let inner = &*self.inner;
        inner
            .retries_skipped
            .get_or_init(|| {
                inner
                    .families
                    .retries_skipped
                    .get_or_create_owned(&RetrySkippedLabels {
                        direction: inner.labels.direction,
                        dst_service: inner.labels.dst_service.clone(),
                        reason: "budget",
                    })
            })
            .inc();
    }
}

/// One (direction, dst_service)'s connection handles (cheap to clone: one `Arc`).
#[derive(Clone)]
pub struct TcpMetrics {
    inner: Arc<TcpInner>,
}

struct TcpInner {
    open: Counter,
    close: Counter,
    read_bytes: Counter,
    write_bytes: Counter,
}

impl TcpMetrics {
    /// Counts `tcp_open_total{direction, dst_service}`.
    pub fn open(&self) {
        self.inner.open.inc();
    }

    /// Counts `tcp_close_total` and adds the connection's totals to `tcp_read_bytes_total`
    /// and `tcp_write_bytes_total` (bytes read from / written to the peer).
    pub fn close(&self, read_bytes: u64, write_bytes: u64) {
        self.inner.close.inc();
        self.inner.read_bytes.inc_by(read_bytes);
        self.inner.write_bytes.inc_by(write_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition's sample lines (no comments), for exact matching.
    fn samples(metrics: &Metrics) -> Vec<String> {
        let text = metrics.encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    #[track_caller]
    fn assert_sample(samples: &[String], line: &str) {
        assert!(
            samples.iter().any(|s| s == line),
            "missing {line:?} in:\n{}",
            samples.join("\n")
        );
    }

    #[track_caller]
    fn assert_no_sample(samples: &[String], prefix: &str) {
        assert!(
            !samples.iter().any(|s| s.starts_with(prefix)),
            "unexpected {prefix:?} in:\n{}",
            samples.join("\n")
        );
    }

    #[test]
    fn requests_and_responses() {
        let metrics = Metrics::new();
        let web = metrics.route(Direction::Outbound, "web");
        for _ in 0..3 {
            web.request();
        }
        web.response(200, Duration::from_micros(500));
        web.response(200, Duration::from_millis(7));
        web.response(503, Duration::from_millis(250));
        web.response(0, Duration::from_secs(60));
        // A second lookup of the same route shares the series.
        metrics.route(Direction::Outbound, "web").request();
        metrics.route(Direction::Inbound, "web").request();

        let s = samples(&metrics);
        assert_sample(
            &s,
            r#"request_total{direction="outbound",dst_service="web"} 4"#,
        );
        assert_sample(
            &s,
            r#"request_total{direction="inbound",dst_service="web"} 1"#,
        );
        assert_sample(
            &s,
            r#"response_total{direction="outbound",dst_service="web",status_code="200",classification="success"} 2"#,
        );
        assert_sample(
            &s,
            r#"response_total{direction="outbound",dst_service="web",status_code="503",classification="failure"} 1"#,
        );
        assert_sample(
            &s,
            r#"response_total{direction="outbound",dst_service="web",classification="failure"} 1"#,
        );
        let bucket = |le: &str, n: u64| {
            format!(
                r#"response_latency_ms_bucket{{le="{le}",direction="outbound",dst_service="web"}} {n}"#
            )
        };
        assert_sample(&s, &bucket("1.0", 1));
        assert_sample(&s, &bucket("5.0", 1));
        assert_sample(&s, &bucket("10.0", 2));
        assert_sample(&s, &bucket("200.0", 2));
        assert_sample(&s, &bucket("300.0", 3));
        assert_sample(&s, &bucket("50000.0", 3));
        assert_sample(&s, &bucket("+Inf", 4));
        assert_sample(
            &s,
            r#"response_latency_ms_count{direction="outbound",dst_service="web"} 4"#,
        );
        assert_sample(
            &s,
            r#"response_latency_ms_sum{direction="outbound",dst_service="web"} 60257.5"#,
        );
        let buckets = s
            .iter()
            .filter(|l| l.starts_with("response_latency_ms_bucket{") && l.contains("outbound"))
            .count();
        assert_eq!(buckets, LATENCY_BUCKETS_MS.len() + 1);
        // The inbound route had no response: no histogram series for it.
        assert_no_sample(
            &s,
            r#"response_latency_ms_count{direction="inbound",dst_service="web"}"#,
        );
    }

    #[test]
    fn faults_and_retries() {
        let metrics = Metrics::new();
        let api = metrics.route(Direction::Outbound, "api");
        let s = samples(&metrics);
        assert_no_sample(&s, "pimesh_fault_injected_total");
        assert_no_sample(&s, "pimesh_retry_total");
        assert_no_sample(&s, "pimesh_retry_skipped_total");

        api.fault(FaultKind::Abort);
        api.fault(FaultKind::Delay);
        api.fault(FaultKind::Delay);
        api.retry();
        api.retry();
        api.retry_budget_exhausted();
        let s = samples(&metrics);
        assert_sample(
            &s,
            r#"pimesh_fault_injected_total{dst_service="api",kind="abort"} 1"#,
        );
        assert_sample(
            &s,
            r#"pimesh_fault_injected_total{dst_service="api",kind="delay"} 2"#,
        );
        assert_sample(
            &s,
            r#"pimesh_retry_total{direction="outbound",dst_service="api"} 2"#,
        );
        assert_sample(
            &s,
            r#"pimesh_retry_skipped_total{direction="outbound",dst_service="api",reason="budget"} 1"#,
        );
    }

    #[test]
    fn tcp_and_connections() {
        let metrics = Metrics::new();
        let db = metrics.tcp(Direction::Inbound, "db");
        db.open();
        db.open();
        db.close(100, 2_000);
        let unrouted = metrics.tcp(Direction::Inbound, "");
        unrouted.open();
        let a = metrics.open_connection(Direction::Inbound);
        let b = metrics.open_connection(Direction::Inbound);
        let c = metrics.open_connection(Direction::Outbound);
        drop(a);
        drop(c);

        let s = samples(&metrics);
        assert_sample(
            &s,
            r#"tcp_open_total{direction="inbound",dst_service="db"} 2"#,
        );
        assert_sample(
            &s,
            r#"tcp_open_total{direction="inbound",dst_service=""} 1"#,
        );
        assert_sample(
            &s,
            r#"tcp_close_total{direction="inbound",dst_service="db"} 1"#,
        );
        assert_sample(
            &s,
            r#"tcp_read_bytes_total{direction="inbound",dst_service="db"} 100"#,
        );
        assert_sample(
            &s,
            r#"tcp_write_bytes_total{direction="inbound",dst_service="db"} 2000"#,
        );
        assert_sample(&s, r#"pimesh_open_connections{direction="inbound"} 1"#);
        assert_sample(&s, r#"pimesh_open_connections{direction="outbound"} 0"#);
        drop(b);
        let s = samples(&metrics);
        assert_sample(&s, r#"pimesh_open_connections{direction="inbound"} 0"#);
    }

    #[test]
    fn reasons_splits_spans_reloads() {
        let metrics = Metrics::new();
        metrics.tls_handshake_failure(Direction::Inbound, "no_client_cert");
        metrics.tls_handshake_failure(Direction::Inbound, "no_client_cert");
        metrics.rejected(Direction::Inbound, "header_too_large");
        metrics.rejected(Direction::Outbound, "no_endpoints");
        metrics.rejected(Direction::Outbound, "no_endpoints");
        metrics.split("web", "web-v1");
        metrics.split("web", "web-v2");
        metrics.split("web", "web-v2");
        let spans = metrics.span_counters();
        spans.exported.inc_by(5);
        spans.dropped.inc();
        spans.failed.inc_by(2);
        metrics.config_reload(true);
        metrics.config_reload(true);
        metrics.config_reload(false);

        let s = samples(&metrics);
        assert_sample(
            &s,
            r#"tls_handshake_failure_total{direction="inbound",reason="no_client_cert"} 2"#,
        );
        assert_sample(
            &s,
            r#"pimesh_rejected_total{direction="inbound",reason="header_too_large"} 1"#,
        );
        assert_sample(
            &s,
            r#"pimesh_rejected_total{direction="outbound",reason="no_endpoints"} 2"#,
        );
        assert_sample(
            &s,
            r#"pimesh_split_total{service="web",backend="web-v1"} 1"#,
        );
        assert_sample(
            &s,
            r#"pimesh_split_total{service="web",backend="web-v2"} 2"#,
        );
        assert_sample(&s, "pimesh_spans_exported_total 5");
        assert_sample(&s, "pimesh_spans_dropped_total 1");
        assert_sample(&s, "pimesh_span_export_failures_total 2");
        assert_sample(&s, r#"pimesh_config_reloads_total{result="ok"} 2"#);
        assert_sample(&s, r#"pimesh_config_reloads_total{result="error"} 1"#);
    }

    #[test]
    fn type_lines_and_escaping() {
        let metrics = Metrics::new();
        let route = metrics.route(Direction::Outbound, "we\"ird\\svc\n");
        route.request();
        route.response(200, Duration::from_millis(1));
        let _open = metrics.open_connection(Direction::Inbound);
        let text = metrics.encode();
        assert!(text.contains("# TYPE request counter\n"), "{text}");
        assert!(
            text.contains("# TYPE response_latency_ms histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE pimesh_open_connections gauge\n"),
            "{text}"
        );
        assert_sample(
            &samples(&metrics),
            r#"request_total{direction="outbound",dst_service="we\"ird\\svc\n"} 1"#,
        );
    }
}
