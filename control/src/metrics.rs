//! `GET /metrics` on the replica's plain-HTTP side (beside `/live` and `/ready`), in
//! Prometheus' OpenMetrics text:
//!
//! | metric | what |
//! |---|---|
//! | `pimesh_control_ready` | 1 when the replica can issue, else 0 |
//! | `pimesh_control_certificates_issued_total` | leaf certificates issued |
//! | `pimesh_control_certificate_requests_refused_total` | certificate requests refused |
//! | `pimesh_control_handshakes_refused_total` | TLS handshakes refused |
//! | `pimesh_control_live_nodes` | nodes with a live heartbeat |
//! | `pimesh_control_server_nodes` | of those, server nodes |
//! | `pimesh_control_kube_services`, `pimesh_control_kube_routes` | what it reads from K3s |
//! | `process_*` | see `pimesh_runtime::process_metrics` |
//!
//! Invariant: every value is read at scrape time from what the replica already keeps; a
//! scrape changes nothing and costs no more than the heartbeat table's size.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::discovery::Discovery;
use crate::state::{Counters, State};

/// The OpenMetrics text's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The replica's metrics now, as text.
pub fn encode(state: &Arc<State>, discovery: &Arc<Discovery>) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Replica {
        state: Arc::clone(state),
        discovery: Arc::clone(discovery),
    }));
    registry.register_collector(Box::new(pimesh_runtime::process_metrics::ProcessCollector));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

struct Replica {
    state: Arc<State>,
    discovery: Arc<Discovery>,
}

impl fmt::Debug for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Replica")
    }
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for Replica {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let counters = &self.state.counters;
        for (name, help, value) in [
            (
                "pimesh_control_certificates_issued",
                "Leaf certificates issued",
                Counters::get(&counters.issued),
            ),
            (
                "pimesh_control_certificate_requests_refused",
                "Certificate requests refused",
                Counters::get(&counters.refused),
            ),
            (
                "pimesh_control_handshakes_refused",
                "TLS handshakes refused (no client certificate, an untrusted one, not TLS 1.3)",
                Counters::get(&counters.handshakes_refused),
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let kube = self.discovery.kube();
        for (name, help, value) in [
            (
                "pimesh_control_ready",
                "1 when the replica can issue certificates, else 0",
                i64::from(self.state.readiness().is_ok()),
            ),
            (
                "pimesh_control_live_nodes",
                "Nodes with a live heartbeat",
                count(self.discovery.heartbeats.live().len()),
            ),
            (
                "pimesh_control_server_nodes",
                "Server nodes with a live heartbeat",
                count(self.discovery.heartbeats.servers().len()),
            ),
            (
                "pimesh_control_kube_services",
                "Meshed Kubernetes Service ports read from K3s",
                count(kube.services.len()),
            ),
            (
                "pimesh_control_kube_routes",
                "Gateway API routes read from K3s",
                count(kube.routes.len()),
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}
