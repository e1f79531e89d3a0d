//! The embedded storage of a single central server: one file per revision, rollout and
//! node report, each written atomically, so that a crash or power cut during a publish
//! leaves the revision either whole or absent — never half-stored.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use pimesh_revision::{RecordedReport, Rollout, SignedRevision};
use pimesh_runtime::atomic_file;
use pimesh_schema::DnsLabel;
use tracing::warn;

use super::{RolloutChange, Storage};

/// `<root>/<site>/revisions/<n>.json`, `<root>/<site>/rollouts/<n>.json` and
/// `<root>/<site>/reports/<node>.json`.
pub struct FileStorage {
    root: PathBuf,
    /// Held through each rollout change: one at a time.
    rollout_changes: Mutex<()>,
}

impl FileStorage {
    pub fn new(root: &Path) -> io::Result<FileStorage> {
        std::fs::create_dir_all(root)?;
        Ok(FileStorage {
            root: root.to_path_buf(),
            rollout_changes: Mutex::new(()),
        })
    }

    fn revisions_dir(&self, site: &DnsLabel) -> PathBuf {
        self.root.join(site.as_str()).join("revisions")
    }

    fn reports_dir(&self, site: &DnsLabel) -> PathBuf {
        self.root.join(site.as_str()).join("reports")
    }

    fn rollouts_dir(&self, site: &DnsLabel) -> PathBuf {
        self.root.join(site.as_str()).join("rollouts")
    }

    fn rollout_file(&self, site: &DnsLabel, revision: u64) -> PathBuf {
        self.rollouts_dir(site).join(format!("{revision}.json"))
    }
}

/// The JSON document at `path`, when it exists; a file that does not parse is logged and
/// read as absent (an interrupted write never leaves one: every write is atomic).
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    match serde_json::from_slice(&bytes) {
        Ok(value) => Ok(Some(value)),
        Err(err) => {
            warn!(file = %path.display(), %err, "stored document unreadable; skipped");
            Ok(None)
        }
    }
}

/// JSON files in `dir` named `<stem>.json`, by stem; temporary files of interrupted writes
/// (hidden, `.*.tmp-*`) are not listed.
fn json_files(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        if let Some(stem) = name.strip_suffix(".json") {
            files.push((stem.to_owned(), path.clone()));
        }
    }
    Ok(files)
}

impl Storage for FileStorage {
    fn latest(&self, site: &DnsLabel) -> io::Result<Option<SignedRevision>> {
        let mut numbered: Vec<(u64, PathBuf)> = json_files(&self.revisions_dir(site))?
            .into_iter()
            .filter_map(|(stem, path)| stem.parse().ok().map(|n| (n, path)))
            .collect();
        numbered.sort();
        while let Some((number, path)) = numbered.pop() {
            match std::fs::read(&path).map(|bytes| serde_json::from_slice::<SignedRevision>(&bytes))
            {
                Ok(Ok(revision)) if revision.revision == number => return Ok(Some(revision)),
                Ok(_) => warn!(file = %path.display(), "stored revision unreadable; skipped"),
                Err(err) => {
                    warn!(file = %path.display(), %err, "stored revision unreadable; skipped")
                }
            }
        }
        Ok(None)
    }

    fn store(&self, revision: &SignedRevision) -> io::Result<()> {
        if let Some(newest) = self.latest(&revision.site)? {
            if newest.revision >= revision.revision {
                return Err(super::already_stored(&revision.site, newest.revision));
            }
        }
        let path = self
            .revisions_dir(&revision.site)
            .join(format!("{}.json", revision.revision));
        atomic_file::replace(&path, &revision.to_json(), 0o644).map(drop)
    }

    fn record_report(
        &self,
        site: &DnsLabel,
        node: &DnsLabel,
        report: &RecordedReport,
    ) -> io::Result<()> {
        let path = self.reports_dir(site).join(format!("{node}.json"));
        let bytes = serde_json::to_vec(report).map_err(io::Error::other)?;
        atomic_file::replace(&path, &bytes, 0o644).map(drop)
    }

