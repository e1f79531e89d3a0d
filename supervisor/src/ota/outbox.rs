//! Store-and-forward of the node's reports to the central server.
//!
//! A report is written to disk (`outbox/<sequence>.json`, atomically) before anything
//! tries to send it, and deleted only after the central server took it (or refused it for
//! good, with a 4xx). Reports go out oldest first, so the central server ends on the
//! node's latest word even after days offline. The outbox is bounded: past
//! [`MAX_QUEUED`] reports the oldest are dropped, as only the latest state matters most.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use pimesh_revision::NodeReport;

/// At most this many reports wait on disk.
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

pub struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    pub fn new(ota_dir: &Path) -> Outbox {
        Outbox {
            dir: ota_dir.join("outbox"),
        }
    }

    /// Queued reports, oldest first, as (sequence, path).
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

    pub fn len(&self) -> usize {
        self.queued().len()
    }

    /// Queues `report` durably.
    pub fn push(&self, report: &NodeReport) -> Result<(), QueueError> {
        let queued = self.queued();
        let next = queued.last().map_or(1, |(sequence, _)| sequence + 1);
        let path = self.dir.join(format!("{next:020}.json"));
        let bytes = serde_json::to_vec(report).map_err(QueueError::Encode)?;
        if let Err(source) = pimesh_runtime::atomic_file::replace(&path, &bytes, 0o600) {
            return Err(QueueError::Write { path, source });
        }
        let excess = (queued.len() + 1).saturating_sub(MAX_QUEUED);
        for (_, old) in queued.iter().take(excess) {
            tracing::warn!(file = %old.display(), "outbox full: dropping the oldest report");
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    }

    /// The oldest queued report. A file that does not decode (damaged disk) is dropped.
    pub fn oldest(&self) -> Option<(PathBuf, NodeReport)> {
        for (_, path) in self.queued() {
            match std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            {
                Some(report) => return Some((path, report)),
                None => {
                    tracing::warn!(file = %path.display(), "dropping an unreadable queued report");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        None
    }

    /// Removes a report that was delivered.
    pub fn remove(&self, path: &Path) {
        if let Err(err) = std::fs::remove_file(path) {
            tracing::warn!(file = %path.display(), %err, "cannot remove a delivered report");
        }
    }
}

#[cfg(test)]
mod tests {
    use pimesh_revision::ReportState;

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

    #[test]
    fn reports_leave_oldest_first_and_survive_a_new_outbox() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::new(dir.path());
        assert!(outbox.oldest().is_none());
        outbox.push(&report(1)).expect("push");
        outbox.push(&report(2)).expect("push");
        let reopened = Outbox::new(dir.path());
        assert_eq!(reopened.len(), 2);
        let (path, first) = reopened.oldest().expect("a report");
        assert_eq!(first, report(1));
        reopened.remove(&path);
        assert_eq!(reopened.oldest().map(|(_, r)| r), Some(report(2)));
    }

    #[test]
    fn the_outbox_is_bounded_by_dropping_the_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Outbox::new(dir.path());
        for n in 0..(MAX_QUEUED as u64 + 5) {
            outbox.push(&report(n)).expect("push");
        }
        assert_eq!(outbox.len(), MAX_QUEUED);
        assert_eq!(outbox.oldest().map(|(_, r)| r), Some(report(5)));
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
        let (path, first) = outbox.oldest().expect("a report");
        assert_eq!(first.state, ReportState::Reverted);
        assert_eq!(serde_json::to_string(&first).expect("encode"), written);
        outbox.remove(&path);
        let (_, second) = outbox.oldest().expect("the newer report is kept");
        assert_eq!(serde_json::to_string(&second).expect("encode"), newer);
    }
}
