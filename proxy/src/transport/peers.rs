//! Connections to other nodes' proxies: long-lived mTLS connections carrying multiplexed
//! HTTP/2 — requests as streams, opaque TCP as CONNECT tunnels — so that a client opening
//! a connection per request costs the mesh a stream, not a handshake.
//!
//! Invariants:
//! - every stream is leased ([`Lease`]) and counted on its connection until the lease is
//!   dropped (the response body or the tunnel ends);
//! - a stream goes to the pooled connection with the fewest open streams; a new
//!   connection is dialled only when every pooled one carries
//!   [`STREAMS_PER_CONNECTION`] or more and fewer than [`MAX_CONNECTIONS_PER_PEER`] are
//!   open, so that one busy service's streams never queue another's behind the peer's
//!   stream limit while a connection could be added;
//! - at most one connection attempt per peer is in flight; requests for a peer whose
//!   connection is being set up wait for that attempt instead of starting their own, and
//!   when an extra connection cannot be dialled they share the open ones;
//! - a connection that fails or is closed by the peer is dropped from the pool, and so is
//!   an idle one while another idle one remains (its stream-less connection then closes).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pimesh_meshtls::HandshakeFailure;
use pimesh_schema::DnsLabel;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::identity::Identity;
use crate::telemetry::labels::Direction;
use crate::transport::mesh_http::Body;
use crate::transport::metrics::ConnectionMetrics;

/// How long dialling a peer (TCP connect and TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Open streams on each pooled connection to a peer before another connection is
/// dialled; a quarter of the streams the peer's inbound side allows per connection.
pub const STREAMS_PER_CONNECTION: usize = 250;

/// Connections to one peer at most. Past `STREAMS_PER_CONNECTION` on each, streams share
/// the least busy one up to the peer's own limit per connection (1000).
pub const MAX_CONNECTIONS_PER_PEER: usize = 4;

/// Why node `node` at `addr` could not be reached; the data path turns it into a 502
/// whose reason is this error's one line.
#[derive(Debug)]
pub struct DialError {
    pub node: DnsLabel,
    pub addr: SocketAddr,
    pub problem: DialProblem,
}

/// What went wrong dialling a peer.
#[derive(Debug)]
pub enum DialProblem {
    /// No node identity to present.
    NoIdentity,
    ConnectTimeout,
    Connect(io::Error),
    /// The handshake failed; `reason` is its `tls_handshake_failure_total` label.
    Tls {
        reason: &'static str,
        err: io::Error,
    },
    TlsTimeout,
    Http2(hyper::Error),
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (node, addr) = (&self.node, self.addr);
        match &self.problem {
            DialProblem::NoIdentity => {
                write!(f, "no node identity to dial node {node} at {addr} with")
            }
            DialProblem::ConnectTimeout => {
                write!(f, "connecting to node {node} at {addr} timed out")
            }
            DialProblem::Connect(err) => {
                write!(f, "cannot connect to node {node} at {addr}: {err}")
            }
            DialProblem::Tls { reason, err } => {
                write!(f, "TLS with node {node} at {addr} failed ({reason}): {err}")
            }
            DialProblem::TlsTimeout => write!(f, "TLS with node {node} at {addr} timed out"),
            DialProblem::Http2(err) => write!(f, "HTTP/2 with node {node} at {addr}: {err}"),
        }
    }
}

impl std::error::Error for DialError {}

/// One pooled connection and its open streams.
struct Pooled {
    sender: SendRequest<Body>,
    streams: Arc<AtomicUsize>,
}

impl Pooled {
    fn open_streams(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }

    fn lease(&self) -> Lease {
        self.streams.fetch_add(1, Ordering::AcqRel);
        Lease {
            sender: self.sender.clone(),
            stream: StreamGuard(Arc::clone(&self.streams)),
        }
    }
}

/// A sender on a pooled connection, for one stream.
pub struct Lease {
    pub sender: SendRequest<Body>,
    /// Keep for as long as the stream is open (the response body, the tunnel).
    pub stream: StreamGuard,
}

/// Counts one open stream on its connection until dropped.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

type Slot = Arc<tokio::sync::Mutex<Vec<Pooled>>>;

