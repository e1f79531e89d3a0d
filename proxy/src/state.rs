//! The site config in use and how it changes: one writer (the [`Reloader`], driven by the
//! main loop on start, SIGHUP and file changes) and any number of readers holding a
//! `watch::Receiver<Arc<Snapshot>>` (the admin endpoints; the data plane next).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pimesh_runtime::notify;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::site_config::{self, Fingerprint, SiteConfig};

/// The config in use: the last one that loaded, or none when the file was absent.
#[derive(Debug)]
pub struct InUse {
    /// `None`: no file at the path, so no routes ("no site config yet").
    pub site_config: Option<SiteConfig>,
    /// When this config (these exact bytes, or this absence) was put in use, Unix ms.
    /// Reloading identical bytes keeps it.
    pub loaded_at_ms: u64,
}

/// What readers see, replaced as a whole so that `in_use` and `last_error` always agree.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub file: PathBuf,
    pub in_use: Arc<InUse>,
    /// Why the last load attempt failed; `None` when it succeeded (or found no file).
    /// While set, `in_use` is the config from before the failure and the proxy is not ready.
    pub last_error: Option<String>,
    /// The SHA-256 (hex) of the file that was refused, when `last_error` is set and the
    /// file could be read: lets the supervisor tell "refused" from "not yet seen".
    pub refused_sha256: Option<String>,
}

impl Snapshot {
    /// One line for `STATUS=` and logs.
    pub fn summary(&self) -> String {
        let in_use = describe(&self.in_use);
        match &self.last_error {
            None => in_use,
            Some(err) => format!("config refused ({}); still using {in_use}", one_line(err)),
        }
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
    sender: watch::Sender<Arc<Snapshot>>,
    /// The file as it was just before the last load attempt: a poll that sees another
    /// fingerprint reloads, so a change racing with a load is picked up by the next poll.
    seen: Fingerprint,
}

impl Reloader {
    /// Makes the first load attempt and returns the writer with a reader of the result.
    pub fn start(file: &Path) -> (Reloader, watch::Receiver<Arc<Snapshot>>) {
        let placeholder = Arc::new(Snapshot {
            file: file.to_path_buf(),
            in_use: Arc::new(InUse {
                site_config: None,
                loaded_at_ms: now_ms(),
            }),
            last_error: Some("not loaded yet".to_owned()),
            refused_sha256: None,
        });
        let (sender, receiver) = watch::channel(placeholder);
        let mut reloader = Reloader {
            file: file.to_path_buf(),
            sender,
            seen: Fingerprint::Missing,
        };
        reloader.reload("start");
        (reloader, receiver)
    }

    pub fn current(&self) -> Arc<Snapshot> {
        Arc::clone(&self.sender.borrow())
    }

    /// Reloads when the file's fingerprint changed since the last attempt.
    pub fn poll(&mut self) {
        if site_config::fingerprint(&self.file) != self.seen {
            self.reload("file changed");
        }
    }

    /// Re-reads the file. On success the new config is put in use; on failure the old one
    /// stays in use and the error is recorded (not ready). Never panics on any input.
    pub fn reload(&mut self, trigger: &str) {
        self.seen = site_config::fingerprint(&self.file);
        let previous = self.current();
        let next = match site_config::load(&self.file) {
            Ok(loaded) => {
                let unchanged = match (&previous.in_use.site_config, &loaded) {
                    (Some(old), Some(new)) => old.sha256 == new.sha256,
                    (None, None) => true,
                    _ => false,
                };
                let in_use = if unchanged {
                    Arc::clone(&previous.in_use)
                } else {
                    Arc::new(InUse {
                        site_config: loaded,
                        loaded_at_ms: now_ms(),
                    })
                };
                Snapshot {
                    file: self.file.clone(),
                    in_use,
                    last_error: None,
                    refused_sha256: None,
                }
            }
            Err(err) => Snapshot {
                file: self.file.clone(),
                in_use: Arc::clone(&previous.in_use),
                last_error: Some(err.to_string()),
                refused_sha256: std::fs::read(&self.file)
                    .ok()
                    .map(|bytes| site_config::sha256_hex_of(&bytes)),
            },
        };
        let summary = next.summary();
        match &next.last_error {
            None => info!(file = %self.file.display(), trigger, "{summary}"),
            Some(_) => warn!(file = %self.file.display(), trigger, "{summary}"),
        }
        notify::status(&summary);
        self.sender.send_replace(Arc::new(next));
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
        assert!(receiver.borrow().last_error.is_none());
        assert!(receiver.borrow().in_use.site_config.is_none());

        // max_connections set low: the default (10 000) needs more open files than some
        // test machines allow.
        let good_text = "site = \"lab\"\n[proxy]\nmax_connections = 100\n";
        std::fs::write(&file, good_text).expect("write");
        reloader.reload("test");
        let good = receiver.borrow().clone();
        assert!(good.last_error.is_none());
        assert!(good.summary().starts_with("site lab, 0 services, config "));

        std::fs::write(
            &file,
            "site = \"lab\"\n[control]\nreplicas = 12\n[proxy]\nmax_connections = 100\n",
        )
        .expect("write");
        reloader.poll();
        let bad = receiver.borrow().clone();
        assert!(bad.last_error.is_some());
        assert!(Arc::ptr_eq(&bad.in_use, &good.in_use));
        assert!(
            bad.summary().contains("control.replicas"),
            "{}",
            bad.summary()
        );

        // Same bytes as before: back in use with the original load time.
        std::fs::write(&file, good_text).expect("write");
        reloader.reload("test");
        let again = receiver.borrow().clone();
        assert!(again.last_error.is_none());
        assert!(Arc::ptr_eq(&again.in_use, &good.in_use));
    }
}
