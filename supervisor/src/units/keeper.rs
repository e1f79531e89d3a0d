//! The unit keeper: the event loop that keeps the managed units running. It feeds what
//! systemd reports (D-Bus signals, event-driven) and what readiness probes answer (polled)
//! to the heal policy (`crate::units::heal`), carries out its decisions through systemd, and
//! publishes everything in the node status.
//!
//! The set of units comes from `crate::units::managed_set` and may change while the keeper
//! runs: a unit that joins the set is started like any unit that is down, one that leaves
//! it is stopped (`StopUnit`) and forgotten.
//!
//! Invariants: the keeper never starts a process itself, only asks systemd; it beats its
//! [`Heartbeat`] at least every [`MAX_TURN`], so the supervisor's watchdog is fed exactly
//! while this loop turns; when the bus goes away it reconnects with backoff, keeping what
//! the policy learnt (attempts, backoff, escalation) across connections.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pimesh_runtime::backoff::{Backoff, Jitter};
use pimesh_runtime::notify::Heartbeat;
use pimesh_schema::{HealSettings, ManagedUnit, UnitName};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};
use zbus::zvariant::OwnedObjectPath;

use crate::status::{ActionReport, StatusHandle, UnitReport};
use crate::units::heal::{self, Action, Decision, UnitHealer};
use crate::units::journal;
use crate::units::probe::{self, ProbeError};
use crate::units::systemd::{self, BusEvent, Systemd, CALL_TIMEOUT};

/// The loop turns (and beats) at least this often.
const MAX_TURN: Duration = Duration::from_secs(1);
/// Waits between reconnection attempts: from 200 ms doubling up to 5 s, each in
/// `[3/4 base, base]`.
const RECONNECT: Backoff =
    Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).with_jitter(Jitter::QUARTER);
/// A probe gives up after this long (or the probe interval, if shorter).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One managed unit: its configuration, the policy's memory, and what the keeper did.
struct Managed {
    config: ManagedUnit,
    healer: UnitHealer,
    path: Option<OwnedObjectPath>,
    last_action: Option<ActionReport>,
    /// How many times each action was taken for this unit since the supervisor started.
    action_counts: BTreeMap<&'static str, u64>,
    /// Why the unit cannot be managed; logged once when it appears.
    error: Option<String>,
    /// What the unit last logged, read when the current failure episode began.
    last_log: Vec<String>,
}

/// A readiness probe answer for the process `main_pid` of unit `index`.
struct ProbeAnswer {
    index: usize,
    main_pid: u32,
    /// When the probe was sent: a probe that times out says the unit was not ready then.
    sent_at: Instant,
    result: Result<(), ProbeError>,
}

/// Why a session over one connection ended.
enum SessionEnd {
    /// The connection is unusable, for this reason.
    Lost(Disconnected),
    /// The managed set changed: take it, then go on over the same connection.
    SetChanged,
}

/// Why the keeper has no usable connection to systemd: it reconnects, and the status's
/// `dbus.last_error` says this.
#[derive(Debug)]
enum Disconnected {
    /// Connecting failed.
    Connect(zbus::Error),
    /// Connecting got no answer within [`CALL_TIMEOUT`].
    ConnectTimeout,
    /// A call failed in a way that means the connection itself is unusable.
    Call(zbus::Error),
    /// A managed unit could not be loaded.
    LoadUnit { unit: UnitName, source: zbus::Error },
    /// A managed unit's properties could not be read.
    ReadState { unit: UnitName, source: zbus::Error },
    /// The unit signals could not be subscribed to.
    Subscribe(zbus::Error),
    /// Every signal watcher stopped.
    WatchersStopped,
    /// A signal stream ended (the bus went away); says which.
    StreamEnded(&'static str),
}

impl fmt::Display for Disconnected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disconnected::Connect(err) => write!(f, "cannot connect to systemd over D-Bus: {err}"),
            Disconnected::ConnectTimeout => write!(
                f,
                "cannot connect to systemd over D-Bus: no answer within {} s",
                CALL_TIMEOUT.as_secs()
            ),
            Disconnected::Call(err) => write!(f, "D-Bus call failed: {err}"),
            Disconnected::LoadUnit { unit, source } => {
                write!(f, "LoadUnit({unit}) failed: {source}")
            }
            Disconnected::ReadState { unit, source } => {
                write!(f, "cannot read the properties of {unit}: {source}")
            }
            Disconnected::Subscribe(err) => write!(f, "cannot subscribe to unit signals: {err}"),
            Disconnected::WatchersStopped => f.write_str("the signal watchers stopped"),
            Disconnected::StreamEnded(which) => f.write_str(which),
        }
    }
}

