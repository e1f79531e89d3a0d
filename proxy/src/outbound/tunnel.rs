//! Opaque TCP from a local app: carried to the node that runs the service through a
//! CONNECT stream on a pooled peer connection; an intercepted connection to an address
//! that is no mesh service is sent on as it was.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use pimesh_schema::DnsLabel;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tracing::debug;

use super::MAX_REDIALS;
use crate::config::routes::{Endpoint, ServiceRoute};
use crate::context::Context;
use crate::telemetry::labels::Direction;
use crate::transport::drain;
use crate::transport::mesh_http::{self, DST_HEADER};
use crate::transport::peers::{DialError, Lease};

/// Why a tunnel to a node could not be opened (logged at debug level; the next endpoint is
/// tried).
#[derive(Debug)]
enum TunnelError {
    Dial(DialError),
    Request(http::Error),
    Send(hyper::Error),
    /// The node answered the CONNECT with `status` and the reason its proxy gave.
    Refused {
        node: DnsLabel,
        status: StatusCode,
        reason: String,
    },
    Upgrade(hyper::Error),
}

impl fmt::Display for TunnelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunnelError::Dial(err) => err.fmt(f),
            TunnelError::Request(err) => err.fmt(f),
            TunnelError::Send(err) | TunnelError::Upgrade(err) => err.fmt(f),
            TunnelError::Refused {
                node,
                status,
                reason,
            } => write!(f, "node {node} refused the tunnel: {status} {reason}"),
        }
    }
}

/// Carries an opaque TCP connection to `apex` (or its split's choice) through a CONNECT
/// stream to the node that runs it.
pub async fn tunnel(
    context: Arc<Context>,
    mut client: TcpStream,
    apex: Arc<ServiceRoute>,
    // Held for the tunnel's life: a drain waits for it up to the drain deadline.
    _drain: drain::Watch,
) {
    let backend = apex.choose_backend();
    if !apex.split.is_empty() {
        context
            .metrics
            .outbound
            .split(apex.name.as_str(), backend.name.as_str());
    }
    if !context.has_identity() {
        context
            .metrics
            .connections
            .rejected(Direction::Outbound, "no_identity");
        return;
    }
    let metrics = &apex.tcp_outbound;
    metrics.open();
    // Nothing has reached the app until the tunnel is up, so a failed attempt goes to
    // another endpoint, up to the redial limit or the service's retries.
    let max_attempts = 1 + usize::from(MAX_REDIALS.max(apex.retries).max(backend.retries));
    let mut refused: Vec<Endpoint> = Vec::new();
    let upgraded = loop {
        let pick = if refused.is_empty() {
            backend.endpoints.pick()
        } else {
            backend.endpoints.pick_except(&refused)
        };
        let Some(pick) = pick else {
            if refused.is_empty() {
                context
                    .metrics
                    .connections
                    .rejected(Direction::Outbound, "no_endpoints");
            }
            metrics.close(0, 0);
            return;
        };
        let node = pick.endpoint.node.clone();
        let target = format!("{}:{}", backend.host, backend.port.unwrap_or_default());
        let connect = async {
            let Lease { mut sender, stream } = context
                .peers
                .sender(|| context.identity(), &node, pick.endpoint.addr)
                .await
                .map_err(TunnelError::Dial)?;
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri(target.as_str())
                .header(DST_HEADER, backend.dst_header.clone())
                .body(mesh_http::empty())
                .map_err(TunnelError::Request)?;
            let response = sender
                .send_request(request)
                .await
                .map_err(TunnelError::Send)?;
            if response.status() != StatusCode::OK {
                let reason = response
                    .headers()
                    .get(mesh_http::ERROR_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                return Err(TunnelError::Refused {
                    node: node.clone(),
                    status: response.status(),
                    reason,
                });
            }
            let upgraded = hyper::upgrade::on(response)
                .await
                .map_err(TunnelError::Upgrade)?;
            Ok((upgraded, stream))
        };
        let started = Instant::now();
        match connect.await {
            Ok(up) => {
                pick.success(started.elapsed());
                break up;
            }
            Err(err) => {
                refused.push(pick.endpoint.clone());
                pick.failure();
                debug!(service = %backend.name, error = %err, "tunnel failed");
                if refused.len() >= max_attempts {
                    metrics.close(0, 0);
                    return;
                }
            }
        }
    };
    // The stream lease is held for as long as the tunnel is open.
    let (upgraded, _stream) = upgraded;
    let mut upgraded = TokioIo::new(upgraded);
    let idle = apex.idle_timeout.or(backend.idle_timeout);
    let (read, written) = crate::transport::splice::splice(&mut client, &mut upgraded, idle).await;
    let _ = client.shutdown().await;
    metrics.close(read, written);
}

/// A redirected connection to an address that is not a mesh service: sent on as it was.
pub async fn passthrough(mut client: TcpStream, dst: SocketAddr) {
    let Ok(Ok(mut server)) = tokio::time::timeout(
        crate::transport::peers::CONNECT_TIMEOUT,
        TcpStream::connect(dst),
    )
    .await
    else {
        return;
    };
    crate::transport::splice::splice(&mut client, &mut server, None).await;
}
