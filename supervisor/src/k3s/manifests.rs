//! The site configuration's `[k3s.manifests]` in K3s's auto-deploy folder
//! (`<data-dir>/server/manifests`), which every K3s server applies like `kubectl apply`
//! when a file appears or changes.
//!
//! Invariants:
//! - only a K3s server's folder is written (an agent has no deploy controller); the
//!   placement calls [`sync`] for server roles only, each time it is applied, so a site
//!   configuration taken over the air takes effect at once;
//! - manifest `<name>` is the file `pimesh-<name>.yaml`, mode 0600 (a manifest may hold a
//!   Secret), written atomically and only when its content changed (K3s re-applies a file
//!   whose modification time changed);
//! - a `pimesh-*.yaml` file the configuration no longer lists is emptied (a comment and no
//!   object), not deleted: K3s keeps the objects of a deleted file in the cluster, but
//!   prunes those a changed file no longer holds, so a manifest dropped from the site
//!   configuration takes its objects with it. Every other file there (K3s's own packaged
//!   manifests, the user's) is never touched;
//! - folders this module creates are mode 0700, as K3s makes its data folder.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use pimesh_schema::cluster::K3sManifest;
use pimesh_schema::DnsLabel;
use tracing::info;

use crate::file_error::FileError;

/// The prefix of every file this module owns in the folder.
pub const PREFIX: &str = "pimesh-";
/// The suffix of every file this module owns in the folder.
pub const SUFFIX: &str = ".yaml";
/// The mode of each manifest written.
pub const MODE: u32 = 0o600;

/// What the top of each written file says.
const HEADER: &str = "\
# Written by pimesh-supervisor from the site configuration's [k3s.manifests]; rewritten
# when it changes and emptied when it no longer lists this manifest. Changes made here are
# lost: change cluster.toml.
";

/// The whole text of a manifest the configuration dropped.
pub const EMPTIED: &str = "\
# Dropped from the site configuration's [k3s.manifests] by pimesh-supervisor: emptied, so
# that K3s deletes the objects it held (K3s keeps the objects of a deleted file).
";

/// The file of manifest `name` in `dir`.
pub fn file_of(dir: &Path, name: &DnsLabel) -> PathBuf {
    dir.join(format!("{PREFIX}{name}{SUFFIX}"))
}

/// The text written for `manifest`: the header, then the manifest as written.
pub fn rendered(manifest: &K3sManifest) -> String {
    let text = manifest.text();
    let newline = if text.ends_with('\n') { "" } else { "\n" };
    format!("{HEADER}{text}{newline}")
}

/// Brings `dir` in line with `manifests` (see the module doc). Returns the names of the
/// manifests now in the folder, in order (not the emptied ones); stops at the first
/// failure.
pub fn sync(
    dir: &Path,
    manifests: &BTreeMap<DnsLabel, K3sManifest>,
) -> Result<Vec<String>, FileError> {
    let fail = FileError::on;
    if !manifests.is_empty() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(fail("create", dir))?;
    }
    let mut written = Vec::new();
    for (name, manifest) in manifests {
        let file = file_of(dir, name);
        let changed =
            pimesh_runtime::atomic_file::replace(&file, rendered(manifest).as_bytes(), MODE)
                .map_err(fail("write", &file))?;
        if changed {
            info!(file = %file.display(), "K3s manifest written");
        }
        written.push(name.as_str().to_owned());
    }
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(written),
        Err(err) => return Err(fail("list", dir)(err)),
    };
    for entry in entries {
        let entry = entry.map_err(fail("list", dir))?;
        let file_name = entry.file_name();
        let Some(stale) = owned_name(&file_name.to_string_lossy()) else {
            continue;
        };
        if written.contains(&stale) {
            continue;
        }
        let path = entry.path();
        let emptied = pimesh_runtime::atomic_file::replace(&path, EMPTIED.as_bytes(), MODE)
            .map_err(fail("empty", &path))?;
        if emptied {
            info!(file = %path.display(), "K3s manifest emptied: the site configuration no longer lists it (K3s deletes its objects)");
        }
    }
    Ok(written)
}

/// The manifest name of a file this module owns (`pimesh-<name>.yaml`), else `None`.
fn owned_name(file_name: &str) -> Option<String> {
    file_name
        .strip_prefix(PREFIX)?
        .strip_suffix(SUFFIX)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn manifests(names: &[&str]) -> BTreeMap<DnsLabel, K3sManifest> {
        names
            .iter()
            .map(|name| {
                let text = format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n");
                (
                    DnsLabel::try_from((*name).to_owned()).expect("label"),
                    K3sManifest::parse(text).expect("manifest"),
                )
            })
            .collect()
    }

    #[test]
    fn manifests_are_written_once_and_those_dropped_are_emptied_but_no_other_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let folder = dir.path().join("server/manifests");
        assert_eq!(
            sync(&folder, &BTreeMap::new()).expect("nothing"),
            Vec::<String>::new()
        );
        assert!(!folder.exists(), "no folder is made for nothing");

        let written = sync(&folder, &manifests(&["tracker", "web"])).expect("written");
        assert_eq!(written, ["tracker", "web"]);
        let tracker = folder.join("pimesh-tracker.yaml");
        let text = fs::read_to_string(&tracker).expect("tracker");
        assert!(text.starts_with("# Written by pimesh-supervisor"), "{text}");
        assert!(text.ends_with("metadata:\n  name: tracker\n"), "{text}");
        let mode = |path: &Path| fs::metadata(path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&tracker), 0o600);
        assert_eq!(mode(&folder), 0o700);

        // K3s's own manifests and the user's are left alone.
        for other in ["coredns.yaml", "mine.yaml", "pimesh-notes.txt"] {
            fs::write(folder.join(other), "kind: x\n").expect("other");
        }
        let before = fs::metadata(&tracker)
            .expect("meta")
            .modified()
            .expect("mtime");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let written = sync(&folder, &manifests(&["tracker"])).expect("synced");
        assert_eq!(written, ["tracker"]);
        let after = fs::metadata(&tracker)
            .expect("meta")
            .modified()
            .expect("mtime");
        assert_eq!(before, after, "an unchanged manifest is not rewritten");
        let mut names: Vec<String> = fs::read_dir(&folder)
            .expect("list")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "coredns.yaml",
                "mine.yaml",
                "pimesh-notes.txt",
                "pimesh-tracker.yaml",
                "pimesh-web.yaml"
            ]
        );
        let web = folder.join("pimesh-web.yaml");
        assert_eq!(fs::read_to_string(&web).expect("web"), EMPTIED);

        assert_eq!(
            sync(&folder, &BTreeMap::new()).expect("emptied"),
            Vec::<String>::new()
        );
        assert_eq!(fs::read_to_string(&tracker).expect("tracker"), EMPTIED);
        assert_eq!(
            fs::read_to_string(folder.join("coredns.yaml")).expect("k3s's"),
            "kind: x\n"
        );
        // Back in the configuration, it is written again.
        sync(&folder, &manifests(&["web"])).expect("again");
        assert!(fs::read_to_string(&web).expect("web").contains("name: web"));
    }

    #[test]
    fn only_pimesh_yaml_files_are_ours() {
        assert_eq!(owned_name("pimesh-web.yaml").as_deref(), Some("web"));
        assert_eq!(owned_name("pimesh-.yaml"), None);
        assert_eq!(owned_name("pimesh-web.yml"), None);
        assert_eq!(owned_name(".pimesh-web.yaml.tmp-12"), None);
        assert_eq!(owned_name("web.yaml"), None);
    }
}
