//! The rollout engine: when a rollout's next wave starts, which nodes failed it, when it
//! halts or completes. Pure: it reads what the nodes reported and when the server last
//! heard from each, and changes the [`Rollout`] it is given; storing it is the caller's.
//!
//! Rules (each a test below):
//! - a wave is done when each of its nodes holds the revision, failed it, or is offline,
//!   and at least one of them holds it (an empty wave is done at once): offline nodes do
//!   not hold a wave back, but a wave is never passed on no evidence at all;
//! - a node of a started wave fails it by reporting `rolled-back`, `reverted` or
//!   `rejected` about its revision (a node that does not say which revision its report is
//!   about: any such report received since its wave started); more failed nodes than the plan's `max_failed`
//!   halt the rollout, whatever its state but aborted or complete;
//! - a percentage wave takes the site's nodes not yet in a wave, in name order, until
//!   that share of the site's nodes (those the server heard from, and the canaries) is in
//!   a wave; the last (100 %) takes them all, and every node that appears later;
//! - a rollout completes when its last wave has started and every node of the site holds
//!   the revision, failed it or is offline;
//! - only a running rollout starts waves; a paused or superseded one still counts
//!   failures;
//! - a rollout whose release waits for earlier sites of the fleet starts no wave; one whose
//!   release halted at an earlier site halts (running or paused) before its first wave;
//!   once a wave started, the fleet no longer holds it (see [`crate::release`]).

use std::collections::{BTreeMap, BTreeSet};

use pimesh_revision::{Plan, RecordedReport, ReportState, Rollout, RolloutState, Wave};
use pimesh_schema::DnsLabel;

use crate::release::FleetGate;

/// What the server knows of a site's nodes at one instant.
pub struct Observed<'a> {
    /// Each node's latest report.
    pub reports: &'a BTreeMap<DnsLabel, RecordedReport>,
    /// When the server last heard from each node (a report, or a long-poll; a node parked
    /// in a long-poll now is heard `now`), in seconds since the epoch.
    pub heard: &'a BTreeMap<DnsLabel, u64>,
    /// No node counts as offline before this (the server's start: nodes come back to a
    /// restarted server within seconds, not before it starts).
    pub heard_floor: u64,
    pub now: u64,
    /// Whether the fleet lets the rollout start its first wave.
    pub fleet: FleetGate,
}

impl Observed<'_> {
    /// The site's nodes: every node that reported or polled.
    fn known(&self) -> BTreeSet<DnsLabel> {
        self.reports
            .keys()
            .chain(self.heard.keys())
            .cloned()
            .collect()
    }

    /// Whether the node runs `revision` or a newer one, as its latest report says (a
    /// report's `revision` is what the node runs after the event, whatever the event).
    fn holds(&self, node: &DnsLabel, revision: u64) -> bool {
        self.reports.get(node).is_some_and(|recorded| {
            recorded
                .report
                .revision
                .is_some_and(|held| held >= revision)
        })
    }

    /// The node's report of failing `revision`: one that names it (`about`), or, from a
    /// node that names none, one received since `since` (the second it was offered).
    fn failure_of(&self, node: &DnsLabel, revision: u64, since: u64) -> Option<String> {
        let recorded = self.reports.get(node)?;
        let failed = matches!(
            recorded.report.state,
            ReportState::RolledBack | ReportState::Reverted | ReportState::Rejected
        );
        let of_this = match recorded.report.about {
            Some(about) => about == revision,
            None => recorded.received_at >= since,
        };
        (failed && of_this).then(|| {
            let detail = recorded.report.detail.trim();
            if detail.is_empty() {
                recorded.report.state.to_string()
            } else {
                format!("{}: {detail}", recorded.report.state)
            }
        })
    }

    fn offline(&self, node: &DnsLabel, since: u64, plan: &Plan) -> bool {
        let last = [
            self.heard.get(node).copied(),
            self.reports.get(node).map(|recorded| recorded.received_at),
            Some(since),
            Some(self.heard_floor),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(since);
        self.now.saturating_sub(last) > plan.offline_after_secs
    }
}

