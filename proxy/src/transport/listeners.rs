//! Accept loops: the inbound mesh port, the outbound proxy port, and one listener per
//! service `local_port`, opened and closed as reloads change the table. Each accepted
//! connection is admitted against the connection limit (an inbound one once its TLS
//! handshake is done, within the handshake budget until then) and served on its own task. A
//! failed accept is handled as on every other port (`pimesh_runtime::serve::Acceptor`:
//! a short pause, warnings at a bounded rate); the limit is the proxy's own, per direction
//! and counted in its metrics, and a connection over it is closed at once rather than left
//! in the backlog.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use pimesh_runtime::serve::Acceptor;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::routes::{RouteTable, ServiceRoute};
use crate::context::Context;
use crate::inbound;
use crate::outbound::{self, Entry};
use crate::telemetry::labels::Direction;
use crate::transport::drain;
use crate::transport::original_dst::original_dst;

/// Accepts on the inbound (mTLS) port until the task is dropped.
pub async fn inbound_loop(listener: TcpListener, context: Arc<Context>, drain: drain::Watch) {
    let mut acceptor = Acceptor::new(listener, "inbound");
    loop {
        let Some((stream, peer)) = acceptor.accept().await else {
            continue;
        };
        // Counted against the connection limit once authenticated (`inbound::serve`).
        let Some(handshake) = context.handshakes.begin(peer.ip()) else {
            context
                .metrics
                .connections
                .rejected(Direction::Inbound, "handshake_limit");
            continue;
        };
        tokio::spawn(inbound::serve(
            Arc::clone(&context),
            stream,
            handshake,
            drain.clone(),
        ));
    }
}

/// Accepts on the outbound port (`entry` None) or a service's local port until the task
/// is dropped. On the outbound port a connection that iptables redirected is routed by
/// the address its client dialled.
///
/// Invariant: on the outbound port, a connection that was not redirected is served only
/// when it came to a loopback address: the port listens on every address so that a
/// redirect from the pods' bridge reaches it, and a host of the LAN that dials it
/// directly gets nothing (it would otherwise call the mesh with this node's identity).
pub async fn outbound_loop(
    listener: TcpListener,
    binding: Option<String>,
    context: Arc<Context>,
    drain: drain::Watch,
) {
    let mut acceptor = Acceptor::new(listener, "outbound");
    loop {
        let Some((stream, peer)) = acceptor.accept().await else {
            continue;
        };
        let entry = match (&binding, original_dst(&stream)) {
            (Some(service), _) => Entry::Binding(service.clone()),
            (None, Some(dst)) => Entry::Intercepted(dst),
            (None, None) if dialled_loopback(&stream) => Entry::HttpProxy,
            (None, None) => {
                debug!(%peer, "outbound port dialled from off the node: refused");
                context
                    .metrics
                    .connections
                    .rejected(Direction::Outbound, "not_local");
                continue;
            }
        };
        let Some(admitted) = context.admit(Direction::Outbound) else {
            continue;
        };
        tokio::spawn(outbound::serve(
            Arc::clone(&context),
            stream,
            entry,
            admitted,
            drain.clone(),
        ));
    }
}

/// Whether the client dialled a loopback address (so it runs on this node).
fn dialled_loopback(stream: &tokio::net::TcpStream) -> bool {
    stream
        .local_addr()
        .is_ok_and(|local| local.ip().to_canonical().is_loopback())
}

/// The listeners of services' local ports: `(port, service)` → accept task.
pub struct LocalBindings {
    ip: IpAddr,
    open: BTreeMap<(u16, String), JoinHandle<()>>,
}

impl LocalBindings {
    pub fn new(ip: IpAddr) -> LocalBindings {
        LocalBindings {
            ip,
            open: BTreeMap::new(),
        }
    }

    /// Opens the listeners `table` asks for and closes the others. Connections already
    /// accepted are not touched. A port that cannot be bound is logged and retried at the
    /// next reload; the other bindings still open.
    pub fn update(&mut self, table: &RouteTable, context: &Arc<Context>, drain: &drain::Watch) {
        let wanted: BTreeMap<(u16, String), &Arc<ServiceRoute>> = table
            .local_bindings
            .iter()
            .map(|(port, route)| ((*port, route.name.to_string()), route))
            .collect();
        self.open.retain(|key, task| {
            let keep = wanted.contains_key(key);
            if !keep {
                task.abort();
                info!(port = key.0, service = %key.1, "local port closed");
            }
            keep
        });
        for ((port, name), route) in wanted {
            if self.open.contains_key(&(port, name.clone())) {
                continue;
            }
            let addr = SocketAddr::new(self.ip, port);
            let listener = match bind(addr) {
                Ok(listener) => listener,
                Err(err) => {
                    warn!(%addr, service = %name, error = %err, "cannot open the service's local port");
                    continue;
                }
            };
            info!(%addr, service = %name, "local port open");
            let task = tokio::spawn(outbound_loop(
                listener,
                Some(route.name.clone()),
                Arc::clone(context),
                drain.clone(),
            ));
            self.open.insert((port, name), task);
        }
    }

    pub fn close_all(&mut self) {
        for (_, task) in std::mem::take(&mut self.open) {
            task.abort();
        }
    }
}

/// A listener on `addr` with `SO_REUSEADDR` (a restarted proxy rebinds at once) and a
/// deep backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
