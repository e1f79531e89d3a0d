//! The health gate: after a configuration change, every managed unit that exists must be
//! active and answer its readiness probe, and the proxy must report that it runs exactly
//! the new configuration — continuously for `settle`, within `deadline`. Otherwise the
//! change failed, and the reason says which unit and why.

use std::time::Duration;

use pimesh_schema::{ManagedUnit, ProbeUrl};
use tokio::time::Instant;
use zbus::zvariant::OwnedObjectPath;

use crate::probe;
use crate::systemd::Systemd;

const PROXY: &str = "pimesh-proxy.service";
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// What the gate checks.
pub struct Gate<'a> {
    pub units: &'a [ManagedUnit],
    pub proxy_config_url: &'a ProbeUrl,
    /// The SHA-256 (hex) the proxy must report; `None`: no configuration.
    pub expected_sha256: Option<String>,
    pub settle: Duration,
}

impl Gate<'_> {
    /// Passes once everything has been healthy for `settle` without a break; fails at
    /// `deadline` with the last thing that was wrong.
    pub async fn pass(&self, bus: &Systemd, deadline: Instant) -> Result<(), String> {
        let mut healthy_since: Option<Instant> = None;
        let mut last = String::from("never checked");
        loop {
            match self.check(bus).await {
                // The proxy refused exactly this configuration: waiting will not help.
                Err(Verdict::Refused(reason)) => return Err(reason),
                Err(Verdict::NotYet(reason)) => {
                    healthy_since = None;
                    last = reason;
                }
                Ok(()) => {
                    let since = *healthy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.settle {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(CHECK_INTERVAL).await;
        }
    }

    async fn check(&self, bus: &Systemd) -> Result<(), Verdict> {
        // The proxy's own verdict first: a refused configuration fails the gate at once,
        // even while the proxy's readiness (which reports the same refusal) is down.
        let proxy_listed = self.units.iter().any(|unit| unit.name.as_str() == PROXY);
        let proxy = if proxy_listed {
            match self.proxy_runs_expected().await {
                Err(Verdict::Refused(reason)) => return Err(Verdict::Refused(reason)),
                other => Some(other),
            }
        } else {
            None
        };
        let mut proxy_loaded = false;
        for unit in self.units {
            let name = unit.name.as_str();
            let Some((path, _)) = bus
                .loaded_unit(name)
                .await
                .map_err(|err| Verdict::NotYet(format!("cannot read {name}: {err}")))?
            else {
                continue;
            };
            proxy_loaded |= name == PROXY;
            unit_health(bus, unit, &path)
                .await
                .map_err(Verdict::NotYet)?;
        }
        match proxy {
            Some(result) if proxy_loaded => result,
            _ => Ok(()),
        }
    }

    async fn proxy_runs_expected(&self) -> Result<(), Verdict> {
        let url = self.proxy_config_url;
        let (status, body) = probe::fetch(url, PROBE_TIMEOUT)
            .await
            .map_err(Verdict::NotYet)?;
        if !status.is_success() {
            return Err(Verdict::NotYet(format!("GET {url}: {status}")));
        }
        let answer: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|err| Verdict::NotYet(format!("GET {url}: not JSON: {err}")))?;
        let running = answer.get("sha256").and_then(|sha| sha.as_str());
        if running == self.expected_sha256.as_deref() {
            return Ok(());
        }
        let refused = answer.get("refused_sha256").and_then(|sha| sha.as_str());
        let rejected = answer
            .get("last_error")
            .and_then(|err| err.as_str())
            .map(|err| format!("; the proxy refused it: {err}"))
            .unwrap_or_default();
        let reason = format!(
            "the proxy runs configuration {}, not {}{rejected}",
            short(running),
            short(self.expected_sha256.as_deref())
        );
        if refused.is_some() && refused == self.expected_sha256.as_deref() {
            Err(Verdict::Refused(reason))
        } else {
            Err(Verdict::NotYet(reason))
        }
    }
}

/// Why a check did not pass.
enum Verdict {
    /// Not healthy yet; may still become so before the deadline.
    NotYet(String),
    /// The new configuration was refused outright; no point in waiting.
    Refused(String),
}

fn short(sha: Option<&str>) -> String {
    sha.map_or_else(|| "none".to_owned(), |sha| sha.chars().take(12).collect())
}

/// Whether one loaded unit is active and ready.
pub async fn unit_health(
    bus: &Systemd,
    unit: &ManagedUnit,
    path: &OwnedObjectPath,
) -> Result<(), String> {
    let name = unit.name.as_str();
    let state = bus
        .read_state(path)
        .await
        .map_err(|err| format!("cannot read {name}: {err}"))?;
    if state.active_state != "active" {
        return Err(format!(
            "{name} is {} ({})",
            state.active_state, state.sub_state
        ));
    }
    if let Some(url) = &unit.ready_url {
        probe::is_ready(url, PROBE_TIMEOUT)
            .await
            .map_err(|reason| format!("{name} is not ready: {reason}"))?;
    }
    Ok(())
}
