//! Store-and-forward of the node's reports to the central server.
//!
//! Two kinds of report leave a node:
//! - an *outcome* (a revision applied, refused, rolled back, …) is written to disk
//!   (`outbox/<sequence>.json`, atomically) before anything tries to send it, and deleted
//!   only after the central server took it (or refused it for good, with a 4xx). Outcomes
//!   go out oldest first, so the central server ends on the node's latest word even after
//!   days offline. At most [`MAX_QUEUED`] wait; past that the oldest are dropped, as only
//!   the latest state matters most. The newest outcome is also kept in
//!   `last-outcome.json`, so that a restarted supervisor can refresh it;
//! - a *refresh* (the last outcome again, with the node's K3s, certificate dates or mesh
//!   traffic as they are now) is kept in memory only, the newest replacing any unsent one:
//!   it changes every few minutes under traffic, and an SD card should not pay a file and
//!   two `fsync`s for each. A power cut loses at most that refresh, which the restarted
//!   supervisor makes again from the node's facts and `last-outcome.json`.
//!
//! Invariant: the refresh waiting in memory, if any, is newer than every outcome on disk
//! (queuing an outcome drops it: the outcome carries the node's facts as they are now), so
//! it goes out after them and the central server still ends on the node's latest word.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use pimesh_revision::NodeReport;

/// At most this many outcome reports wait on disk.
pub const MAX_QUEUED: usize = 64;

/// Why a report could not be queued.
#[derive(Debug)]
pub enum QueueError {
    Encode(serde_json::Error),
    Write { path: PathBuf, source: io::Error },
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Encode(err) => write!(f, "cannot encode a report: {err}"),
            QueueError::Write { path, source } => {
                write!(f, "cannot queue a report in {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for QueueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            QueueError::Encode(err) => Some(err),
            QueueError::Write { source, .. } => Some(source),
        }
    }
}

/// The reports waiting for the central server; clones share the refresh in memory.
#[derive(Clone)]
pub struct Outbox {
    dir: PathBuf,
    last_outcome: PathBuf,
    refresh: Arc<Mutex<Refresh>>,
}

/// The refresh waiting in memory. `generation` grows with every report queued, so that a
/// refresh delivered while a newer report was queued does not take the newer one with it.
#[derive(Default)]
struct Refresh {
    generation: u64,
    report: Option<NodeReport>,
}

/// The next report to deliver, as [`Outbox::next`] gives it.
#[derive(Debug)]
pub enum Next {
    /// An outcome on disk.
    Outcome { path: PathBuf, report: NodeReport },
    /// The refresh in memory, as of `generation`.
    Refresh { generation: u64, report: NodeReport },
}

impl Next {
    pub fn report(&self) -> &NodeReport {
        match self {
            Next::Outcome { report, .. } | Next::Refresh { report, .. } => report,
        }
    }
}

impl Outbox {
    pub fn new(ota_dir: &Path) -> Outbox {
        Outbox {
            dir: ota_dir.join("outbox"),
            last_outcome: ota_dir.join("last-outcome.json"),
            refresh: Arc::default(),
        }
    }

