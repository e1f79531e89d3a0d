//! How an offered revision ends on this node, and the [`NodeReport`] that tells the central
//! server; and why applying one fails ([`ApplyError`]).

use std::fmt;
use std::time::Duration;

use pimesh_revision::{NodeReport, Rejection, ReportState};
use serde::{Deserialize, Serialize};

use super::gate::Unhealthy;
use super::revisions::RevisionsError;
use super::rollout::TouchError;

/// Why the node goes back to its committed revision. The journal keeps it while the
/// rollback runs (as the report state it ends in), so that a restart finishes and reports
/// it the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rollback {
    /// The revision could not be applied, or failed its health gate: `rolled-back`.
    #[serde(rename = "rolled-back")]
    Unhealthy,
    /// A trial not confirmed by a newer revision within its window: `reverted`.
    #[serde(rename = "reverted")]
    Unconfirmed,
}

impl Rollback {
    pub fn state(self) -> ReportState {
        match self {
            Rollback::Unhealthy => ReportState::RolledBack,
            Rollback::Unconfirmed => ReportState::Reverted,
        }
    }
}

/// How a change ended, or an offer that never became one.
#[derive(Debug)]
pub enum Outcome {
    /// `revision` passed the health gate and is committed.
    Applied { revision: u64 },
    /// The `try` revision `revision` passed the health gate; it reverts after `window`
    /// unless a newer revision confirms it.
    OnTrial { revision: u64, window: Duration },
    /// An offered document was refused; nothing changed and the node runs `running`.
    /// `offered` is the revision number the document claims, when it can be read.
    Refused {
        running: Option<u64>,
        offered: Option<u64>,
        rejection: Rejection,
    },
    /// The node went back from `revision` to its committed revision, `running`.
    /// `still_failing` is set when the committed revision is not healthy either.
    WentBack {
        rollback: Rollback,
        revision: u64,
        running: Option<u64>,
        reason: String,
        still_failing: Option<ApplyError>,
    },
}

impl Outcome {
    pub fn state(&self) -> ReportState {
        match self {
            Outcome::Applied { .. } => ReportState::Applied,
            Outcome::OnTrial { .. } => ReportState::Trying,
            Outcome::Refused { .. } => ReportState::Rejected,
            Outcome::WentBack { rollback, .. } => rollback.state(),
        }
    }

    /// The revision the node runs after it.
    pub fn running(&self) -> Option<u64> {
        match self {
            Outcome::Applied { revision } | Outcome::OnTrial { revision, .. } => Some(*revision),
            Outcome::Refused { running, .. } | Outcome::WentBack { running, .. } => *running,
        }
    }

    /// Why, in words; empty for [`Outcome::Applied`].
    pub fn detail(&self) -> String {
        match self {
            Outcome::Applied { .. } => String::new(),
            Outcome::OnTrial { window, .. } => format!(
                "healthy; reverts in {} unless a newer revision confirms it",
                humantime::format_duration(*window)
            ),
            Outcome::Refused {
                offered, rejection, ..
            } => match offered {
                Some(n) => format!("revision {n} refused: {rejection}"),
                None => format!("an unreadable revision refused: {rejection}"),
            },
            Outcome::WentBack {
                revision,
                reason,
                still_failing,
                ..
            } => match still_failing {
                Some(err) => format!("revision {revision}: {reason}; after going back: {err}"),
                None => format!("revision {revision}: {reason}"),
            },
        }
    }

    /// The revision the outcome is about: the one applied, tried, refused or gone back
    /// from (`None`: an offer whose number could not be read).
    pub fn about(&self) -> Option<u64> {
        match self {
            Outcome::Applied { revision }
            | Outcome::OnTrial { revision, .. }
            | Outcome::WentBack { revision, .. } => Some(*revision),
            Outcome::Refused { offered, .. } => *offered,
        }
    }

    /// The report for the central server (and `/status`'s `ota.last_outcome`), without
    /// K3s's summary and the certificate dates (the OTA client adds the node's current
    /// ones).
    pub fn report(&self) -> NodeReport {
        NodeReport {
            revision: self.running(),
            state: self.state(),
            detail: self.detail(),
            about: self.about(),
            k3s: None,
            certificates: None,
            traffic: None,
        }
    }
}

/// Why switching the node to a configuration failed.
#[derive(Debug)]
pub enum ApplyError {
    /// The active configuration file could not be replaced.
    Activate(RevisionsError),
    /// systemd could not be reached over D-Bus.
    Bus(zbus::Error),
    /// A unit that reads the configuration could not be reloaded or restarted.
    Touch(TouchError),
    /// The health gate did not pass.
    Unhealthy(Unhealthy),
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApplyError::Activate(err) => err.fmt(f),
            ApplyError::Bus(err) => write!(f, "cannot reach systemd over D-Bus: {err}"),
            ApplyError::Touch(err) => err.fmt(f),
            ApplyError::Unhealthy(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for ApplyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ApplyError::Activate(err) => Some(err),
            ApplyError::Bus(err) => Some(err),
            ApplyError::Touch(err) => Some(err),
            ApplyError::Unhealthy(err) => Some(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_is_reported_with_its_state_revision_and_detail() {
        let report = |outcome: Outcome| {
            let report = outcome.report();
            (report.revision, report.state.to_string(), report.detail)
        };
        assert_eq!(
            report(Outcome::Applied { revision: 5 }),
            (Some(5), "applied".to_owned(), String::new())
        );
        assert_eq!(
            report(Outcome::OnTrial {
                revision: 6,
                window: Duration::from_secs(120)
            }),
            (
                Some(6),
                "trying".to_owned(),
                "healthy; reverts in 2m unless a newer revision confirms it".to_owned()
            )
        );
        assert_eq!(
            report(Outcome::Refused {
                running: Some(5),
                offered: Some(9),
                rejection: Rejection::NotNewer {
                    current: 9,
                    offered: 9
                },
            }),
            (
                Some(5),
                "rejected".to_owned(),
                "revision 9 refused: revision 9 is not newer than the current revision 9"
                    .to_owned()
            )
        );
        assert_eq!(
            report(Outcome::Refused {
                running: None,
                offered: None,
                rejection: Rejection::BadSignature,
            })
            .2,
            "an unreadable revision refused: revision signature does not verify with the \
             site's public key"
        );
        assert_eq!(
            report(Outcome::WentBack {
                rollback: Rollback::Unhealthy,
                revision: 7,
                running: Some(5),
                reason: "pimesh-proxy.service is failed (failed)".to_owned(),
                still_failing: Some(ApplyError::Unhealthy(Unhealthy::NotSettled {
                    settle: Duration::from_secs(3)
                })),
            }),
            (
                Some(5),
                "rolled-back".to_owned(),
                "revision 7: pimesh-proxy.service is failed (failed); after going back: \
                 healthy for less than 3s before the deadline"
                    .to_owned()
            )
        );
        assert_eq!(
            report(Outcome::WentBack {
                rollback: Rollback::Unconfirmed,
                revision: 6,
                running: Some(5),
                reason: "not confirmed by a newer revision within 2m".to_owned(),
                still_failing: None,
            }),
            (
                Some(5),
                "reverted".to_owned(),
                "revision 6: not confirmed by a newer revision within 2m".to_owned()
            )
        );
    }
}
