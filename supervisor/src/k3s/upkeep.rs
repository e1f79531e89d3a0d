//! What K3s's placement hands to a task of its own, because it must be checked again every
//! few seconds and runs a program: the redirect of Services traffic to the proxy
//! ([`super::redirect`]) and the control replicas' kubeconfig ([`super::kubeconfig`]).
//!
//! The placement says what it wants each time it is applied ([`Upkeep::want`]); the task
//! ([`Upkeep::run`]) acts at once on each of those, and every [`EVERY`] in between, and
//! shows the outcome in the status (`k3s.redirect`, `k3s.control_kubeconfig`).
//!
//! Invariants: the redirect is installed (and re-checked) while K3s is placed on the node,
//! in any role, and taken away once when it no longer is (a supervisor that starts on a node
//! without K3s removes what an earlier run left); a failure is shown, retried at the next
//! check, and stops nothing else. The kubeconfig copy exists only while the node is a K3s
//! server. A supervisor run off a node (`--no-node-setup`, as the tests run it) changes
//! no firewall rule of its host: the status says so.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::kubeconfig::{self, Kept};
use super::redirect::{Iptables, RedirectError, Rules};
use crate::status::{ControlKubeconfigReport, RedirectReport, StatusHandle};
use crate::trust::store::KeyOwner;

/// How often the rules and the copy are checked besides each placement.
pub const EVERY: Duration = Duration::from_secs(5);

/// What the placement wants of the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The redirect while K3s is placed here; `None`: none.
    pub redirect: Option<Rules>,
    /// On a K3s server, K3s's admin kubeconfig, which the replicas get a copy of; `None`:
    /// not a K3s server, no copy.
    pub admin_kubeconfig: Option<PathBuf>,
    /// Where the replicas' copy is.
    pub control_kubeconfig: PathBuf,
}

/// The placement's side and the task's side of the upkeep. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Upkeep(Arc<watch::Sender<Option<Wanted>>>);

impl Default for Upkeep {
    fn default() -> Self {
        Upkeep(Arc::new(watch::channel(None).0))
    }
}

impl Upkeep {
    /// Says what the node wants now; the task acts on it at once, even when it is the
    /// same as before (each placement re-checks).
    pub fn want(&self, wanted: Wanted) {
        self.0.send_replace(Some(wanted));
    }

    /// What the placement wants now (`None` before its first placement).
    #[cfg(test)]
    pub fn wanted(&self) -> Option<Wanted> {
        self.0.borrow().clone()
    }

    /// The task: acts on each [`Upkeep::want`] and every [`EVERY`], with `iptables`
    /// (`None`: off a node, no rule is made).
    pub async fn run(self, iptables: Option<Iptables>, status: StatusHandle) {
        let mut changes = self.0.subscribe();
        changes.mark_changed();
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut state = State::default();
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The placement is gone: the supervisor is stopping.
                        return;
                    }
                }
                _ = every.tick() => {}
            }
            let Some(wanted) = changes.borrow_and_update().clone() else {
                continue;
            };
            let iptables = iptables.clone();
            let before = state.clone();
            let checked =
                tokio::task::spawn_blocking(move || check(&iptables, &wanted, before)).await;
            let Ok((next, redirect, copy)) = checked else {
                continue;
            };
            state = next;
            status.update(|status| {
                status.k3s.redirect = redirect;
                status.k3s.control_kubeconfig = copy;
            });
        }
    }
}

/// What the task remembers between checks.
#[derive(Debug, Clone, Default)]
struct State {
    /// No redirect is left on the node (taken away, or never made by this run).
    removed: bool,
    /// The last error shown, so that one failing again is logged once.
    last_error: Option<String>,
}

