//! K3s's auto-deploying manifests (the deploy controller) as the fixture runs them: the
//! files in `<data-dir>/server/manifests/` (and its subfolders) are applied at start and
//! whenever their content changes, checked every 2 s (K3s: every 15 s, on a new mtime).
//!
//! As in K3s (k3s-io/k3s `pkg/deploy/controller.go`):
//! - only `.yaml`, `.yml` and `.json` files (any case); dotfiles are skipped, and so is a
//!   file `F` when a file `F.skip` exists anywhere under the folder;
//! - each file is an AddOn named by its file name up to the first `.`; a changed file is
//!   applied again, and objects it applied before that are no longer in it are deleted;
//! - a deleted (or newly skipped) file changes nothing: its objects stay. (An emptied
//!   file deletes them: nothing is left in it.)
//!
//! Simplifications: Namespaces, Services and EndpointSlices are stored (see `objects`),
//! other kinds are logged and ignored; a document that is not valid YAML or not a valid
//! object is logged and skipped while the file's other documents apply (K3s fails the
//! whole file, or the one object); the objects live in memory, so after a restart only
//! the files present are applied again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::ClusterState;
use crate::log::{error, info};
use crate::objects::{parse, Cidr, Parsed, Store};

/// Between two scans of the folder.
pub const SCAN_EVERY: Duration = Duration::from_secs(2);

/// The manifests folder and what was last applied from it.
pub struct Watcher {
    dir: PathBuf,
    cidr: Cidr,
    /// Per file, the SHA-256 of the content last applied, or why it could not be read.
    seen: BTreeMap<PathBuf, String>,
    listing_error: Option<String>,
}

impl Watcher {
    /// Watches `dir` (made if missing, as K3s makes it).
    pub fn new(dir: PathBuf, cidr: Cidr) -> Watcher {
        if let Err(err) = std::fs::create_dir_all(&dir) {
            error(&format!(
                "k3s fixture: cannot make {}: {err}",
                dir.display()
            ));
        }
        Watcher {
            dir,
            cidr,
            seen: BTreeMap::new(),
            listing_error: None,
        }
    }

    /// Scans every [`SCAN_EVERY`] until the process ends.
    pub async fn run(mut self, state: Arc<ClusterState>) {
        let mut every = tokio::time::interval(SCAN_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.scan(&mut state.objects());
        }
    }

    /// Applies the files that are new or changed since the last scan.
    pub fn scan(&mut self, store: &mut Store) {
        let mut files = Vec::new();
        if let Err(err) = walk(&self.dir, true, &mut files) {
            let err = format!("Failed to process config: {}: {err}", self.dir.display());
            if self.listing_error.as_ref() != Some(&err) {
                error(&format!("k3s fixture: {err}"));
            }
            self.listing_error = Some(err);
            return;
        }
        self.listing_error = None;
        files.sort();
        let name = |path: &Path| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let skips: BTreeSet<String> = files
            .iter()
            .filter_map(|path| name(path).strip_suffix(".skip").map(str::to_owned))
            .collect();
        let mut present = BTreeSet::new();
        for path in files {
            let file = name(&path);
            if file.starts_with('.') || skips.contains(&file) || !manifest_name(&file) {
                continue;
            }
            present.insert(path.clone());
            let (version, content) = match std::fs::read(&path) {
                Ok(content) => (crate::token::sha256_hex(&content), Some(content)),
                Err(err) => (format!("unreadable: {err}"), None),
            };
            if self.seen.get(&path) == Some(&version) {
                continue;
            }
            self.seen.insert(path.clone(), version.clone());
            match content {
                Some(content) => self.apply(&path, &String::from_utf8_lossy(&content), store),
                None => error(&format!(
                    "k3s fixture: failed to process {}: {version}",
                    path.display()
                )),
            }
        }
        self.seen.retain(|path, _| {
            let keep = present.contains(path);
            if !keep {
                info(&format!(
                    "k3s fixture: no longer applying {} (deleted or skipped); its objects stay, as in K3s",
                    path.display()
                ));
            }
            keep
        });
    }

