//! Saved contexts, as kubeconfig keeps them: named sets of a central server, the CA to
//! trust for it and a site folder, one of them current, so that an operator does not
//! repeat `--central`, `--central-ca` and `--site-dir` on every command.
//!
//! The file is `$PIMESH_CONFIG`, else `$XDG_CONFIG_HOME/pimesh/contexts.toml`, else
//! `~/.config/pimesh/contexts.toml`. A value comes from the command line first, then the
//! environment (`PIMESH_CENTRAL`, `PIMESH_CENTRAL_CA`, `PIMESH_SITE_DIR`), then the current
//! context.
//!
//! Invariants: the file is replaced whole (written beside it, synced, renamed over it), so
//! a crash leaves the old file or the new one; a file that does not parse is an error
//! naming it, never read as no contexts (which the next write would then save).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Failure, OutputFormat};

/// The contexts file.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Contexts {
    /// The context commands use when the command line and environment do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Context {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub central: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub central_ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_dir: Option<PathBuf>,
}

/// Where the contexts file is (see the module doc).
pub fn file() -> PathBuf {
    if let Some(path) = std::env::var_os("PIMESH_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("pimesh").join("contexts.toml")
}

impl Contexts {
    /// The file at `path`; none saved yet when there is no file.
    pub fn load(path: &Path) -> Result<Contexts, Failure> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Contexts::default())
            }
            Err(err) => return Err(format!("cannot read {}: {err}", path.display()).into()),
        };
        toml::from_str(&text).map_err(|err| {
            format!(
                "{}: not a contexts file ({}); fix or remove it",
                path.display(),
                err.to_string().trim_end()
            )
            .into()
        })
    }

    /// Replaces the file at `path` with these contexts (see the module's invariants).
    pub fn save(&self, path: &Path) -> Result<(), Failure> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        let text = toml::to_string(self)?;
        let temporary = dir.join(".contexts.toml.new");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|err| format!("cannot write {}: {err}", path.display()).into())
    }

    /// The current context, when one is set (and still exists).
    pub fn current(&self) -> Option<&Context> {
        self.contexts.get(self.current.as_deref()?)
    }
}

/// The current context of the contexts file, or an empty one.
pub fn current() -> Result<Context, Failure> {
    Ok(Contexts::load(&file())?
        .current()
        .cloned()
        .unwrap_or_default())
}

/// `pimeshctl context add`: saves `name` (replacing a context of that name) and makes it
/// current when it is the first.
pub fn add(name: &str, context: Context) -> Result<(), Failure> {
    if name.is_empty() {
        return Err("a context needs a name".into());
    }
    if let Some(url) = &context.central {
        crate::central_url::check_url(url)?;
    }
    let path = file();
    let mut contexts = Contexts::load(&path)?;
    let replaced = contexts.contexts.insert(name.to_owned(), context).is_some();
    if contexts.current.is_none() {
        contexts.current = Some(name.to_owned());
    }
    contexts.save(&path)?;
    let what = if replaced { "replaced" } else { "added" };
    let current = if contexts.current.as_deref() == Some(name) {
        " (current)"
    } else {
        ""
    };
    println!("{what} context {name}{current} in {}", path.display());
    Ok(())
}

/// `pimeshctl context use`: makes `name` current.
pub fn use_context(name: &str) -> Result<(), Failure> {
    let path = file();
    let mut contexts = Contexts::load(&path)?;
    if !contexts.contexts.contains_key(name) {
        let known: Vec<&str> = contexts.contexts.keys().map(String::as_str).collect();
        return Err(format!(
            "no context {name:?} in {} (known: {})",
            path.display(),
            if known.is_empty() {
                "none; add one with `pimeshctl context add`".to_owned()
            } else {
                known.join(", ")
            }
        )
        .into());
    }
    contexts.current = Some(name.to_owned());
    contexts.save(&path)?;
    println!("using context {name}");
    Ok(())
}

/// `pimeshctl context list`.
pub fn list(output: OutputFormat) -> Result<(), Failure> {
    let contexts = Contexts::load(&file())?;
    let text = output.render(&contexts, |contexts| {
        let mut text = String::new();
        for (name, context) in &contexts.contexts {
            let mark = if contexts.current.as_deref() == Some(name) {
                "*"
            } else {
                " "
            };
            let show = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
            text.push_str(&format!(
                "{mark} {name}  central {}  ca {}  site {}\n",
                show(context.central.clone()),
                show(context.central_ca.as_ref().map(|p| p.display().to_string())),
                show(context.site_dir.as_ref().map(|p| p.display().to_string())),
            ));
        }
        if text.is_empty() {
            text.push_str("no contexts; add one with `pimeshctl context add`\n");
        }
        text
    })?;
    print!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_round_trip_and_a_broken_file_is_named_not_emptied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pimesh/contexts.toml");
        assert_eq!(Contexts::load(&path).expect("no file"), Contexts::default());
        let mut contexts = Contexts::default();
        contexts.contexts.insert(
            "depot".to_owned(),
            Context {
                central: Some("https://central.example:8443".to_owned()),
                central_ca: Some(PathBuf::from("/etc/pimesh/central-ca.pem")),
                site_dir: None,
            },
        );
        contexts.current = Some("depot".to_owned());
        contexts.save(&path).expect("saved");
        let read = Contexts::load(&path).expect("read back");
        assert_eq!(read, contexts);
        assert_eq!(
            read.current().and_then(|c| c.central.as_deref()),
            Some("https://central.example:8443")
        );
        std::fs::write(
            &path,
            "current = \"depot\"\n[contexts.depot]\ncentrl = \"x\"\n",
        )
        .expect("write");
        let err = Contexts::load(&path).expect_err("a misspelt key");
        assert!(err.to_string().contains("contexts.toml"), "{err}");
        assert!(err.to_string().contains("centrl"), "{err}");
    }
}
