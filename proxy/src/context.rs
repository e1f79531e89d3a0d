//! What every connection handler shares: the current routing table and identity (each
//! replaced whole on reload), the peer pool, the clients to local apps, metrics, and the
//! connection limit.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

use crate::config::routes::RouteTable;
use crate::identity::Identity;
use crate::inbound::app_pool::AppPool;
use crate::telemetry::labels::Direction;
use crate::telemetry::metrics::Metrics;
use crate::transport::drain;
use crate::transport::handshakes::Handshakes;
use crate::transport::mesh_http::Body;
use crate::transport::metrics::ConnectionGuard;
use crate::transport::peers::Peers;

pub struct Context {
    pub routes: watch::Receiver<Arc<RouteTable>>,
    pub identity: watch::Receiver<Option<Identity>>,
    pub peers: Peers,
    pub metrics: Arc<Metrics>,
    /// Pooled keep-alive HTTP/1.1 connections to the apps on this node.
    pub app_h1: Arc<AppPool>,
    /// Pooled prior-knowledge HTTP/2 connections to the apps on this node.
    pub app_h2: Client<HttpConnector, Body>,
    /// Open connections per direction (outbound: from local apps; inbound: from peer
    /// proxies), each limited to `proxy.max_connections` on its own, so that apps filling
    /// their limit never lock other nodes out.
    open_connections: [AtomicU32; 2],
    /// Inbound TLS handshakes in progress (before a connection counts as open).
    pub handshakes: Handshakes,
    /// The drain, for the upgraded connections requests turn into: each holds a
    /// [`drain::Watch`] for its life, as the accepted connections do.
    pub drain: drain::WeakWatch,
}

/// One accepted connection, counted against `proxy.max_connections` until dropped.
pub struct Admitted {
    context: Arc<Context>,
    direction: Direction,
    _gauge: ConnectionGuard,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.context
            .counter(self.direction)
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl Context {
    /// A request refused by this proxy: counted in `pimesh_rejected_total{direction,
    /// reason}` and answered with `status` and `message` (see `mesh_http::error_response`).
    pub fn refuse(
        &self,
        direction: Direction,
        reason: &'static str,
        status: http::StatusCode,
        message: &str,
    ) -> http::Response<Body> {
        self.metrics.connections.rejected(direction, reason);
        crate::transport::mesh_http::error_response(status, message)
    }

    pub fn new(
        routes: watch::Receiver<Arc<RouteTable>>,
        identity: watch::Receiver<Option<Identity>>,
        metrics: Arc<Metrics>,
        drain: drain::WeakWatch,
    ) -> Context {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // A burst of requests opens as many app connections as it needs; afterwards only
        // this many per app stay pooled, so a burst does not leave its size in memory.
        const IDLE_APP_CONNECTIONS: usize = 128;
        Context {
            routes,
            identity,
            peers: Peers::new(metrics.connections.clone()),
            metrics,
            app_h1: AppPool::new(IDLE_APP_CONNECTIONS),
            app_h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .pool_max_idle_per_host(IDLE_APP_CONNECTIONS)
                .build(connector),
            open_connections: [AtomicU32::new(0), AtomicU32::new(0)],
            handshakes: Handshakes::default(),
            drain,
        }
    }

    fn counter(&self, direction: Direction) -> &AtomicU32 {
        match direction {
            Direction::Outbound => &self.open_connections[0],
            Direction::Inbound => &self.open_connections[1],
        }
    }

    pub fn table(&self) -> Arc<RouteTable> {
        Arc::clone(&self.routes.borrow())
    }

    pub fn identity(&self) -> Option<Identity> {
        self.identity.borrow().clone()
    }

    /// Whether there is a node identity, without copying it.
    pub fn has_identity(&self) -> bool {
        self.identity.borrow().is_some()
    }

    /// Admits one more client connection unless `proxy.max_connections` are open (then
    /// the refusal is counted and the caller closes the socket).
    pub fn admit(self: &Arc<Self>, direction: Direction) -> Option<Admitted> {
        let max = self.routes.borrow().settings.max_connections;
        let admitted = self
            .counter(direction)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .is_ok();
        if !admitted {
            self.metrics
                .connections
                .rejected(direction, "connection_limit");
            return None;
        }
        Some(Admitted {
            context: Arc::clone(self),
            direction,
            _gauge: self.metrics.connections.open_connection(direction),
        })
    }
}
