//! Releases across the fleet: the same change published to several sites (each site's
//! revision signed with its own key) under one `[rollout] release` name, the sites taking
//! it in fleet waves — canary sites first, then shares of the central server's sites in
//! name order — each fleet wave only when the sites of the waves before it completed it.
//!
//! Rules (each a test below):
//! - a site's fleet wave is where its own revision's plan puts it: a canary site is in the
//!   first; a percentage wave takes the sites not yet in a wave, in name order, until that
//!   share of the fleet (the server's sites and the canaries) is in a wave;
//! - a site of the first fleet wave is never held back;
//! - a later site waits while a site of an earlier wave runs or pauses the release; a site
//!   that does not carry it (never published it, or superseded it) does not hold the wave
//!   back, but at least one earlier site must have completed it, so a fleet wave never
//!   opens on no evidence;
//! - an earlier site that halted or aborted the release halts it for every later site
//!   that has not started it: its nodes are never offered it; a later site's revision
//!   published after that halt (a fix, published to every site under the same name) waits
//!   for a newer revision of the release at the halted site instead;
//! - a site's newest revision carrying a release speaks for the site: publishing the
//!   release again (a fix under the same name) makes the later sites wait for the new one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};

use pimesh_revision::{FleetPlan, Plan, Rollout, RolloutState};
use pimesh_schema::DnsLabel;
use tokio::sync::watch;

/// Whether a site's rollout may start its first wave, as far as the fleet is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetGate {
    /// No release, the first fleet wave, or the waves before it completed the release.
    Open,
    /// Sites of earlier fleet waves have not completed the release yet: why.
    Waiting(String),
    /// A site of an earlier fleet wave halted or aborted the release: why.
    Halted(String),
}

/// A site's newest rollout of a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRelease {
    pub revision: u64,
    pub state: RolloutState,
    pub reason: Option<String>,
    /// When the rollout last changed (for a halted or aborted one: when it stopped).
    pub updated_at: u64,
}

/// The server's sites and, per release, each site's newest rollout of it. Shared by every
/// site's offers; its lock is taken last (never held while taking another). `changes` is
/// bumped whenever a site's rollout of a release changes state, so that the sites it may
/// hold back or halt are advanced at once rather than at the next tick.
pub struct Releases {
    fleet: BTreeSet<DnsLabel>,
    by_release: Mutex<BTreeMap<String, BTreeMap<DnsLabel, SiteRelease>>>,
    changes: watch::Sender<u64>,
}

impl Releases {
    /// The releases of a server whose sites are `fleet`, none known yet.
    pub fn new(fleet: impl IntoIterator<Item = DnsLabel>) -> Releases {
        Releases {
            fleet: fleet.into_iter().collect(),
            by_release: Mutex::new(BTreeMap::new()),
            changes: watch::Sender::new(0),
        }
    }

