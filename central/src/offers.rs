//! Which revision each node of a site is offered: the newest revision whose rollout
//! offers to that node ([`Rollout::offers_to`]), with the rollouts kept up to date as
//! reports arrive, time passes and the operator pauses, resumes or aborts them.
//!
//! Invariants: every change to a rollout's state, waves or failures is written to storage
//! as it is made (a failed write is logged and made again with the rollout's next such
//! change; an operator's command is refused unless stored) — its progress (`applied`,
//! `offline`, `reason`) is recomputed from the reports at every step, so it is stored
//! only along with those; the newest
//! stored revision always has a rollout here (one is started from its own `[rollout]`
//! plan when the server finds none, e.g. after a power cut between storing the revision
//! and its rollout); `live` holds every rollout whose revision may still be offered to a
//! node: the newest that offers to every node and the ones above it; long-polls are woken
//! (`changes`) after every change of a live rollout's state or waves (nothing else
//! changes an offer); the fleet's [`Releases`] are told of every live rollout after each
//! change, and of every stored one at load.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use pimesh_revision::rollout::Command;
use pimesh_revision::{Plan, RecordedReport, Rollout, RolloutState, SignedRevision, Wave};
use pimesh_schema::cluster::{ClusterConfig, RolloutSettings};
use pimesh_schema::DnsLabel;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::release::{FleetGate, Releases};
use crate::rollout::{self, Observed};
use crate::storage::Storage;

pub struct Offers {
    state: Mutex<State>,
    /// Bumped after every change of a live rollout's state or waves.
    changes: watch::Sender<u64>,
}

struct State {
    site: DnsLabel,
    live: BTreeMap<u64, Live>,
    reports: BTreeMap<DnsLabel, RecordedReport>,
    /// When each node was last heard from (a report, or the end of a long-poll).
    heard: BTreeMap<DnsLabel, u64>,
    /// When other replicas last heard from each node, as storage said at the last tick
    /// (a node parked in a long-poll there counts as heard for the longest poll).
    heard_elsewhere: BTreeMap<DnsLabel, u64>,
    /// Long-polls parked now, per node.
    parked: BTreeMap<DnsLabel, usize>,
    /// The server's start: no node counts as offline before it.
    heard_floor: u64,
    /// Every site's rollouts of each release, which hold back or halt this site's.
    releases: Arc<Releases>,
}

struct Live {
    rollout: Rollout,
    revision: Arc<Latest>,
}

/// Why an operator's command was refused.
#[derive(Debug)]
pub enum CommandError {
    /// The site has no rollout of that revision.
    NotFound(u64),
    /// The rollout's state does not allow the command.
    Conflict(String),
    /// The command is not newer than one already accepted (a replay, or a clock set back).
    Replayed {
        at_ms: u64,
        last_ms: u64,
    },
    Storage(io::Error),
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::NotFound(revision) => {
                write!(f, "no rollout of revision {revision} on this site")
            }
            CommandError::Conflict(why) => f.write_str(why),
            CommandError::Replayed { at_ms, last_ms } => write!(
                f,
                "the command was signed at {at_ms} ms, not after the last accepted one \
                 ({last_ms} ms): a replay, or this machine's clock went back"
            ),
            CommandError::Storage(err) => write!(f, "cannot store the rollout: {err}"),
        }
    }
}

impl std::error::Error for CommandError {}

/// The newest revision of a site, serialised once for every node that fetches it.
#[derive(Debug)]
pub struct Latest {
    pub revision: u64,
    pub json: Vec<u8>,
}

impl Latest {
    /// `revision`, serialised for the nodes.
    pub fn of(revision: &SignedRevision) -> Arc<Latest> {
        Arc::new(Latest {
            revision: revision.revision,
            json: revision.to_json(),
        })
    }
}

/// How many revision numbers below the newest [`Offers::load`] looks through at most for
/// the revisions that may still be offered.
const MAX_REVISION_SCAN: u64 = 10_000;

/// Seconds since the Unix epoch (0 before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A rollout's plan as its revision's configuration says (every node at once when the
/// configuration does not parse, which a stored revision's always does).
pub fn plan_of(revision: &SignedRevision) -> Plan {
    let source = format!("cluster.toml (revision {})", revision.revision);
    ClusterConfig::parse(Path::new(&source), &revision.config)
        .map(|config| Plan::from(&config.rollout))
        .unwrap_or_else(|_| Plan::from(&RolloutSettings::default()))
}

