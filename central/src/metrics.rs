//! `GET /metrics`: the central server in Prometheus' OpenMetrics text.
//!
//! | metric | what |
//! |---|---|
//! | `pimesh_central_reports_total{site}` | node reports stored |
//! | `pimesh_central_publishes_total{site,outcome}` | publishes: `stored`, `refused`, `failed` (storage) |
//! | `pimesh_central_long_polls{site}` | nodes waiting in a long-poll now |
//! | `pimesh_central_long_poll_answers_total{site,answer}` | long-polls answered: `revision`, `nothing_newer` or `trial_stopped` |
//! | `pimesh_central_site_revision{site}` | the newest revision (absent before the first) |
//! | `pimesh_central_site_nodes{site}` | nodes that reported |
//! | `pimesh_central_site_nodes_behind{site}` | of those, not on the newest revision: the site's revision lag |
//! | `pimesh_central_rollouts{site,state}` | the site's live rollouts (the newest, and those still offered), by state: `running`, `paused`, `halted`, … |
//! | `pimesh_central_replication_listening` | on PostgreSQL: 1 while this replica hears the others' notices, 0 while it reconnects |
//! | `process_*` | see `pimesh_runtime::process_metrics` |
//!
//! Invariant: the per-site gauges are computed at scrape time from the fleet view the
//! server already keeps (rebuilt only when a report or revision was stored), so a scrape
//! never reads storage more than a fleet request would.

use std::sync::{Arc, OnceLock, Weak};

use hyper::body::Bytes;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry as Metrics;

/// Where the per-site gauges come from: the fleet view's JSON, as `GET /v1/fleet` serves
/// it (`None` when it cannot be built now).
pub trait FleetSource: Send + Sync + 'static {
    fn fleet_view_json(&self) -> Option<Bytes>;
    /// Each site's live rollouts: `(site, state)`, one entry per rollout.
    fn live_rollouts(&self) -> Vec<(String, pimesh_revision::RolloutState)>;
}

/// The OpenMetrics text's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabel {
    pub site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishLabels {
    pub site: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct RolloutLabels {
    site: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnswerLabels {
    pub site: String,
    pub answer: &'static str,
}

/// The server's counters and gauges, and the registry that encodes them.
pub struct CentralMetrics {
    registry: Metrics,
    pub reports: Family<SiteLabel, Counter>,
    pub publishes: Family<PublishLabels, Counter>,
    pub long_polls: Family<SiteLabel, Gauge>,
    pub long_poll_answers: Family<AnswerLabels, Counter>,
    /// The fleet view, for the per-site gauges; set once it exists.
    sites: Arc<OnceLock<Weak<dyn FleetSource>>>,
}

impl Default for CentralMetrics {
    fn default() -> Self {
        let mut registry = Metrics::default();
        let reports = Family::<SiteLabel, Counter>::default();
        let publishes = Family::<PublishLabels, Counter>::default();
        let long_polls = Family::<SiteLabel, Gauge>::default();
        let long_poll_answers = Family::<AnswerLabels, Counter>::default();
        // Counter names are registered without `_total`: the encoder appends it.
        registry.register(
            "pimesh_central_reports",
            "Node reports stored, by site",
            reports.clone(),
        );
        registry.register(
            "pimesh_central_publishes",
            "Publishes, by site and outcome (stored, refused, failed)",
            publishes.clone(),
        );
        registry.register(
            "pimesh_central_long_polls",
            "Nodes waiting in a long-poll now, by site",
            long_polls.clone(),
        );
        registry.register(
            "pimesh_central_long_poll_answers",
            "Long-polls answered, by site and answer (revision, nothing_newer, trial_stopped)",
            long_poll_answers.clone(),
        );
        let sites = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(SiteGauges {
            sites: Arc::clone(&sites),
        }));
        registry.register_collector(Box::new(pimesh_runtime::process_metrics::ProcessCollector));
        CentralMetrics {
            registry,
            reports,
            publishes,
            long_polls,
            long_poll_answers,
            sites,
        }
    }
}

impl CentralMetrics {
    /// `pimesh_central_replication_listening`, registered for a replica on PostgreSQL.
    pub fn replication_gauge(&mut self) -> Gauge {
        let listening = Gauge::default();
        self.registry.register(
            "pimesh_central_replication_listening",
            "1 while this replica hears the other replicas' notices (PostgreSQL LISTEN), 0 while it reconnects",
            listening.clone(),
        );
        listening
    }

    /// Ties the per-site gauges to the server's fleet view (once; later calls do
    /// nothing). Held weakly: the source owns these metrics.
    pub fn watch<S: FleetSource>(&self, source: &Arc<S>) {
        let weak: Weak<S> = Arc::downgrade(source);
        let _ = self.sites.set(weak);
    }

    pub fn site(site: &impl ToString) -> SiteLabel {
        SiteLabel {
            site: site.to_string(),
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// The per-site gauges, from the fleet view at scrape time.
struct SiteGauges {
    sites: Arc<OnceLock<Weak<dyn FleetSource>>>,
}

impl std::fmt::Debug for SiteGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SiteGauges")
    }
}

impl Collector for SiteGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(source) = self.sites.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        let Some(fleet) = source
            .fleet_view_json()
            .and_then(|json| serde_json::from_slice::<pimesh_revision::FleetView>(&json).ok())
        else {
            return Ok(());
        };
        let mut revision = Vec::new();
        let mut nodes = Vec::new();
        let mut behind = Vec::new();
        for site in &fleet.sites {
            let label = CentralMetrics::site(&site.site);
            if let Some(newest) = site.latest_revision {
                revision.push((label.clone(), i64::try_from(newest).unwrap_or(i64::MAX)));
            }
            let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            nodes.push((label.clone(), count(site.nodes.len())));
            let lagging = site
                .nodes
                .iter()
                .filter(|node| {
                    site.latest_revision.is_some()
                        && node.recorded.report.revision != site.latest_revision
                })
                .count();
            behind.push((label, count(lagging)));
        }
        let mut rollouts: std::collections::BTreeMap<RolloutLabels, i64> = Default::default();
        for (site, state) in source.live_rollouts() {
            *rollouts
                .entry(RolloutLabels {
                    site,
                    state: state.to_string(),
                })
                .or_default() += 1;
        }
        if !rollouts.is_empty() {
            let mut family = encoder.encode_descriptor(
                "pimesh_central_rollouts",
                "Live rollouts (the newest, and those still offered), by site and state",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (labels, count) in rollouts {
                ConstGauge::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        for (name, help, values) in [
            (
                "pimesh_central_site_revision",
                "The newest revision of each site",
                revision,
            ),
            (
                "pimesh_central_site_nodes",
                "Nodes that reported, by site",
                nodes,
            ),
            (
                "pimesh_central_site_nodes_behind",
                "Nodes not on their site's newest revision (the revision lag), by site",
                behind,
            ),
        ] {
            if values.is_empty() {
                continue;
            }
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (label, value) in values {
                let gauge = ConstGauge::new(value);
                gauge.encode(family.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}