/// A new rollout of `revision` by `plan`, no wave started yet (the first [`advance`]
/// starts it).
pub fn new(site: DnsLabel, revision: u64, plan: Plan, now: u64) -> Rollout {
    Rollout {
        site,
        revision,
        state: RolloutState::Running,
        reason: None,
        plan,
        waves: Vec::new(),
        applied: BTreeSet::new(),
        failed: BTreeMap::new(),
        offline: BTreeSet::new(),
        created_at: now,
        updated_at: now,
        last_command_ms: 0,
    }
}

/// Brings `rollout` up to what `observed` says: progress, failures, halting, new waves,
/// completion. Returns whether anything changed (then `updated_at` is `observed.now`).
pub fn advance(rollout: &mut Rollout, observed: &Observed<'_>) -> bool {
    let before = rollout.clone();
    let known = observed.known();
    record_progress(rollout, observed, &known);
    if matches!(
        rollout.state,
        RolloutState::Running | RolloutState::Paused | RolloutState::Superseded
    ) && rollout.failed.len() > rollout.plan.max_failed as usize
    {
        rollout.state = RolloutState::Halted;
        let failed: Vec<String> = rollout
            .failed
            .iter()
            .map(|(node, why)| format!("{node} ({why})"))
            .collect();
        rollout.reason = Some(format!(
            "{} node(s) failed, more than max_failed = {}: {}",
            rollout.failed.len(),
            rollout.plan.max_failed,
            failed.join(", ")
        ));
    }
    let held_by_fleet = rollout.waves.is_empty()
        && match &observed.fleet {
            FleetGate::Open => false,
            FleetGate::Waiting(why) => {
                if rollout.state == RolloutState::Running {
                    rollout.reason = Some(why.clone());
                }
                true
            }
            FleetGate::Halted(why) => {
                if matches!(rollout.state, RolloutState::Running | RolloutState::Paused) {
                    rollout.state = RolloutState::Halted;
                    rollout.reason = Some(why.clone());
                }
                true
            }
        };
    if rollout.state == RolloutState::Running && !held_by_fleet {
        start_waves(rollout, observed, &known);
    }
    let changed = *rollout != before;
    if changed {
        rollout.updated_at = observed.now;
    }
    changed
}

/// The nodes the rollout answers for: its waves' nodes, and once its last wave started
/// every node of the site.
fn scope(rollout: &Rollout, known: &BTreeSet<DnsLabel>) -> BTreeSet<DnsLabel> {
    let mut scope: BTreeSet<DnsLabel> = rollout.members().cloned().collect();
    if rollout.last_wave_started() {
        scope.extend(known.iter().cloned());
    }
    scope
}

/// When `node` was offered the revision: its wave's start, else the last wave's.
fn offered_at(rollout: &Rollout, node: &DnsLabel) -> u64 {
    rollout
        .waves
        .iter()
        .find(|wave| wave.nodes.contains(node))
        .or(rollout.waves.last())
        .map_or(rollout.created_at, |wave| wave.started_at)
}

fn record_progress(rollout: &mut Rollout, observed: &Observed<'_>, known: &BTreeSet<DnsLabel>) {
    let revision = rollout.revision;
    rollout.applied = known
        .iter()
        .filter(|node| observed.holds(node, revision))
        .cloned()
        .collect();
    let scope = scope(rollout, known);
    for node in &scope {
        if rollout.applied.contains(node) || rollout.failed.contains_key(node) {
            continue;
        }
        if let Some(why) = observed.failure_of(node, revision, offered_at(rollout, node)) {
            rollout.failed.insert(node.clone(), why);
        }
    }
    rollout.offline = scope
        .iter()
        .filter(|node| !rollout.applied.contains(*node) && !rollout.failed.contains_key(*node))
        .filter(|node| observed.offline(node, offered_at(rollout, node), &rollout.plan))
        .cloned()
        .collect();
}

