//! The control plane client: with `--control`, the site config comes from the control
//! replicas' discovery stream instead of (and merged with live node addresses beyond)
//! the config file.
//!
//! - `client`: one discovery watch open to one healthy replica at a time, failing over
//!   to the next on error, end of stream or silence; heartbeats to every replica of the
//!   live set (`control::replicas`: the start list and the servers' replicas the
//!   accepted documents list).
//! - `heartbeat`: what a heartbeat says (port, node credential key, role, replicas).
//! - `document`: a document's checks — the same schema validator as the file config.
//! - `cache`: the last good document on disk, used at start so that a proxy serves with
//!   every replica down.
//!
//! What the rest of the proxy sees is a `watch` of the site config to route by
//! ([`Control::configs`]): `None` until a document (live or cached) has been accepted,
//! or while the replicas have no site config — the file config is used then. Invariant:
//! a refused document never replaces an accepted one.

mod cache;
mod client;
pub(crate) mod document;
mod heartbeat;
pub mod metrics;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio::sync::watch;
use tracing::{info, warn};

use super::replicas::ReplicaSet;
use crate::cli::Role;
use crate::config::SiteConfig;
use crate::identity::Identity;
use metrics::ControlMetrics;

/// Where the discovery client connects and what it announces.
#[derive(Debug, Clone)]
pub struct Options {
    /// The replicas: the start list (`--control`, at least one) and those the accepted
    /// documents list, which this client updates.
    pub replicas: Arc<ReplicaSet>,
    /// The port this node's proxy takes mesh traffic on, sent in heartbeats.
    pub inbound_port: u16,
    /// `--role`, sent in heartbeats.
    pub role: Option<Role>,
    /// `--server-replicas`, sent in heartbeats with `--role server`.
    pub server_replicas: Vec<u16>,
    /// `--state-dir`: where the last good document is kept.
    pub state_dir: PathBuf,
}

/// Where the config in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// No document accepted yet: the file config is in use.
    None,
    /// The cached document, read at start.
    Cache,
    /// A document streamed by a replica.
    Live,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::Cache => "cache",
            Source::Live => "live",
        }
    }
}

/// What `/config` shows of the control plane.
#[derive(Debug, Clone)]
pub struct Status {
    pub replicas: Vec<SocketAddr>,
    /// The replica the watch is open to, while it is.
    pub replica: Option<SocketAddr>,
    pub source: Source,
    /// The version of the document in use.
    pub version: Option<String>,
    /// When the document in use was received (for the cache: when it was written).
    pub received_at: Option<SystemTime>,
    /// Why the last document was refused, or the last watch failed.
    pub last_error: Option<String>,
}

impl Status {
    /// `{"replicas", "replica", "connected", "source", "version", "age_ms", "last_error"}`.
    pub fn json(&self) -> serde_json::Value {
        let age_ms = self.received_at.map(|at| {
            let age = SystemTime::now().duration_since(at).unwrap_or_default();
            u64::try_from(age.as_millis()).unwrap_or(u64::MAX)
        });
        serde_json::json!({
            "replicas": self.replicas.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "replica": self.replica.map(|r| r.to_string()),
            "connected": self.replica.is_some(),
            "source": self.source.as_str(),
            "version": self.version,
            "age_ms": age_ms,
            "last_error": self.last_error,
        })
    }
}

/// The state the client tasks share.
pub(crate) struct Shared {
    options: Options,
    /// The newest live document, for [`keep_cache`] to write.
    to_cache: watch::Sender<Option<Arc<[u8]>>>,
    identities: watch::Receiver<Option<Identity>>,
    /// The node credential as loaded from its files: its key is announced in heartbeats.
    node_credential: watch::Receiver<Option<Identity>>,
    metrics: ControlMetrics,
    configs: watch::Sender<Option<Arc<SiteConfig>>>,
    status: Mutex<Status>,
}

