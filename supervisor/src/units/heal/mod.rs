//! The heal policy: given what systemd and the readiness probe say about a unit, what the
//! supervisor does about it, and when. Pure logic — no D-Bus, no clock, no randomness of
//! its own — so that every rule is unit-tested; `crate::units::keeper` does the I/O.
//!
//! The rules, for a unit whose desired state is "running":
//! - failed or inactive (exited, stopped, never started) → start it; a failed one is reset
//!   first (`ResetFailedUnit`), which also clears systemd's start limit (hit or not: the
//!   systemd 257 we test against keeps `Result=exit-code` rather than reporting
//!   `start-limit-hit` when an earlier failure is recorded);
//! - active, but its readiness probe has failed for longer than the hang threshold (a hung
//!   process) → restart it; for K3s, failures in the first [`K3S_STARTUP_GRACE`] of a
//!   process do not count (it takes that long to be ready after a start);
//! - activating, deactivating, or waiting to be restarted by systemd itself → wait;
//! - between two heal attempts, an exponential backoff with jitter, capped (each pause in
//!   `[3/4 base, base]`);
//! - after `escalate_after` attempts in a row without the unit becoming stable, restart its
//!   dependencies once; after twice that many, reboot the node if the configuration allows
//!   it, or record that it does not and keep retrying at the capped backoff.
//!
//! A unit is *stable* once it has been active and ready for [`STABLE_AFTER`]; that ends a
//! failure episode (attempt count and escalation go back to zero).
//!
//! Quorum: while the caller says disruption is held back (this node runs a K3s server and
//! taking it down would leave the site's etcd without a majority, `crate::k3s::quorum`),
//! the K3s server unit is not restarted and no unit escalates to a reboot; starting a unit
//! that is down is never held back (it cannot take a member away). A held-back heal counts
//! no attempt, the unit's status says why it waits, and K3s's unreadiness starts over
//! with its startup grace: once the other servers are back, it has that long to find its
//! quorum again before it counts as hung.

use std::time::{Duration, Instant};

use pimesh_runtime::backoff::{Backoff, Jitter};
use pimesh_schema::{HealSettings, ManagedUnit, UnitName};
use serde::Serialize;

/// What says, when asked right before a disruptive heal, whether it must be held back
/// (`Some(why)`) — `crate::k3s::quorum` on a node running K3s.
pub trait DisruptionGuard: Send + Sync {
    /// `None` when the disruption may go ahead now; what the guard takes for it (the
    /// site's restart lease) is then held until [`DisruptionGuard::back_up`] says that a
    /// process started after this answer is ready.
    fn hold(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send + '_>>;

    /// A unit whose restart takes a K3s server down answered its readiness probe; the
    /// process answering was first probed at `first_probed` (after the keeper saw it
    /// start). Called on every passing probe; cheap.
    fn back_up(&self, first_probed: Instant);

    /// The disruption that the last [`DisruptionGuard::hold`] let go ahead did not happen
    /// (the unit came back by itself, or systemd refused the job): what the guard took
    /// for it is given back once the node's K3s answers ready, unless an earlier
    /// disruption still waits for its process to come back.
    fn not_taken_down(&self);
}

/// How long after its start K3s may stay unready before it counts as hung.
pub const K3S_STARTUP_GRACE: Duration = Duration::from_secs(120);

/// A unit healthy for this long ends its failure episode.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How long an issued action may stay without its job finishing before the policy decides
/// afresh (systemd's own start timeout normally ends the job well before).
pub const JOB_GRACE: Duration = Duration::from_secs(120);

/// What systemd says about a unit (properties of `org.freedesktop.systemd1.Unit` and
/// `.Service`), as last read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UnitState {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub result: String,
    pub main_pid: u32,
    /// Restarts done by systemd itself (`Restart=`), not by Pimesh.
    pub n_restarts: u32,
    pub exec_main_status: i32,
}

/// Something the supervisor asks systemd to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `StartUnit`, preceded by `ResetFailedUnit` when `reset_failed`.
    Start { reset_failed: bool },
    /// `RestartUnit` (the unit is active but hung).
    Restart,
    /// `RestartUnit` on each dependency (first escalation rung).
    RestartDependencies(Vec<UnitName>),
    /// Start `reboot.target` (last escalation rung; only when allowed).
    Reboot,
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Start {
                reset_failed: false,
            } => "start",
            Action::Start { reset_failed: true } => "reset-failed-and-start",
            Action::Restart => "restart",
            Action::RestartDependencies(_) => "restart-dependencies",
            Action::Reboot => "reboot",
        }
    }
}

