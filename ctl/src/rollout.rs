//! `pimeshctl rollout status|history|pause|resume|abort|undo`: the site's staged rollouts
//! as the central server runs them, read and steered with requests signed by the site key.
//!
//! `status` exits [`UNHEALTHY_EXIT`] when the rollout it shows halted or was aborted;
//! `--watch` prints the rollout again whenever it changes, until it completes (exit 0),
//! halts or is aborted (exit 3), or is superseded by a newer revision (exit 0: the newer
//! one is the one to watch).

use std::time::Duration;

use pimesh_revision::rollout::Command;
use pimesh_revision::{Mode, Revision, Rollout, RolloutState};

use crate::central::Operator;
use crate::status::UNHEALTHY_EXIT;
use crate::{Failure, OutputFormat};

/// How often `--watch` asks again.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// Bar width, in characters.
const BAR: usize = 20;

/// `rollout status`: the rollout of `revision` (default: the newest).
pub fn status(
    operator: &Operator<'_>,
    revision: Option<u64>,
    watch: bool,
    output: OutputFormat,
) -> Result<u8, Failure> {
    let mut shown: Option<Rollout> = None;
    loop {
        let rollout = find(operator, revision)?;
        let changed = shown.as_ref().is_none_or(|before| {
            (
                before.state,
                &before.waves,
                &before.applied,
                &before.failed,
                &before.reason,
            ) != (
                rollout.state,
                &rollout.waves,
                &rollout.applied,
                &rollout.failed,
                &rollout.reason,
            )
        });
        if changed {
            print!("{}", output.render(&rollout, table)?);
        }
        let settled = !matches!(rollout.state, RolloutState::Running | RolloutState::Paused);
        if !watch || settled {
            return Ok(if rollout.state.is_stopped() {
                UNHEALTHY_EXIT
            } else {
                0
            });
        }
        shown = Some(rollout);
        std::thread::sleep(WATCH_EVERY);
    }
}

/// The rollout of `revision`, or the newest.
fn find(operator: &Operator<'_>, revision: Option<u64>) -> Result<Rollout, Failure> {
    let rollouts = operator.rollouts(if revision.is_some() { 1_000 } else { 1 })?;
    let found = match revision {
        Some(number) => rollouts.into_iter().find(|r| r.revision == number),
        None => rollouts.into_iter().next(),
    };
    found.ok_or_else(|| {
        match revision {
            Some(number) => format!("site {} has no rollout of revision {number}", operator.site),
            None => format!(
                "site {} has no rollout yet: nothing was published",
                operator.site
            ),
        }
        .into()
    })
}

/// `rollout history`: the site's rollouts, newest first.
pub fn history(operator: &Operator<'_>, limit: usize, output: OutputFormat) -> Result<(), Failure> {
    let rollouts = operator.rollouts(limit)?;
    print!(
        "{}",
        output.render(&rollouts, |rollouts| history_table(rollouts))?
    );
    Ok(())
}

/// `rollout pause|resume|abort`: on the rollout of `revision` (default: the newest).
pub fn command(
    operator: &Operator<'_>,
    revision: Option<u64>,
    command: Command,
) -> Result<(), Failure> {
    let number = match revision {
        Some(number) => number,
        None => find(operator, None)?.revision,
    };
    let rollout = operator.command(number, command)?;
    println!(
        "rollout of revision {number} of site {}: {}",
        operator.site, rollout.state
    );
    Ok(())
}

/// `rollout undo`: publishes the configuration of the last revision whose rollout
/// completed before the newest one, as a new revision (numbers only grow: nodes never go
/// back to a lower one).
pub fn undo(operator: &Operator<'_>) -> Result<(), Failure> {
    let rollouts = operator.rollouts(1_000)?;
    let newest = rollouts
        .first()
        .ok_or_else(|| format!("site {} has no revision to undo", operator.site))?;
    let good = rollouts
        .iter()
        .skip(1)
        .find(|r| r.state == RolloutState::Complete)
        .ok_or_else(|| {
            format!(
                "site {}: no revision before {} completed its rollout; nothing to go back to",
                operator.site, newest.revision
            )
        })?;
    let previous = operator.revision(good.revision)?;
    let latest = operator.latest_revision()?.unwrap_or(newest.revision);
    let number = latest + 1;
    operator.publish(Revision {
        site: operator.site.clone(),
        revision: number,
        mode: Mode::Apply,
        config: previous.config,
    })?;
    println!(
        "published revision {number} of site {}: the configuration of revision {} (the last \
         that completed its rollout), replacing revision {}",
        operator.site, good.revision, newest.revision
    );
    Ok(())
}

fn bar(done: usize, of: usize) -> String {
    let filled = (done * BAR).checked_div(of).unwrap_or(BAR).min(BAR);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(BAR - filled))
}

