//! K3s's config file: `/etc/rancher/k3s/config.yaml` (or `K3S_CONFIG_FILE`, checked first,
//! or `--config/-c`), then the drop-ins `<config>.d/*.yaml|*.yml` in file-name order.
//!
//! Merge rules (K3s's `pkg/configfilearg`): a later file replaces a key's whole value, a
//! `key+:` appends to it; keys keep the order they first appeared in. A missing main file
//! is no config; a YAML error is fatal and names the file. Keys are flag names: an unknown
//! key is skipped with a warning by `server` and fatal for `agent`, as K3s filters unknown
//! keys for `server` only.

use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

use crate::flags::{flags, Kind, Subcommand};

/// Config keys in order of first appearance, with their merged YAML values.
pub type Keys = Vec<(String, Value)>;
/// Flags by long name, in order, each with its values.
pub type FlagValues = Vec<(String, Vec<String>)>;

/// The default config file.
pub const DEFAULT_PATH: &str = "/etc/rancher/k3s/config.yaml";

/// The config file to read: `K3S_CONFIG_FILE`, else `--config/-c` in `args` (the words
/// after the subcommand), else [`DEFAULT_PATH`].
pub fn path(args: &[String], env: Option<String>) -> PathBuf {
    if let Some(path) = env.filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word == "--" {
            break;
        }
        let body = word.trim_start_matches('-');
        if body.len() == word.len() {
            continue;
        }
        match body.split_once('=') {
            Some(("c" | "config", value)) => return PathBuf::from(value),
            None if body == "c" || body == "config" => {
                if let Some(value) = words.next() {
                    return PathBuf::from(value);
                }
            }
            _ => {}
        }
    }
    PathBuf::from(DEFAULT_PATH)
}

/// The merged keys of the config file at `path` and its drop-ins, and the files read.
pub fn load(path: &Path) -> Result<(Keys, Vec<PathBuf>), String> {
    let mut files = Vec::new();
    match std::fs::metadata(path) {
        Ok(_) => files.push(path.to_path_buf()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(format!("failed to read {}: {err}", path.display())),
    }
    files.extend(drop_ins(path)?);
    let mut merged: Vec<(String, Value)> = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .map_err(|err| format!("failed to read {}: {err}", file.display()))?;
        let doc: Value = serde_yaml_ng::from_str(&text)
            .map_err(|err| format!("failed to parse {}: {err}", file.display()))?;
        let map = match doc {
            Value::Null => continue,
            Value::Mapping(map) => map,
            _ => {
                return Err(format!(
                    "failed to parse {}: expected a mapping of flag names to values",
                    file.display()
                ))
            }
        };
        for (key, value) in map {
            let key = match key {
                Value::String(key) => key,
                other => scalar_text(&other).unwrap_or_default(),
            };
            merge(&mut merged, key, value);
        }
    }
    Ok((merged, files))
}

