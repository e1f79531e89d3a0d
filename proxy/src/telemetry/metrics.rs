//! The proxy's Prometheus metrics, served at `/metrics` in the OpenMetrics text format.
//!
//! Names and labels follow Linkerd where Linkerd has the metric (`request_total`,
//! `response_total`, `response_latency_ms`, `tcp_*`, `tls_handshake_failure_total`);
//! metrics of our own are prefixed `pimesh_`.
//!
//! [`Metrics`] is the root: one registry, in which each concern registers the families it
//! defines and records, and the handles each concern is given. Label sets are never
//! removed, so every series lives as long as the process: the number of series is bounded
//! by the routes and reasons the config and code can name.

use prometheus_client::registry::Registry;

use super::requests::RequestMetrics;
use super::trace::SpanCounters;
use crate::config::metrics::ConfigMetrics;
use crate::control::discovery::metrics::ControlMetrics;
use crate::control::enroll::metrics::IdentityMetrics;
use crate::outbound::metrics::OutboundMetrics;
use crate::transport::metrics::ConnectionMetrics;

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// All of the proxy's metrics; share it as `Arc<Metrics>`, or hand a concern its own part.
pub struct Metrics {
    registry: Registry,
    /// The discovery client's (`control::discovery`).
    pub control: ControlMetrics,
    /// HTTP requests and responses by route, both directions.
    pub requests: RequestMetrics,
    /// Connections: opened, closed, open, refused, failed TLS handshakes.
    pub connections: ConnectionMetrics,
    /// Splits, faults and retries.
    pub outbound: OutboundMetrics,
    /// The span exporter's counters.
    pub spans: SpanCounters,
    /// Site config reloads.
    pub config: ConfigMetrics,
    /// The identity's renewals and expiry (`control::enroll`).
    pub identity: IdentityMetrics,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let control = ControlMetrics::register(&mut registry);
        let requests = RequestMetrics::register(&mut registry);
        let connections = ConnectionMetrics::register(&mut registry);
        let outbound = OutboundMetrics::register(&mut registry);
        let spans = SpanCounters::register(&mut registry);
        let config = ConfigMetrics::register(&mut registry);
        let identity = IdentityMetrics::register(&mut registry);
        Metrics {
            registry,
            control,
            requests,
            connections,
            outbound,
            spans,
            config,
            identity,
        }
    }

    /// The OpenMetrics text exposition (ends with `# EOF`); see [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(8 * 1024);
    // Writing to a String cannot fail; an encoder error would leave a truncated body,
    // which a scraper rejects for lack of `# EOF`.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Reading an exposition back, for the tests of every concern's metrics.
#[cfg(test)]
pub mod testing {
    use prometheus_client::registry::Registry;

    /// The exposition's sample lines (no comments), for exact matching.
    pub fn samples(registry: &Registry) -> Vec<String> {
        let text = super::encode(registry);
        assert!(text.ends_with("# EOF\n"), "{text}");
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    #[track_caller]
    pub fn assert_sample(samples: &[String], line: &str) {
        assert!(
            samples.iter().any(|s| s == line),
            "missing {line:?} in:\n{}",
            samples.join("\n")
        );
    }

    #[track_caller]
    pub fn assert_no_sample(samples: &[String], prefix: &str) {
        assert!(
            !samples.iter().any(|s| s.starts_with(prefix)),
            "unexpected {prefix:?} in:\n{}",
            samples.join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::telemetry::requests::testing::lab;
    use std::time::Duration;

    use super::*;
    use crate::outbound::metrics::FaultKind;
    use crate::telemetry::labels::Direction;

    #[test]
    fn type_lines_and_escaping() {
        let metrics = Metrics::new();
        let route = metrics
            .requests
            .route(Direction::Outbound, lab("we\"ird\\svc\n"));
        route.request();
        route.response(200, Duration::from_millis(1));
        let _open = metrics.connections.open_connection(Direction::Inbound);
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
        testing::assert_sample(
            &testing::samples(&metrics.registry),
            r#"request_total{direction="outbound",dst_service="we\"ird\\svc\n",namespace="lab",tls="true"} 1"#,
        );
    }

    #[test]
    fn every_family_is_registered_once_with_its_type() {
        // Families without a series are left out of the exposition: record in each.
        let metrics = Metrics::new();
        let route = metrics.requests.route(Direction::Outbound, lab("web"));
        route.request();
        route.response(200, Duration::from_millis(1));
        metrics
            .connections
            .tcp(Direction::Outbound, lab("web"))
            .close(1, 1);
        metrics
            .connections
            .tcp(Direction::Inbound, lab("web"))
            .open();
        metrics
            .connections
            .tls_handshake_failure(Direction::Inbound, "no_client_cert");
        metrics
            .connections
            .rejected(Direction::Inbound, "unauthorized");
        let _open = metrics.connections.open_connection(Direction::Inbound);
        metrics.outbound.split("web", "web-v1");
        let policy = metrics.outbound.route(lab("web"));
        policy.fault(FaultKind::Abort);
        policy.retry();
        policy.retry_budget_exhausted();
        metrics.config.reload(true);
        metrics.identity.renewal(true);
        metrics.spans.exporter("otlp");
        let text = metrics.encode();
        let types: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .collect();
        let mut names: Vec<&str> = types
            .iter()
            .filter_map(|line| line.split(' ').next())
            .collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all, "{types:?}");
        for family in [
            "pimesh_control_failovers counter",
            "pimesh_discovery_updates counter",
            "pimesh_discovery_rejected counter",
            "pimesh_control_heartbeat_failures counter",
            "pimesh_control_connected gauge",
            "request counter",
            "response counter",
            "response_latency_ms histogram",
            "tcp_open counter",
            "tcp_close counter",
            "tcp_read_bytes counter",
            "tcp_write_bytes counter",
            "tls_handshake_failure counter",
            "pimesh_rejected counter",
            "pimesh_split counter",
            "pimesh_fault_injected counter",
            "pimesh_retry counter",
            "pimesh_retry_skipped counter",
            "pimesh_spans_exported counter",
            "pimesh_spans_dropped counter",
            "pimesh_span_export_failures counter",
            "pimesh_spans_kept counter",
            "pimesh_span_queue_corrupt_files counter",
            "pimesh_span_queue_spans gauge",
            "pimesh_open_connections gauge",
            "pimesh_config_reloads counter",
            "pimesh_identity_renewals counter",
            "pimesh_identity_expiry_timestamp_seconds gauge",
        ] {
            assert!(types.contains(&family), "{family} missing from {types:?}");
        }
    }
}