pub struct Keeper {
    settings: HealSettings,
    desired: watch::Receiver<Vec<ManagedUnit>>,
    units: Vec<Managed>,
    status: StatusHandle,
    heartbeat: Arc<Heartbeat>,
    /// Asked right before a heal that would take a K3s server down or reboot the node.
    guard: Arc<dyn heal::DisruptionGuard>,
    connections: u64,
}

impl Keeper {
    pub fn new(
        settings: HealSettings,
        mut desired: watch::Receiver<Vec<ManagedUnit>>,
        status: StatusHandle,
        heartbeat: Arc<Heartbeat>,
        guard: Arc<dyn heal::DisruptionGuard>,
    ) -> Self {
        let units = desired
            .borrow_and_update()
            .iter()
            .cloned()
            .map(Managed::new)
            .collect();
        Keeper {
            settings,
            desired,
            units,
            status,
            heartbeat,
            guard,
            connections: 0,
        }
    }

    /// Runs for ever: connects, keeps the units, reconnects when the bus goes away.
    pub async fn run(mut self) {
        self.publish();
        let mut failures = 0u32;
        loop {
            self.heartbeat.beat();
            let why = match tokio::time::timeout(CALL_TIMEOUT, Systemd::connect()).await {
                Ok(Ok(bus)) => {
                    failures = 0;
                    self.connections += 1;
                    info!(
                        connection = self.connections,
                        "connected to systemd over D-Bus"
                    );
                    self.set_bus(true, None);
                    let why = self.keep_over(&bus).await;
                    warn!(reason = %why, "lost the connection to systemd ({why}); reconnecting");
                    why
                }
                Ok(Err(err)) => {
                    let why = Disconnected::Connect(err);
                    warn!(attempt = failures + 1, "{why}");
                    why
                }
                Err(_) => {
                    let why = Disconnected::ConnectTimeout;
                    warn!(attempt = failures + 1, "{why}");
                    why
                }
            };
            failures = failures.saturating_add(1);
            self.set_bus(false, Some(why.to_string()));
            let wait = RECONNECT.delay(failures, random());
            self.sleep_beating(wait).await;
        }
    }

    async fn sleep_beating(&self, duration: Duration) {
        let end = Instant::now() + duration;
        while Instant::now() < end {
            self.heartbeat.beat();
            tokio::time::sleep((end - Instant::now()).min(MAX_TURN)).await;
        }
    }

    /// Keeps the units over one connection, taking each new managed set as it comes;
    /// returns why the connection ended.
    async fn keep_over(&mut self, bus: &Systemd) -> Disconnected {
        loop {
            if self.desired.has_changed().unwrap_or(false) {
                if let Err(why) = self.take_new_set(bus).await {
                    return why;
                }
            }
            match self.session(bus).await {
                SessionEnd::Lost(why) => return why,
                SessionEnd::SetChanged => {}
            }
        }
    }

    /// Makes the managed units the desired set: stops (through systemd) and forgets the
    /// units that left it, adds those that joined it; what the policy learnt about the
    /// units that stay is kept.
    async fn take_new_set(&mut self, bus: &Systemd) -> Result<(), Disconnected> {
        let desired = self.desired.borrow_and_update().clone();
        let mut old: Vec<Managed> = std::mem::take(&mut self.units);
        for unit in old
            .iter()
            .filter(|unit| !desired.iter().any(|d| d.name == unit.config.name))
        {
            self.heartbeat.beat();
            let name = unit.config.name.as_str();
            info!(unit = %name, "stopping {name}: it left the managed set");
            if let Err(err) = bus.manager().stop_unit(name, "replace").await {
                if is_connection_error(&err) {
                    // Taken again over the next connection.
                    self.units = old;
                    self.desired.mark_changed();
                    return Err(Disconnected::Call(err));
                }
                warn!(unit = %name, %err, "systemd refused to stop {name}: {err}");
            }
        }
        self.units = desired
            .into_iter()
            .map(
                |config| match old.iter().position(|unit| unit.config.name == config.name) {
                    Some(index) => {
                        let mut kept = old.swap_remove(index);
                        kept.config = config;
                        kept
                    }
                    None => {
                        info!(unit = %config.name, "{} joined the managed set", config.name);
                        Managed::new(config)
                    }
                },
            )
            .collect();
        self.publish();
        Ok(())
    }