    fn apply(&self, path: &Path, text: &str, store: &mut Store) {
        let file = path.display();
        let mut objects = Vec::new();
        for (index, doc) in documents(text).into_iter().enumerate() {
            let number = index + 1;
            let value = match serde_yaml_ng::from_str::<serde_json::Value>(doc) {
                Ok(value) => value,
                Err(err) => {
                    error(&format!(
                        "k3s fixture: {file} document {number}: not valid YAML: {err}; skipped"
                    ));
                    continue;
                }
            };
            match parse(value, &self.cidr) {
                Ok(Parsed::Object(object)) => objects.push((number, object)),
                Ok(Parsed::Unsupported(kind)) => crate::log::warn(&format!(
                    "k3s fixture does not apply kind {kind} (file {file})"
                )),
                Err(invalid) => error(&format!(
                    "k3s fixture: {file} document {number}: invalid {}: {}; skipped",
                    invalid.field, invalid.message
                )),
            }
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let count = objects.len();
        let errors = store.apply(addon(&name), objects);
        for (number, err) in &errors {
            error(&format!(
                "k3s fixture: {file} document {number}: {err}; skipped"
            ));
        }
        info(&format!(
            "k3s fixture: applied manifest {file}: {} objects",
            count - errors.len()
        ));
    }
}

/// The files under `dir`, descending into subfolders (following symbolic links only at
/// the top level, as K3s).
fn walk(dir: &Path, top: bool, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        let folder = kind.is_dir() || (top && kind.is_symlink() && path.is_dir());
        if folder {
            walk(&path, false, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

fn manifest_name(file: &str) -> bool {
    let lower = file.to_ascii_lowercase();
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| lower.ends_with(ext))
}

/// The AddOn of a file: its name up to the first `.`.
fn addon(file: &str) -> &str {
    file.split('.').next().unwrap_or(file)
}

/// The YAML documents of `text`, split at lines starting with `---` (as Kubernetes's
/// YAML reader does), without those holding only comments and blank lines.
fn documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("---") {
            let rest = rest.trim();
            if rest.is_empty() || rest.starts_with('#') {
                docs.push(&text[start..offset]);
                start = offset + line.len();
            }
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs.retain(|doc| {
        doc.lines()
            .map(str::trim)
            .any(|l| !l.is_empty() && !l.starts_with('#'))
    });
    docs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{Kind, Selector};

    #[test]
    fn documents_are_split_at_separator_lines() {
        let text = "# header\n---\na: 1\n--- # next\nb: '---'\n---\n\n# only a comment\n---\nc: 3";
        assert_eq!(documents(text), vec!["a: 1\n", "b: '---'\n", "c: 3"]);
        assert_eq!(documents("{\"a\": 1}"), vec!["{\"a\": 1}"]);
    }

    #[test]
    fn files_are_applied_changed_skipped_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        let cidr = Cidr::from_flag(&[]).unwrap();
        let mut store = Store::new(cidr);
        let mut watcher = Watcher::new(manifests.clone(), cidr);
        let svc = |name: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports:\n  - port: 80\n")
        };
        let names = |store: &Store| -> Vec<String> {
            let list: serde_json::Value = serde_json::from_str(&store.list(
                Kind::Service,
                Some("default"),
                &Selector::parse("").unwrap(),
            ))
            .unwrap();
            list["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["metadata"]["name"].as_str().unwrap().to_owned())
                .collect()
        };
        std::fs::write(
            manifests.join("a.yaml"),
            format!("{}---\n{}", svc("one"), svc("two")),
        )
        .unwrap();
        std::fs::write(
            manifests.join("b.YML"),
            format!("{}---\nkind: Service\n", svc("bad-doc-next")),
        )
        .unwrap();
        std::fs::write(manifests.join("c.yaml"), svc("skipped")).unwrap();
        std::fs::write(manifests.join("c.yaml.skip"), "").unwrap();
        std::fs::write(manifests.join(".d.yaml"), svc("dotfile")).unwrap();
        std::fs::write(manifests.join("e.txt"), svc("text")).unwrap();
        std::fs::create_dir(manifests.join("sub")).unwrap();
        std::fs::write(manifests.join("sub/f.json"), r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"nested"},"spec":{"ports":[{"port":1}]}}"#).unwrap();
        watcher.scan(&mut store);
        assert_eq!(
            names(&store),
            ["bad-doc-next", "kubernetes", "nested", "one", "two"]
        );

        // A change re-applies the file, deleting what left it; a deleted file's objects stay.
        std::fs::write(manifests.join("a.yaml"), svc("three")).unwrap();
        std::fs::remove_file(manifests.join("sub/f.json")).unwrap();
        watcher.scan(&mut store);
        assert_eq!(
            names(&store),
            ["bad-doc-next", "kubernetes", "nested", "three"]
        );

        // An emptied file deletes its objects.
        std::fs::write(manifests.join("b.YML"), "# nothing\n").unwrap();
        watcher.scan(&mut store);
        assert_eq!(names(&store), ["kubernetes", "nested", "three"]);
    }
}