impl Offers {
    /// The site's offers as storage holds them, `latest` being its newest revision; its
    /// stored rollouts are noted in `releases`.
    pub fn load(
        site: &DnsLabel,
        latest: Option<&SignedRevision>,
        storage: &dyn Storage,
        releases: Arc<Releases>,
        now: u64,
    ) -> io::Result<Offers> {
        let mut stored = storage.rollouts(site)?;
        for rollout in stored.values() {
            releases.note(rollout);
        }
        let reports = storage.reports(site)?;
        let mut live = BTreeMap::new();
        if let Some(latest) = latest {
            let rollout = stored.remove(&latest.revision).unwrap_or_else(|| {
                info!(%site, revision = latest.revision, "no rollout stored for the newest revision; starting its plan");
                rollout::new(site.clone(), latest.revision, plan_of(latest), now)
            });
            let mut covers_all = offers_to_all(&rollout);
            live.insert(
                latest.revision,
                Live {
                    rollout,
                    revision: Latest::of(latest),
                },
            );
            // Down to the newest revision that went to every node; numbers are usually
            // consecutive, the scan is bounded for those that are not.
            let mut below = latest.revision;
            let floor = latest.revision.saturating_sub(MAX_REVISION_SCAN).max(1);
            while !covers_all && below > floor {
                below -= 1;
                let Some(revision) = storage.revision(site, below)? else {
                    continue;
                };
                // A revision stored before rollouts existed went to every node at once.
                let rollout = stored
                    .remove(&below)
                    .unwrap_or_else(|| everyone(site, below));
                covers_all = offers_to_all(&rollout);
                live.insert(
                    below,
                    Live {
                        rollout,
                        revision: Latest::of(&revision),
                    },
                );
            }
            if !covers_all && floor > 1 {
                warn!(%site, scanned = MAX_REVISION_SCAN, "no revision below the newest that went to every node was found; nodes outside the newest one's waves are offered nothing until it reaches them");
            }
        }
        let (changes, _) = watch::channel(0);
        let state = State {
            site: site.clone(),
            live,
            reports,
            heard: BTreeMap::new(),
            heard_elsewhere: BTreeMap::new(),
            parked: BTreeMap::new(),
            heard_floor: now,
            releases,
        };
        state.note_live();
        Ok(Offers {
            state: Mutex::new(state),
            changes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Woken after every change that may change an offer.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn wake(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The revision to offer `node`, when newer than `after`.
    pub fn offer(&self, node: &DnsLabel, after: u64) -> Option<Arc<Latest>> {
        let state = self.lock();
        state
            .live
            .values()
            .rev()
            .find(|live| live.rollout.offers_to(node))
            .filter(|live| live.rollout.revision > after)
            .map(|live| Arc::clone(&live.revision))
    }

    /// The state of `revision`'s rollout when it is halted or aborted (its nodes on trial
    /// go back), as far as the live rollouts tell.
    pub fn stopped(&self, revision: u64) -> Option<RolloutState> {
        self.lock()
            .live
            .get(&revision)
            .map(|live| live.rollout.state)
            .filter(|state| state.is_stopped())
    }

    /// Counts `node` as heard from while the returned guard lives (a parked long-poll),
    /// and tells the other replicas through `storage`.
    pub fn park(&self, node: &DnsLabel, storage: &dyn Storage, now: u64) -> Parked<'_> {
        let site = self.lock().site.clone();
        if let Err(err) = storage.record_heard(&site, node, now) {
            debug!(%site, %node, %err, "cannot note the long-poll for the other replicas");
        }
        let mut state = self.lock();
        *state.parked.entry(node.clone()).or_default() += 1;
        state.heard.insert(node.clone(), now);
        Parked {
            offers: self,
            node: node.clone(),
        }
    }

    /// A newly stored revision (stored here or by another replica): its rollout starts
    /// (or, when another replica started it, is taken as stored), rollouts still running
    /// below it are superseded. A revision already live here is left as it is.
    pub fn published(
        &self,
        revision: &SignedRevision,
        plan: Plan,
        storage: &dyn Storage,
        now: u64,
    ) {
        let mut state = self.lock();
        let site = state.site.clone();
        let number = revision.revision;
        if state.live.contains_key(&number) {
            return;
        }
        let mut fresh = rollout::new(site.clone(), number, plan, now);
        match state.live.keys().next_back() {
            Some(newer) if *newer > number => {
                fresh.state = RolloutState::Superseded;
                fresh.reason = Some(format!("revision {newer} published"));
            }
            _ => {
                state.advance(&mut fresh, now);
            }
        }
        let rollout = change(
            storage,
            &fresh,
            |_| {},
            |stored| stored.is_none().then(|| fresh.clone()),
        );
        let below: Vec<u64> = state.live.range(..number).map(|(n, _)| *n).collect();
        for older in below {
            let Some(current) = state.live.get(&older).map(|live| live.rollout.clone()) else {
                continue;
            };
            let superseded = change(
                storage,
                &current,
                |rollout| {
                    supersede(rollout, number, now);
                },
                |stored| {
                    let mut rollout = stored.cloned().unwrap_or_else(|| current.clone());
                    supersede(&mut rollout, number, now).then_some(rollout)
                },
            );
            if let Some(live) = state.live.get_mut(&older) {
                live.rollout = superseded;
            }
        }
        info!(%site, revision = number, waves = ?rollout.plan.stages(), state = %rollout.state, "rollout started");
        state.live.insert(
            number,
            Live {
                rollout,
                revision: Latest::of(revision),
            },
        );
        state.prune();
        drop(state);
        self.wake();
    }

    /// Another replica changed the stored rollout of `revision`: the live one follows.
    pub fn refresh(&self, revision: u64, storage: &dyn Storage, now: u64) {
        let site = self.lock().site.clone();
        let stored = match storage.rollout(&site, revision) {
            Ok(Some(stored)) => stored,
            Ok(None) => return,
            Err(err) => {
                warn!(%site, revision, %err, "cannot read the rollout another replica changed");
                return;
            }
        };
        let mut state = self.lock();
        let Some(live) = state.live.get_mut(&revision) else {
            return;
        };
        live.rollout = stored;
        state.advance_all(storage, now);
        state.prune();
        drop(state);
        self.wake();
    }

    /// Everything as storage holds it now (after this replica lost touch with the
    /// others): every node's report and every live rollout.
    pub fn resync(&self, storage: &dyn Storage, now: u64) {
        let site = self.lock().site.clone();
        let reports = match storage.reports(&site) {
            Ok(reports) => reports,
            Err(err) => {
                warn!(%site, %err, "cannot read the reports to catch up with the other replicas");
                return;
            }
        };
        let mut state = self.lock();
        state.reports.extend(reports);
        let revisions: Vec<u64> = state.live.keys().copied().collect();
        for revision in revisions {
            match storage.rollout(&site, revision) {
                Ok(Some(stored)) => {
                    if let Some(live) = state.live.get_mut(&revision) {
                        live.rollout = stored;
                    }
                }
                Ok(None) => {}
                Err(err) => warn!(%site, revision, %err, "cannot read a rollout to catch up"),
            }
        }
        state.advance_all(storage, now);
        state.prune();
        drop(state);
        self.wake();
    }

    /// A node's report, recorded.
    pub fn reported(
        &self,
        node: &DnsLabel,
        recorded: &RecordedReport,
        storage: &dyn Storage,
        now: u64,
    ) {
        let mut state = self.lock();
        state.reports.insert(node.clone(), recorded.clone());
        state.heard.insert(node.clone(), now);
        let changed = state.advance_all(storage, now);
        drop(state);
        if changed {
            self.wake();
        }
    }

    /// Time passed: nodes may have gone offline. `longest_poll` is how long a node's
    /// long-poll may be parked on another replica, heard from all the while.
    pub fn tick(&self, storage: &dyn Storage, now: u64, longest_poll: u64) {
        let site = self.lock().site.clone();
        let elsewhere = match storage.heard(&site) {
            Ok(heard) => Some(heard),
            Err(err) => {
                warn!(%site, %err, "cannot read when the other replicas heard from the nodes");
                None
            }
        };
        let mut state = self.lock();
        if let Some(heard) = elsewhere {
            state.heard_elsewhere = heard
                .into_iter()
                .map(|(node, at)| (node, at.saturating_add(longest_poll).min(now)))
                .collect();
        }
        let changed = state.advance_all(storage, now);
        drop(state);
        if changed {
            self.wake();
        }
    }

    /// The operator's `command` on the rollout of `revision`, signed at `at_ms`.
    pub fn command(
        &self,
        revision: u64,
        command: Command,
        at_ms: u64,
        storage: &dyn Storage,
        now: u64,
    ) -> Result<Rollout, CommandError> {
        let state = self.lock();
        let site = state.site.clone();
        let fallback = state.live.get(&revision).map(|live| live.rollout.clone());
        let mut outcome = Err(CommandError::NotFound(revision));
        storage
            .update_rollout(&site, revision, &mut |stored| {
                let Some(mut rollout) = stored.cloned().or_else(|| fallback.clone()) else {
                    outcome = Err(CommandError::NotFound(revision));
                    return None;
                };
                if let Err(err) = steer(&mut rollout, command, at_ms, now) {
                    outcome = Err(err);
                    return None;
                }
                if rollout.state == RolloutState::Running {
                    state.advance(&mut rollout, now);
                }
                outcome = Ok(rollout.clone());
                Some(rollout)
            })
            .map_err(CommandError::Storage)?;
        let rollout = outcome?;
        let mut state = state;
        info!(site = %rollout.site, revision, command = command.as_str(), state = %rollout.state, "rollout command");
        if let Some(live) = state.live.get_mut(&revision) {
            live.rollout = rollout.clone();
        }
        state.prune();
        drop(state);
        self.wake();
        Ok(rollout)
    }

    /// The states of the live rollouts, oldest first.
    pub fn live_states(&self) -> Vec<RolloutState> {
        self.lock()
            .live
            .values()
            .map(|live| live.rollout.state)
            .collect()
    }

    /// Each node's latest report, by node name, as the fleet view and the overview show it.
    pub fn node_views(&self) -> Vec<pimesh_revision::NodeView> {
        self.lock()
            .reports
            .iter()
            .map(|(node, recorded)| pimesh_revision::NodeView {
                node: node.clone(),
                recorded: recorded.clone(),
            })
            .collect()
    }

    /// The site's rollouts, newest first, at most `limit`: the live ones as they are now,
    /// the others as stored.
    pub fn rollouts(&self, storage: &dyn Storage, limit: usize) -> io::Result<Vec<Rollout>> {
        let state = self.lock();
        let mut all = storage.rollouts(&state.site)?;
        for (revision, live) in &state.live {
            all.insert(*revision, live.rollout.clone());
        }
        Ok(all.into_values().rev().take(limit).collect())
    }
}

/// A long-poll of `node`, counted as hearing from it until dropped.
pub struct Parked<'a> {
    offers: &'a Offers,
    node: DnsLabel,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        let mut state = self.offers.lock();
        let now = unix_now();
        state.heard.insert(self.node.clone(), now);
        if let Some(count) = state.parked.get_mut(&self.node) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.parked.remove(&self.node);
            }
        }
    }
}

