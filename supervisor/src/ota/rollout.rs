//! Which units a configuration change touches, and touching them through systemd.
//!
//! The proxy reads the site configuration's `site`, `proxy` and `services`; the control
//! replicas read `site`, `control` and `services`. Each reloads in place (`ReloadUnit`,
//! SIGHUP) when what it reads changed, keeping its open connections (the replicas' open
//! discovery streams carry the new configuration to every proxy). A unit that is not
//! running is restarted instead, and must be ready before the next one is touched:
//! so a replica that joins the managed set with a new `[control] replicas` (see
//! `crate::units::managed_set`) is started and ready before the health gate.
//!
//! K3s reads its `config.yaml` only at its start: a server's K3s is restarted when a
//! `[k3s]` setting its config holds changed (`servers`, `disable`, `service_cidr`; an
//! agent's config holds none of them), but only once the node's [`DisruptionGuard`]
//! (etcd's quorum, the site's restart lease) lets it go down — so the servers of a site
//! take a new revision one after the other — and it must be ready again (within
//! [`K3S_STARTUP_GRACE`] at least) before the health gate. A configuration of unknown
//! origin never restarts K3s. Nothing else is touched.

use std::fmt;
use std::time::Duration;

use pimesh_schema::cluster::ClusterConfig;
use pimesh_schema::{ManagedUnit, UnitName};
use tokio::time::Instant;

use super::gate::{unit_health, UnitUnhealthy};
use crate::units::heal::{DisruptionGuard, K3S_STARTUP_GRACE};
use crate::units::role::UnitRole;
use crate::units::systemd::Systemd;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// Reload in place (SIGHUP); a unit that is not running is restarted instead.
    Reload,
    /// Restart once the disruption guard allows it (K3s, which has no reload).
    Restart,
}

/// The site configuration's consumers among the managed units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consumer {
    Proxy,
    Control,
    K3sServer,
}

fn consumer_of(unit: &ManagedUnit) -> Option<Consumer> {
    match UnitRole::of(&unit.name) {
        UnitRole::Proxy => Some(Consumer::Proxy),
        UnitRole::ControlReplica { .. } => Some(Consumer::Control),
        UnitRole::K3sServer => Some(Consumer::K3sServer),
        // An agent's config.yaml holds no `[k3s]` setting.
        UnitRole::K3sAgent | UnitRole::Other => None,
    }
}

fn changes_for(
    consumer: Consumer,
    old: Option<&ClusterConfig>,
    new: Option<&ClusterConfig>,
) -> bool {
    if consumer == Consumer::K3sServer {
        return match (old, new) {
            (Some(old), Some(new)) => {
                old.k3s.servers != new.k3s.servers
                    || old.k3s.disable != new.k3s.disable
                    || old.k3s.service_cidr != new.k3s.service_cidr
            }
            _ => false,
        };
    }
    match (old, new) {
        (Some(old), Some(new)) => {
            old.site != new.site
                || old.services != new.services
                || match consumer {
                    Consumer::Proxy => old.proxy != new.proxy,
                    Consumer::Control | Consumer::K3sServer => old.control != new.control,
                }
        }
        (None, None) => false,
        _ => true,
    }
}

/// The units to touch, in order, when the active configuration goes from `old` to `new`
/// (`None`: no configuration, or one not known — then every consumer is touched).
pub fn plan(
    units: &[ManagedUnit],
    old: Option<&ClusterConfig>,
    new: Option<&ClusterConfig>,
) -> Vec<(ManagedUnit, Touch)> {
    units
        .iter()
        .filter_map(|unit| {
            let consumer = consumer_of(unit)?;
            let touch = match consumer {
                Consumer::K3sServer => Touch::Restart,
                Consumer::Proxy | Consumer::Control => Touch::Reload,
            };
            changes_for(consumer, old, new).then(|| (unit.clone(), touch))
        })
        .collect()
}

/// What was done to a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reload,
    Restart,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Reload => "reload",
            Action::Restart => "restart",
        }
    }
}

