//! Where revisions and node reports live. [`Storage`] is what the API needs; [`FileStorage`]
//! is the embedded default: one file per revision and per node report, each written
//! atomically, so a crash or power cut during a publish leaves the revision either whole
//! or absent — never half-stored. A PostgreSQL implementation can follow for several
//! central replicas behind a load balancer.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use pimesh_revision::SignedRevision;
use pimesh_runtime::atomic_file;
use pimesh_schema::DnsLabel;
use serde::{Deserialize, Serialize};
use tracing::warn;

/// What a node last said about its configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The revision the node runs (`None`: none yet).
    pub revision: Option<u64>,
    /// `applied`, `rejected`, `rolled-back` or `pending`.
    pub state: String,
    /// Why, for anything but `applied`.
    #[serde(default)]
    pub detail: String,
    /// Seconds since the Unix epoch when the central server received the report.
    #[serde(default)]
    pub received_at: u64,
}

pub trait Storage: Send + Sync {
    /// The newest stored revision of `site`.
    fn latest(&self, site: &DnsLabel) -> io::Result<Option<SignedRevision>>;
    /// Stores a revision durably; returns once it survives a power cut.
    fn store(&self, revision: &SignedRevision) -> io::Result<()>;
    fn record_report(
        &self,
        site: &DnsLabel,
        node: &DnsLabel,
        report: &NodeReport,
    ) -> io::Result<()>;
    fn reports(&self, site: &DnsLabel) -> io::Result<BTreeMap<DnsLabel, NodeReport>>;
}

/// `<root>/<site>/revisions/<n>.json` and `<root>/<site>/reports/<node>.json`.
pub struct FileStorage {
    root: PathBuf,
}

impl FileStorage {
    pub fn new(root: &Path) -> io::Result<FileStorage> {
        std::fs::create_dir_all(root)?;
        Ok(FileStorage {
            root: root.to_path_buf(),
        })
    }

    fn revisions_dir(&self, site: &DnsLabel) -> PathBuf {
        self.root.join(site.as_str()).join("revisions")
    }

    fn reports_dir(&self, site: &DnsLabel) -> PathBuf {
        self.root.join(site.as_str()).join("reports")
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
        let path = self
            .revisions_dir(&revision.site)
            .join(format!("{}.json", revision.revision));
        atomic_file::replace(&path, &revision.to_json(), 0o644).map(drop)
    }

    fn record_report(
        &self,
        site: &DnsLabel,
        node: &DnsLabel,
        report: &NodeReport,
    ) -> io::Result<()> {
        let path = self.reports_dir(site).join(format!("{node}.json"));
        let bytes = serde_json::to_vec(report).map_err(io::Error::other)?;
        atomic_file::replace(&path, &bytes, 0o644).map(drop)
    }

    fn reports(&self, site: &DnsLabel) -> io::Result<BTreeMap<DnsLabel, NodeReport>> {
        let mut reports = BTreeMap::new();
        for (stem, path) in json_files(&self.reports_dir(site))? {
            let Ok(node) = DnsLabel::try_from(stem) else {
                continue;
            };
            match std::fs::read(&path).map(|bytes| serde_json::from_slice::<NodeReport>(&bytes)) {
                Ok(Ok(report)) => {
                    reports.insert(node, report);
                }
                _ => warn!(file = %path.display(), "stored report unreadable; skipped"),
            }
        }
        Ok(reports)
    }
}