impl State {
    /// Advances `rollout` by what is known now; whether it changed.
    fn advance(&self, rollout: &mut Rollout, now: u64) -> bool {
        let mut heard = self.heard_elsewhere.clone();
        for (node, at) in &self.heard {
            let entry = heard.entry(node.clone()).or_default();
            *entry = (*entry).max(*at);
        }
        for node in self.parked.keys() {
            heard.insert(node.clone(), now);
        }
        // Only a rollout that has not started is held by the fleet.
        let fleet = if rollout.waves.is_empty() {
            self.releases
                .gate(&self.site, &rollout.plan, rollout.created_at)
        } else {
            FleetGate::Open
        };
        rollout::advance(
            rollout,
            &Observed {
                reports: &self.reports,
                heard: &heard,
                heard_floor: self.heard_floor,
                now,
                fleet,
            },
        )
    }

    /// Tells the fleet's releases of every live rollout.
    fn note_live(&self) {
        for live in self.live.values() {
            self.releases.note(&live.rollout);
        }
    }

    /// Advances every live rollout that can still change; stores those whose durable part
    /// changed (state, waves, failures: what the progress fields are recomputed from
    /// reports for at every step, so a restart loses none of it) and says whether any did
    /// (only those changes can change an offer).
    fn advance_all(&mut self, storage: &dyn Storage, now: u64) -> bool {
        let mut changed = false;
        let revisions: Vec<u64> = self.live.keys().copied().collect();
        for revision in revisions {
            let Some(current) = self.live.get(&revision).map(|live| live.rollout.clone()) else {
                continue;
            };
            // A complete rollout still counts the nodes that take it (those that appear
            // after it completed); a stopped one is over.
            if current.state.is_stopped() {
                continue;
            }
            let mut next = current.clone();
            if !self.advance(&mut next, now) {
                continue;
            }
            if durable(&next) != durable(&current) {
                // Made again on the stored version: another replica may have moved it.
                next = change(
                    storage,
                    &current,
                    |rollout| {
                        self.advance(rollout, now);
                    },
                    |stored| {
                        let mut rollout = stored.cloned().unwrap_or_else(|| current.clone());
                        if rollout.state.is_stopped() {
                            return None;
                        }
                        let before = durable(&rollout);
                        self.advance(&mut rollout, now);
                        (durable(&rollout) != before).then_some(rollout)
                    },
                );
                if next.state != current.state {
                    info!(site = %next.site, revision, state = %next.state, reason = ?next.reason, "rollout state");
                }
                changed = true;
            }
            if let Some(live) = self.live.get_mut(&revision) {
                live.rollout = next;
            }
        }
        if changed {
            self.prune();
        }
        changed
    }