    /// Woken when a site's rollout of a release changes state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Takes `rollout` as its site's word on its release, unless the site has a newer
    /// revision of that release already.
    pub fn note(&self, rollout: &Rollout) {
        let Some(fleet) = &rollout.plan.fleet else {
            return;
        };
        let mut by_release = self
            .by_release
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let sites = by_release.entry(fleet.release.clone()).or_default();
        if sites
            .get(&rollout.site)
            .is_some_and(|known| known.revision > rollout.revision)
        {
            return;
        }
        let moved = sites
            .get(&rollout.site)
            .is_none_or(|known| (known.revision, known.state) != (rollout.revision, rollout.state));
        sites.insert(
            rollout.site.clone(),
            SiteRelease {
                revision: rollout.revision,
                state: rollout.state,
                reason: rollout.reason.clone(),
                updated_at: rollout.updated_at,
            },
        );
        drop(by_release);
        if moved {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Whether `site`'s rollout by `plan`, created at `created_at`, may start its first
    /// wave.
    pub fn gate(&self, site: &DnsLabel, plan: &Plan, created_at: u64) -> FleetGate {
        let Some(fleet) = &plan.fleet else {
            return FleetGate::Open;
        };
        let by_release = self
            .by_release
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let empty = BTreeMap::new();
        let known = by_release.get(&fleet.release).unwrap_or(&empty);
        gate(site, fleet, created_at, &self.fleet, known)
    }
}

/// Whether `site`'s rollout of `fleet`'s release, created at `created_at`, may start, the
/// server's sites being `sites` and each site's newest rollout of the release `known`.
pub fn gate(
    site: &DnsLabel,
    fleet: &FleetPlan,
    created_at: u64,
    sites: &BTreeSet<DnsLabel>,
    known: &BTreeMap<DnsLabel, SiteRelease>,
) -> FleetGate {
    let stages = fleet.stages();
    let waves = fleet_waves(fleet, sites);
    let Some(mine) = waves.iter().position(|wave| wave.contains(site)) else {
        return FleetGate::Open;
    };
    if mine == 0 {
        return FleetGate::Open;
    }
    let release = &fleet.release;
    let wave_name = stages
        .get(mine)
        .copied()
        .flatten()
        .map_or_else(|| "canary".to_owned(), |percent| format!("{percent}%"));
    let earlier: Vec<&DnsLabel> = waves[..mine].iter().flatten().collect();
    let mut running = Vec::new();
    let mut completed = 0;
    for other in &earlier {
        let Some(status) = known.get(*other) else {
            continue;
        };
        match status.state {
            RolloutState::Complete => completed += 1,
            RolloutState::Running | RolloutState::Paused => running.push(other.to_string()),
            RolloutState::Halted | RolloutState::Aborted if status.updated_at < created_at => {
                running.push(format!(
                    "{other} (its revision {} {} before this one was published: a newer \
                     one of the release there)",
                    status.revision, status.state
                ));
            }
            RolloutState::Halted | RolloutState::Aborted => {
                let why = status
                    .reason
                    .as_deref()
                    .map_or_else(String::new, |reason| format!(": {reason}"));
                return FleetGate::Halted(format!(
                    "release {release} {} at site {other} (revision {}){why}",
                    status.state, status.revision
                ));
            }
            RolloutState::Superseded => {}
        }
    }
    if !running.is_empty() {
        return FleetGate::Waiting(format!(
            "fleet wave {wave_name} of release {release} waits for site(s) {} to complete it",
            running.join(", ")
        ));
    }
    if completed == 0 {
        let names: Vec<String> = earlier.iter().map(ToString::to_string).collect();
        return FleetGate::Waiting(format!(
            "fleet wave {wave_name} of release {release} waits for a site before it to \
             complete it (none of {} has)",
            names.join(", ")
        ));
    }
    FleetGate::Open
}

/// The fleet's waves in the plan's order: the canary sites, then each percentage's sites.
fn fleet_waves(fleet: &FleetPlan, sites: &BTreeSet<DnsLabel>) -> Vec<BTreeSet<DnsLabel>> {
    let population: BTreeSet<&DnsLabel> = sites.iter().chain(fleet.canary.iter()).collect();
    let mut members: BTreeSet<&DnsLabel> = BTreeSet::new();
    let mut waves = Vec::new();
    for stage in fleet.stages() {
        let wave: BTreeSet<&DnsLabel> = match stage {
            None => fleet.canary.iter().collect(),
            Some(percent) => {
                let target = (population.len() * usize::from(percent)).div_ceil(100);
                population
                    .iter()
                    .copied()
                    .filter(|site| !members.contains(site))
                    .take(target.saturating_sub(members.len()))
                    .collect()
            }
        };
        members.extend(wave.iter().copied());
        waves.push(wave.into_iter().cloned().collect());
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    fn fleet(canary: &[&str], waves: &[u8]) -> FleetPlan {
        FleetPlan {
            release: "2026.12-tls".to_owned(),
            canary: canary.iter().map(|s| label(s)).collect(),
            waves: waves.to_vec(),
        }
    }

    /// Ten sites, `depot-0`..`depot-9`.
    fn ten_sites() -> BTreeSet<DnsLabel> {
        (0..10).map(|i| label(&format!("depot-{i}"))).collect()
    }

    /// A site's rollout of `revision`, last changed at 100.
    fn status(revision: u64, state: RolloutState) -> SiteRelease {
        SiteRelease {
            revision,
            state,
            reason: Some("pi-a (rolled-back)".to_owned()),
            updated_at: 100,
        }
    }

    fn names(wave: &BTreeSet<DnsLabel>) -> Vec<String> {
        wave.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn fleet_waves_take_the_canaries_then_shares_of_the_sites_in_name_order() {
        let waves = fleet_waves(&fleet(&["depot-7"], &[30, 100]), &ten_sites());
        assert_eq!(waves.len(), 3);
        assert_eq!(names(&waves[0]), ["depot-7"]);
        assert_eq!(
            names(&waves[1]),
            ["depot-0", "depot-1"],
            "30 % of 10, the canary counted"
        );
        assert_eq!(waves[2].len(), 7);
        assert!(!waves[2].contains(&label("depot-7")));
        let plain = fleet_waves(&fleet(&[], &[1, 100]), &ten_sites());
        assert_eq!(
            names(&plain[0]),
            ["depot-0"],
            "1 % of 10 rounds up to one site"
        );
        assert_eq!(plain[1].len(), 9);
    }

    #[test]
    fn the_first_wave_is_open_and_a_later_one_waits_for_the_earlier_sites() {
        let plan = fleet(&["depot-7"], &[30, 100]);
        let sites = ten_sites();
        let mut known = BTreeMap::new();
        assert_eq!(
            gate(&label("depot-7"), &plan, 50, &sites, &known),
            FleetGate::Open
        );
        let FleetGate::Waiting(why) = gate(&label("depot-0"), &plan, 50, &sites, &known) else {
            panic!("nothing completed: the 30 % wave waits");
        };
        assert!(why.contains("none of depot-7 has"), "{why}");
        known.insert(label("depot-7"), status(4, RolloutState::Running));
        let FleetGate::Waiting(why) = gate(&label("depot-0"), &plan, 50, &sites, &known) else {
            panic!("the canary site runs: the 30 % wave waits");
        };
        assert!(
            why.contains("fleet wave 30% of release 2026.12-tls waits for site(s) depot-7"),
            "{why}"
        );
        known.insert(label("depot-7"), status(4, RolloutState::Complete));
        assert_eq!(
            gate(&label("depot-0"), &plan, 50, &sites, &known),
            FleetGate::Open
        );
        known.insert(label("depot-0"), status(3, RolloutState::Paused));
        let FleetGate::Waiting(why) = gate(&label("depot-5"), &plan, 50, &sites, &known) else {
            panic!("the last wave waits for the 30 % wave's sites");
        };
        assert!(
            why.starts_with("fleet wave 100% of release 2026.12-tls waits for site(s) depot-0 "),
            "{why}"
        );
        known.insert(label("depot-0"), status(3, RolloutState::Complete));
        assert_eq!(
            gate(&label("depot-5"), &plan, 50, &sites, &known),
            FleetGate::Open
        );
    }

    #[test]
    fn a_site_that_does_not_carry_the_release_does_not_hold_a_wave_back() {
        let plan = fleet(&[], &[30, 100]);
        let sites = ten_sites();
        let mut known = BTreeMap::new();
        known.insert(label("depot-0"), status(2, RolloutState::Complete));
        known.insert(label("depot-1"), status(9, RolloutState::Superseded));
        assert_eq!(
            gate(&label("depot-3"), &plan, 50, &sites, &known),
            FleetGate::Open,
            "depot-2 never published it, depot-1 superseded it, depot-0 completed it"
        );
    }

    #[test]
    fn a_halt_or_abort_before_a_site_halts_the_release_there() {
        let plan = fleet(&["depot-9"], &[100]);
        let sites = ten_sites();
        let mut known = BTreeMap::new();
        known.insert(label("depot-9"), status(12, RolloutState::Halted));
        let FleetGate::Halted(why) = gate(&label("depot-0"), &plan, 50, &sites, &known) else {
            panic!("the canary site halted");
        };
        assert_eq!(
            why,
            "release 2026.12-tls halted at site depot-9 (revision 12): pi-a (rolled-back)"
        );
        known.insert(label("depot-9"), status(12, RolloutState::Aborted));
        assert!(matches!(
            gate(&label("depot-0"), &plan, 50, &sites, &known),
            FleetGate::Halted(why) if why.contains("aborted at site depot-9")
        ));
        let FleetGate::Waiting(why) = gate(&label("depot-0"), &plan, 101, &sites, &known) else {
            panic!("a revision published after the abort waits for a newer one at depot-9");
        };
        assert_eq!(
            why,
            "fleet wave 100% of release 2026.12-tls waits for site(s) depot-9 (its revision 12 \
             aborted before this one was published: a newer one of the release there) to \
             complete it"
        );
    }

    #[test]
    fn a_sites_newest_revision_of_the_release_speaks_for_it() {
        let releases = Releases::new(ten_sites());
        let plan = Plan {
            canary: Vec::new(),
            waves: vec![100],
            max_failed: 0,
            offline_after_secs: 60,
            fleet: Some(fleet(&["depot-9"], &[100])),
        };
        let mut rollout = crate::rollout::new(label("depot-9"), 12, plan.clone(), 1);
        rollout.state = RolloutState::Halted;
        releases.note(&rollout);
        assert!(matches!(
            releases.gate(&label("depot-0"), &plan, 1),
            FleetGate::Halted(_)
        ));
        let fix = crate::rollout::new(label("depot-9"), 13, plan.clone(), 2);
        releases.note(&fix);
        releases.note(&rollout);
        assert!(
            matches!(releases.gate(&label("depot-0"), &plan, 1), FleetGate::Waiting(why) if why.contains("depot-9")),
            "the fix runs at the canary site; the old halt no longer speaks"
        );
        let mut done = fix;
        done.state = RolloutState::Complete;
        releases.note(&done);
        assert_eq!(releases.gate(&label("depot-0"), &plan, 1), FleetGate::Open);
        let mut no_release = plan;
        no_release.fleet = None;
        assert_eq!(
            releases.gate(&label("depot-0"), &no_release, 1),
            FleetGate::Open
        );
    }
}
