//! A rollout: how the central server hands one revision to its site's nodes, wave by wave,
//! as the revision's `[rollout]` plan says. The central server stores it, serves it to
//! `pimeshctl rollout status|history`, and decides from it which nodes are offered the
//! revision.
//!
//! ```json
//! {"site": "depot-7", "revision": 12, "state": "running",
//!  "plan": {"canary": ["pi-a"], "waves": [50, 100], "max_failed": 0, "offline_after_secs": 600},
//!  "waves": [{"percent": null, "nodes": ["pi-a"], "started_at": 1764000000}],
//!  "applied": ["pi-a"], "failed": {}, "offline": [], "created_at": 1764000000,
//!  "updated_at": 1764000042}
//! ```
//!
//! Invariants: `waves` holds the waves started so far, in the plan's order (the canary
//! wave first when the plan has one), and no node is in two of them; once the plan's last
//! wave has started every node of the site is offered the revision, those that appear
//! later too, unless the rollout is halted or aborted, after which no node is offered it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use pimesh_schema::cluster::RolloutSettings;
use pimesh_schema::DnsLabel;
use serde::{Deserialize, Serialize};

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    /// Waves start as the ones before them finish.
    Running,
    /// No new wave starts; the nodes of started waves are still offered the revision.
    Paused,
    /// More nodes failed than the plan allows: no node is offered the revision any more.
    Halted,
    /// Stopped by the operator: no node is offered the revision any more.
    Aborted,
    /// Every node holds it, failed it, or was offline when the last wave ran.
    Complete,
    /// A newer revision was published before this one completed: no new wave starts; the
    /// nodes of started waves are still offered it.
    Superseded,
}

impl RolloutState {
    pub const ALL: [RolloutState; 6] = [
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Halted,
        RolloutState::Aborted,
        RolloutState::Complete,
        RolloutState::Superseded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Halted => "halted",
            RolloutState::Aborted => "aborted",
            RolloutState::Complete => "complete",
            RolloutState::Superseded => "superseded",
        }
    }

    /// Whether the revision is no longer offered to anyone.
    pub fn is_stopped(self) -> bool {
        matches!(self, RolloutState::Halted | RolloutState::Aborted)
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The revision's `[rollout]` plan, as the central server follows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub canary: Vec<DnsLabel>,
    /// Cumulative percentages of the site's nodes, increasing, ending at 100.
    pub waves: Vec<u8>,
    pub max_failed: u32,
    pub offline_after_secs: u64,
    /// The release this revision carries across the fleet, and the order of the sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetPlan>,
}

/// Where a site stands among the sites of the central server that carry one release.
///
/// Invariant: `waves` is non-empty, increasing, ends at 100; sites are ordered by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetPlan {
    pub release: String,
    /// Sites that take the release first.
    pub canary: Vec<DnsLabel>,
    /// Cumulative percentages of the central server's sites, ending at 100.
    pub waves: Vec<u8>,
}

impl FleetPlan {
    /// The fleet's waves in order: `None` for the canary sites, else the percentage.
    pub fn stages(&self) -> Vec<Option<u8>> {
        stages(&self.canary, &self.waves)
    }
}

/// Waves in order: `None` for a canary wave when there are canaries, then each percentage.
fn stages<T>(canary: &[T], waves: &[u8]) -> Vec<Option<u8>> {
    let canary = (!canary.is_empty()).then_some(None);
    canary
        .into_iter()
        .chain(waves.iter().map(|&percent| Some(percent)))
        .collect()
}

impl From<&RolloutSettings> for Plan {
    fn from(settings: &RolloutSettings) -> Plan {
        Plan {
            canary: settings.canary.clone(),
            waves: settings.waves.clone(),
            max_failed: settings.max_failed,
            offline_after_secs: settings.offline_after.0.as_secs(),
            fleet: settings.release.as_ref().map(|release| FleetPlan {
                release: release.clone(),
                canary: settings.fleet_canary.clone(),
                waves: settings.fleet_waves.clone(),
            }),
        }
    }
}

impl Plan {
    /// The plan's waves in order: `None` for the canary wave, else the percentage.
    pub fn stages(&self) -> Vec<Option<u8>> {
        stages(&self.canary, &self.waves)
    }
}

/// One started wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// The share of the site this wave brings the revision to; `None`: the canary wave.
    pub percent: Option<u8>,
    /// The nodes this wave offered the revision to.
    pub nodes: BTreeSet<DnsLabel>,
    /// When it started, in seconds since the Unix epoch.
    pub started_at: u64,
}

