//! The HTTP metrics both directions record per route, named and labelled as Linkerd's:
//! `request_total{direction, dst_service, namespace, tls}`, `response_total{direction,
//! dst_service, namespace, tls, status_code, grpc_status, classification}` (`grpc_status`
//! for gRPC responses that carried one, see `telemetry::grpc`) and
//! `response_latency_ms{direction, dst_service, namespace, tls}`.
//!
//! Cost model: [`RequestMetrics::route`] takes the families' locks and allocates the
//! labels; it is called once per route when a routing table is built, and the table keeps
//! the handles. Recording through a handle is an atomic add (a histogram observation takes
//! an uncontended lock) and never allocates after the first response of each status code.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::labels::{Direction, MeshTls, Name};

/// How a gRPC response ended (`telemetry::grpc` tells), as [`RouteMetrics::grpc_end`]
/// counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcEnd {
    /// With this `grpc-status`.
    Status(u32),
    /// Its body ended without a `grpc-status`: a protocol error.
    NoStatus,
    /// Its body failed: reset, or the connection was cut.
    Error,
    /// Dropped unfinished by the proxy's client (a cancelled call).
    Dropped,
}

/// A response as `response_total` tells it: HTTP status (0: none), `grpc-status`,
/// failure.
type Outcome = (u16, Option<u32>, bool);

/// `response_latency_ms` buckets (milliseconds): Linkerd's.
const LATENCY_BUCKETS_MS: [f64; 25] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
    1_000.0, 2_000.0, 3_000.0, 4_000.0, 5_000.0, 10_000.0, 20_000.0, 30_000.0, 40_000.0, 50_000.0,
];

/// Which service a route's series are of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteName<'a> {
    /// The Kubernetes namespace of a meshed Service, else the site's name.
    pub namespace: &'a str,
    /// The service's name (`dst_service`).
    pub service: &'a str,
}

/// A route's labels: `direction`, `dst_service`, and the two Linkerd's dashboards filter
/// every query on: `namespace` (see [`RouteName`]) and `tls`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct RouteLabels {
    pub direction: Direction,
    pub dst_service: Name,
    pub namespace: Name,
    pub tls: MeshTls,
}

impl RouteLabels {
    pub fn new(direction: Direction, route: RouteName<'_>) -> RouteLabels {
        RouteLabels {
            direction,
            dst_service: Name(route.service.to_owned()),
            namespace: Name(route.namespace.to_owned()),
            tls: MeshTls,
        }
    }
}

/// `response_total`'s labels. Like Linkerd, a request that got no response has no
/// `status_code` label at all (rather than an empty one), and a response without a
/// `grpc-status` no `grpc_status` label.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ResponseLabels {
    route: RouteLabels,
    /// `None`: no response (an error).
    status_code: Option<u16>,
    grpc_status: Option<u32>,
    failure: bool,
}

impl EncodeLabelSet for ResponseLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        self.route.encode(encoder)?;
        if let Some(code) = self.status_code {
            ("status_code", code).encode(encoder.encode_label())?;
        }
        if let Some(code) = self.grpc_status {
            ("grpc_status", code).encode(encoder.encode_label())?;
        }
        let classification = if self.failure { "failure" } else { "success" };
        ("classification", classification).encode(encoder.encode_label())
    }
}

/// Linkerd's default HTTP classification: a 5xx or no response (0) is a failure.
fn http_failure(status: u16) -> bool {
    status == 0 || status >= 500
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_MS)
}

/// The families; cheap to clone (a family clone shares its series).
#[derive(Clone)]
pub struct RequestMetrics {
    requests: Family<RouteLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    latency: HistogramFamily<RouteLabels>,
}

impl RequestMetrics {
    /// New families, registered in `registry`.
    pub fn register(registry: &mut Registry) -> RequestMetrics {
        let metrics = RequestMetrics {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        };
        // Counter names are registered without `_total`: the encoder appends it.
        registry.register(
            "request",
            "HTTP requests received, by route",
            metrics.requests.clone(),
        );
        registry.register(
            "response",
            "HTTP responses (or failures to respond), by status code and classification",
            metrics.responses.clone(),
        );
        registry.register(
            "response_latency_ms",
            "Time from receiving a request to its response headers, in milliseconds",
            metrics.latency.clone(),
        );
        metrics
    }

    /// Handles for one route: call once per (direction, route) and keep the result.
    /// Calling it again (e.g. after a config reload) returns handles to the same series.
    pub fn route(&self, direction: Direction, route: RouteName<'_>) -> RouteMetrics {
        let labels = RouteLabels::new(direction, route);
        RouteMetrics {
            inner: Arc::new(RouteInner {
                requests: self.requests.get_or_create_owned(&labels),
                labels,
                families: self.clone(),
                latency: OnceLock::new(),
                statuses: Mutex::new(Vec::new()),
            }),
        }
    }
}

/// One route's handles (cheap to clone: one `Arc`). Series other than `request_total` appear
/// in the exposition only once first recorded, so routes without responses add no
/// zero-valued lines.
#[derive(Clone)]
pub struct RouteMetrics {
    inner: Arc<RouteInner>,
}