/// An action and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub reason: String,
}

/// How far up the escalation ladder the current failure episode went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Escalation {
    None,
    /// The unit's dependencies were restarted (or there were none to restart).
    Dependencies,
    /// A reboot was due but the configuration does not allow it.
    RebootRefused,
    /// A reboot was requested.
    Reboot,
}

impl Escalation {
    /// The rung as the status shows it.
    pub fn name(self) -> &'static str {
        match self {
            Escalation::None => "none",
            Escalation::Dependencies => "dependencies",
            Escalation::RebootRefused => "reboot-refused",
            Escalation::Reboot => "reboot",
        }
    }
}

/// The policy's memory of one unit. Invariant: `attempts` counts heal actions since the
/// unit was last stable, and `next_attempt_at` is set whenever `attempts > 0`.
#[derive(Debug, Clone)]
pub struct UnitHealer {
    has_probe: bool,
    dependencies: Vec<UnitName>,
    pub state: Option<UnitState>,
    /// The last probe answer since the unit (re)became active; `None` before the first.
    pub ready: Option<bool>,
    not_ready_since: Option<Instant>,
    /// When the current process was first probed.
    first_probe_at: Option<Instant>,
    /// Probe failures within this long of the first probe of a process do not count
    /// towards a hang: K3s takes tens of seconds to become ready after its start (etcd
    /// joins, the API server's checks); the mesh's own daemons take none.
    startup_grace: Duration,
    healthy_since: Option<Instant>,
    pub attempts: u32,
    next_attempt_at: Option<Instant>,
    /// An action was issued and its job has not finished yet.
    awaiting_job_until: Option<Instant>,
    pub escalation: Escalation,
    /// Starts and restarts of this unit done by Pimesh (not by systemd's `Restart=`).
    pub restarts_by_pimesh: u64,
    /// A restart of this unit takes a K3s server (an etcd member) down.
    restart_takes_a_member: bool,
    /// Why the last heal was held back; cleared once the unit is healthy or a heal goes
    /// ahead.
    pub held_back: Option<String>,
}

/// Why a unit cannot be managed at all (it is not a loadable unit).
pub fn unmanageable(state: &UnitState) -> Option<String> {
    match state.load_state.as_str() {
        "loaded" | "" => None,
        "not-found" => Some("no such unit: systemd has no unit file for it".to_owned()),
        "masked" => Some("the unit is masked".to_owned()),
        other => Some(format!("systemd cannot load the unit (LoadState={other})")),
    }
}

impl UnitHealer {
    pub fn new(unit: &ManagedUnit) -> Self {
        UnitHealer {
            has_probe: unit.ready_url.is_some(),
            dependencies: unit.dependencies.clone(),
            state: None,
            ready: None,
            not_ready_since: None,
            first_probe_at: None,
            startup_grace: match crate::units::role::UnitRole::of(&unit.name) {
                crate::units::role::UnitRole::K3sServer
                | crate::units::role::UnitRole::K3sAgent => K3S_STARTUP_GRACE,
                _ => Duration::ZERO,
            },
            healthy_since: None,
            attempts: 0,
            next_attempt_at: None,
            awaiting_job_until: None,
            escalation: Escalation::None,
            restarts_by_pimesh: 0,
            restart_takes_a_member: crate::units::role::UnitRole::of(&unit.name)
                == crate::units::role::UnitRole::K3sServer,
            held_back: None,
        }
    }

    /// Records a fresh read of the unit's properties.
    pub fn observe_state(&mut self, state: UnitState) {
        let was_running = self
            .state
            .as_ref()
            .filter(|old| old.active_state == "active")
            .map(|old| old.main_pid);
        let running_now = (state.active_state == "active").then_some(state.main_pid);
        if was_running != running_now {
            // A new process (or none): earlier probe answers say nothing about it.
            self.ready = None;
            self.not_ready_since = None;
            self.first_probe_at = None;
            self.healthy_since = None;
        }
        self.state = Some(state);
    }

    /// When the current process was first probed (it started before), if it has been.
    pub fn first_probed_at(&self) -> Option<Instant> {
        self.first_probe_at
    }

    /// Whether a restart of this unit takes a K3s server (an etcd member) down.
    pub fn restart_takes_a_member(&self) -> bool {
        self.restart_takes_a_member
    }

