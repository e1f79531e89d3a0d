//! The connections' metrics: opened, closed and bytes carried per route (`tcp_*_total`,
//! Linkerd's names), open now (`pimesh_open_connections`), TLS handshakes that failed
//! (`tls_handshake_failure_total`) and connections or requests refused
//! (`pimesh_rejected_total`), and upgraded HTTP connections (WebSocket and other
//! `Upgrade`s, HTTP/2 extended CONNECT): opened, closed by reason and bytes carried
//! (`pimesh_upgrade_*_total`).
//!
//! Cost model: [`ConnectionMetrics::tcp`] allocates its labels and is called once per
//! route when a routing table is built; recording through its handles is an atomic add.
//! The counters by reason allocate only for the first event with each reason. Label sets
//! are never removed: the series are bounded by the routes and reasons the config and code
//! can name.

use std::sync::{Arc, OnceLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::telemetry::labels::Direction;
use crate::telemetry::requests::{RouteLabels, RouteName};

#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct ReasonLabels {
    direction: Direction,
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct CloseLabels {
    direction: Direction,
    dst_service: crate::telemetry::labels::Name,
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

/// The families; cheap to clone (a family clone shares its series).
#[derive(Clone, Default)]
pub struct ConnectionMetrics {
    tcp_open: Family<RouteLabels, Counter>,
    tcp_close: Family<RouteLabels, Counter>,
    tcp_read_bytes: Family<RouteLabels, Counter>,
    tcp_write_bytes: Family<RouteLabels, Counter>,
    tls_failures: Family<ReasonLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    open_connections: Family<DirectionLabels, Gauge>,
    upgrades: UpgradeFamilies,
}

/// The upgraded connections' families, cloned into each route's handles.
#[derive(Clone, Default)]
struct UpgradeFamilies {
    open: Family<RouteLabels, Counter>,
    close: Family<CloseLabels, Counter>,
    read_bytes: Family<RouteLabels, Counter>,
    write_bytes: Family<RouteLabels, Counter>,
}

impl ConnectionMetrics {
    /// New families, registered in `registry`.
    pub fn register(registry: &mut Registry) -> ConnectionMetrics {
        let metrics = ConnectionMetrics::default();
        // Counter names are registered without `_total`: the encoder appends it.
        registry.register(
            "tcp_open",
            "Connections opened, by destination service",
            metrics.tcp_open.clone(),
        );
        registry.register(
            "tcp_close",
            "Connections closed, by destination service",
            metrics.tcp_close.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from closed connections' peers",
            metrics.tcp_read_bytes.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to closed connections' peers",
            metrics.tcp_write_bytes.clone(),
        );
        registry.register(
            "tls_handshake_failure",
            "TLS handshakes that failed, by reason",
            metrics.tls_failures.clone(),
        );
        registry.register(
            "pimesh_rejected",
            "Connections or requests refused for bad input or limits, by reason",
            metrics.rejected.clone(),
        );
        registry.register(
            "pimesh_open_connections",
            "Connections currently open",
            metrics.open_connections.clone(),
        );
        let upgrades = &metrics.upgrades;
        registry.register(
            "pimesh_upgrade_open",
            "HTTP connections upgraded (WebSocket, extended CONNECT), by destination service",
            upgrades.open.clone(),
        );
        registry.register(
            "pimesh_upgrade_close",
            "Upgraded HTTP connections closed, by destination service and reason \
             (closed, idle_timeout, error)",
            upgrades.close.clone(),
        );
        registry.register(
            "pimesh_upgrade_read_bytes",
            "Bytes read from the client side of upgraded HTTP connections, as they move",
            upgrades.read_bytes.clone(),
        );
        registry.register(
            "pimesh_upgrade_write_bytes",
            "Bytes written to the client side of upgraded HTTP connections, as they move",
            upgrades.write_bytes.clone(),
        );
        metrics
    }

    /// Handles for the upgraded connections of one (direction, dst_service); each series
    /// appears on first use. Call once per route and keep the result.
    pub fn upgrades(&self, direction: Direction, route: RouteName<'_>) -> UpgradeMetrics {
        UpgradeMetrics {
            inner: Arc::new(UpgradeInner {
                labels: RouteLabels::new(direction, route),
                families: self.upgrades.clone(),
                open: OnceLock::new(),
                close: Default::default(),
                read_bytes: OnceLock::new(),
                write_bytes: OnceLock::new(),
            }),
        }
    }

    /// Handles for opaque TCP of one (direction, dst_service). Call once and keep the
    /// result.
    pub fn tcp(&self, direction: Direction, route: RouteName<'_>) -> TcpMetrics {
        let labels = RouteLabels::new(direction, route);
        TcpMetrics {
            inner: Arc::new(TcpInner {
                open: self.tcp_open.get_or_create_owned(&labels),
                close: self.tcp_close.get_or_create_owned(&labels),
                read_bytes: self.tcp_read_bytes.get_or_create_owned(&labels),
                write_bytes: self.tcp_write_bytes.get_or_create_owned(&labels),
            }),
        }
    }

    /// Counts `tls_handshake_failure_total{direction, reason}`. Does not allocate after the
    /// first failure with this reason.
    pub fn tls_handshake_failure(&self, direction: Direction, reason: &'static str) {
        self.tls_failures
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    /// Counts `pimesh_rejected_total{direction, reason}`: bad input or a limit hit, e.g.
    /// `malformed_http`, `header_too_large`, `header_timeout`, `connection_limit`,
    /// `handshake_limit`, `not_tls`, `service_overflow`,
    /// `unknown_service`, `no_endpoints`, `unauthorized`, `detect_timeout`. Does not allocate
    /// after the first rejection with this reason.
    pub fn rejected(&self, direction: Direction, reason: &'static str) {
        self.rejected
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    /// Counts one open connection in `pimesh_open_connections{direction}` until the guard is
    /// dropped.
    pub fn open_connection(&self, direction: Direction) -> ConnectionGuard {
        let gauge = self
            .open_connections
            .get_or_create_owned(&DirectionLabels { direction });
        gauge.inc();
        ConnectionGuard { gauge }
    }
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

/// Why an upgraded connection ended; label `reason` of `pimesh_upgrade_close_total`.
pub use crate::transport::splice::End as UpgradeEnd;

fn end_label(end: UpgradeEnd) -> &'static str {
    match end {
        UpgradeEnd::Closed => "closed",
        UpgradeEnd::IdleTimeout => "idle_timeout",
        UpgradeEnd::Error => "error",
    }
}

/// One (direction, dst_service)'s upgraded-connection handles (cheap to clone: one `Arc`).
/// Bytes are counted as they move, so a connection open for hours shows its traffic.
#[derive(Clone)]
pub struct UpgradeMetrics {
    inner: Arc<UpgradeInner>,
}

struct UpgradeInner {
    labels: RouteLabels,
    families: UpgradeFamilies,
    open: OnceLock<Counter>,
    /// Indexed by `UpgradeEnd as usize`.
    close: [OnceLock<Counter>; 3],
    read_bytes: OnceLock<Counter>,
    write_bytes: OnceLock<Counter>,
}

impl UpgradeMetrics {
    /// Counts `pimesh_upgrade_open_total{direction, dst_service}`.
    pub fn open(&self) {
        let inner = &*self.inner;
        inner
            .open
            .get_or_init(|| inner.families.open.get_or_create_owned(&inner.labels))
            .inc();
    }

    /// Counts `pimesh_upgrade_close_total{direction, dst_service, reason}`.
    pub fn close(&self, end: UpgradeEnd) {
        let inner = &*self.inner;
        inner.close[end as usize]
            .get_or_init(|| {
                inner.families.close.get_or_create_owned(&CloseLabels {
                    direction: inner.labels.direction,
                    dst_service: inner.labels.dst_service.clone(),
                    reason: end_label(end),
                })
            })
            .inc();
    }

    /// The counter of bytes read from the client side
    /// (`pimesh_upgrade_read_bytes_total`).
    pub fn read_bytes(&self) -> Counter {
        let inner = &*self.inner;
        inner
            .read_bytes
            .get_or_init(|| inner.families.read_bytes.get_or_create_owned(&inner.labels))
            .clone()
    }

    /// The counter of bytes written to the client side
    /// (`pimesh_upgrade_write_bytes_total`).
    pub fn write_bytes(&self) -> Counter {
        let inner = &*self.inner;
        inner
            .write_bytes
            .get_or_init(|| {
                inner
                    .families
                    .write_bytes
                    .get_or_create_owned(&inner.labels)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::testing::{assert_sample, samples};
    use crate::telemetry::requests::testing::lab;

    #[test]
    fn tcp_and_connections() {
        let mut registry = Registry::default();
        let metrics = ConnectionMetrics::register(&mut registry);
        let db = metrics.tcp(Direction::Inbound, lab("db"));
        db.open();
        db.open();
        db.close(100, 2_000);
        let unrouted = metrics.tcp(Direction::Inbound, lab(""));
        unrouted.open();
        let a = metrics.open_connection(Direction::Inbound);
        let b = metrics.open_connection(Direction::Inbound);
        let c = metrics.open_connection(Direction::Outbound);
        drop(a);
        drop(c);

        let s = samples(&registry);
        assert_sample(
            &s,
            r#"tcp_open_total{direction="inbound",dst_service="db",namespace="lab",tls="true"} 2"#,
        );
        assert_sample(
            &s,
            r#"tcp_open_total{direction="inbound",dst_service="",namespace="lab",tls="true"} 1"#,
        );
        assert_sample(
            &s,
            r#"tcp_close_total{direction="inbound",dst_service="db",namespace="lab",tls="true"} 1"#,
        );
        assert_sample(
            &s,
            r#"tcp_read_bytes_total{direction="inbound",dst_service="db",namespace="lab",tls="true"} 100"#,
        );
        assert_sample(
            &s,
            r#"tcp_write_bytes_total{direction="inbound",dst_service="db",namespace="lab",tls="true"} 2000"#,
        );
        assert_sample(&s, r#"pimesh_open_connections{direction="inbound"} 1"#);
        assert_sample(&s, r#"pimesh_open_connections{direction="outbound"} 0"#);
        drop(b);
        let s = samples(&registry);
        assert_sample(&s, r#"pimesh_open_connections{direction="inbound"} 0"#);
    }

    #[test]
    fn upgrades_by_route_and_close_reason() {
        let mut registry = Registry::default();
        let metrics = ConnectionMetrics::register(&mut registry);
        let ws = metrics.upgrades(Direction::Outbound, lab("ws"));
        let s = samples(&registry);
        assert!(!s.iter().any(|l| l.starts_with("pimesh_upgrade")), "{s:?}");
        ws.open();
        ws.open();
        ws.read_bytes().inc_by(10);
        ws.write_bytes().inc_by(20);
        ws.read_bytes().inc_by(5);
        ws.close(UpgradeEnd::Closed);
        ws.close(UpgradeEnd::IdleTimeout);
        let s = samples(&registry);
        assert_sample(
            &s,
            r#"pimesh_upgrade_open_total{direction="outbound",dst_service="ws",namespace="lab",tls="true"} 2"#,
        );
        assert_sample(
            &s,
            r#"pimesh_upgrade_close_total{direction="outbound",dst_service="ws",reason="closed"} 1"#,
        );
        assert_sample(
            &s,
            r#"pimesh_upgrade_close_total{direction="outbound",dst_service="ws",reason="idle_timeout"} 1"#,
        );
        assert_sample(
            &s,
            r#"pimesh_upgrade_read_bytes_total{direction="outbound",dst_service="ws",namespace="lab",tls="true"} 15"#,
        );
        assert_sample(
            &s,
            r#"pimesh_upgrade_write_bytes_total{direction="outbound",dst_service="ws",namespace="lab",tls="true"} 20"#,
        );
    }

    #[test]
    fn handshake_failures_and_rejections_by_reason() {
        let mut registry = Registry::default();
        let metrics = ConnectionMetrics::register(&mut registry);
        metrics.tls_handshake_failure(Direction::Inbound, "no_client_cert");
        metrics.tls_handshake_failure(Direction::Inbound, "no_client_cert");
        metrics.rejected(Direction::Inbound, "header_too_large");
        metrics.rejected(Direction::Outbound, "no_endpoints");
        metrics.rejected(Direction::Outbound, "no_endpoints");

        let s = samples(&registry);
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
    }
}