    /// Keeps the current units over one connection, until it is lost or the set changes.
    async fn session(&mut self, bus: &Systemd) -> SessionEnd {
        let mut watched = Vec::new();
        for (index, unit) in self.units.iter_mut().enumerate() {
            // Each call may take up to CALL_TIMEOUT: beat between them.
            self.heartbeat.beat();
            match bus.load_unit(unit.config.name.as_str()).await {
                Ok(path) => {
                    watched.push((index, path.clone()));
                    unit.path = Some(path);
                }
                Err(source) => {
                    return SessionEnd::Lost(Disconnected::LoadUnit {
                        unit: unit.config.name.clone(),
                        source,
                    });
                }
            }
        }
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let mut watchers = JoinSet::new();
        if let Err(err) = bus.watch(&watched, &events_tx, &mut watchers).await {
            return SessionEnd::Lost(Disconnected::Subscribe(err));
        }
        // Read everything once after subscribing, so no change falls in between.
        for index in 0..self.units.len() {
            self.heartbeat.beat();
            if let Err(why) = self.refresh(bus, index).await {
                return SessionEnd::Lost(why);
            }
        }
        let (probes_tx, mut probes) = mpsc::unbounded_channel::<ProbeAnswer>();
        let mut probe_tick = tokio::time::interval(self.settings.probe_interval);
        // A clone, so that waiting for a change does not borrow `self`; it has seen what
        // `self.desired` has seen.
        let mut desired = self.desired.clone();
        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.heartbeat.beat();
            if let Err(why) = self.heal_all(bus).await {
                return SessionEnd::Lost(why);
            }
            self.publish();
            let now = Instant::now();
            let wake = self
                .units
                .iter()
                .filter_map(|unit| unit.healer.next_deadline(now, &self.settings))
                .min()
                .unwrap_or(now + MAX_TURN)
                .min(now + MAX_TURN);
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else {
                        return SessionEnd::Lost(Disconnected::WatchersStopped);
                    };
                    let mut dirty = BTreeSet::new();
                    let mut next = Some(event);
                    while let Some(event) = next {
                        match event {
                            BusEvent::UnitChanged(index) => {
                                dirty.insert(index);
                            }
                            BusEvent::JobRemoved { unit, result } => {
                                if let Some(index) = self.index_of(&unit) {
                                    debug!(%unit, %result, "job finished");
                                    self.units[index].healer.observe_job_finished();
                                    dirty.insert(index);
                                }
                            }
                            BusEvent::Lost(why) => {
                                return SessionEnd::Lost(Disconnected::StreamEnded(why))
                            }
                        }
                        next = events.try_recv().ok();
                    }
                    for index in dirty {
                        self.heartbeat.beat();
                        if let Err(why) = self.refresh(bus, index).await {
                            return SessionEnd::Lost(why);
                        }
                    }
                }
                Some(answer) = probes.recv() => self.observe_probe(answer),
                Ok(()) = desired.changed() => return SessionEnd::SetChanged,
                _ = probe_tick.tick() => self.spawn_probes(&probes_tx),
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    fn index_of(&self, unit_name: &str) -> Option<usize> {
        self.units
            .iter()
            .position(|unit| unit.config.name.as_str() == unit_name)
    }

    /// Reads unit `index`'s properties and hands them to the policy.
    async fn refresh(&mut self, bus: &Systemd, index: usize) -> Result<(), Disconnected> {
        let unit = &mut self.units[index];
        let Some(path) = &unit.path else {
            return Ok(());
        };
        let state = bus
            .read_state(path)
            .await
            .map_err(|source| Disconnected::ReadState {
                unit: unit.config.name.clone(),
                source,
            })?;
        let problem = heal::unmanageable(&state);
        if problem.is_some() && problem != unit.error {
            error!(
                unit = %unit.config.name,
                load_state = %state.load_state,
                "cannot manage {}: {}",
                unit.config.name,
                problem.as_deref().unwrap_or_default()
            );
        }
        unit.error = problem;
        unit.healer.observe_state(state);
        Ok(())
    }

