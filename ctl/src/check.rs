//! `pimeshctl check`, as `linkerd check` does it: each thing an operator relies on, one
//! line each — `√` holds, `‼` worth a look, `×` broken — and an exit code that says
//! whether anything is broken.
//!
//! Checked in order: the central server answers over TLS (its certificate trusted and for
//! the host named); this machine's clock agrees with the server's; the server serves the
//! site of the site folder (which the server shows only to a request signed with its key)
//! and checks its revisions with the folder's key; every node's last report: its state,
//! revision and age. A check that cannot run because an earlier
//! one failed is not printed.

use std::path::Path;
use std::time::{Duration, SystemTime};

use pimesh_revision::ReportState;

use crate::central::CentralError;
use crate::status::{FleetStatus, UNHEALTHY_EXIT};
use crate::{central, site, CentralArgs, Failure};

/// Clocks further apart than this are worth a look: certificates and leases start to go
/// wrong.
const CLOCK_WARN: Duration = Duration::from_secs(60);
/// Clocks further apart than this are broken: a node's certificate made now would not be
/// valid yet there, or already expired.
const CLOCK_FAIL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Holds,
    Warning,
    Broken,
}

/// What `check` found, line by line.
#[derive(Default)]
struct Findings {
    lines: Vec<(Verdict, String)>,
}

impl Findings {
    fn note(&mut self, verdict: Verdict, text: impl Into<String>) {
        let text = text.into();
        let mark = match verdict {
            Verdict::Holds => "√",
            Verdict::Warning => "‼",
            Verdict::Broken => "×",
        };
        println!("{mark} {text}");
        self.lines.push((verdict, text));
    }

    fn broken(&self) -> bool {
        self.lines.iter().any(|(v, _)| *v == Verdict::Broken)
    }
}