/// One check: the redirect, then the copy.
fn check(
    iptables: &Option<Iptables>,
    wanted: &Wanted,
    mut state: State,
) -> (
    State,
    Option<RedirectReport>,
    Option<ControlKubeconfigReport>,
) {
    let redirect = match (&wanted.redirect, iptables) {
        (Some(rules), None) => Some(RedirectReport {
            service_cidr: rules.service_cidr.to_string(),
            installed: false,
            error: Some(
                "not made off a node (--no-node-setup): the host's firewall is left alone".into(),
            ),
        }),
        (None, None) => None,
        (Some(rules), Some(iptables)) => {
            state.removed = false;
            let result = iptables.install(rules);
            if let Ok(true) = result {
                info!(service_cidr = %rules.service_cidr, to_port = rules.to_port, "K3s Services' traffic is redirected to the proxy");
            }
            let error = result.err().map(|err| err.to_string());
            if error != state.last_error {
                if let Some(error) = &error {
                    warn!(%error, "cannot redirect K3s Services' traffic to the proxy");
                }
                state.last_error.clone_from(&error);
            }
            Some(RedirectReport {
                service_cidr: rules.service_cidr.to_string(),
                installed: error.is_none(),
                error,
            })
        }
        (None, Some(iptables)) => {
            if !state.removed {
                match iptables.remove() {
                    Ok(changed) => {
                        if changed {
                            info!("K3s is not placed here: the redirect of its Services' traffic is taken away");
                        }
                        state.removed = true;
                    }
                    // Without iptables there is nothing to take away.
                    Err(RedirectError::Spawn { .. }) => state.removed = true,
                    Err(err) => {
                        warn!(%err, "cannot take the redirect of K3s Services' traffic away")
                    }
                }
            }
            state.last_error = None;
            None
        }
    };
    let copy = &wanted.control_kubeconfig;
    let copy_report = match &wanted.admin_kubeconfig {
        Some(admin) => Some(
            match kubeconfig::keep(admin, copy, KeyOwner::control_user()) {
                Ok(Kept::Copied { .. }) => ControlKubeconfigReport {
                    path: copy.display().to_string(),
                    copied: true,
                    note: None,
                },
                Ok(Kept::Waiting) => ControlKubeconfigReport {
                    path: copy.display().to_string(),
                    copied: false,
                    note: Some(format!("waiting for K3s to write {}", admin.display())),
                },
                Err(err) => ControlKubeconfigReport {
                    path: copy.display().to_string(),
                    copied: false,
                    note: Some(err.to_string()),
                },
            },
        ),
        None => {
            if let Err(err) = kubeconfig::remove(copy) {
                warn!(%err, "cannot remove the control replicas' kubeconfig");
            }
            None
        }
    };
    (state, redirect, copy_report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::NodePaths;
    use pimesh_schema::cluster::Ipv4Cidr;

    #[test]
    fn a_server_gets_the_copy_and_a_missing_iptables_is_shown_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = NodePaths::under(dir.path());
        let iptables = Some(Iptables {
            program: dir.path().join("no-iptables"),
        });
        std::fs::create_dir_all(paths.rancher_etc.clone()).expect("mkdir");
        std::fs::write(paths.k3s_admin_kubeconfig(), "kind: Config\n").expect("admin");
        let server = Wanted {
            redirect: Some(Rules::for_proxy(Ipv4Cidr::K3S_DEFAULT_SERVICES)),
            admin_kubeconfig: Some(paths.k3s_admin_kubeconfig()),
            control_kubeconfig: paths.control_kubeconfig(),
        };
        let (state, redirect, copy) = check(&iptables, &server, State::default());
        let redirect = redirect.expect("a redirect report");
        assert_eq!(redirect.service_cidr, "10.43.0.0/16");
        assert!(!redirect.installed);
        assert!(
            redirect.error.unwrap_or_default().contains("cannot run"),
            "the status says iptables is missing"
        );
        assert!(copy.expect("a copy report").copied);
        assert!(paths.control_kubeconfig().exists());

        let gone = Wanted {
            redirect: None,
            admin_kubeconfig: None,
            ..server.clone()
        };
        let (state, redirect, copy) = check(&iptables, &gone, state);
        assert!(state.removed, "nothing to take away without iptables");
        assert!(redirect.is_none() && copy.is_none());
        assert!(!paths.control_kubeconfig().exists());

        let (_, redirect, _) = check(&None, &server, State::default());
        let redirect = redirect.expect("a redirect report");
        assert!(!redirect.installed);
        assert!(redirect.error.unwrap_or_default().contains("off a node"));
    }
}