    /// Tells the fleet's releases of every live rollout, then drops the live rollouts
    /// below the newest one that offers to every node.
    fn prune(&mut self) {
        self.note_live();
        let floor = self
            .live
            .iter()
            .rev()
            .find(|(_, live)| offers_to_all(&live.rollout))
            .map(|(revision, _)| *revision);
        if let Some(floor) = floor {
            self.live.retain(|revision, _| *revision >= floor);
        }
    }
}

/// What of a rollout is stored: what cannot be recomputed from the nodes' reports.
fn durable(rollout: &Rollout) -> (RolloutState, Vec<Wave>, BTreeMap<DnsLabel, String>) {
    (rollout.state, rollout.waves.clone(), rollout.failed.clone())
}

fn offers_to_all(rollout: &Rollout) -> bool {
    rollout.last_wave_started() && !rollout.state.is_stopped()
}

/// The rollout of a revision stored before rollouts existed: every node at once, done.
fn everyone(site: &DnsLabel, revision: u64) -> Rollout {
    let mut rollout = rollout::new(
        site.clone(),
        revision,
        Plan::from(&RolloutSettings::default()),
        0,
    );
    rollout.state = RolloutState::Complete;
    rollout.waves.push(Wave {
        percent: Some(100),
        nodes: Default::default(),
        started_at: 0,
    });
    rollout
}

