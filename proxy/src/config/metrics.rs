//! The site config's metric: `pimesh_config_reloads_total{result="ok"|"error"}`, one per
//! load attempt of the file.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::telemetry::labels::ResultLabels;

/// Cheap to clone: clones share their series.
#[derive(Clone, Default)]
pub struct ConfigMetrics {
    reloads: Family<ResultLabels, Counter>,
}

impl ConfigMetrics {
    /// New metrics, registered in `registry`.
    pub fn register(registry: &mut Registry) -> ConfigMetrics {
        let metrics = ConfigMetrics::default();
        // Counter names are registered without `_total`: the encoder appends it.
        registry.register(
            "pimesh_config_reloads",
            "Site config reload attempts, by result",
            metrics.reloads.clone(),
        );
        metrics
    }

    /// Counts `pimesh_config_reloads_total{result="ok"|"error"}`.
    pub fn reload(&self, ok: bool) {
        self.reloads.get_or_create(&ResultLabels::of(ok)).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::testing::{assert_sample, samples};

    #[test]
    fn reloads_by_result() {
        let mut registry = Registry::default();
        let metrics = ConfigMetrics::register(&mut registry);
        metrics.reload(true);
        metrics.reload(true);
        metrics.reload(false);
        let s = samples(&registry);
        assert_sample(&s, r#"pimesh_config_reloads_total{result="ok"} 2"#);
        assert_sample(&s, r#"pimesh_config_reloads_total{result="error"} 1"#);
    }
}
