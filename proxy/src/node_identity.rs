//! The node identity in use, reloaded when its files change: one writer (the main loop,
//! on start, SIGHUP and each poll), readers through a `watch` (the listeners, the peer
//! pool and the admin endpoints).
//!
//! Invariant: a failed load never replaces a good identity; the proxy keeps serving with
//! the one it has and logs why the new files were refused.

use std::path::PathBuf;
use std::time::SystemTime;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::tls::{Identity, IdentityFiles};

/// The site's trust folder on a node that holds it (a server node).
const SITE_ANCHORS: &str = "/var/lib/pimesh/trust/anchor.pem";

/// Where the identity files are when `--identity-dir` is not given: the unit's
/// credentials directory (systemd `LoadCredential=`), else the supervisor's own files —
/// the anchors of the site's trust folder on a node that has one, else those the
/// supervisor imported beside the node credential (a joining node).
pub fn default_files() -> IdentityFiles {
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        return IdentityFiles::in_dir(&PathBuf::from(dir));
    }
    let identity = std::path::Path::new("/var/lib/pimesh/identity");
    let anchors = if std::path::Path::new(SITE_ANCHORS).exists() {
        PathBuf::from(SITE_ANCHORS)
    } else {
        identity.join("anchor.pem")
    };
    IdentityFiles {
        chain: identity.join("node.pem"),
        key: identity.join("node.key"),
        anchors,
    }
}

type Stamp = [Option<(SystemTime, u64)>; 3];

pub struct IdentityReloader {
    files: IdentityFiles,
    sender: watch::Sender<Option<Identity>>,
    seen: Option<Stamp>,
}

impl IdentityReloader {
    pub fn start(files: IdentityFiles) -> (IdentityReloader, watch::Receiver<Option<Identity>>) {
        let (sender, receiver) = watch::channel(None);
        let mut reloader = IdentityReloader {
            files,
            sender,
            seen: None,
        };
        reloader.reload("start");
        (reloader, receiver)
    }

    /// Reloads when any of the three files changed (mtime, size) since the last attempt.
    pub fn poll(&mut self) {
        if self.seen != Some(self.stamp()) {
            self.reload("file change");
        }
    }

    pub fn reload(&mut self, trigger: &str) {
        self.seen = Some(self.stamp());
        match Identity::load(&self.files) {
            Ok(identity) => {
                info!(trigger, node = %identity.node, site = %identity.site, "node identity loaded");
                self.sender.send_replace(Some(identity));
            }
            Err(err) if self.sender.borrow().is_some() => {
                warn!(trigger, error = %err, "node identity refused; keeping the one in use");
            }
            Err(err) => {
                warn!(trigger, error = %err, "no node identity: the mesh ports stay closed until one loads");
            }
        }
    }

    fn stamp(&self) -> Stamp {
        let of = |path: &PathBuf| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        };
        [
            of(&self.files.chain),
            of(&self.files.key),
            of(&self.files.anchors),
        ]
    }
}