    fn observe_probe(&mut self, answer: ProbeAnswer) {
        let unit = &mut self.units[answer.index];
        let current_pid = unit.healer.state.as_ref().map(|state| state.main_pid);
        if current_pid != Some(answer.main_pid) {
            return; // about a process that is gone
        }
        if let Err(reason) = &answer.result {
            if unit.healer.ready != Some(false) {
                warn!(unit = %unit.config.name, %reason, "{}: readiness probe failing: {reason}", unit.config.name);
            }
        } else if unit.healer.ready == Some(false) {
            info!(unit = %unit.config.name, "readiness probe passing again");
        }
        unit.healer
            .observe_probe(answer.sent_at, answer.result.is_ok());
        if answer.result.is_ok() && unit.healer.restart_takes_a_member() {
            if let Some(first_probed) = unit.healer.first_probed_at() {
                self.guard.back_up(first_probed);
            }
        }
    }

    /// Probes every active unit that has a readiness URL, concurrently.
    fn spawn_probes(&self, answers: &mpsc::UnboundedSender<ProbeAnswer>) {
        let timeout = PROBE_TIMEOUT.min(self.settings.probe_interval);
        for (index, unit) in self.units.iter().enumerate() {
            let (Some(url), Some(state)) = (&unit.config.ready_url, &unit.healer.state) else {
                continue;
            };
            if state.active_state != "active" {
                continue;
            }
            let url = url.clone();
            let main_pid = state.main_pid;
            let answers = answers.clone();
            tokio::spawn(async move {
                let sent_at = Instant::now();
                let result = probe::is_ready(&url, timeout).await;
                let _ = answers.send(ProbeAnswer {
                    index,
                    main_pid,
                    sent_at,
                    result,
                });
            });
        }
    }

    /// Asks the policy about every unit and carries out what it decides.
    async fn heal_all(&mut self, bus: &Systemd) -> Result<(), Disconnected> {
        let now = Instant::now();
        let disruptive = self
            .units
            .iter()
            .any(|unit| unit.healer.wants_disruption(now, &self.settings));
        // Asked afresh: a view even seconds old may predate the failure being healed.
        let hold = if disruptive {
            self.heartbeat.beat();
            let hold = self.guard.hold().await;
            self.heartbeat.beat();
            hold
        } else {
            None
        };
        let mut taken_down = false;
        let mut result = Ok(());
        for index in 0..self.units.len() {
            self.heartbeat.beat();
            let now = Instant::now();
            let healer = &mut self.units[index].healer;
            let Some(decision) = healer.decide_held(now, &self.settings, random(), hold.as_deref())
            else {
                continue;
            };
            let disrupts = decision.action == Action::Reboot
                || (decision.action == Action::Restart && healer.restart_takes_a_member());
            match self.act(bus, index, decision).await {
                Ok(refused) => taken_down |= disrupts && !refused,
                Err(disconnected) => {
                    // Whether the job was queued is unknown: the lease stays until the
                    // keeper sees a new K3s ready, or expires.
                    taken_down |= disrupts;
                    result = Err(disconnected);
                    break;
                }
            }
        }
        if disruptive && hold.is_none() && !taken_down {
            self.guard.not_taken_down();
        }
        result
    }

