//! The discovery client's metrics: `pimesh_control_failovers_total`,
//! `pimesh_discovery_updates_total`, `pimesh_discovery_rejected_total`,
//! `pimesh_control_heartbeat_failures_total`, `pimesh_control_connected`,
//! `pimesh_control_replicas`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Cheap to clone: clones share their series.
#[derive(Clone, Default)]
pub struct ControlMetrics {
    pub failovers: Counter,
    pub updates: Counter,
    pub rejected: Counter,
    pub heartbeat_failures: Counter,
    pub connected: Gauge,
    /// The size of the live replica set (`control::replicas`).
    pub replicas: Gauge,
}

impl ControlMetrics {
    /// New metrics, registered in `registry`.
    pub fn register(registry: &mut Registry) -> ControlMetrics {
        let metrics = ControlMetrics::default();
        // Counter names are registered without `_total`: the encoder appends it.
        registry.register(
            "pimesh_control_failovers",
            "Times the discovery watch left a control replica (error, end, silence) for the next",
            metrics.failovers.clone(),
        );
        registry.register(
            "pimesh_discovery_updates",
            "Discovery documents put in use",
            metrics.updates.clone(),
        );
        registry.register(
            "pimesh_discovery_rejected",
            "Discovery documents refused (the last good one stays in use)",
            metrics.rejected.clone(),
        );
        registry.register(
            "pimesh_control_heartbeat_failures",
            "Heartbeats to a control replica that failed",
            metrics.heartbeat_failures.clone(),
        );
        registry.register(
            "pimesh_control_connected",
            "1 while a discovery watch to a control replica is open",
            metrics.connected.clone(),
        );
        registry.register(
            "pimesh_control_replicas",
            "Control replicas the proxy fails over between: its start list and the servers' replicas discovery lists",
            metrics.replicas.clone(),
        );
        metrics
    }
}