/// Why touching the units stopped.
#[derive(Debug)]
pub enum TouchError {
    /// systemd did not say whether the unit is loaded.
    Unreadable { unit: UnitName, source: zbus::Error },
    /// systemd did not reload or restart the unit.
    Failed {
        action: Action,
        unit: UnitName,
        source: zbus::Error,
    },
    /// A restarted unit was not healthy by the deadline; `last` is why (`None`: the
    /// deadline came before a check).
    NotBack {
        unit: UnitName,
        last: Option<UnitUnhealthy>,
    },
    /// The disruption guard held the restart back until the deadline.
    Held { unit: UnitName, why: String },
}

impl fmt::Display for TouchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TouchError::Unreadable { unit, source } => write!(f, "cannot read {unit}: {source}"),
            TouchError::Failed {
                action,
                unit,
                source,
            } => write!(f, "cannot {} {unit}: {source}", action.as_str()),
            TouchError::Held { unit, why } => {
                write!(
                    f,
                    "{unit} could not be restarted for the new configuration: {why}"
                )
            }
            TouchError::NotBack { unit, last } => {
                write!(f, "{unit} did not come back after its restart: ")?;
                match last {
                    Some(reason) => reason.fmt(f),
                    None => f.write_str("not checked yet"),
                }
            }
        }
    }
}

impl std::error::Error for TouchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TouchError::Unreadable { source, .. } | TouchError::Failed { source, .. } => {
                Some(source)
            }
            TouchError::Held { .. } => None,
            TouchError::NotBack { last, .. } => last
                .as_ref()
                .map(|reason| reason as &(dyn std::error::Error + 'static)),
        }
    }
}

/// How often a held restart asks its guard again.
const ASK_AGAIN: Duration = Duration::from_secs(5);
/// How long a restart waits for its turn at least: the site's other servers may be
/// taking the same revision one after the other, each within K3s's startup grace.
pub const TURN_WAIT: Duration = Duration::from_secs(600);

/// Reloads each planned unit (restarts it when it is not running), or restarts it once
/// `guard` lets it go down (waiting [`TURN_WAIT`] for that at least); a restarted unit
/// must be active and ready before the next one is touched (bounded by `deadline`, and
/// for K3s by [`K3S_STARTUP_GRACE`] after its restart at least). Units that do not exist are skipped (the keeper reports them).
pub async fn touch(
    bus: &Systemd,
    plan: &[(ManagedUnit, Touch)],
    guard: &dyn DisruptionGuard,
    deadline: Instant,
) -> Result<(), TouchError> {
    for (unit, touch) in plan {
        let name = unit.name.as_str();
        let Some((path, state)) =
            bus.loaded_unit(name)
                .await
                .map_err(|source| TouchError::Unreadable {
                    unit: unit.name.clone(),
                    source,
                })?
        else {
            continue;
        };
        let inactive = state.active_state != "active";
        if *touch == Touch::Restart && !inactive {
            wait_for_guard(unit, guard, deadline.max(Instant::now() + TURN_WAIT)).await?;
        }
        // A reload needs a running unit; a stopped one is started with the new file.
        let (action, result) = match touch {
            Touch::Reload if !inactive => (
                Action::Reload,
                bus.manager().reload_unit(name, "replace").await,
            ),
            Touch::Reload | Touch::Restart => (
                Action::Restart,
                bus.manager().restart_unit(name, "replace").await,
            ),
        };
        if let Err(source) = result {
            if *touch == Touch::Restart && !inactive && crate::units::systemd::refused(&source) {
                guard.not_taken_down();
            }
            return Err(TouchError::Failed {
                action,
                unit: unit.name.clone(),
                source,
            });
        }
        tracing::info!(
            unit = name,
            action = action.as_str(),
            "unit touched for the new configuration"
        );
        if *touch == Touch::Restart {
            let at_least = Instant::now() + K3S_STARTUP_GRACE;
            wait_ready(bus, unit, &path, deadline.max(at_least)).await?;
        } else if inactive {
            wait_ready(bus, unit, &path, deadline).await?;
        }
    }
    Ok(())
}

/// Waits until `guard` no longer holds `unit`'s restart back, asking every [`ASK_AGAIN`]
/// until `deadline`.
async fn wait_for_guard(
    unit: &ManagedUnit,
    guard: &dyn DisruptionGuard,
    deadline: Instant,
) -> Result<(), TouchError> {
    loop {
        let Some(why) = guard.hold().await else {
            return Ok(());
        };
        if Instant::now() + ASK_AGAIN >= deadline {
            return Err(TouchError::Held {
                unit: unit.name.clone(),
                why,
            });
        }
        tracing::info!(unit = unit.name.as_str(), %why, "restart for the new configuration held back; asking again");
        tokio::time::sleep(ASK_AGAIN).await;
    }
}

