//! The identity's metrics: `pimesh_identity_renewals_total{result="ok"|"error"}` (leaves
//! asked of the control replicas, by outcome) and `pimesh_identity_expiry_timestamp_seconds`
//! (when the identity in use expires, Unix seconds).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::telemetry::labels::ResultLabels;

/// Cheap to clone: clones share their series.
#[derive(Clone, Default)]
pub struct IdentityMetrics {
    renewals: Family<ResultLabels, Counter>,
    expiry: Gauge,
}

impl IdentityMetrics {
    /// New metrics, registered in `registry`.
    pub fn register(registry: &mut Registry) -> IdentityMetrics {
        let metrics = IdentityMetrics::default();
        // Counter names are registered without `_total`: the encoder appends it.
        registry.register(
            "pimesh_identity_renewals",
            "Leaves asked of the control replicas, by result",
            metrics.renewals.clone(),
        );
        registry.register(
            "pimesh_identity_expiry_timestamp_seconds",
            "When the identity in use expires, in Unix seconds",
            metrics.expiry.clone(),
        );
        metrics
    }

    pub fn renewal(&self, ok: bool) {
        self.renewals.get_or_create(&ResultLabels::of(ok)).inc();
    }

    pub fn expires_at(&self, at: std::time::SystemTime) {
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.expiry.set(secs);
    }
}
