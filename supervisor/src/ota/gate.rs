//! The health gate: after a configuration change, every managed unit that exists must be
//! active and answer its readiness probe, and the proxy must report that it runs exactly
//! the new configuration and answer a request on its outbound port (a proxy that fails
//! its traffic under the new configuration while its admin port answers does not pass) —
//! continuously for `settle`, within `deadline`. Otherwise the
//! change failed, and [`Unhealthy`] says which unit and why.
//!
//! K3s is not judged: a revision does not restart it (its rendered config takes effect at
//! its next start), and its readiness depends on the site's other servers, so a K3s that
//! is down for its own reasons must not roll back every revision of the mesh.

use std::fmt;
use std::time::Duration;

use pimesh_schema::{ManagedUnit, ProbeUrl, UnitName};
use tokio::time::Instant;
use zbus::zvariant::OwnedObjectPath;

use crate::units::probe::{self, JsonProbeError, ProbeError};
use crate::units::role::UnitRole;
use crate::units::systemd::Systemd;

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// What the gate checks.
pub struct Gate<'a> {
    pub units: &'a [ManagedUnit],
    pub proxy_config_url: &'a ProbeUrl,
    /// The proxy's outbound port ([`Gate::proxy_serves`]).
    pub proxy_probe_url: &'a ProbeUrl,
    /// The SHA-256 (hex) the proxy must report; `None`: no configuration.
    pub expected_sha256: Option<String>,
    pub settle: Duration,
}

/// Why the gate did not pass: the last thing that was wrong.
#[derive(Debug)]
pub enum Unhealthy {
    /// Healthy at every check, but not yet for the whole `settle` when the deadline came.
    NotSettled {
        settle: Duration,
    },
    Unit(UnitUnhealthy),
    Proxy(ProxyUnhealthy),
}

impl Unhealthy {
    /// Whether waiting cannot help: the proxy refused exactly the new configuration.
    fn is_final(&self) -> bool {
        matches!(self, Unhealthy::Proxy(ProxyUnhealthy::Refused(_)))
    }
}

impl fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unhealthy::NotSettled { settle } => write!(
                f,
                "healthy for less than {} before the deadline",
                humantime::format_duration(*settle)
            ),
            Unhealthy::Unit(unit) => unit.fmt(f),
            Unhealthy::Proxy(proxy) => proxy.fmt(f),
        }
    }
}

impl std::error::Error for Unhealthy {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Unhealthy::NotSettled { .. } => None,
            Unhealthy::Unit(unit) => unit.source(),
            Unhealthy::Proxy(proxy) => proxy.source(),
        }
    }
}

/// Why one unit is not healthy.
#[derive(Debug)]
pub enum UnitUnhealthy {
    /// systemd did not say how the unit is.
    Unreadable { unit: UnitName, source: zbus::Error },
    /// Not active (failed, activating, inactive...).
    Inactive {
        unit: UnitName,
        active_state: String,
        sub_state: String,
    },
    /// Active, but its readiness probe does not answer 2xx; the probe says why.
    NotReady { unit: UnitName, reason: ProbeError },
}

impl fmt::Display for UnitUnhealthy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnitUnhealthy::Unreadable { unit, source } => write!(f, "cannot read {unit}: {source}"),
            UnitUnhealthy::Inactive {
                unit,
                active_state,
                sub_state,
            } => write!(f, "{unit} is {active_state} ({sub_state})"),
            UnitUnhealthy::NotReady { unit, reason } => write!(f, "{unit} is not ready: {reason}"),
        }
    }
}

impl std::error::Error for UnitUnhealthy {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UnitUnhealthy::Unreadable { source, .. } => Some(source),
            UnitUnhealthy::NotReady { reason, .. } => Some(reason),
            UnitUnhealthy::Inactive { .. } => None,
        }
    }
}

/// Why the proxy does not count as running the new configuration.
#[derive(Debug)]
pub enum ProxyUnhealthy {
    /// Its configuration endpoint gave no JSON document.
    Config(JsonProbeError),
    /// It runs another configuration (so far).
    RunsOther(Mismatch),
    /// It refused exactly the new configuration.
    Refused(Mismatch),
    /// It runs the new configuration but its outbound port gave no HTTP answer.
    NoTraffic(ProbeError),
}

