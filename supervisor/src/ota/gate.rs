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
                Ok(()) => {
                    let since = *healthy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.settle {
                        return Ok(());
                    }
                }
                Err(reason) => {
                    healthy_since = None;
                    last = reason;
                }
            }
            if Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(CHECK_INTERVAL).await;
        }
    }

    async fn check(&self, bus: &Systemd) -> Result<(), String> {
        let mut proxy_managed = false;
        for unit in self.units {
            let name = unit.name.as_str();
            let path = bus
                .load_unit(name)
                .await
                .map_err(|err| format!("cannot load {name}: {err}"))?;
            let state = bus
                .read_state(&path)
                .await
                .map_err(|err| format!("cannot read {name}: {err}"))?;
            if state.load_state != "loaded" {
                continue;
            }
            proxy_managed |= name == "pimesh-proxy.service";
            unit_health(bus, unit, &path).await?;
        }
        if proxy_managed {
            self.proxy_runs_expected().await?;
        }
        Ok(())
    }

    async fn proxy_runs_expected(&self) -> Result<(), String> {
        let url = self.proxy_config_url;
        let (status, body) = probe::fetch(url, PROBE_TIMEOUT).await?;
        if !status.is_success() {
            return Err(format!("GET {url}: {status}"));
        }
        let answer: serde_json::Value =
            serde_json::from_slice(&body).map_err(|err| format!("GET {url}: not JSON: {err}"))?;
        let running = answer.get("sha256").and_then(|sha| sha.as_str());
        if running == self.expected_sha256.as_deref() {
            return Ok(());
        }
        let rejected = answer
            .get("last_error")
            .and_then(|err| err.as_str())
            .map(|err| format!("; the proxy refused it: {err}"))
            .unwrap_or_default();
        Err(format!(
            "the proxy runs configuration {}, not {}{rejected}",
            short(running),
            short(self.expected_sha256.as_deref())
        ))
    }
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