struct RouteInner {
    labels: RouteLabels,
    families: RequestMetrics,
    requests: Counter,
    latency: OnceLock<Histogram>,
    /// `response_total` by (status code (0: no response), grpc-status, failure), filled on
    /// first use. A route sees a handful of these, so a linear scan beats hashing.
    statuses: Mutex<Vec<(Outcome, Counter)>>,
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
        self.count((status, None, http_failure(status)));
        self.latency(latency);
    }

    /// Records `response_latency_ms{direction, dst_service}` alone: the head of a gRPC
    /// response, whose `response_total` waits for [`RouteMetrics::grpc_end`].
    pub fn latency(&self, latency: Duration) {
        let inner = &*self.inner;
        inner
            .latency
            .get_or_init(|| inner.families.latency.get_or_create_owned(&inner.labels))
            .observe(latency.as_secs_f64() * 1_000.0);
    }

    /// Counts `response_total` for a gRPC response of HTTP `status` that ended as `end`:
    /// a failure unless its `grpc-status` is 0, or unless the client cancelled it (then as
    /// its HTTP status says).
    pub fn grpc_end(&self, status: u16, end: GrpcEnd) {
        self.count(match end {
            GrpcEnd::Status(code) => (status, Some(code), code != 0 || http_failure(status)),
            GrpcEnd::NoStatus | GrpcEnd::Error => (status, None, true),
            GrpcEnd::Dropped => (status, None, http_failure(status)),
        });
    }

    fn count(&self, outcome: Outcome) {
        let inner = &*self.inner;
        let mut statuses = inner.statuses.lock().unwrap_or_else(|e| e.into_inner());
        match statuses.iter().find(|(seen, _)| *seen == outcome) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                let (status, grpc_status, failure) = outcome;
                let counter = inner
                    .families
                    .responses
                    .get_or_create_owned(&ResponseLabels {
                        route: inner.labels.clone(),
                        status_code: (status != 0).then_some(status),
                        grpc_status,
                        failure,
                    });
                counter.inc();
                statuses.push((outcome, counter));
            }
        }
    }
}

/// Routes for the tests of every concern's metrics.
#[cfg(test)]
pub mod testing {
    use super::RouteName;

    /// The route of `service` of the site `lab`.
    pub fn lab(service: &str) -> RouteName<'_> {
        RouteName {
            namespace: "lab",
            service,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::lab;
    use super::*;
    use crate::telemetry::metrics::testing::{assert_no_sample, assert_sample, samples};

    #[test]
    fn requests_and_responses() {
        let mut registry = Registry::default();
        let metrics = RequestMetrics::register(&mut registry);
        let web = metrics.route(Direction::Outbound, lab("web"));
        for _ in 0..3 {
            web.request();
        }
        web.response(200, Duration::from_micros(500));
        web.response(200, Duration::from_millis(7));
        web.response(503, Duration::from_millis(250));
        web.response(0, Duration::from_secs(60));
        // A second lookup of the same route shares the series.
        metrics.route(Direction::Outbound, lab("web")).request();
        metrics.route(Direction::Inbound, lab("web")).request();

        let s = samples(&registry);
        assert_sample(
            &s,
            r#"request_total{direction="outbound",dst_service="web",namespace="lab",tls="true"} 4"#,
        );
        assert_sample(
            &s,
            r#"request_total{direction="inbound",dst_service="web",namespace="lab",tls="true"} 1"#,
        );
        assert_sample(
            &s,
            r#"response_total{direction="outbound",dst_service="web",namespace="lab",tls="true",status_code="200",classification="success"} 2"#,
        );
        assert_sample(
            &s,
            r#"response_total{direction="outbound",dst_service="web",namespace="lab",tls="true",status_code="503",classification="failure"} 1"#,
        );
        assert_sample(
            &s,
            r#"response_total{direction="outbound",dst_service="web",namespace="lab",tls="true",classification="failure"} 1"#,
        );
        let bucket = |le: &str, n: u64| {
            format!(
                r#"response_latency_ms_bucket{{le="{le}",direction="outbound",dst_service="web",namespace="lab",tls="true"}} {n}"#
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
            r#"response_latency_ms_count{direction="outbound",dst_service="web",namespace="lab",tls="true"} 4"#,
        );
        assert_sample(
            &s,
            r#"response_latency_ms_sum{direction="outbound",dst_service="web",namespace="lab",tls="true"} 60257.5"#,
        );
        let buckets = s
            .iter()
            .filter(|l| l.starts_with("response_latency_ms_bucket{") && l.contains("outbound"))
            .count();
        assert_eq!(buckets, LATENCY_BUCKETS_MS.len() + 1);
        // gRPC: classified by grpc-status, counted once per response.
        web.grpc_end(200, GrpcEnd::Status(0));
        web.grpc_end(200, GrpcEnd::Status(14));
        web.grpc_end(200, GrpcEnd::Status(14));
        web.grpc_end(200, GrpcEnd::Error);
        let s = samples(&registry);
        assert_sample(
            &s,
            r#"response_total{direction="outbound",dst_service="web",namespace="lab",tls="true",status_code="200",grpc_status="0",classification="success"} 1"#,
        );
        assert_sample(
            &s,
            r#"response_total{direction="outbound",dst_service="web",namespace="lab",tls="true",status_code="200",grpc_status="14",classification="failure"} 2"#,
        );
        assert_sample(
            &s,
            r#"response_total{direction="outbound",dst_service="web",namespace="lab",tls="true",status_code="200",classification="failure"} 1"#,
        );
        // The inbound route had no response: no histogram series for it.
        assert_no_sample(
            &s,
            r#"response_latency_ms_count{direction="inbound",dst_service="web",namespace="lab",tls="true"}"#,
        );
    }
}
