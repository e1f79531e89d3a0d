//! The revisions a node keeps on disk, and the one active configuration file.
//!
//! Every verified revision is stored as received (`revisions/<n>.json`, the signed
//! document) before it is applied, so that the committed revision and the one being tried
//! can always be re-read and re-verified; older ones are pruned once a newer one commits.
//! The active configuration (`/etc/pimesh/cluster.toml`, what the proxy and the control
//! replicas read) is only ever replaced whole.

use std::io;
use std::path::{Path, PathBuf};

use pimesh_revision::{SignedRevision, Verifier};

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
    pub fn store(&self, revision: u64, signed_json: &[u8]) -> Result<(), String> {
        let path = self.path_of(revision);
        pimesh_runtime::atomic_file::replace(&path, signed_json, 0o600)
            .map(|_changed| ())
            .map_err(|err| format!("cannot store {}: {err}", path.display()))
    }

    /// The stored revision, verified again (signature and site) against `verifier`: the
    /// disk is not trusted more than the network.
    pub fn load(&self, revision: u64, verifier: &Verifier) -> Result<SignedRevision, String> {
        let path = self.path_of(revision);
        let bytes =
            std::fs::read(&path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        let signed = verifier
            .verify_signature(&bytes)
            .map_err(|err| format!("{}: {err}", path.display()))?;
        if signed.revision != revision {
            return Err(format!(
                "{} holds revision {}, not {revision}",
                path.display(),
                signed.revision
            ));
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
    pub fn activate(&self, config: Option<&str>) -> Result<bool, String> {
        let path = &self.active;
        match config {
            Some(text) => pimesh_runtime::atomic_file::replace(path, text.as_bytes(), 0o644)
                .map_err(|err| format!("cannot write {}: {err}", path.display())),
            None => match std::fs::remove_file(path) {
                Ok(()) => {
                    sync_parent(path)
                        .map_err(|err| format!("cannot sync {}: {err}", path.display()))?;
                    Ok(true)
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(err) => Err(format!("cannot remove {}: {err}", path.display())),
            },
        }
    }

    /// The active configuration's text, `None` when there is no file.
    pub fn active_text(&self) -> Result<Option<String>, String> {
        match std::fs::read_to_string(&self.active) {
            Ok(text) => Ok(Some(text)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(format!("cannot read {}: {err}", self.active.display())),
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