impl Wave {
    /// `canary` or `50%`.
    pub fn name(&self) -> String {
        self.percent
            .map_or_else(|| "canary".to_owned(), |percent| format!("{percent}%"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub site: DnsLabel,
    pub revision: u64,
    pub state: RolloutState,
    /// Why the rollout halted or was aborted, or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub plan: Plan,
    pub waves: Vec<Wave>,
    /// Nodes that hold the revision (or a newer one), as their reports say.
    #[serde(default)]
    pub applied: BTreeSet<DnsLabel>,
    /// Nodes of started waves that rolled it back, reverted it or refused it, with what
    /// they reported.
    #[serde(default)]
    pub failed: BTreeMap<DnsLabel, String>,
    /// Nodes of started waves that the server has not heard from within the plan's
    /// `offline_after` (as of `updated_at`).
    #[serde(default)]
    pub offline: BTreeSet<DnsLabel>,
    pub created_at: u64,
    pub updated_at: u64,
    /// The newest operator command's time (milliseconds since the epoch): a command must
    /// be newer, so a captured one cannot be replayed.
    #[serde(default)]
    pub last_command_ms: u64,
}

impl Rollout {
    /// Whether the plan's last wave has started (every node is offered the revision).
    pub fn last_wave_started(&self) -> bool {
        self.waves.len() >= self.plan.stages().len()
    }

    /// Whether `node` is offered the revision now.
    pub fn offers_to(&self, node: &DnsLabel) -> bool {
        if self.state.is_stopped() {
            return false;
        }
        self.last_wave_started() || self.waves.iter().any(|wave| wave.nodes.contains(node))
    }

    /// The nodes of started waves.
    pub fn members(&self) -> impl Iterator<Item = &DnsLabel> {
        self.waves.iter().flat_map(|wave| wave.nodes.iter())
    }
}

/// What the operator asks of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Pause,
    Resume,
    Abort,
}

impl Command {
    pub const ALL: [Command; 3] = [Command::Pause, Command::Resume, Command::Abort];

    /// The last segment of its path.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Abort => "abort",
        }
    }

    pub fn from_segment(segment: &str) -> Option<Command> {
        Command::ALL
            .into_iter()
            .find(|command| command.as_str() == segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    fn rollout(state: RolloutState, canary: &[&str], waves: &[u8]) -> Rollout {
        Rollout {
            site: label("depot-7"),
            revision: 4,
            state,
            reason: None,
            plan: Plan {
                canary: canary.iter().map(|n| label(n)).collect(),
                waves: waves.to_vec(),
                max_failed: 0,
                offline_after_secs: 600,
                fleet: None,
            },
            waves: Vec::new(),
            applied: BTreeSet::new(),
            failed: BTreeMap::new(),
            offline: BTreeSet::new(),
            created_at: 1,
            updated_at: 1,
            last_command_ms: 0,
        }
    }

    #[test]
    fn a_rollout_offers_to_its_started_waves_then_to_all_and_to_none_once_stopped() {
        let mut rollout = rollout(RolloutState::Running, &["pi-a"], &[50, 100]);
        assert_eq!(rollout.plan.stages(), vec![None, Some(50), Some(100)]);
        assert!(!rollout.offers_to(&label("pi-a")));
        rollout.waves.push(Wave {
            percent: None,
            nodes: BTreeSet::from([label("pi-a")]),
            started_at: 2,
        });
        assert!(rollout.offers_to(&label("pi-a")));
        assert!(!rollout.offers_to(&label("pi-b")));
        for percent in [50, 100] {
            rollout.waves.push(Wave {
                percent: Some(percent),
                nodes: BTreeSet::new(),
                started_at: 3,
            });
        }
        assert!(rollout.last_wave_started());
        assert!(
            rollout.offers_to(&label("pi-new")),
            "every node once the last wave ran"
        );
        rollout.state = RolloutState::Halted;
        assert!(!rollout.offers_to(&label("pi-a")));
        assert_eq!(rollout.waves[0].name(), "canary");
        assert_eq!(rollout.waves[1].name(), "50%");
    }

    #[test]
    fn a_rollout_round_trips_with_its_field_names() {
        let rollout = rollout(RolloutState::Paused, &[], &[100]);
        let json = serde_json::to_value(&rollout).expect("serialise");
        assert_eq!(json["state"], "paused");
        assert_eq!(json["plan"]["waves"], serde_json::json!([100]));
        let back: Rollout = serde_json::from_value(json).expect("parse");
        assert_eq!(back, rollout);
        for state in RolloutState::ALL {
            let text = serde_json::to_string(&state).expect("serialise");
            assert_eq!(text, format!("\"{state}\""));
        }
        for command in Command::ALL {
            assert_eq!(Command::from_segment(command.as_str()), Some(command));
        }
        assert_eq!(Command::from_segment("delete"), None);
    }
}
