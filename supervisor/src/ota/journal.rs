//! The OTA journal: what the node runs, what it is in the middle of, and how far it has
//! read the site's revision history. One small JSON file, replaced atomically, so that a
//! power cut at any instant leaves the previous or the next journal entry — and the
//! journal, read at start, says exactly which work to finish.
//!
//! Invariant kept by [`crate::ota`]: the active `cluster.toml` holds the configuration of
//! `pending.revision` while a revision is pending (or is about to, when the cut came
//! before the write), and of `committed` otherwise (no file when `committed` is `None`).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use pimesh_revision::Mode;
use serde::{Deserialize, Serialize};

use super::outcome::Rollback;

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
    /// Going back to `committed`; `outcome` and `reason` are what gets reported when it
    /// is done.
    RollingBack { outcome: Rollback, reason: String },
}

/// Why the journal could not be read or written.
#[derive(Debug)]
pub enum JournalError {
    Read {
        path: PathBuf,
        source: io::Error,
    },
    /// The file is there but is not a journal (damaged, or written by hand).
    Damaged {
        path: PathBuf,
        source: serde_json::Error,
    },
    Encode(serde_json::Error),
    Write {
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for JournalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JournalError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            JournalError::Damaged { path, source } => {
                write!(f, "{}: not an OTA journal: {source}", path.display())
            }
            JournalError::Encode(source) => write!(f, "cannot encode the OTA journal: {source}"),
            JournalError::Write { path, source } => {
                write!(f, "cannot write {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for JournalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            JournalError::Read { source, .. } | JournalError::Write { source, .. } => Some(source),
            JournalError::Damaged { source, .. } | JournalError::Encode(source) => Some(source),
        }
    }
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
    pub fn load(&self) -> Result<Journal, JournalError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| JournalError::Damaged {
                path: self.path.clone(),
                source,
            }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Journal::default()),
            Err(source) => Err(JournalError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Replaces the journal durably (temporary file, fsync, rename, fsync of the folder).
    pub fn store(&self, journal: &Journal) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec_pretty(journal).map_err(JournalError::Encode)?;
        pimesh_runtime::atomic_file::replace(&self.path, &bytes, 0o600)
            .map(|_changed| ())
            .map_err(|source| JournalError::Write {
                path: self.path.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_survives_a_round_trip_and_absence_means_fresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = JournalFile::new(dir.path());
        assert_eq!(file.load().expect("no journal yet"), Journal::default());
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
        assert_eq!(file.load().expect("load"), journal);
    }

    #[test]
    fn a_damaged_journal_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = JournalFile::new(dir.path());
        std::fs::write(dir.path().join("journal.json"), b"{\"committed\": ").expect("write");
        let err = file.load().expect_err("damaged");
        assert!(matches!(err, JournalError::Damaged { .. }), "{err:?}");
        assert!(err.to_string().contains("journal.json"), "{err}");
    }

    #[test]
    fn a_rollback_under_way_reads_as_every_supervisor_writes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = JournalFile::new(dir.path());
        for (outcome, written) in [
            (Rollback::Unhealthy, "rolled-back"),
            (Rollback::Unconfirmed, "reverted"),
        ] {
            let text = format!(
                r#"{{"committed": 3, "highest_verified": 4, "poll_after": 4, "pending":
                   {{"revision": 4, "mode": "try", "phase": {{"phase": "rolling-back",
                   "outcome": "{written}", "reason": "why"}}}}}}"#
            );
            std::fs::write(dir.path().join("journal.json"), text).expect("write");
            let journal = file.load().expect("load");
            let pending = journal.pending.clone().expect("pending");
            assert_eq!(
                pending.phase,
                Phase::RollingBack {
                    outcome,
                    reason: "why".to_owned()
                }
            );
            file.store(&journal).expect("store");
            let stored: serde_json::Value = serde_json::from_slice(
                &std::fs::read(dir.path().join("journal.json")).expect("read"),
            )
            .expect("json");
            assert_eq!(stored["pending"]["phase"]["outcome"], written);
        }
    }
}