/// Starts waves while the current one is done; completes the rollout after the last.
fn start_waves(rollout: &mut Rollout, observed: &Observed<'_>, known: &BTreeSet<DnsLabel>) {
    let stages = rollout.plan.stages();
    loop {
        if let Some(current) = rollout.waves.last() {
            let waiting: Vec<&DnsLabel> = current
                .nodes
                .iter()
                .filter(|node| settled(rollout, node).is_none())
                .collect();
            if !waiting.is_empty() {
                rollout.reason = Some(format!(
                    "wave {} waits for {}",
                    current.name(),
                    names(waiting)
                ));
                return;
            }
            if !current.nodes.is_empty() && current.nodes.is_disjoint(&rollout.applied) {
                rollout.reason = Some(format!(
                    "wave {} waits for one of its nodes to apply the revision (the others \
                     failed or are offline)",
                    current.name()
                ));
                return;
            }
        }
        let Some(&stage) = stages.get(rollout.waves.len()) else {
            let waiting: Vec<&DnsLabel> = known
                .iter()
                .filter(|node| settled(rollout, node).is_none())
                .collect();
            if waiting.is_empty() {
                rollout.state = RolloutState::Complete;
                rollout.reason = None;
            } else {
                rollout.reason = Some(format!("waits for {}", names(waiting)));
            }
            return;
        };
        let nodes = wave_nodes(rollout, stage, known);
        rollout.waves.push(Wave {
            percent: stage,
            nodes,
            started_at: observed.now,
        });
        // The new wave's nodes are settled by nothing yet, but a node that already holds
        // the revision (it took a newer one) is.
        record_progress(rollout, observed, known);
    }
}

/// Whether `node` holds the revision, failed it or is offline (`Some`), or is still
/// expected to apply it (`None`).
fn settled<'r>(rollout: &'r Rollout, node: &DnsLabel) -> Option<&'r str> {
    if rollout.applied.contains(node) {
        Some("applied")
    } else if rollout.failed.contains_key(node) {
        Some("failed")
    } else if rollout.offline.contains(node) {
        Some("offline")
    } else {
        None
    }
}

/// The nodes the wave of `stage` brings the revision to.
fn wave_nodes(
    rollout: &Rollout,
    stage: Option<u8>,
    known: &BTreeSet<DnsLabel>,
) -> BTreeSet<DnsLabel> {
    let members: BTreeSet<&DnsLabel> = rollout.members().collect();
    let Some(percent) = stage else {
        return rollout
            .plan
            .canary
            .iter()
            .filter(|node| !members.contains(node))
            .cloned()
            .collect();
    };
    let population: BTreeSet<&DnsLabel> = known
        .iter()
        .chain(rollout.plan.canary.iter())
        .chain(members.iter().copied())
        .collect();
    let target = (population.len() * usize::from(percent)).div_ceil(100);
    let wanted = target.saturating_sub(members.len());
    population
        .into_iter()
        .filter(|node| !members.contains(node))
        .take(if percent >= 100 { usize::MAX } else { wanted })
        .cloned()
        .collect()
}

/// `pi-a, pi-b and 3 more`.
fn names(nodes: Vec<&DnsLabel>) -> String {
    const SHOWN: usize = 5;
    let mut text: Vec<String> = nodes.iter().take(SHOWN).map(ToString::to_string).collect();
    if nodes.len() > SHOWN {
        text.push(format!("{} more", nodes.len() - SHOWN));
    }
    text.join(", ")
}

#[cfg(test)]
mod tests {
    use pimesh_revision::NodeReport;

    use super::*;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    fn plan(canary: &[&str], waves: &[u8], max_failed: u32) -> Plan {
        Plan {
            canary: canary.iter().map(|n| label(n)).collect(),
            waves: waves.to_vec(),
            max_failed,
            offline_after_secs: 60,
            fleet: None,
        }
    }

