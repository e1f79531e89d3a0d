//! The outbound side's own metrics: split decisions (`pimesh_split_total`), injected
//! faults (`pimesh_fault_injected_total`), retries sent (`pimesh_retry_total`) and retries
//! the budget refused (`pimesh_retry_skipped_total`).
//!
//! Cost model: [`OutboundMetrics::route`] is called once per route when a routing table
//! is built, and its handles create each series on first use (a route without faults or
//! retries adds no zero-valued lines); recording after that is an atomic add. A split
//! decision looks its counter up by `&str` and allocates only the first time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::telemetry::labels::{Direction, Name};
use crate::telemetry::requests::{RouteLabels, RouteName};

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
struct MatchedLabels {
    service: Name,
    route: Name,
}

/// The per-route families, cloned into the handles (a family clone shares its series).
#[derive(Clone, Default)]
struct RouteFamilies {
    faults: Family<FaultLabels, Counter>,
    retries: Family<RouteLabels, Counter>,
    retries_skipped: Family<RetrySkippedLabels, Counter>,
}

pub struct OutboundMetrics {
    splits: Family<SplitLabels, Counter>,
    matched: Family<MatchedLabels, Counter>,
    route_families: RouteFamilies,
    /// `split`'s counters by apex then backend, so that a split decision looks its counter up
    /// by `&str` without allocating.
    split_cache: Mutex<HashMap<String, HashMap<String, Counter>>>,
}

impl OutboundMetrics {
    /// New families, registered in `registry`.
    pub fn register(registry: &mut Registry) -> OutboundMetrics {
        let metrics = OutboundMetrics {
            splits: Family::default(),
            matched: Family::default(),
            route_families: RouteFamilies::default(),
            split_cache: Mutex::new(HashMap::new()),
        };
        let routes = &metrics.route_families;
        // Counter names are registered without `_total`: the encoder appends it.
        registry.register(
            "pimesh_split",
            "Traffic split decisions, by apex service and chosen backend",
            metrics.splits.clone(),
        );
        registry.register(
            "pimesh_route_matched",
            "Requests sent by a rule of a service's routes, by service and route \
             (`<route>/<rule>` when the route has several rules)",
            metrics.matched.clone(),
        );
        registry.register(
            "pimesh_fault_injected",
            "Faults injected, by destination service and kind",
            routes.faults.clone(),
        );
        registry.register(
            "pimesh_retry",
            "Retries sent, by route",
            routes.retries.clone(),
        );
        registry.register(
            "pimesh_retry_skipped",
            "Retries not sent, by route and reason",
            routes.retries_skipped.clone(),
        );
        metrics
    }

    /// Handles for one service's faults and retries: call once per service and keep the
    /// result. Calling it again (e.g. after a config reload) returns handles to the same
    /// series.
    pub fn route(&self, route: RouteName<'_>) -> PolicyMetrics {
        PolicyMetrics {
            inner: Arc::new(PolicyInner {
                labels: RouteLabels::new(Direction::Outbound, route),
                families: self.route_families.clone(),
                faults: [OnceLock::new(), OnceLock::new()],
                retries: OnceLock::new(),
                retries_skipped: OnceLock::new(),
            }),
        }
    }

    /// The counter of requests that `route` of `service` matched (the same series for
    /// every call with the same names).
    pub fn route_matched(&self, service: &str, route: &str) -> Counter {
        self.matched.get_or_create_owned(&MatchedLabels {
            service: Name(service.to_owned()),
            route: Name(route.to_owned()),
        })
    }

    /// Counts one split decision: `pimesh_split_total{service=apex, backend}`. Does not
    /// allocate after the first decision for this (apex, backend).
    pub fn split(&self, apex: &str, backend: &str) {
        let mut cache = self.split_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(counter) = cache.get(apex).and_then(|backends| backends.get(backend)) {
            counter.inc();
            return;
        }
        let counter = self.splits.get_or_create_owned(&SplitLabels {
            service: Name(apex.to_owned()),
            backend: Name(backend.to_owned()),
        });
        counter.inc();
        cache
            .entry(apex.to_owned())
            .or_default()
            .insert(backend.to_owned(), counter);
    }
}

/// One service's fault and retry handles (cheap to clone: one `Arc`).
#[derive(Clone)]
pub struct PolicyMetrics {
    inner: Arc<PolicyInner>,
}

struct PolicyInner {
    /// `direction="outbound"` and the service.
    labels: RouteLabels,
    families: RouteFamilies,
    /// Indexed by `FaultKind as usize`.
    faults: [OnceLock<Counter>; 2],
    retries: OnceLock<Counter>,
    retries_skipped: OnceLock<Counter>,
}

impl PolicyMetrics {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::testing::{assert_no_sample, assert_sample, samples};
    use crate::telemetry::requests::testing::lab;

    #[test]
    fn faults_and_retries() {
        let mut registry = Registry::default();
        let metrics = OutboundMetrics::register(&mut registry);
        let api = metrics.route(lab("api"));
        let s = samples(&registry);
        assert_no_sample(&s, "pimesh_fault_injected_total");
        assert_no_sample(&s, "pimesh_retry_total");
        assert_no_sample(&s, "pimesh_retry_skipped_total");

        api.fault(FaultKind::Abort);
        api.fault(FaultKind::Delay);
        api.fault(FaultKind::Delay);
        api.retry();
        api.retry();
        api.retry_budget_exhausted();
        let s = samples(&registry);
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
            r#"pimesh_retry_total{direction="outbound",dst_service="api",namespace="lab",tls="true"} 2"#,
        );
        assert_sample(
            &s,
            r#"pimesh_retry_skipped_total{direction="outbound",dst_service="api",reason="budget"} 1"#,
        );
    }

    #[test]
    fn splits_by_apex_and_backend() {
        let mut registry = Registry::default();
        let metrics = OutboundMetrics::register(&mut registry);
        metrics.split("web", "web-v1");
        metrics.split("web", "web-v2");
        metrics.split("web", "web-v2");
        let s = samples(&registry);
        assert_sample(
            &s,
            r#"pimesh_split_total{service="web",backend="web-v1"} 1"#,
        );
        assert_sample(
            &s,
            r#"pimesh_split_total{service="web",backend="web-v2"} 2"#,
        );
    }
}