/// The configuration the proxy runs, and the one it should.
#[derive(Debug)]
pub struct Mismatch {
    /// SHA-256 (hex) of what the proxy runs; `None`: no configuration.
    pub running: Option<String>,
    pub expected: Option<String>,
    /// The proxy's last error, naming what it refused.
    pub proxy_error: Option<String>,
}

impl fmt::Display for ProxyUnhealthy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyUnhealthy::Config(reason) => reason.fmt(f),
            ProxyUnhealthy::RunsOther(mismatch) | ProxyUnhealthy::Refused(mismatch) => {
                mismatch.fmt(f)
            }
            ProxyUnhealthy::NoTraffic(reason) => {
                write!(f, "the proxy's outbound port gives no answer: {reason}")
            }
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the proxy runs configuration {}, not {}",
            short(self.running.as_deref()),
            short(self.expected.as_deref())
        )?;
        match &self.proxy_error {
            Some(err) => write!(f, "; the proxy refused it: {err}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for ProxyUnhealthy {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProxyUnhealthy::Config(reason) => Some(reason),
            ProxyUnhealthy::NoTraffic(reason) => Some(reason),
            ProxyUnhealthy::RunsOther(_) | ProxyUnhealthy::Refused(_) => None,
        }
    }
}

impl Gate<'_> {
    /// Passes once everything has been healthy for `settle` without a break; fails at
    /// `deadline` with the last thing that was wrong, or at once when the proxy refused
    /// the new configuration.
    pub async fn pass(&self, bus: &Systemd, deadline: Instant) -> Result<(), Unhealthy> {
        let mut healthy_since: Option<Instant> = None;
        let mut last = Unhealthy::NotSettled {
            settle: self.settle,
        };
        loop {
            match self.check(bus).await {
                Err(unhealthy) if unhealthy.is_final() => return Err(unhealthy),
                Err(unhealthy) => {
                    healthy_since = None;
                    last = unhealthy;
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

    async fn check(&self, bus: &Systemd) -> Result<(), Unhealthy> {
        // The proxy's own verdict first: a refused configuration fails the gate at once,
        // even while the proxy's readiness (which reports the same refusal) is down.
        let proxy_listed = self
            .units
            .iter()
            .any(|unit| UnitRole::of(&unit.name) == UnitRole::Proxy);
        let proxy = if proxy_listed {
            match self.proxy_runs_expected().await {
                Err(refused @ ProxyUnhealthy::Refused(_)) => return Err(Unhealthy::Proxy(refused)),
                Ok(()) => Some(self.proxy_serves().await),
                other => Some(other),
            }
        } else {
            None
        };
        let mut proxy_loaded = false;
        for unit in self.units {
            if matches!(
                UnitRole::of(&unit.name),
                UnitRole::K3sServer | UnitRole::K3sAgent
            ) {
                continue;
            }
            let name = unit.name.as_str();
            let Some((path, _)) = bus.loaded_unit(name).await.map_err(|source| {
                Unhealthy::Unit(UnitUnhealthy::Unreadable {
                    unit: unit.name.clone(),
                    source,
                })
            })?
            else {
                continue;
            };
            proxy_loaded |= UnitRole::of(&unit.name) == UnitRole::Proxy;
            unit_health(bus, unit, &path)
                .await
                .map_err(Unhealthy::Unit)?;
        }
        match proxy {
            Some(result) if proxy_loaded => result.map_err(Unhealthy::Proxy),
            _ => Ok(()),
        }
    }

    /// Whether the proxy's outbound port answers a request with any HTTP status: the
    /// request is for no service (its answer is the proxy's own 503), so it exercises the
    /// accept, the HTTP parsing and the routing of the new configuration, and reaches no
    /// app.
    async fn proxy_serves(&self) -> Result<(), ProxyUnhealthy> {
        probe::fetch(self.proxy_probe_url, PROBE_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(ProxyUnhealthy::NoTraffic)
    }

    async fn proxy_runs_expected(&self) -> Result<(), ProxyUnhealthy> {
        let answer = probe::fetch_json(self.proxy_config_url, PROBE_TIMEOUT)
            .await
            .map_err(ProxyUnhealthy::Config)?;
        let text = |field: &str| answer.get(field).and_then(|value| value.as_str());
        let running = text("sha256");
        if running == self.expected_sha256.as_deref() {
            return Ok(());
        }
        let refused = text("refused_sha256");
        let mismatch = Mismatch {
            running: running.map(str::to_owned),
            expected: self.expected_sha256.clone(),
            proxy_error: text("last_error").map(str::to_owned),
        };
        if refused.is_some() && refused == self.expected_sha256.as_deref() {
            Err(ProxyUnhealthy::Refused(mismatch))
        } else {
            Err(ProxyUnhealthy::RunsOther(mismatch))
        }
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
) -> Result<(), UnitUnhealthy> {
    let state = bus
        .read_state(path)
        .await
        .map_err(|source| UnitUnhealthy::Unreadable {
            unit: unit.name.clone(),
            source,
        })?;
    if state.active_state != "active" {
        return Err(UnitUnhealthy::Inactive {
            unit: unit.name.clone(),
            active_state: state.active_state,
            sub_state: state.sub_state,
        });
    }
    if let Some(url) = &unit.ready_url {
        probe::is_ready(url, PROBE_TIMEOUT)
            .await
            .map_err(|reason| UnitUnhealthy::NotReady {
                unit: unit.name.clone(),
                reason,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reasons_read_as_the_rollback_detail_says_them() {
        let sha = |c: char| Some(c.to_string().repeat(64));
        let refused = Unhealthy::Proxy(ProxyUnhealthy::Refused(Mismatch {
            running: sha('a'),
            expected: sha('b'),
            proxy_error: Some("proxy.max_connections: expected at most 100000".to_owned()),
        }));
        assert!(refused.is_final(), "waiting cannot help");
        assert_eq!(
            refused.to_string(),
            "the proxy runs configuration aaaaaaaaaaaa, not bbbbbbbbbbbb; the proxy refused \
             it: proxy.max_connections: expected at most 100000"
        );
        let other = Unhealthy::Proxy(ProxyUnhealthy::RunsOther(Mismatch {
            running: None,
            expected: sha('b'),
            proxy_error: None,
        }));
        assert_eq!(
            other.to_string(),
            "the proxy runs configuration none, not bbbbbbbbbbbb"
        );
        assert!(!other.is_final());
        let unit = UnitName::try_from("pimesh-proxy.service".to_owned()).expect("unit");
        let inactive = Unhealthy::Unit(UnitUnhealthy::Inactive {
            unit,
            active_state: "failed".to_owned(),
            sub_state: "failed".to_owned(),
        });
        assert_eq!(
            inactive.to_string(),
            "pimesh-proxy.service is failed (failed)"
        );
    }

    /// A gate whose proxy probe goes to `probe`.
    fn probing(probe: &ProbeUrl) -> Gate<'_> {
        Gate {
            units: &[],
            proxy_config_url: probe,
            proxy_probe_url: probe,
            expected_sha256: None,
            settle: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn the_proxy_serves_when_its_outbound_port_gives_any_http_answer() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let url = |addr: std::net::SocketAddr| {
            ProbeUrl::try_from(format!("http://{addr}/")).expect("url")
        };
        // The proxy's own 503 for a request to no service: the data path works.
        let answering = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let answering_url = url(answering.local_addr().expect("addr"));
        tokio::spawn(async move {
            let (mut stream, _) = answering.accept().await.expect("accept");
            let mut buffer = [0u8; 1024];
            let _ = stream.read(&mut buffer).await;
            let _ = stream
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                .await;
        });
        assert!(probing(&answering_url).proxy_serves().await.is_ok());
        // A proxy that drops every request (it crashed on it, say): no answer.
        let dropping = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dropping_url = url(dropping.local_addr().expect("addr"));
        tokio::spawn(async move {
            let (mut stream, _) = dropping.accept().await.expect("accept");
            let mut buffer = [0u8; 1024];
            let _ = stream.read(&mut buffer).await;
        });
        let dropped = probing(&dropping_url).proxy_serves().await;
        assert!(
            matches!(dropped, Err(ProxyUnhealthy::NoTraffic(_))),
            "{dropped:?}"
        );
        // Nothing listening at all.
        let closed = {
            let spare = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            url(spare.local_addr().expect("addr"))
        };
        let refused = probing(&closed).proxy_serves().await;
        assert!(
            refused.as_ref().is_err_and(|err| err
                .to_string()
                .starts_with("the proxy's outbound port gives no answer")),
            "{refused:?}"
        );
    }
}
