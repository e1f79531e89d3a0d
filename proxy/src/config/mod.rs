//! The site config and what the data path routes by.
//!
//! - `site`: reading `cluster.toml` and the checks the proxy makes beyond the schema;
//! - `state`: the file config in use, reloaded on SIGHUP and when the file changes, and
//!   the last refusal;
//! - `routes`: the routing table compiled from a site config;
//! - `http_routes`: a service's `[[routes]]` compiled: request matches and rule policies;
//! - `metrics`: reload attempts of the file, counted;
//! - [`Routing`]: the only writer of the site config in use (discovery's, else the
//!   file's) and of the routing table built from it.

pub mod http_routes;
pub mod metrics;
pub mod routes;
pub mod site;
pub mod state;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use crate::identity::Identity;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::{CollectorSink, ExportSettings};
use routes::RouteTable;
pub use site::SiteConfig;
use state::Snapshot;

/// Publishes the site config to route by and the routing table compiled from it with the
/// identity in use.
///
/// Invariant: the table readers see was compiled from the site config readers see (once
/// [`Routing::update`] returns), for the identity's node only when the identity is of the
/// config's site.
pub struct Routing {
    /// Where this proxy's own node takes mesh traffic when the config does not say.
    own_inbound: SocketAddr,
    metrics: Arc<Metrics>,
    /// `--state-dir`: the span disk queue's folder is `spans/` in it unless the config says.
    state_dir: PathBuf,
    spans: CollectorSink,
    site_config: watch::Sender<Option<Arc<SiteConfig>>>,
    routes: watch::Sender<Arc<RouteTable>>,
}

impl Routing {
    /// `inbound` is the proxy's inbound address; `file_config` the file's config at start,
    /// published until the first [`Routing::update`]; `state_dir` the proxy's
    /// `--state-dir`. The table is empty until the first [`Routing::compile`].
    pub fn new(
        inbound: SocketAddr,
        metrics: Arc<Metrics>,
        file_config: Option<&SiteConfig>,
        state_dir: PathBuf,
    ) -> Routing {
        Routing {
            own_inbound: own_inbound(inbound),
            metrics,
            state_dir,
            spans: CollectorSink::default(),
            site_config: watch::Sender::new(file_config.cloned().map(Arc::new)),
            routes: watch::Sender::new(Arc::new(RouteTable::empty())),
        }
    }

    /// The site config in use, for what needs only that.
    pub fn site_configs(&self) -> watch::Receiver<Option<Arc<SiteConfig>>> {
        self.site_config.subscribe()
    }

    /// The routing table in use.
    pub fn routes(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.routes.subscribe()
    }

    /// Compiles the table for the config in use (`snapshot`'s, or `discovered` when there is
    /// one) and `identity`, and publishes it.
    pub fn compile(
        &mut self,
        snapshot: &Snapshot,
        discovered: &Option<Arc<SiteConfig>>,
        identity: &Option<Identity>,
    ) {
        let table = self.build(in_use(snapshot, discovered), identity);
        self.routes.send_replace(Arc::new(table));
    }

    /// Publishes the config in use when it changed, then compiles and publishes its table.
    pub fn update(
        &mut self,
        snapshot: &Snapshot,
        discovered: &Option<Arc<SiteConfig>>,
        identity: &Option<Identity>,
    ) {
        let site_config = in_use(snapshot, discovered);
        self.site_config.send_if_modified(|current| {
            let changed = current.as_ref().map(|c| c.sha256) != site_config.map(|c| c.sha256);
            if changed {
                *current = site_config.cloned().map(Arc::new);
            }
            changed
        });
        self.compile(snapshot, discovered, identity);
    }

    /// The routing table for the config and identity in use.
    fn build(
        &mut self,
        site_config: Option<&SiteConfig>,
        identity: &Option<Identity>,
    ) -> RouteTable {
        let Some(loaded) = site_config else {
            return RouteTable::empty();
        };
        let config = &loaded.config;
        let export = ExportSettings {
            zipkin_url: config.proxy.zipkin_url.clone(),
            otlp_url: config.proxy.otlp_url.clone(),
            queue_dir: config
                .proxy
                .span_queue_dir
                .clone()
                .unwrap_or_else(|| self.state_dir.join("spans")),
            queue_max_bytes: config.proxy.span_queue_max_bytes,
        };
        let sink = self.spans.update(
            &export,
            || {
                identity
                    .as_ref()
                    .map_or("unknown", |id| id.node.as_str())
                    .to_owned()
            },
            &self.metrics.spans,
        );
        // A config for another site than the identity's is not this proxy's to serve.
        let node = identity
            .as_ref()
            .filter(|id| id.site == config.site)
            .map(|id| &id.node);
        RouteTable::build(
            config,
            &loaded.kube,
            node,
            self.own_inbound,
            &self.metrics,
            sink,
        )
    }
}

/// Where this proxy's own node takes mesh traffic when the config does not say: the
/// inbound address, with loopback for a wildcard.
fn own_inbound(inbound: SocketAddr) -> SocketAddr {
    if inbound.ip().is_unspecified() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, inbound.port()))
    } else {
        inbound
    }
}

/// The site config to route by: the discovered one when there is one, else the file's.
fn in_use<'a>(
    snapshot: &'a Snapshot,
    discovered: &'a Option<Arc<SiteConfig>>,
) -> Option<&'a SiteConfig> {
    discovered
        .as_deref()
        .or(snapshot.value.site_config.as_ref())
}