    /// Carries out `decision` for the unit at `index`: `Ok(true)` when systemd refused
    /// the job (nothing was queued).
    async fn act(
        &mut self,
        bus: &Systemd,
        index: usize,
        decision: Decision,
    ) -> Result<bool, Disconnected> {
        let unit = &mut self.units[index];
        let name = unit.config.name.as_str();
        info!(
            unit = %name,
            action = decision.action.name(),
            reason = %decision.reason,
            attempt = unit.healer.attempts,
            escalation = ?unit.healer.escalation,
            "healing {name}: {} ({})",
            decision.action.name(),
            decision.reason
        );
        // Why a unit failed (or hangs) is in what it logged last: read at each heal of a
        // unit that failed or is restarted (a first start of a unit that never ran has
        // nothing to say), at most once per backoff.
        let failed = unit.healer.state.as_ref().is_some_and(|state| {
            state.active_state == "failed"
                || state.n_restarts > 0
                || !matches!(state.result.as_str(), "" | "success")
        });
        if failed || decision.action == Action::Restart {
            self.heartbeat.beat();
            let lines = journal::last_lines(name).await;
            self.heartbeat.beat();
            let unit = &mut self.units[index];
            unit.last_log = lines;
        }
        let unit = &mut self.units[index];
        let name = unit.config.name.as_str();
        let manager = bus.manager();
        let outcome: zbus::Result<()> = match &decision.action {
            Action::Start { reset_failed } => {
                let reset = if *reset_failed {
                    manager.reset_failed_unit(name).await
                } else {
                    Ok(())
                };
                match reset {
                    Ok(()) => manager.start_unit(name, "replace").await.map(drop),
                    Err(err) => Err(err),
                }
            }
            Action::Restart => manager.restart_unit(name, "replace").await.map(drop),
            Action::RestartDependencies(dependencies) => {
                let mut outcome = Ok(());
                for dependency in dependencies {
                    info!(unit = %name, %dependency, "restarting a dependency");
                    if let Err(err) = manager.restart_unit(dependency.as_str(), "replace").await {
                        outcome = Err(err);
                    }
                }
                // No job of this unit to wait for.
                unit.healer.observe_job_finished();
                outcome
            }
            Action::Reboot => {
                error!(unit = %name, reason = %decision.reason, "rebooting the node");
                manager
                    .start_unit("reboot.target", "replace-irreversibly")
                    .await
                    .map(drop)
            }
        };
        let refused = outcome.as_ref().is_err_and(systemd::refused);
        let outcome = match outcome {
            Ok(()) => "ok".to_owned(),
            Err(err) => {
                warn!(
                    unit = %name,
                    action = decision.action.name(),
                    %err,
                    "systemd refused to {} {name}: {err}",
                    decision.action.name()
                );
                unit.healer.observe_job_finished();
                if is_connection_error(&err) {
                    return Err(Disconnected::Call(err));
                }
                format!("error: {err}")
            }
        };
        *unit
            .action_counts
            .entry(decision.action.name())
            .or_default() += 1;
        unit.last_action = Some(ActionReport {
            action: decision.action.name(),
            reason: decision.reason,
            at_ms: unix_millis(),
            outcome,
        });
        Ok(refused)
    }

    fn set_bus(&self, connected: bool, error: Option<String>) {
        let connections = self.connections;
        self.status.update(|status| {
            status.dbus.connected = connected;
            status.dbus.connections = connections;
            if error.is_some() {
                status.dbus.last_error = error;
            }
        });
        self.publish();
    }

    /// Copies every unit's state into the node status.
    fn publish(&self) {
        let reports: Vec<UnitReport> = self.units.iter().map(Managed::report).collect();
        let unit_errors: Vec<String> = self
            .units
            .iter()
            .filter_map(|unit| {
                let error = unit.error.as_ref()?;
                Some(format!("unit {}: {error}", unit.config.name))
            })
            .collect();
        self.status.update(|status| {
            status.units = reports;
            status
                .config_errors
                .retain(|error| !error.starts_with("unit "));
            status.config_errors.extend(unit_errors);
        });
    }
}

impl Managed {
    fn new(config: ManagedUnit) -> Managed {
        Managed {
            healer: UnitHealer::new(&config),
            config,
            path: None,
            last_action: None,
            action_counts: BTreeMap::new(),
            error: None,
            last_log: Vec::new(),
        }
    }

    fn report(&self) -> UnitReport {
        let state = self.healer.state.as_ref();
        UnitReport {
            name: self.config.name.to_string(),
            desired_state: "running",
            load_state: state.map(|s| s.load_state.clone()),
            active_state: state.map(|s| s.active_state.clone()),
            sub_state: state.map(|s| s.sub_state.clone()),
            result: state.map(|s| s.result.clone()),
            main_pid: state.map(|s| s.main_pid),
            systemd_restarts: state.map(|s| s.n_restarts),
            ready: self.healer.ready,
            restarts_by_pimesh: self.healer.restarts_by_pimesh,
            heal_attempts: self.healer.attempts,
            escalation: self.healer.escalation.name(),
            held_back: self.healer.held_back.clone(),
            last_action: self.last_action.clone(),
            action_counts: self.action_counts.clone(),
            error: self.error.clone(),
            last_log: self.last_log.clone(),
        }
    }
}

/// Whether `err` means the connection itself is unusable (rather than systemd refusing).
fn is_connection_error(err: &zbus::Error) -> bool {
    matches!(err, zbus::Error::InputOutput(_) | zbus::Error::InvalidReply)
}

/// A different `u64` on every call, for backoff jitter (std's hasher keys are random).
fn random() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
