//! `GET /metrics` on the status API: what `/status` says, as Prometheus' OpenMetrics text,
//! so that the node's own health is graphed beside its proxy's traffic.
//!
//! | metric | what |
//! |---|---|
//! | `pimesh_supervisor_unit_up{unit}` | 1 while systemd says the unit is active |
//! | `pimesh_supervisor_unit_ready{unit}` | the unit's last readiness probe (when it has one) |
//! | `pimesh_supervisor_unit_heal_attempts{unit}` | heal attempts of the current failure episode |
//! | `pimesh_supervisor_heal_actions_total{unit,action}` | actions taken since the start (start, restart, reboot, ...) |
//! | `pimesh_supervisor_ota_state{state}` | 1 for the OTA client's state, 0 for the others |
//! | `pimesh_supervisor_ota_committed_revision` | the revision the node falls back to |
//! | `pimesh_supervisor_ota_queued_reports` | reports waiting to reach the central server |
//! | `pimesh_supervisor_issuer_expiry_days` | days until the site issuer on this node expires |
//! | `process_*` | see `pimesh_runtime::process_metrics` |
//!
//! Invariant: read from one snapshot of the status at scrape time; a scrape changes
//! nothing.

use std::fmt;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{NodeStatus, OtaState};

/// The OpenMetrics text's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnitLabel {
    unit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    unit: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// `status` as OpenMetrics text.
pub fn encode(status: &NodeStatus) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    let up = Family::<UnitLabel, Gauge>::default();
    let ready = Family::<UnitLabel, Gauge>::default();
    let attempts = Family::<UnitLabel, Gauge>::default();
    let actions = Family::<ActionLabels, Counter>::default();
    for unit in &status.units {
        let label = UnitLabel {
            unit: unit.name.clone(),
        };
        up.get_or_create(&label)
            .set(i64::from(unit.active_state.as_deref() == Some("active")));
        if let Some(probe) = unit.ready {
            ready.get_or_create(&label).set(i64::from(probe));
        }
        attempts
            .get_or_create(&label)
            .set(i64::from(unit.heal_attempts));
        for (action, count) in &unit.action_counts {
            actions
                .get_or_create(&ActionLabels {
                    unit: unit.name.clone(),
                    action: (*action).to_owned(),
                })
                .inc_by(*count);
        }
    }
    registry.register(
        "pimesh_supervisor_unit_up",
        "1 while systemd says the managed unit is active",
        up,
    );
    registry.register(
        "pimesh_supervisor_unit_ready",
        "The managed unit's last readiness probe, 1 ready, 0 not",
        ready,
    );
    registry.register(
        "pimesh_supervisor_unit_heal_attempts",
        "Heal attempts in the unit's current failure episode",
        attempts,
    );
    // Counter names are registered without `_total`: the encoder appends it.
    registry.register(
        "pimesh_supervisor_heal_actions",
        "Actions the supervisor took for a unit since it started, by action",
        actions,
    );
    let ota = Family::<StateLabel, Gauge>::default();
    for state in OtaState::ALL {
        // The label is the state as `/status` writes it.
        let Some(name) = serde_json::to_value(state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
        else {
            continue;
        };
        ota.get_or_create(&StateLabel { state: name })
            .set(i64::from(status.ota.state == state));
    }
    registry.register(
        "pimesh_supervisor_ota_state",
        "1 for the state the over-the-air client is in, 0 for the others",
        ota,
    );
    if let Some(committed) = status.ota.committed {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(committed).unwrap_or(i64::MAX));
        registry.register(
            "pimesh_supervisor_ota_committed_revision",
            "The revision the node runs and falls back to",
            gauge,
        );
    }
    let queued = Gauge::<i64>::default();
    queued.set(i64::try_from(status.ota.queued_reports).unwrap_or(i64::MAX));
    registry.register(
        "pimesh_supervisor_ota_queued_reports",
        "Reports waiting to reach the central server",
        queued,
    );
    if let Some(issuer) = &status.trust.issuer {
        let days = Gauge::<i64>::default();
        days.set(issuer.days_left);
        registry.register(
            "pimesh_supervisor_issuer_expiry_days",
            "Whole days until the site issuer on this node expires (negative once expired)",
            days,
        );
    }
    registry.register_collector(Box::new(pimesh_runtime::process_metrics::ProcessCollector));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}