    /// A site of `n` nodes (`pi-00`..), all heard at `now`, holding revision 1.
    struct Site {
        reports: BTreeMap<DnsLabel, RecordedReport>,
        heard: BTreeMap<DnsLabel, u64>,
        now: u64,
        fleet: FleetGate,
    }

    impl Site {
        fn new(n: usize) -> Site {
            let mut site = Site {
                reports: BTreeMap::new(),
                heard: BTreeMap::new(),
                now: 1_000,
                fleet: FleetGate::Open,
            };
            for i in 0..n {
                site.report(&format!("pi-{i:02}"), 1, ReportState::Applied);
            }
            site
        }

        fn report(&mut self, node: &str, revision: u64, state: ReportState) {
            let about = match state {
                ReportState::Applied | ReportState::Trying => revision,
                _ => revision + 1,
            };
            self.reports.insert(
                label(node),
                RecordedReport {
                    report: NodeReport {
                        revision: Some(revision),
                        state,
                        detail: "revision 2: unhealthy".to_owned(),
                        about: Some(about),
                        k3s: None,
                        certificates: None,
                        traffic: None,
                    },
                    received_at: self.now,
                },
            );
            self.heard.insert(label(node), self.now);
        }

        fn advance(&mut self, rollout: &mut Rollout) -> bool {
            self.now += 1;
            for heard in self.heard.values_mut() {
                *heard = (*heard).max(self.now - 1);
            }
            advance(
                rollout,
                &Observed {
                    reports: &self.reports,
                    heard: &self.heard,
                    heard_floor: 0,
                    now: self.now,
                    fleet: self.fleet.clone(),
                },
            )
        }
    }

    fn wave_names(rollout: &Rollout) -> Vec<Vec<String>> {
        rollout
            .waves
            .iter()
            .map(|wave| wave.nodes.iter().map(ToString::to_string).collect())
            .collect()
    }

    #[test]
    fn waves_start_in_order_each_when_the_one_before_applied() {
        let mut site = Site::new(10);
        let mut rollout = new(label("s"), 2, plan(&["pi-07"], &[30, 100], 0), site.now);
        assert!(site.advance(&mut rollout));
        assert_eq!(wave_names(&rollout), vec![vec!["pi-07"]]);
        assert!(!rollout.offers_to(&label("pi-00")));
        assert!(!site.advance(&mut rollout), "nothing new: nothing changes");

        site.report("pi-07", 2, ReportState::Applied);
        site.advance(&mut rollout);
        // 30 % of 10 is 3 nodes: the canary and the first two by name.
        assert_eq!(wave_names(&rollout)[1], vec!["pi-00", "pi-01"]);
        assert_eq!(rollout.state, RolloutState::Running);
        assert!(rollout
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("pi-00, pi-01")));