/// Runs the checks; the exit code is [`UNHEALTHY_EXIT`] when one is broken.
pub fn check(args: &CentralArgs, site_dir: Option<&Path>) -> Result<u8, Failure> {
    let mut findings = Findings::default();
    let (version, server_clock) = match central::server_version_and_clock(args) {
        Ok(answer) => answer,
        Err(err) => {
            findings.note(
                Verdict::Broken,
                format!("the central server answers: {err}"),
            );
            return Ok(UNHEALTHY_EXIT);
        }
    };
    findings.note(
        Verdict::Holds,
        format!(
            "the central server {} answers over TLS (pimesh-central {version})",
            args.central
        ),
    );
    match server_clock {
        None => findings.note(
            Verdict::Warning,
            "the server sent no Date: clocks not compared",
        ),
        Some(server) => {
            let (verdict, text) = clock_verdict(SystemTime::now(), server);
            findings.note(verdict, text);
        }
    }
    let Some(dir) = site_dir else {
        findings.note(
            Verdict::Broken,
            "no site folder: the server shows a site to its operator only (give --site-dir, \
             set PIMESH_SITE_DIR, or save one in the context)",
        );
        return Ok(UNHEALTHY_EXIT);
    };
    let name = site::name_of(dir)?;
    let key = site::public_key_of(dir)?;
    let fleet = match central::Operator::open(args, dir)?.fleet() {
        Ok(fleet) => fleet,
        Err(CentralError::Status { status, .. }) if status == reqwest::StatusCode::NOT_FOUND => {
            findings.note(
                Verdict::Broken,
                format!(
                    "site {name} (from {}) is served by the central server: it is not; \
                     add it to the server's [[sites]]",
                    dir.display()
                ),
            );
            return Ok(UNHEALTHY_EXIT);
        }
        Err(CentralError::Status { status, body, .. })
            if status == reqwest::StatusCode::FORBIDDEN && body.contains("does not verify") =>
        {
            findings.note(
                Verdict::Broken,
                format!(
                    "the server checks site {name}'s revisions and operator with another key \
                     than the one of {} ({key}): every publish from here would be refused",
                    dir.display()
                ),
            );
            return Ok(UNHEALTHY_EXIT);
        }
        Err(err) => {
            findings.note(Verdict::Broken, format!("the fleet view: {err}"));
            return Ok(UNHEALTHY_EXIT);
        }
    };
    let mut sites: Vec<_> = fleet.sites.iter().collect();
    match fleet.site(&name) {
        None => {
            findings.note(
                Verdict::Broken,
                format!("the server's fleet view has no site {name}"),
            );
            sites.clear();
        }
        Some(view) => {
            findings.note(Verdict::Holds, format!("site {name} is served"));
            match &view.public_key {
                Some(served) if *served == key => findings.note(
                    Verdict::Holds,
                    format!(
                        "the server checks site {name}'s revisions with the key of {}",
                        dir.display()
                    ),
                ),
                Some(served) => findings.note(
                    Verdict::Broken,
                    format!(
                        "the server checks site {name}'s revisions with {served}, not with \
                         the key of {} ({key}): every publish from here would be refused",
                        dir.display()
                    ),
                ),
                None => findings.note(
                    Verdict::Warning,
                    "the server does not say which key it checks revisions with (older server)",
                ),
            }
            sites.retain(|s| s.site == name);
        }
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let judged = FleetStatus::of(
        &pimesh_revision::FleetView {
            sites: sites.into_iter().cloned().collect(),
        },
        now,
    );
    for site in &judged.sites {
        if site.nodes.is_empty() {
            findings.note(
                Verdict::Holds,
                format!("site {}: no node has reported yet", site.site),
            );
        }
        for node in &site.nodes {
            let age = node
                .last_report_age_seconds
                .map_or_else(|| "age unknown".to_owned(), |s| format!("{s} s ago"));
            let revision = node
                .revision
                .map_or_else(|| "no revision".to_owned(), |r| format!("revision {r}"));
            let what = format!(
                "{}/{}: {} {revision} (last report {age}){}",
                site.site,
                node.node,
                node.state,
                if node.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", node.detail)
                }
            );
            let state = ReportState::from(node.state.as_str());
            let verdict = match state {
                _ if node.healthy => Verdict::Holds,
                ReportState::Applied | ReportState::Trying => Verdict::Warning, // behind
                _ => Verdict::Broken,
            };
            findings.note(verdict, what);
        }
    }
    let broken = findings.broken();
    let summary = if broken {
        "some checks failed"
    } else {
        "all checks passed"
    };
    println!("{summary}");
    Ok(if broken { UNHEALTHY_EXIT } else { 0 })
}

/// How far this machine's clock (`local`) is from the server's, judged.
fn clock_verdict(local: SystemTime, server: SystemTime) -> (Verdict, String) {
    let (skew, ahead) = match local.duration_since(server) {
        Ok(skew) => (skew, "ahead of"),
        Err(err) => (err.duration(), "behind"),
    };
    // The Date header has whole seconds: a second apart is agreement.
    let seconds = skew.as_secs();
    if skew <= CLOCK_WARN {
        (
            Verdict::Holds,
            format!(
                "this machine's clock agrees with the server's (within {} s)",
                seconds.max(1)
            ),
        )
    } else {
        let verdict = if skew > CLOCK_FAIL {
            Verdict::Broken
        } else {
            Verdict::Warning
        };
        (
            verdict,
            format!("this machine's clock is {seconds} s {ahead} the server's"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_apart_are_judged_by_how_far() {
        let server = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(clock_verdict(server, server).0, Verdict::Holds);
        let (verdict, text) = clock_verdict(server + Duration::from_secs(120), server);
        assert_eq!(verdict, Verdict::Warning);
        assert!(text.contains("120 s ahead of"), "{text}");
        let (verdict, text) = clock_verdict(server - Duration::from_secs(3600), server);
        assert_eq!(verdict, Verdict::Broken);
        assert!(text.contains("3600 s behind"), "{text}");
    }
}