/// The pool of peer connections. Cheap to clone.
#[derive(Clone)]
pub struct Peers {
    /// Keyed by the peer's address alone (one node per address), so that a lookup
    /// allocates nothing.
    slots: Arc<Mutex<HashMap<SocketAddr, Slot>>>,
    metrics: ConnectionMetrics,
}

impl Peers {
    pub fn new(metrics: ConnectionMetrics) -> Peers {
        Peers {
            slots: Arc::default(),
            metrics,
        }
    }

    /// A lease of a stream to `node` at `addr`, on the least busy pooled connection, or
    /// on a new one when every pooled one is busy (see the module's invariants). A new
    /// connection is dialled with the identity `identity` gives, which is asked only
    /// then: a pooled request copies no identity.
    pub async fn sender(
        &self,
        identity: impl FnOnce() -> Option<Identity>,
        node: &DnsLabel,
        addr: SocketAddr,
    ) -> Result<Lease, DialError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(slots.entry(addr).or_default())
        };
        let mut pooled = slot.lock().await;
        pooled.retain(|connection| !connection.sender.is_closed());
        let mut idle_seen = false;
        pooled.retain(|connection| {
            let idle = connection.open_streams() == 0;
            let keep = !(idle && idle_seen);
            idle_seen |= idle;
            keep
        });
        // The first of equally busy connections: the oldest, so extra ones fall idle.
        let least_busy = pooled
            .iter()
            .min_by_key(|connection| connection.open_streams());
        if let Some(connection) = least_busy {
            if connection.open_streams() < STREAMS_PER_CONNECTION
                || pooled.len() >= MAX_CONNECTIONS_PER_PEER
            {
                return Ok(connection.lease());
            }
        }
        let Some(identity) = identity() else {
            return match least_busy {
                Some(connection) => Ok(connection.lease()),
                None => Err(dial_error(node, addr, DialProblem::NoIdentity)),
            };
        };
        match self.dial(&identity, node, addr).await {
            Ok(sender) => {
                let connection = Pooled {
                    sender,
                    streams: Arc::default(),
                };
                let lease = connection.lease();
                pooled.push(connection);
                if pooled.len() > 1 {
                    debug!(%node, %addr, connections = pooled.len(), "extra peer connection up");
                }
                Ok(lease)
            }
            Err(err) => match pooled.iter().min_by_key(|c| c.open_streams()) {
                Some(connection) => {
                    debug!(%node, %addr, error = %err, "no extra peer connection; sharing the open ones");
                    Ok(connection.lease())
                }
                None => Err(err),
            },
        }
    }

    /// Forgets every pooled connection (after an identity change): open streams finish on
    /// their connections, new requests dial with the new identity.
    pub fn clear(&self) {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    async fn dial(
        &self,
        identity: &Identity,
        node: &DnsLabel,
        addr: SocketAddr,
    ) -> Result<SendRequest<Body>, DialError> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| dial_error(node, addr, DialProblem::ConnectTimeout))?
            .map_err(|err| dial_error(node, addr, DialProblem::Connect(err)))?;
        let _ = tcp.set_nodelay(true);
        let handshake = identity
            .connector()
            .connect(identity.server_name(node), tcp);
        let tls = match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                let reason = HandshakeFailure::of(&err).label();
                self.metrics
                    .tls_handshake_failure(Direction::Outbound, reason);
                return Err(dial_error(node, addr, DialProblem::Tls { reason, err }));
            }
            Err(_) => {
                self.metrics
                    .tls_handshake_failure(Direction::Outbound, HandshakeFailure::Timeout.label());
                return Err(dial_error(node, addr, DialProblem::TlsTimeout));
            }
        };
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|err| dial_error(node, addr, DialProblem::Http2(err)))?;
        let peer = node.clone();
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => debug!(node = %peer, %addr, "peer connection closed"),
                Err(err) => warn!(node = %peer, %addr, error = %err, "peer connection failed"),
            }
        });
        debug!(%node, %addr, "peer connection up");
        Ok(sender)
    }
}

fn dial_error(node: &DnsLabel, addr: SocketAddr, problem: DialProblem) -> DialError {
    DialError {
        node: node.clone(),
        addr,
        problem,
    }
}