/// The rollout as a person reads it.
fn table(rollout: &Rollout) -> String {
    let release = rollout
        .plan
        .fleet
        .as_ref()
        .map_or_else(String::new, |fleet| format!(" · release {}", fleet.release));
    let mut text = format!(
        "site {} · revision {}{release} · {}\n",
        rollout.site, rollout.revision, rollout.state
    );
    text.push_str(&format!(
        "{:<8} {:>5} {:>7} {:>6} {:>7}  {}\n",
        "WAVE", "NODES", "APPLIED", "FAILED", "OFFLINE", "PROGRESS"
    ));
    let stages = rollout.plan.stages();
    for (i, stage) in stages.iter().enumerate() {
        let name = stage.map_or_else(|| "canary".to_owned(), |p| format!("{p}%"));
        let Some(wave) = rollout.waves.get(i) else {
            text.push_str(&format!("{name:<8} {:>5}  not started\n", "-"));
            continue;
        };
        // The last wave answers for every node that is in no earlier wave.
        let last = i + 1 == stages.len();
        let earlier: Vec<_> = rollout.waves[..i].iter().flat_map(|w| &w.nodes).collect();
        let nodes: Vec<_> = if last {
            rollout
                .applied
                .iter()
                .chain(rollout.failed.keys())
                .chain(&rollout.offline)
                .chain(&wave.nodes)
                .filter(|node| !earlier.contains(node))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            wave.nodes.iter().collect()
        };
        let count = |set: &dyn Fn(&&pimesh_schema::DnsLabel) -> bool| {
            nodes.iter().filter(|n| set(n)).count()
        };
        let applied = count(&|n| rollout.applied.contains(*n));
        let failed = count(&|n| rollout.failed.contains_key(*n));
        let offline = count(&|n| rollout.offline.contains(*n));
        text.push_str(&format!(
            "{name:<8} {:>5} {applied:>7} {failed:>6} {offline:>7}  {} {applied}/{}\n",
            nodes.len(),
            bar(applied, nodes.len()),
            nodes.len()
        ));
    }
    if let Some(reason) = &rollout.reason {
        text.push_str(&format!("{reason}\n"));
    }
    for (node, why) in &rollout.failed {
        text.push_str(&format!("failed: {node}: {why}\n"));
    }
    text
}

fn history_table(rollouts: &[Rollout]) -> String {
    let mut text = format!(
        "{:<9} {:<10} {:<18} {:>7} {:>6}  {}\n",
        "REVISION", "STATE", "WAVES", "APPLIED", "FAILED", "REASON"
    );
    for rollout in rollouts {
        let waves: Vec<String> = rollout
            .plan
            .stages()
            .iter()
            .map(|stage| stage.map_or_else(|| "canary".to_owned(), |p| format!("{p}%")))
            .collect();
        let started = format!(
            "{} ({}/{})",
            waves.join(","),
            rollout.waves.len(),
            waves.len()
        );
        text.push_str(&format!(
            "{:<9} {:<10} {:<18} {:>7} {:>6}  {}\n",
            rollout.revision,
            rollout.state.as_str(),
            started,
            rollout.applied.len(),
            rollout.failed.len(),
            rollout.reason.as_deref().unwrap_or("")
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use pimesh_revision::{Plan, Wave};
    use pimesh_schema::DnsLabel;

    use super::*;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    #[test]
    fn the_table_shows_each_wave_with_its_progress_and_why_it_stopped() {
        let rollout = Rollout {
            site: label("depot-7"),
            revision: 12,
            state: RolloutState::Halted,
            reason: Some("1 node(s) failed, more than max_failed = 0: pi-b (rolled-back)".into()),
            plan: Plan {
                canary: vec![label("pi-a")],
                waves: vec![50, 100],
                max_failed: 0,
                offline_after_secs: 600,
                fleet: None,
            },
            waves: vec![
                Wave {
                    percent: None,
                    nodes: BTreeSet::from([label("pi-a")]),
                    started_at: 1,
                },
                Wave {
                    percent: Some(50),
                    nodes: BTreeSet::from([label("pi-b"), label("pi-c")]),
                    started_at: 2,
                },
            ],
            applied: BTreeSet::from([label("pi-a"), label("pi-c")]),
            failed: BTreeMap::from([(label("pi-b"), "rolled-back".to_owned())]),
            offline: BTreeSet::new(),
            created_at: 1,
            updated_at: 3,
            last_command_ms: 0,
        };
        let text = table(&rollout);
        assert!(
            text.starts_with("site depot-7 · revision 12 · halted\n"),
            "{text}"
        );
        assert!(
            text.contains("canary       1       1      0       0  [####################] 1/1"),
            "{text}"
        );
        assert!(
            text.contains("50%          2       1      1       0  [##########----------] 1/2"),
            "{text}"
        );
        assert!(text.contains("100%         -  not started"), "{text}");
        assert!(text.contains("failed: pi-b: rolled-back"), "{text}");
        let history = history_table(std::slice::from_ref(&rollout));
        assert!(
            history.contains("12        halted     canary,50%,100% (2/3)       2      1"),
            "{history}"
        );
        let mut of_a_release = rollout;
        of_a_release.plan.fleet = Some(pimesh_revision::FleetPlan {
            release: "2026.12-a".to_owned(),
            canary: vec![label("depot-2")],
            waves: vec![100],
        });
        assert!(table(&of_a_release)
            .starts_with("site depot-7 · revision 12 · release 2026.12-a · halted\n"));
    }
}