    /// Records a readiness probe answer to a probe sent at `sent_at`. Ignored unless the
    /// unit is active.
    pub fn observe_probe(&mut self, sent_at: Instant, ready: bool) {
        if !self.is_active() {
            return;
        }
        self.ready = Some(ready);
        let first = *self.first_probe_at.get_or_insert(sent_at);
        if ready {
            self.not_ready_since = None;
        } else {
            // Failures within the startup grace count from its end.
            self.not_ready_since
                .get_or_insert(sent_at.max(first + self.startup_grace));
        }
    }

    /// The job of the last action finished (systemd's `JobRemoved`).
    pub fn observe_job_finished(&mut self) {
        self.awaiting_job_until = None;
    }

    fn is_active(&self) -> bool {
        self.state
            .as_ref()
            .is_some_and(|state| state.active_state == "active")
    }

    /// Active and, when it has a probe, answering it.
    pub fn is_healthy(&self) -> bool {
        self.is_active() && (!self.has_probe || self.ready == Some(true))
    }

    /// What is wrong with the unit right now and the action that fixes it, ignoring
    /// backoff and escalation.
    fn needed(&self, now: Instant, settings: &HealSettings) -> Option<Decision> {
        let state = self.state.as_ref()?;
        if unmanageable(state).is_some() {
            return None;
        }
        match state.active_state.as_str() {
            // A failed unit is reset before it is started: systemd refuses to start a unit
            // whose start limit is still in its window, and systemd 257 (as tested) keeps
            // the original failure in `Result` (`exit-code`) rather than
            // `start-limit-hit`, so the limit cannot be told from the properties. The reset also clears the
            // limit's counter: from here on the supervisor's backoff paces the attempts.
            "failed" => Some(Decision {
                action: Action::Start { reset_failed: true },
                reason: format!(
                    "unit failed (Result={}, SubState={}, exit status {}, {} restarts by systemd{})",
                    state.result,
                    state.sub_state,
                    state.exec_main_status,
                    state.n_restarts,
                    if state.result == "start-limit-hit" {
                        ", start limit hit"
                    } else {
                        ""
                    }
                ),
            }),
            "inactive" => Some(Decision {
                action: Action::Start {
                    reset_failed: false,
                },
                reason: format!(
                    "unit is inactive (Result={}, SubState={}), its desired state is running",
                    state.result, state.sub_state
                ),
            }),
            "active" if self.has_probe => {
                let since = self.not_ready_since?;
                let failing = now.saturating_duration_since(since);
                (failing >= settings.hang_threshold).then(|| Decision {
                    action: Action::Restart,
                    reason: format!(
                        "active but its readiness probe has failed for {} ms (threshold {} ms): hung",
                        failing.as_millis(),
                        settings.hang_threshold.as_millis()
                    ),
                })
            }
            // activating (systemd's own auto-restart included), deactivating, reloading:
            // systemd is already at work.
            _ => None,
        }
    }

    /// Decides what to do now. `random` feeds the backoff jitter. The caller carries out
    /// the returned action and must call [`UnitHealer::decide`] again no later than
    /// [`UnitHealer::next_deadline`].
    #[cfg(test)]
    pub fn decide(
        &mut self,
        now: Instant,
        settings: &HealSettings,
        random: u64,
    ) -> Option<Decision> {
        self.decide_held(now, settings, random, None)
    }