/// `<path>.d/*.yaml|*.yml`, regular files, by name.
fn drop_ins(path: &Path) -> Result<Vec<PathBuf>, String> {
    let mut dir = path.as_os_str().to_owned();
    dir.push(".d");
    let dir = PathBuf::from(dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(format!("failed to read {}: {err}", dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            (name.ends_with(".yaml") || name.ends_with(".yml")) && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// One key of one file into the merged keys.
fn merge(merged: &mut Vec<(String, Value)>, key: String, value: Value) {
    let (name, append) = match key.strip_suffix('+') {
        Some(name) => (name.to_owned(), true),
        None => (key, false),
    };
    match merged.iter_mut().find(|(k, _)| *k == name) {
        Some((_, old)) if append => {
            let mut list = as_list(std::mem::take(old));
            list.extend(as_list(value));
            *old = Value::Sequence(list);
        }
        Some((_, old)) => *old = value,
        None => merged.push((name, value)),
    }
}

fn as_list(value: Value) -> Vec<Value> {
    match value {
        Value::Sequence(list) => list,
        Value::Null => Vec::new(),
        other => vec![other],
    }
}

/// A scalar's text as a flag value (`true`, `42`, `text`).
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Null => Some(String::new()),
        Value::Tagged(tagged) => scalar_text(&tagged.value),
        Value::Sequence(_) | Value::Mapping(_) => None,
    }
}

/// A boolean of the config file: Go's forms, and YAML 1.1's `yes`/`no`/`on`/`off`, which
/// K3s's YAML reader takes as booleans too (the fixture's YAML reader is YAML 1.2).
fn yaml11_bool(text: &str) -> Option<bool> {
    crate::cli::parse_bool(text).or(match text.to_ascii_lowercase().as_str() {
        "yes" | "y" | "on" => Some(true),
        "no" | "n" | "off" => Some(false),
        _ => None,
    })
}

/// The merged keys as flag values for `command`, in order, each with all its values.
/// An unknown key is skipped with a warning (`server`, returned in the second list) or is
/// an error (`agent`), as in K3s.
pub fn to_flags(command: Subcommand, merged: Keys) -> Result<(FlagValues, Vec<String>), String> {
    let set = flags(command);
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for (key, value) in merged {
        let Some((long, kind)) = set.lookup(command, &key) else {
            let dashed = if key.len() == 1 { "-" } else { "--" };
            match command {
                Subcommand::Server => warnings.push(format!(
                    "Unknown flag {dashed}{key} found in config.yaml, skipping"
                )),
                Subcommand::Agent => {
                    return Err(format!("flag provided but not defined: -{key}"));
                }
            }
            continue;
        };
        let values: Vec<String> = match &value {
            Value::Sequence(items) => items
                .iter()
                .map(|item| {
                    scalar_text(item).ok_or_else(|| {
                        format!(
                            "invalid value for {key} in the config file: a nested list or mapping"
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            Value::Mapping(_) => {
                return Err(format!(
                    "invalid value for {key} in the config file: a mapping"
                ))
            }
            scalar => vec![scalar_text(scalar).unwrap_or_default()],
        };
        match kind {
            Kind::List => {}
            Kind::Scalar | Kind::Bool if matches!(value, Value::Sequence(_)) => {
                return Err(format!(
                    "invalid value for {key} in the config file: a list, but --{long} takes one value"
                ))
            }
            Kind::Scalar => {}
            Kind::Bool => {}
        }
        let values = if kind == Kind::Bool {
            values
                .iter()
                .map(|v| {
                    yaml11_bool(v).map(|b| b.to_string()).ok_or_else(|| {
                        format!("invalid boolean value {v:?} for -{long}: parse error")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            values
        };
        out.push((long, values));
    }
    Ok((out, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn the_env_comes_before_the_flag() {
        let args = strs(&["--debug", "-c", "/x.yaml"]);
        assert_eq!(path(&args, None), PathBuf::from("/x.yaml"));
        assert_eq!(
            path(&strs(&["--config=/y.yaml"]), None),
            PathBuf::from("/y.yaml")
        );
        assert_eq!(
            path(&args, Some("/env.yaml".to_owned())),
            PathBuf::from("/env.yaml")
        );
        assert_eq!(path(&[], None), PathBuf::from(DEFAULT_PATH));
    }

    #[test]
    fn drop_ins_replace_or_append() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("config.yaml");
        std::fs::write(
            &main,
            "node-label: [a=1]\ntoken: one\ntls-san: x\ncluster-init: true\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("config.yaml.d")).unwrap();
        std::fs::write(dir.path().join("config.yaml.d/20-b.yml"), "token: three\n").unwrap();
        std::fs::write(
            dir.path().join("config.yaml.d/10-a.yaml"),
            "node-label+: [b=2]\ntoken: two\ntls-san: [y, z]\nnode-taint+: t=1:NoSchedule\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("config.yaml.d/30-c.txt"), "token: no\n").unwrap();
        let (merged, files) = load(&main).unwrap();
        assert_eq!(files.len(), 3);
        let (flags, warnings) = to_flags(Subcommand::Server, merged).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(
            flags,
            vec![
                ("node-label".to_owned(), strs(&["a=1", "b=2"])),
                ("token".to_owned(), strs(&["three"])),
                ("tls-san".to_owned(), strs(&["y", "z"])),
                ("cluster-init".to_owned(), strs(&["true"])),
                ("node-taint".to_owned(), strs(&["t=1:NoSchedule"])),
            ]
        );
    }

    #[test]
    fn unknown_keys_warn_for_server_and_fail_for_agent() {
        let merged = vec![
            ("disable".to_owned(), Value::String("traefik".to_owned())),
            ("foo".to_owned(), Value::Bool(true)),
        ];
        let (flags, warnings) = to_flags(Subcommand::Server, merged.clone()).unwrap();
        assert_eq!(flags.len(), 1);
        assert_eq!(
            warnings,
            vec!["Unknown flag --foo found in config.yaml, skipping".to_owned()]
        );
        assert_eq!(
            to_flags(Subcommand::Agent, merged),
            Err("flag provided but not defined: -disable".to_owned())
        );
    }

    #[test]
    fn a_scalar_flag_given_a_list_is_an_error() {
        let merged = vec![(
            "token".to_owned(),
            Value::Sequence(vec![Value::String("a".to_owned())]),
        )];
        assert!(to_flags(Subcommand::Server, merged).is_err());
    }

    #[test]
    fn a_yaml_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("config.yaml");
        std::fs::write(&main, "token: [unclosed\n").unwrap();
        let err = load(&main).unwrap_err();
        assert!(err.contains(&main.display().to_string()), "{err}");
        assert_eq!(load(&dir.path().join("none.yaml")).unwrap().0, Vec::new());
    }
}