        site.report("pi-00", 2, ReportState::Applied);
        site.advance(&mut rollout);
        assert_eq!(rollout.waves.len(), 2, "pi-01 still applying");
        site.report("pi-01", 2, ReportState::Trying);
        site.advance(&mut rollout);
        assert_eq!(rollout.waves.len(), 3);
        assert!(rollout.last_wave_started());
        assert!(rollout.offers_to(&label("pi-new")));
        for i in 2..10 {
            if i != 7 {
                site.report(&format!("pi-{i:02}"), 2, ReportState::Applied);
            }
        }
        site.advance(&mut rollout);
        assert_eq!(rollout.state, RolloutState::Complete);
        assert_eq!(rollout.applied.len(), 10);
    }

    #[test]
    fn a_failure_past_the_threshold_halts_and_no_further_wave_starts() {
        let mut site = Site::new(10);
        let mut rollout = new(label("s"), 2, plan(&[], &[20, 100], 1), site.now);
        site.advance(&mut rollout);
        assert_eq!(wave_names(&rollout), vec![vec!["pi-00", "pi-01"]]);
        site.report("pi-00", 1, ReportState::RolledBack);
        site.advance(&mut rollout);
        assert_eq!(rollout.state, RolloutState::Running, "1 failure is allowed");
        assert_eq!(rollout.waves.len(), 1, "and its wave waits for pi-01");
        site.report("pi-01", 2, ReportState::Applied);
        site.advance(&mut rollout);
        assert_eq!(rollout.waves.len(), 2, "the last wave: every node");
        site.report("pi-05", 1, ReportState::Rejected);
        site.advance(&mut rollout);
        assert_eq!(rollout.state, RolloutState::Halted);
        let reason = rollout.reason.clone().unwrap_or_default();
        assert!(
            reason.contains("pi-00 (rolled-back: revision 2: unhealthy)"),
            "{reason}"
        );
        assert!(reason.contains("pi-05 (rejected"), "{reason}");
        assert!(
            !rollout.offers_to(&label("pi-09")),
            "a halted rollout offers nothing"
        );
        site.report("pi-09", 2, ReportState::Applied);
        site.advance(&mut rollout);
        assert_eq!(rollout.state, RolloutState::Halted, "halted stays halted");
    }

    #[test]
    fn a_failure_of_another_revision_is_not_this_rollouts() {
        let mut site = Site::new(3);
        // pi-01 failed revision 2 in the very second revision 3 goes out.
        site.report("pi-01", 1, ReportState::RolledBack);
        let mut rollout = new(label("s"), 3, plan(&["pi-00"], &[100], 0), site.now);
        site.now -= 1;
        site.advance(&mut rollout);
        site.report("pi-00", 3, ReportState::Applied);
        site.advance(&mut rollout);
        assert!(rollout.failed.is_empty(), "{:?}", rollout.failed);
        assert_eq!(rollout.state, RolloutState::Running);

        // From a node that does not say which revision: counted only from its offer on.
        let mut site = Site::new(2);
        site.report("pi-01", 1, ReportState::RolledBack);
        if let Some(recorded) = site.reports.get_mut(&label("pi-01")) {
            recorded.report.about = None;
        }
        site.now += 10;
        let mut rollout = new(label("s"), 2, plan(&["pi-00"], &[100], 0), site.now);
        site.advance(&mut rollout);
        site.report("pi-00", 2, ReportState::Applied);
        site.advance(&mut rollout);
        assert!(rollout.failed.is_empty(), "{:?}", rollout.failed);
        site.report("pi-01", 1, ReportState::RolledBack);
        if let Some(recorded) = site.reports.get_mut(&label("pi-01")) {
            recorded.report.about = None;
        }
        site.advance(&mut rollout);
        assert!(rollout.failed.contains_key(&label("pi-01")));
    }

    #[test]
    fn offline_nodes_do_not_hold_a_wave_back_but_a_wave_needs_one_applied() {
        let mut site = Site::new(4);
        let mut rollout = new(
            label("s"),
            2,
            plan(&["pi-00", "pi-01"], &[100], 0),
            site.now,
        );
        site.advance(&mut rollout);
        // pi-01 goes away; pi-00 stays, applying.
        site.heard.remove(&label("pi-01"));
        site.reports
            .get_mut(&label("pi-01"))
            .expect("report")
            .received_at = 0;
        site.now += 120;
        site.advance(&mut rollout);
        assert!(rollout.offline.contains(&label("pi-01")));
        assert_eq!(
            rollout.waves.len(),
            1,
            "no node of the canary wave applied yet"
        );
        assert!(rollout
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("pi-00")));
        site.report("pi-00", 2, ReportState::Applied);
        site.advance(&mut rollout);
        assert_eq!(
            rollout.waves.len(),
            2,
            "pi-00 applied, pi-01 offline: next wave"
        );
        assert!(
            rollout.offers_to(&label("pi-01")),
            "offered when it returns"
        );
    }

    #[test]
    fn a_canary_wave_of_offline_nodes_alone_never_passes() {
        let mut site = Site::new(3);
        let mut rollout = new(label("s"), 2, plan(&["pi-gone"], &[100], 0), site.now);
        site.advance(&mut rollout);
        site.now += 1_000;
        site.advance(&mut rollout);
        assert!(rollout.offline.contains(&label("pi-gone")));
        assert_eq!(rollout.waves.len(), 1);
        assert!(!rollout.offers_to(&label("pi-00")));
    }

    #[test]
    fn a_paused_rollout_starts_no_wave_but_counts_failures() {
        let mut site = Site::new(4);
        let mut rollout = new(
            label("s"),
            2,
            plan(&["pi-00", "pi-01"], &[100], 0),
            site.now,
        );
        site.advance(&mut rollout);
        rollout.state = RolloutState::Paused;
        site.report("pi-00", 2, ReportState::Applied);
        site.advance(&mut rollout);
        assert_eq!(rollout.waves.len(), 1);
        site.report("pi-01", 1, ReportState::Reverted);
        site.advance(&mut rollout);
        assert_eq!(rollout.state, RolloutState::Halted);
    }

    #[test]
    fn every_node_at_once_offers_to_all_and_an_empty_site_completes() {
        let mut site = Site::new(0);
        let mut rollout = new(label("s"), 2, plan(&[], &[100], 0), site.now);
        site.advance(&mut rollout);
        assert_eq!(rollout.state, RolloutState::Complete);
        assert!(rollout.offers_to(&label("pi-first")));

        let mut site = Site::new(3);
        let mut rollout = new(label("s"), 2, plan(&[], &[100], 0), site.now);
        site.advance(&mut rollout);
        assert!(rollout.offers_to(&label("pi-02")));
        assert_eq!(rollout.state, RolloutState::Running);
    }

    #[test]
    fn percentages_round_up_and_never_take_a_node_twice() {
        let mut site = Site::new(5);
        let mut rollout = new(label("s"), 2, plan(&["pi-03"], &[1, 50, 100], 0), site.now);
        site.advance(&mut rollout);
        site.report("pi-03", 2, ReportState::Applied);
        site.advance(&mut rollout);
        // 1 % of 5 rounds up to 1 node, which the canary already is: an empty wave, passed
        // at once; 50 % is 3 nodes: two more.
        assert_eq!(wave_names(&rollout)[1], Vec::<String>::new());
        assert_eq!(wave_names(&rollout)[2], vec!["pi-00", "pi-01"]);
        let all: Vec<&DnsLabel> = rollout.members().collect();
        let unique: BTreeSet<&DnsLabel> = all.iter().copied().collect();
        assert_eq!(all.len(), unique.len());
    }

    #[test]
    fn the_fleet_holds_the_first_wave_and_halts_a_rollout_that_has_not_started() {
        let mut site = Site::new(4);
        let mut rollout = new(label("s"), 2, plan(&["pi-00"], &[100], 0), site.now);
        site.fleet = FleetGate::Waiting("fleet wave 50% of release r waits for site(s) a".into());
        assert!(site.advance(&mut rollout));
        assert!(rollout.waves.is_empty(), "no wave while the fleet waits");
        assert_eq!(rollout.state, RolloutState::Running);
        assert_eq!(
            rollout.reason.as_deref(),
            Some("fleet wave 50% of release r waits for site(s) a")
        );
        site.fleet = FleetGate::Open;
        site.advance(&mut rollout);
        assert_eq!(wave_names(&rollout), vec![vec!["pi-00"]]);
        site.fleet = FleetGate::Halted("release r halted at site a (revision 3)".into());
        site.advance(&mut rollout);
        assert_eq!(
            rollout.state,
            RolloutState::Running,
            "a started rollout is its own site's"
        );

        let mut paused = new(label("s"), 3, plan(&[], &[100], 0), site.now);
        paused.state = RolloutState::Paused;
        site.advance(&mut paused);
        assert_eq!(paused.state, RolloutState::Halted);
        assert_eq!(
            paused.reason.as_deref(),
            Some("release r halted at site a (revision 3)")
        );
        assert!(!paused.offers_to(&label("pi-01")));
    }
}