    fn reports(&self, site: &DnsLabel) -> io::Result<BTreeMap<DnsLabel, RecordedReport>> {
        let mut reports = BTreeMap::new();
        for (stem, path) in json_files(&self.reports_dir(site))? {
            let Ok(node) = DnsLabel::try_from(stem) else {
                continue;
            };
            match std::fs::read(&path).map(|bytes| serde_json::from_slice::<RecordedReport>(&bytes))
            {
                Ok(Ok(report)) => {
                    reports.insert(node, report);
                }
                _ => warn!(file = %path.display(), "stored report unreadable; skipped"),
            }
        }
        Ok(reports)
    }

    fn report(&self, site: &DnsLabel, node: &DnsLabel) -> io::Result<Option<RecordedReport>> {
        read_json(&self.reports_dir(site).join(format!("{node}.json")))
    }

    fn revision(&self, site: &DnsLabel, number: u64) -> io::Result<Option<SignedRevision>> {
        let path = self.revisions_dir(site).join(format!("{number}.json"));
        Ok(read_json::<SignedRevision>(&path)?.filter(|revision| revision.revision == number))
    }

    fn update_rollout(
        &self,
        site: &DnsLabel,
        revision: u64,
        change: &mut RolloutChange<'_>,
    ) -> io::Result<Option<Rollout>> {
        let _one_at_a_time = self
            .rollout_changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let stored = self.rollout(site, revision)?;
        let Some(changed) = change(stored.as_ref()) else {
            return Ok(stored);
        };
        let bytes = serde_json::to_vec(&changed).map_err(io::Error::other)?;
        atomic_file::replace(&self.rollout_file(site, revision), &bytes, 0o644)?;
        Ok(Some(changed))
    }

    fn rollout(&self, site: &DnsLabel, revision: u64) -> io::Result<Option<Rollout>> {
        Ok(read_json::<Rollout>(&self.rollout_file(site, revision))?
            .filter(|rollout| rollout.revision == revision && &rollout.site == site))
    }

    fn rollouts(&self, site: &DnsLabel) -> io::Result<BTreeMap<u64, Rollout>> {
        let mut rollouts = BTreeMap::new();
        for (stem, path) in json_files(&self.rollouts_dir(site))? {
            let Ok(number) = stem.parse::<u64>() else {
                continue;
            };
            if let Some(rollout) = read_json::<Rollout>(&path)? {
                if rollout.revision == number && &rollout.site == site {
                    rollouts.insert(number, rollout);
                }
            }
        }
        Ok(rollouts)
    }
}

#[cfg(test)]
mod tests {
    use pimesh_revision::{NodeReport, ReportState};

    use super::*;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    #[test]
    fn a_report_is_kept_per_node_as_written_and_an_unknown_state_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FileStorage::new(dir.path()).expect("storage");
        let site = label("depot-7");
        // A report file as the server has always written it.
        let reports = dir.path().join("depot-7/reports");
        std::fs::create_dir_all(&reports).expect("mkdir");
        let stored = r#"{"revision":3,"state":"rolled-back","detail":"revision 4: unhealthy","received_at":1764000000}"#;
        std::fs::write(reports.join("pi-a.json"), stored).expect("write");
        // A newer node's report with a state this server does not know.
        let newer = RecordedReport {
            report: serde_json::from_str(r#"{"revision":4,"state":"draining","detail":"x"}"#)
                .expect("report"),
            received_at: 7,
        };
        storage
            .record_report(&site, &label("pi-b"), &newer)
            .expect("record");

        let read = storage.reports(&site).expect("reports");
        assert_eq!(
            read.get(&label("pi-a")),
            Some(&RecordedReport {
                report: NodeReport {
                    revision: Some(3),
                    state: ReportState::RolledBack,
                    detail: "revision 4: unhealthy".to_owned(),
                    about: None,
                    k3s: None,
                    certificates: None,
                    traffic: None,
                },
                received_at: 1_764_000_000,
            })
        );
        assert_eq!(read.get(&label("pi-b")), Some(&newer));
        assert_eq!(
            std::fs::read_to_string(reports.join("pi-b.json")).expect("read"),
            r#"{"revision":4,"state":"draining","detail":"x","received_at":7}"#
        );
    }
}