    /// Queued outcomes, oldest first, as (sequence, path).
    fn queued(&self) -> Vec<(u64, PathBuf)> {
        let mut queued: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                let sequence = name.to_str()?.strip_suffix(".json")?.parse().ok()?;
                Some((sequence, entry.path()))
            })
            .collect();
        queued.sort();
        queued
    }

    /// Reports waiting: the outcomes on disk and the refresh in memory.
    pub fn len(&self) -> usize {
        self.queued().len() + usize::from(self.lock().report.is_some())
    }

    /// Queues the outcome `report` durably, records it as the last outcome, and drops the
    /// refresh waiting in memory (older than this report). When the disk refuses it, the
    /// outcome waits in memory as the refresh does.
    pub fn push(&self, report: &NodeReport) -> Result<(), QueueError> {
        let queued = self.queued();
        let next = queued.last().map_or(1, |(sequence, _)| sequence + 1);
        let path = self.dir.join(format!("{next:020}.json"));
        let bytes = serde_json::to_vec(report).map_err(QueueError::Encode)?;
        {
            let mut refresh = self.lock();
            refresh.generation += 1;
            refresh.report = None;
        }
        if let Err(source) = pimesh_runtime::atomic_file::replace(&path, &bytes, 0o600) {
            // Not durable, but not lost while the supervisor runs.
            self.refresh(report.clone());
            return Err(QueueError::Write { path, source });
        }
        if let Err(err) = pimesh_runtime::atomic_file::replace(&self.last_outcome, &bytes, 0o600) {
            // Only a restart's first refresh needs it; the outcome itself is queued.
            tracing::warn!(file = %self.last_outcome.display(), %err, "cannot keep the last outcome");
        }
        let excess = (queued.len() + 1).saturating_sub(MAX_QUEUED);
        for (_, old) in queued.iter().take(excess) {
            tracing::warn!(file = %old.display(), "outbox full: dropping the oldest report");
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    }

    /// Queues the refresh `report` in memory, in place of any refresh not yet delivered.
    pub fn refresh(&self, report: NodeReport) {
        let mut refresh = self.lock();
        refresh.generation += 1;
        refresh.report = Some(report);
    }

    /// The last outcome queued by any supervisor on this node (`None`: none, or the file
    /// is unreadable).
    pub fn last_outcome(&self) -> Option<NodeReport> {
        let bytes = std::fs::read(&self.last_outcome).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(report) => Some(report),
            Err(err) => {
                tracing::warn!(file = %self.last_outcome.display(), %err, "ignoring an unreadable last outcome");
                None
            }
        }
    }

    /// The report to deliver next: the oldest outcome on disk, else the refresh. A file
    /// that does not decode (damaged disk) is dropped.
    pub fn next(&self) -> Option<Next> {
        for (_, path) in self.queued() {
            match std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            {
                Some(report) => return Some(Next::Outcome { path, report }),
                None => {
                    tracing::warn!(file = %path.display(), "dropping an unreadable queued report");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let refresh = self.lock();
        refresh.report.clone().map(|report| Next::Refresh {
            generation: refresh.generation,
            report,
        })
    }

    /// Forgets a report that was delivered (a refresh only if nothing was queued since).
    pub fn delivered(&self, next: &Next) {
        match next {
            Next::Outcome { path, .. } => {
                if let Err(err) = std::fs::remove_file(path) {
                    tracing::warn!(file = %path.display(), %err, "cannot remove a delivered report");
                }
            }
            Next::Refresh { generation, .. } => {
                let mut refresh = self.lock();
                if refresh.generation == *generation {
                    refresh.report = None;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Refresh> {
        self.refresh.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use pimesh_revision::{MeshTraffic, ReportState};

    use super::*;

    fn report(n: u64) -> NodeReport {
        NodeReport {
            revision: Some(n),
            state: ReportState::Applied,
            detail: String::new(),
            about: None,
            k3s: None,
            certificates: None,
            traffic: None,
        }
    }

    fn refreshed(n: u64, window_s: u64) -> NodeReport {
        NodeReport {
            traffic: Some(MeshTraffic {
                window_s,
                services: Vec::new(),
            }),
            ..report(n)
        }
    }

    /// Delivers everything waiting, in order.
    fn drain(outbox: &Outbox) -> Vec<NodeReport> {
        let mut sent = Vec::new();
        while let Some(next) = outbox.next() {
            sent.push(next.report().clone());
            outbox.delivered(&next);
        }
        sent
    }

    fn files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("outbox")).map_or(0, Iterator::count)
    }

    #[test]
    fn reports_leave_oldest_first_and_survive_a_new_outbox() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::new(dir.path());
        assert!(outbox.next().is_none());
        outbox.push(&report(1)).expect("push");
        outbox.push(&report(2)).expect("push");
        let reopened = Outbox::new(dir.path());
        assert_eq!(reopened.len(), 2);
        assert_eq!(drain(&reopened), vec![report(1), report(2)]);
        assert_eq!(reopened.len(), 0);
    }

    #[test]
    fn the_outbox_is_bounded_by_dropping_the_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::new(dir.path());
        for n in 0..(MAX_QUEUED as u64 + 5) {
            outbox.push(&report(n)).expect("push");
        }
        assert_eq!(outbox.len(), MAX_QUEUED);
        assert_eq!(outbox.next().map(|n| n.report().clone()), Some(report(5)));
    }

    #[test]
    fn a_refresh_stays_in_memory_and_leaves_after_the_outcomes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::new(dir.path());
        outbox.push(&report(1)).expect("push");
        outbox.refresh(refreshed(1, 60));
        outbox.refresh(refreshed(1, 120));
        assert_eq!(files(dir.path()), 1, "only the outcome is on disk");
        assert_eq!(outbox.len(), 2);
        assert_eq!(
            drain(&outbox),
            vec![report(1), refreshed(1, 120)],
            "the newest refresh replaced the older one"
        );
        assert!(
            Outbox::new(dir.path()).next().is_none(),
            "a new supervisor has nothing to send"
        );
    }

    #[test]
    fn an_outcome_drops_the_older_refresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::new(dir.path());
        outbox.refresh(refreshed(1, 60));
        outbox.push(&report(2)).expect("push");
        assert_eq!(drain(&outbox), vec![report(2)]);
    }

    #[test]
    fn a_refresh_queued_while_another_was_sent_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::new(dir.path());
        outbox.refresh(refreshed(1, 60));
        let sending = outbox.next().expect("the refresh");
        // The next window's refresh arrives while the first is on the wire.
        let sharing = outbox.clone();
        sharing.refresh(refreshed(1, 120));
        outbox.delivered(&sending);
        assert_eq!(drain(&outbox), vec![refreshed(1, 120)]);
    }

    #[test]
    fn the_last_outcome_outlives_its_delivery_and_the_supervisor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::new(dir.path());
        assert_eq!(outbox.last_outcome(), None);
        outbox.push(&report(1)).expect("push");
        outbox.push(&report(2)).expect("push");
        outbox.refresh(refreshed(2, 60));
        drain(&outbox);
        assert_eq!(Outbox::new(dir.path()).last_outcome(), Some(report(2)));
        std::fs::write(dir.path().join("last-outcome.json"), b"{\"revision\":").expect("write");
        assert_eq!(outbox.last_outcome(), None, "a torn file is ignored");
    }

    #[test]
    fn an_outcome_the_disk_refuses_waits_in_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A file where the outbox folder should be: nothing can be written under it.
        std::fs::write(dir.path().join("outbox"), b"").expect("write");
        let outbox = Outbox::new(dir.path());
        assert!(outbox.push(&report(3)).is_err());
        assert_eq!(drain(&outbox), vec![report(3)]);
    }

    #[test]
    fn queued_files_of_any_supervisor_are_delivered_as_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::new(dir.path());
        let queued = dir.path().join("outbox");
        std::fs::create_dir_all(&queued).expect("mkdir");
        // One as this supervisor writes it, one of a newer supervisor's states.
        let written = r#"{"revision":3,"state":"reverted","detail":"revision 4: not confirmed"}"#;
        let newer = r#"{"revision":4,"state":"draining","detail":""}"#;
        std::fs::write(queued.join(format!("{:020}.json", 1)), written).expect("write");
        std::fs::write(queued.join(format!("{:020}.json", 2)), newer).expect("write");
        let first = outbox.next().expect("a report");
        assert_eq!(first.report().state, ReportState::Reverted);
        assert_eq!(
            serde_json::to_string(first.report()).expect("encode"),
            written
        );
        outbox.delivered(&first);
        let second = outbox.next().expect("the newer report is kept");
        assert_eq!(
            serde_json::to_string(second.report()).expect("encode"),
            newer
        );
    }
}
