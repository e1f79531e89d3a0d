//! The site config in use and how it changes: one writer (the [`Reloader`], driven by the
//! main loop on start, SIGHUP and file changes through `pimesh_runtime::watched`) and any
//! number of readers holding a `watch::Receiver<Snapshot>` (the admin endpoints, the
//! routing table).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pimesh_runtime::notify;
use pimesh_runtime::watched::{Current, Load, Outcome, Trigger, Watched};
use tokio::sync::watch;
use tracing::info;

use crate::config::site::{self, SiteConfig};

/// The config in use: the last one that loaded, or none when the file was absent.
#[derive(Debug)]
pub struct InUse {
    /// The file it was read from (`--config`).
    pub file: PathBuf,
    /// `None`: no file at the path, so no routes ("no site config yet").
    pub site_config: Option<SiteConfig>,
    /// When this config (these exact bytes, or this absence) was put in use, Unix ms.
    /// Reloading identical bytes keeps it.
    pub loaded_at_ms: u64,
}

/// Why the last load attempt refused the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The error, naming the file and, when the fault belongs to one, the key.
    pub message: String,
    /// The SHA-256 (hex) of the refused file, when it could be read: lets the supervisor
    /// tell "refused" from "not yet seen".
    pub sha256: Option<String>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// What readers see, replaced as a whole so that the config in use (`value`) and the last
/// refusal (`problem`) always agree. While `problem` is set, `value` is the config from
/// before the failure and the proxy is not ready.
pub type Snapshot = Current<Arc<InUse>, Refusal>;

/// One line for `STATUS=` and logs.
pub fn summary(snapshot: &Snapshot) -> String {
    let in_use = describe(&snapshot.value);
    match &snapshot.problem {
        None => in_use,
        Some(refusal) => format!(
            "config refused ({}); still using {in_use}",
            one_line(&refusal.message)
        ),
    }
}

fn describe(in_use: &InUse) -> String {
    match &in_use.site_config {
        None => "no site config yet".to_owned(),
        Some(loaded) => {
            let hex = loaded.sha256_hex();
            format!(
                "site {}, {} services, config {}",
                loaded.config.site,
                loaded.config.services.len(),
                &hex[..8]
            )
        }
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The only writer of the snapshot.
pub struct Reloader {
    file: PathBuf,
    watched: Watched<Arc<InUse>, Refusal>,
}

impl Reloader {
    /// Makes the first load attempt and returns the writer with a reader of the result.
    pub fn start(file: &Path) -> (Reloader, watch::Receiver<Snapshot>) {
        let nothing = Arc::new(InUse {
            file: file.to_path_buf(),
            site_config: None,
            loaded_at_ms: now_ms(),
        });
        let watched = Watched::new("site config", vec![file.to_path_buf()], nothing);
        let receiver = watched.subscribe();
        let mut reloader = Reloader {
            file: file.to_path_buf(),
            watched,
        };
        reloader.reload("start");
        (reloader, receiver)
    }

    pub fn current(&self) -> Snapshot {
        self.watched.current().clone()
    }

    /// What `trigger` asks for: a load at once on SIGHUP, a load when the file's
    /// fingerprint changed on a poll.
    pub fn on(&mut self, trigger: Trigger) {
        let file = &self.file;
        if let Some(attempt) = self.watched.on(trigger, |previous| load(file, previous)) {
            self.loaded(attempt.trigger, attempt.outcome);
        }
    }

    /// Reloads when the file's fingerprint changed since the last attempt.
    #[cfg(test)]
    pub fn poll(&mut self) {
        self.on(Trigger::Poll);
    }

    /// Re-reads the file. On success the new config is put in use; on failure the old one
    /// stays in use and the refusal is recorded (not ready). Never panics on any input.
    pub fn reload(&mut self, trigger: &str) {
        let file = &self.file;
        let outcome = self
            .watched
            .reload(trigger, |previous| load(file, previous));
        self.loaded(trigger, outcome);
    }

    /// After an attempt: a success is logged (a refusal was, by the watched file), and the
    /// unit's status tells what is in use either way.
    fn loaded(&self, trigger: &str, outcome: Outcome) {
        let summary = summary(&self.current());
        if outcome == Outcome::Loaded {
            info!(file = %self.file.display(), trigger, "{summary}");
        }
        notify::status(&summary);
    }
}

/// Reads `file`; the config in use (`previous`) stays in use, with its load time, when the
/// bytes (or the absence) are the same.
fn load(file: &Path, previous: &Arc<InUse>) -> Load<Arc<InUse>, Refusal> {
    match site::load(file) {
        Ok(loaded) => {
            let unchanged = match (&previous.site_config, &loaded) {
                (Some(old), Some(new)) => old.sha256 == new.sha256,
                (None, None) => true,
                _ => false,
            };
            if unchanged {
                Load::Loaded(Arc::clone(previous))
            } else {
                Load::Loaded(Arc::new(InUse {
                    file: file.to_path_buf(),
                    site_config: loaded,
                    loaded_at_ms: now_ms(),
                }))
            }
        }
        Err(err) => Load::Failed(Refusal {
            message: err.to_string(),
            sha256: std::fs::read(file)
                .ok()
                .map(|bytes| site::sha256_hex_of(&bytes)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_revision_keeps_the_old_config_in_use_until_a_good_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("cluster.toml");
        let (mut reloader, receiver) = Reloader::start(&file);
        assert!(receiver.borrow().problem.is_none());
        assert!(receiver.borrow().value.site_config.is_none());

        // max_connections set low: the default (10 000) needs more open files than some
        // test machines allow.
        let good_text = "site = \"lab\"\n[proxy]\nmax_connections = 100\n";
        std::fs::write(&file, good_text).expect("write");
        reloader.reload("test");
        let good = receiver.borrow().clone();
        assert!(good.problem.is_none());
        assert!(summary(&good).starts_with("site lab, 0 services, config "));

        std::fs::write(
            &file,
            "site = \"lab\"\n[control]\nreplicas = 12\n[proxy]\nmax_connections = 100\n",
        )
        .expect("write");
        reloader.poll();
        let bad = receiver.borrow().clone();
        assert!(bad.problem.is_some());
        assert!(Arc::ptr_eq(&bad.value, &good.value));
        assert!(
            summary(&bad).contains("control.replicas"),
            "{}",
            summary(&bad)
        );

        // Same bytes as before: back in use with the original load time.
        std::fs::write(&file, good_text).expect("write");
        reloader.reload("test");
        let again = receiver.borrow().clone();
        assert!(again.problem.is_none());
        assert!(Arc::ptr_eq(&again.value, &good.value));
    }
}