impl Shared {
    fn status<T>(&self, f: impl FnOnce(&mut Status) -> T) -> T {
        f(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Checks `raw`, one document from `source`, and puts it in use when it is new and
    /// valid; `true` when it is (or already was) in use.
    fn accept(&self, source: &str, raw: &[u8], origin: Source, received_at: SystemTime) -> bool {
        let Some(site) = self.identities.borrow().as_ref().map(|id| id.site.clone()) else {
            warn!(source, "discovery document ignored: no node identity yet");
            return false;
        };
        let checked = document::Document::parse(source, raw).and_then(|document| {
            let config = document.site_config(source, &site)?;
            Ok((document, config))
        });
        let (document, config) = match checked {
            Ok(checked) => checked,
            Err(err) => {
                warn!(error = %err, "discovery document refused; keeping the one in use");
                self.metrics.rejected.inc();
                self.status(|status| status.last_error = Some(err.to_string()));
                return false;
            }
        };
        let same = self.status(|status| {
            let same = status.version.as_deref() == Some(document.version.as_str());
            if same && origin == Source::Live {
                status.source = Source::Live;
            }
            same
        });
        if same {
            return true;
        }
        self.options
            .replicas
            .discovered(&document.server_replicas());
        info!(
            source,
            version = %document.version,
            nodes = document.nodes.len(),
            has_config = config.is_some(),
            "discovery document in use"
        );
        self.configs.send_replace(config.map(Arc::new));
        self.metrics.updates.inc();
        self.status(|status| {
            status.source = origin;
            status.version = Some(document.version.clone());
            status.received_at = Some(received_at);
            status.last_error = None;
        });
        if origin == Source::Live {
            self.to_cache.send_replace(Some(Arc::from(raw)));
        }
        true
    }
}

/// Writes each new live document to `file`, one write at a time and always the newest:
/// two documents that arrive together never race for the file, and an older one never
/// lands after a newer one.
async fn keep_cache(mut documents: watch::Receiver<Option<Arc<[u8]>>>, file: PathBuf) {
    while documents.changed().await.is_ok() {
        let Some(raw) = documents.borrow_and_update().clone() else {
            continue;
        };
        let path = file.clone();
        let written = tokio::task::spawn_blocking(move || cache::store(&path, &raw)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                warn!(file = %file.display(), %err, "cannot keep the discovery document");
            }
            Err(err) => warn!(%err, "the discovery cache writer stopped"),
        }
    }
}

/// A running control plane client.
pub struct Control {
    shared: Arc<Shared>,
}

impl Control {
    /// Loads the cached document (when there is one and a node identity to check it
    /// with) and starts the watch and heartbeat tasks. `identities` is what connections
    /// authenticate with; `node_credential` the node credential whose key heartbeats
    /// announce.
    pub fn start(
        options: Options,
        identities: watch::Receiver<Option<Identity>>,
        node_credential: watch::Receiver<Option<Identity>>,
        metrics: ControlMetrics,
    ) -> Control {
        let cache_file = cache::file(&options.state_dir);
        let shared = Arc::new(Shared {
            status: Mutex::new(Status {
                replicas: options.replicas.current().to_vec(),
                replica: None,
                source: Source::None,
                version: None,
                received_at: None,
                last_error: None,
            }),
            options,
            to_cache: watch::Sender::new(None),
            identities,
            node_credential,
            metrics,
            configs: watch::Sender::new(None),
        });
        load_cache(&shared, &cache_file);
        tokio::spawn(keep_cache(shared.to_cache.subscribe(), cache_file));
        client::spawn(&shared);
        Control { shared }
    }

    /// The site config to route by, `None` while the file config is to be used.
    pub fn configs(&self) -> watch::Receiver<Option<Arc<SiteConfig>>> {
        self.shared.configs.subscribe()
    }

    pub fn status(&self) -> Status {
        let mut status = self.shared.status(|status| status.clone());
        status.replicas = self.shared.options.replicas.current().to_vec();
        status
    }
}

/// The cached document, put in use when valid.
fn load_cache(shared: &Shared, file: &Path) {
    match cache::load(file) {
        Ok(Some(cached)) => {
            let source = file.display().to_string();
            if shared.accept(&source, &cached.raw, Source::Cache, cached.written) {
                info!(file = %source, version = %cached.document.version, "serving from the cached discovery document until a control replica answers");
            }
        }
        Ok(None) => {
            info!(file = %file.display(), "no cached discovery document; the config file is used until a control replica answers")
        }
        Err(err) => {
            warn!(error = %err, "cached discovery document unusable; the config file is used until a control replica answers")
        }
    }
}
