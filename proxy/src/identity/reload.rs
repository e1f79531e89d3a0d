//! The node identity in use, reloaded when its files change: one writer (the main loop,
//! on start, SIGHUP and each poll), readers through a `watch` (the listeners, the peer
//! pool and the admin endpoints).
//!
//! Invariant: a failed load never replaces a good identity (`pimesh_runtime::watched`);
//! the proxy keeps serving with the one it has and logs why the new files were refused.
//! Readers are told only of identities that loaded.

use pimesh_runtime::watched::{Load, Outcome, Trigger, Watched};
use tokio::sync::watch;
use tracing::info;

use super::{Identity, IdentityFiles, LoadError};

/// The only writer of the node identity in use: loads [`IdentityFiles`] through a
/// [`Watched`] and publishes each identity that loads.
pub struct IdentityReloader {
    files: IdentityFiles,
    watched: Watched<Option<Identity>, LoadError>,
    sender: watch::Sender<Option<Identity>>,
}

impl IdentityReloader {
    /// Makes the first load attempt and returns the writer with a reader of the identity.
    pub fn start(files: IdentityFiles) -> (IdentityReloader, watch::Receiver<Option<Identity>>) {
        let (sender, receiver) = watch::channel(None);
        let watched = Watched::new(
            "node identity",
            vec![
                files.chain.clone(),
                files.key.clone(),
                files.anchors.clone(),
            ],
            None,
        );
        let mut reloader = IdentityReloader {
            files,
            watched,
            sender,
        };
        reloader.reload("start");
        (reloader, receiver)
    }

    /// What `trigger` asks for: a load at once on SIGHUP, a load when any of the three
    /// files changed on a poll.
    pub fn on(&mut self, trigger: Trigger) {
        let files = &self.files;
        if let Some(attempt) = self.watched.on(trigger, |_| load(files)) {
            self.published(attempt.trigger, attempt.outcome);
        }
    }

    pub fn reload(&mut self, trigger: &str) {
        let files = &self.files;
        let outcome = self.watched.reload(trigger, |_| load(files));
        self.published(trigger, outcome);
    }

    /// After a load: a new identity goes to the readers; a refused one was logged, and
    /// until one loads the mesh ports stay closed.
    fn published(&self, trigger: &str, outcome: Outcome) {
        if outcome != Outcome::Loaded {
            return;
        }
        let identity = self.watched.current().value.clone();
        if let Some(identity) = &identity {
            info!(trigger, node = %identity.node, site = %identity.site, "node identity loaded");
        }
        self.sender.send_replace(identity);
    }
}

fn load(files: &IdentityFiles) -> Load<Option<Identity>, LoadError> {
    Identity::load(files).map(Some).into()
}
