//! The revisions a node keeps on disk, and the one active configuration file.
//!
//! Every verified revision is stored as received (`revisions/<n>.json`, the signed
//! document) before it is applied, so that the committed revision and the one being tried
//! can always be re-read and re-verified; older ones are pruned once a newer one commits.
//! The active configuration (`/etc/pimesh/cluster.toml`, what the proxy and the control
//! replicas read) is only ever replaced whole.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use pimesh_revision::{Rejection, SignedRevision, Verifier};

/// Why a stored revision or the active configuration could not be used.
#[derive(Debug)]
pub enum RevisionsError {
    /// A file could not be stored, read, written, removed or synced: `op` says which.
    Io {
        op: FileOp,
        path: PathBuf,
        source: io::Error,
    },
    /// A stored revision no longer verifies.
    Refused {
        path: PathBuf,
        rejection: Box<Rejection>,
    },
    /// A stored revision holds another number than its file name.
    Misfiled {
        path: PathBuf,
        holds: u64,
        wanted: u64,
    },
}

/// What was done to a file when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    Store,
    Read,
    Write,
    Remove,
    Sync,
}

impl FileOp {
    fn verb(self) -> &'static str {
        match self {
            FileOp::Store => "store",
            FileOp::Read => "read",
            FileOp::Write => "write",
            FileOp::Remove => "remove",
            FileOp::Sync => "sync",
        }
    }

    fn on(self, path: &Path) -> impl FnOnce(io::Error) -> RevisionsError {
        let path = path.to_path_buf();
        move |source| RevisionsError::Io {
            op: self,
            path,
            source,
        }
    }
}

impl fmt::Display for RevisionsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RevisionsError::Io { op, path, source } => {
                write!(f, "cannot {} {}: {source}", op.verb(), path.display())
            }
            RevisionsError::Refused { path, rejection } => {
                write!(f, "{}: {rejection}", path.display())
            }
            RevisionsError::Misfiled {
                path,
                holds,
                wanted,
            } => write!(f, "{} holds revision {holds}, not {wanted}", path.display()),
        }
    }
}

impl std::error::Error for RevisionsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RevisionsError::Io { source, .. } => Some(source),
            RevisionsError::Refused { rejection, .. } => Some(rejection.as_ref()),
            RevisionsError::Misfiled { .. } => None,
        }
    }
}

/// The stored signed revisions and the active configuration file.
pub struct Revisions {
    dir: PathBuf,
    active: PathBuf,
}

impl Revisions {
    pub fn new(ota_dir: &Path, active: PathBuf) -> Revisions {
        Revisions {
            dir: ota_dir.join("revisions"),
            active,
        }
    }

    pub fn active_path(&self) -> &Path {
        &self.active
    }

    fn path_of(&self, revision: u64) -> PathBuf {
        self.dir.join(format!("{revision}.json"))
    }

    /// Stores the signed document of `revision` durably.
    pub fn store(&self, revision: u64, signed_json: &[u8]) -> Result<(), RevisionsError> {
        let path = self.path_of(revision);
        pimesh_runtime::atomic_file::replace(&path, signed_json, 0o600)
            .map(|_changed| ())
            .map_err(FileOp::Store.on(&path))
    }

    /// The stored revision, verified again (signature and site) against `verifier`: the
    /// disk is not trusted more than the network.
    pub fn load(
        &self,
        revision: u64,
        verifier: &Verifier,
    ) -> Result<SignedRevision, RevisionsError> {
        let path = self.path_of(revision);
        let bytes = std::fs::read(&path).map_err(FileOp::Read.on(&path))?;
        let signed = match verifier.verify_signature(&bytes) {
            Ok(signed) => signed,
            Err(rejection) => {
                return Err(RevisionsError::Refused {
                    path,
                    rejection: Box::new(rejection),
                })
            }
        };
        if signed.revision != revision {
            return Err(RevisionsError::Misfiled {
                path,
                holds: signed.revision,
                wanted: revision,
            });
        }
        Ok(signed)
    }

    /// Deletes stored revisions other than `keep`.
    pub fn prune(&self, keep: &[u64]) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let number = name
                .to_str()
                .and_then(|name| name.strip_suffix(".json"))
                .and_then(|stem| stem.parse::<u64>().ok());
            if number.is_some_and(|n| !keep.contains(&n)) {
                if let Err(err) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(file = %entry.path().display(), %err, "cannot prune an old revision");
                }
            }
        }
    }

    /// Makes `config` the active configuration (`None`: no site configuration at all).
    /// Returns whether the file changed.
    pub fn activate(&self, config: Option<&str>) -> Result<bool, RevisionsError> {
        let path = &self.active;
        match config {
            Some(text) => pimesh_runtime::atomic_file::replace(path, text.as_bytes(), 0o644)
                .map_err(FileOp::Write.on(path)),
            None => match std::fs::remove_file(path) {
                Ok(()) => {
                    sync_parent(path).map_err(FileOp::Sync.on(path))?;
                    Ok(true)
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(err) => Err(FileOp::Remove.on(path)(err)),
            },
        }
    }

    /// The active configuration's text, `None` when there is no file.
    pub fn active_text(&self) -> Result<Option<String>, RevisionsError> {
        match std::fs::read_to_string(&self.active) {
            Ok(text) => Ok(Some(text)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(FileOp::Read.on(&self.active)(err)),
        }
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// The hex SHA-256 of `bytes`: how the proxy names the configuration it runs, and how a
/// refused document is recognised when it is offered again.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