/// Waits until `unit` is active and its readiness probe answers.
async fn wait_ready(
    bus: &Systemd,
    unit: &ManagedUnit,
    path: &zbus::zvariant::OwnedObjectPath,
    deadline: Instant,
) -> Result<(), TouchError> {
    let mut last = None;
    while Instant::now() < deadline {
        match unit_health(bus, unit, path).await {
            Ok(()) => return Ok(()),
            Err(reason) => last = Some(reason),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(TouchError::NotBack {
        unit: unit.name.clone(),
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> ClusterConfig {
        ClusterConfig::parse(std::path::Path::new("cluster.toml"), text).expect("valid config")
    }

    fn names(plan: &[(ManagedUnit, Touch)]) -> Vec<(String, Touch)> {
        plan.iter()
            .map(|(unit, touch)| (unit.name.to_string(), *touch))
            .collect()
    }

    const BASE: &str = "site = \"s\"\n[control]\nreplicas = 3\n[proxy]\nmax_connections = 100\n";

    #[test]
    fn proxy_settings_reload_only_the_proxy_and_replica_settings_only_replicas() {
        let units = pimesh_schema::supervisor::default_units();
        let base = config(BASE);
        let proxy_change = config(&BASE.replace("max_connections = 100", "max_connections = 200"));
        let control_change = config(&BASE.replace("replicas = 3", "replicas = 2"));
        assert_eq!(
            names(&plan(&units, Some(&base), Some(&proxy_change))),
            vec![("pimesh-proxy.service".to_owned(), Touch::Reload)]
        );
        let reloaded = names(&plan(&units, Some(&base), Some(&control_change)));
        assert_eq!(reloaded.len(), 3);
        assert!(reloaded
            .iter()
            .all(|(name, touch)| name.starts_with("pimesh-control@") && *touch == Touch::Reload));
        assert!(plan(&units, Some(&base), Some(&base.clone())).is_empty());
    }

    #[test]
    fn k3s_settings_restart_a_k3s_server_never_an_agent_and_never_from_an_unknown_origin() {
        let server: Vec<ManagedUnit> = ["k3s.service", "pimesh-proxy.service"]
            .iter()
            .map(|name| ManagedUnit {
                name: UnitName::try_from((*name).to_owned()).expect("unit"),
                ready_url: None,
                dependencies: Vec::new(),
            })
            .collect();
        let agent: Vec<ManagedUnit> = vec![ManagedUnit {
            name: UnitName::try_from("k3s-agent.service".to_owned()).expect("unit"),
            ready_url: None,
            dependencies: Vec::new(),
        }];
        let base = config(BASE);
        let disabled = config(&format!(
            "{BASE}[k3s]\ndisable = [\"traefik\", \"servicelb\"]\n"
        ));
        assert_eq!(
            names(&plan(&server, Some(&base), Some(&disabled))),
            vec![("k3s.service".to_owned(), Touch::Restart)]
        );
        assert!(plan(&agent, Some(&base), Some(&disabled)).is_empty());
        assert!(plan(&server, None, Some(&disabled))
            .iter()
            .all(|(unit, _)| unit.name.as_str() != "k3s.service"));
        // A service of the site is nothing to K3s.
        let with_service = config(&format!(
            "{BASE}[services.web]\nport = 8080\nnodes = [\"n\"]\n"
        ));
        assert_eq!(
            names(&plan(&server, Some(&base), Some(&with_service))),
            vec![("pimesh-proxy.service".to_owned(), Touch::Reload)]
        );
    }

    #[test]
    fn services_and_unknown_origins_touch_every_consumer() {
        let units = pimesh_schema::supervisor::default_units();
        let base = config(BASE);
        let with_service = config(&format!(
            "{BASE}[services.web]\nport = 8080\nnodes = [\"n\"]\n"
        ));
        assert_eq!(plan(&units, Some(&base), Some(&with_service)).len(), 4);
        assert_eq!(plan(&units, None, Some(&base)).len(), 4);
        assert_eq!(plan(&units, Some(&base), None).len(), 4);
    }
}