/// Makes `changed` on the stored version of `current`'s rollout and returns the rollout
/// as stored afterwards. When storage fails, the failure is logged and `in_memory` is
/// made on `current` instead (kept in memory; the next change stores it again).
fn change(
    storage: &dyn Storage,
    current: &Rollout,
    in_memory: impl FnOnce(&mut Rollout),
    mut changed: impl FnMut(Option<&Rollout>) -> Option<Rollout> + Send,
) -> Rollout {
    match storage.update_rollout(&current.site, current.revision, &mut changed) {
        Ok(Some(stored)) => stored,
        Ok(None) => current.clone(),
        Err(err) => {
            warn!(site = %current.site, revision = current.revision, %err, "cannot store the rollout; kept in memory");
            let mut rollout = current.clone();
            in_memory(&mut rollout);
            rollout
        }
    }
}

/// Marks a running or paused `rollout` superseded by revision `by`; whether it was.
fn supersede(rollout: &mut Rollout, by: u64, now: u64) -> bool {
    if !matches!(rollout.state, RolloutState::Running | RolloutState::Paused) {
        return false;
    }
    rollout.state = RolloutState::Superseded;
    rollout.reason = Some(format!("revision {by} published"));
    rollout.updated_at = now;
    true
}

/// The operator's `command`, signed at `at_ms`, applied to `rollout` at `now`.
fn steer(
    rollout: &mut Rollout,
    command: Command,
    at_ms: u64,
    now: u64,
) -> Result<(), CommandError> {
    let revision = rollout.revision;
    if at_ms <= rollout.last_command_ms {
        return Err(CommandError::Replayed {
            at_ms,
            last_ms: rollout.last_command_ms,
        });
    }
    rollout.state = match (command, rollout.state) {
        (Command::Pause, RolloutState::Running) => RolloutState::Paused,
        (Command::Resume, RolloutState::Paused) => RolloutState::Running,
        (
            Command::Abort,
            RolloutState::Running
            | RolloutState::Paused
            | RolloutState::Halted
            | RolloutState::Superseded,
        ) => RolloutState::Aborted,
        (_, state) => {
            return Err(CommandError::Conflict(format!(
                "the rollout of revision {revision} is {state}: it cannot be {}",
                match command {
                    Command::Pause => "paused",
                    Command::Resume => "resumed",
                    Command::Abort => "aborted",
                }
            )))
        }
    };
    rollout.reason = Some(format!("{} by the operator", rollout.state));
    rollout.last_command_ms = at_ms;
    rollout.updated_at = now;
    Ok(())
}
