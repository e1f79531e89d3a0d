//! The OTA journal: what the node runs, what it is in the middle of, and how far it has
//! read the site's revision history. One small JSON file, replaced atomically, so that a
//! power cut at any instant leaves the previous or the next journal entry — and the
//! journal, read at start, says exactly which work to finish.
//!
//! Invariant kept by [`crate::ota`]: the active `cluster.toml` holds the configuration of
//! `pending.revision` while a revision is pending (or is about to, when the cut came
//! before the write), and of `committed` otherwise (no file when `committed` is `None`).

use std::io;
use std::path::{Path, PathBuf};

use pimesh_revision::Mode;
use serde::{Deserialize, Serialize};

/// The journal's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    /// The last revision that passed the health gate (and was not a trial): what the node
    /// falls back to. `None` before the first one.
    pub committed: Option<u64>,
    /// The highest revision whose signature and site verified: nothing at or below it is
    /// ever applied again (no replay, no downgrade).
    pub highest_verified: u64,
    /// Ask the central server only for revisions above this. At least `highest_verified`;
    /// also moved past revisions that were refused, so a bad one is not fetched again.
    /// Never used as a security floor: a lying server can only make the node wait.
    pub poll_after: u64,
    /// A revision written to the active configuration but not yet committed.
    pub pending: Option<Pending>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    pub revision: u64,
    pub mode: Mode,
    pub phase: Phase,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Phase {
    /// Written (or being written) and units being restarted; the health gate has not
    /// passed yet.
    Applying,
    /// A `try` revision that passed the health gate; it reverts at `until_ms` (Unix
    /// milliseconds) unless a newer revision arrives first.
    Trying { until_ms: u64 },
    /// Going back to `committed`; `outcome` (`rolled-back` or `reverted`) and `reason`
    /// are what gets reported when it is done.
    RollingBack { outcome: String, reason: String },
}

/// Where the journal lives.
pub struct JournalFile {
    path: PathBuf,
}

impl JournalFile {
    pub fn new(dir: &Path) -> JournalFile {
        JournalFile {
            path: dir.join("journal.json"),
        }
    }

    /// The journal on disk; an absent file is a node that never took a revision.
    pub fn load(&self) -> Result<Journal, String> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|err| format!("{}: not an OTA journal: {err}", self.path.display())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Journal::default()),
            Err(err) => Err(format!("cannot read {}: {err}", self.path.display())),
        }
    }

    /// Replaces the journal durably (temporary file, fsync, rename, fsync of the folder).
    pub fn store(&self, journal: &Journal) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(journal)
            .map_err(|err| format!("cannot encode the OTA journal: {err}"))?;
        pimesh_runtime::atomic_file::replace(&self.path, &bytes, 0o600)
            .map(|_changed| ())
            .map_err(|err| format!("cannot write {}: {err}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_survives_a_round_trip_and_absence_means_fresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = JournalFile::new(dir.path());
        assert_eq!(file.load(), Ok(Journal::default()));
        let journal = Journal {
            committed: Some(3),
            highest_verified: 5,
            poll_after: 6,
            pending: Some(Pending {
                revision: 5,
                mode: Mode::Try,
                phase: Phase::Trying { until_ms: 42 },
            }),
        };
        file.store(&journal).expect("store");
        assert_eq!(file.load(), Ok(journal));
    }

    #[test]
    fn a_damaged_journal_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = JournalFile::new(dir.path());
        std::fs::write(dir.path().join("journal.json"), b"{\"committed\": ").expect("write");
        let err = file.load().expect_err("damaged");
        assert!(err.contains("journal.json"), "{err}");
    }
}