    /// [`UnitHealer::decide`] while `hold` says why disruption is held back (`None`: it
    /// is not): see the module doc's quorum rule.
    pub fn decide_held(
        &mut self,
        now: Instant,
        settings: &HealSettings,
        random: u64,
        hold: Option<&str>,
    ) -> Option<Decision> {
        if self.is_healthy() {
            self.held_back = None;
            let since = *self.healthy_since.get_or_insert(now);
            if self.attempts > 0 && now.saturating_duration_since(since) >= STABLE_AFTER {
                self.attempts = 0;
                self.next_attempt_at = None;
                self.escalation = Escalation::None;
            }
            return None;
        }
        self.healthy_since = None;
        if self.awaiting_job_until.is_some_and(|until| now < until) {
            return None;
        }
        let needed = self.needed(now, settings)?;
        if self.next_attempt_at.is_some_and(|at| now < at) {
            return None;
        }
        if let (Some(why), Action::Restart, true) =
            (hold, &needed.action, self.restart_takes_a_member)
        {
            self.held_back = Some(format!("not restarted ({}): {why}", needed.reason));
            // When the hold lifts (the other servers are back), K3s gets its startup grace
            // to find its quorum again before it counts as hung, rather than a restart at
            // once for an unreadiness that was the quorum's.
            self.not_ready_since = None;
            self.first_probe_at = None;
            return None;
        }
        if let Some(why) = hold {
            if self.reboot_due(settings) && settings.allow_reboot {
                self.held_back = Some(format!(
                    "a reboot is due but held back: {why}; retrying the unit at the backoff cap"
                ));
                self.attempts = self.attempts.saturating_add(1);
                self.next_attempt_at = Some(now + settings.backoff_max);
                self.awaiting_job_until = Some(now + JOB_GRACE);
                if matches!(needed.action, Action::Start { .. } | Action::Restart) {
                    self.restarts_by_pimesh += 1;
                }
                return Some(needed);
            }
        }
        self.held_back = None;
        self.attempts = self.attempts.saturating_add(1);
        self.next_attempt_at = Some(
            now + Backoff::new(settings.backoff_initial, settings.backoff_max)
                .with_jitter(Jitter::QUARTER)
                .delay(self.attempts, random),
        );
        self.awaiting_job_until = Some(now + JOB_GRACE);
        let decision = self.escalate(needed, settings);
        if matches!(decision.action, Action::Start { .. } | Action::Restart) {
            self.restarts_by_pimesh += 1;
        }
        Some(decision)
    }

    /// Whether deciding now would take a K3s server down or reboot the node: the caller
    /// then asks its [`DisruptionGuard`] afresh and passes its answer to
    /// [`UnitHealer::decide_held`].
    pub fn wants_disruption(&self, now: Instant, settings: &HealSettings) -> bool {
        if self.is_healthy()
            || self.awaiting_job_until.is_some_and(|until| now < until)
            || self.next_attempt_at.is_some_and(|at| now < at)
        {
            return false;
        }
        match self.needed(now, settings) {
            Some(needed) => {
                (needed.action == Action::Restart && self.restart_takes_a_member)
                    || (self.reboot_due(settings) && settings.allow_reboot)
            }
            None => false,
        }
    }

    /// Whether the next attempt reaches the reboot rung.
    fn reboot_due(&self, settings: &HealSettings) -> bool {
        self.attempts.saturating_add(1) > settings.escalate_after.saturating_mul(2)
            && self.escalation < Escalation::RebootRefused
    }

    /// Replaces `needed` by the next escalation rung when this attempt reaches one.
    fn escalate(&mut self, needed: Decision, settings: &HealSettings) -> Decision {
        let rung = settings.escalate_after;
        if self.attempts > rung.saturating_mul(2) && self.escalation < Escalation::RebootRefused {
            let reason = format!(
                "{} heal attempts without the unit becoming stable; last: {}",
                self.attempts - 1,
                needed.reason
            );
            if settings.allow_reboot {
                self.escalation = Escalation::Reboot;
                return Decision {
                    action: Action::Reboot,
                    reason,
                };
            }
            self.escalation = Escalation::RebootRefused;
            return Decision {
                reason: format!(
                    "{reason}; a reboot is due but heal.allow_reboot is false, retrying at the backoff cap"
                ),
                ..needed
            };
        }
        if self.attempts > rung && self.escalation < Escalation::Dependencies {
            self.escalation = Escalation::Dependencies;
            let reason = format!(
                "{} heal attempts without the unit becoming stable; last: {}",
                self.attempts - 1,
                needed.reason
            );
            if self.dependencies.is_empty() {
                return Decision {
                    reason: format!("{reason}; no dependencies configured to restart"),
                    ..needed
                };
            }
            return Decision {
                action: Action::RestartDependencies(self.dependencies.clone()),
                reason,
            };
        }
        needed
    }

    /// When the policy next needs to look at this unit even if nothing is observed: the
    /// end of a backoff wait, the hang threshold, the end of the stability window.
    /// Only instants after `now` count, so that a caller sleeping until the deadline
    /// never spins.
    pub fn next_deadline(&self, now: Instant, settings: &HealSettings) -> Option<Instant> {
        let hang = self
            .not_ready_since
            .filter(|_| self.is_active())
            .map(|since| since + settings.hang_threshold);
        let stable = self
            .healthy_since
            .filter(|_| self.attempts > 0)
            .map(|since| since + STABLE_AFTER);
        [hang, stable, self.next_attempt_at, self.awaiting_job_until]
            .into_iter()
            .flatten()
            .filter(|deadline| *deadline > now)
            .min()
    }
}

#[cfg(test)]
mod tests;
