//! The inbound side: mTLS connections from other nodes' proxies (and this node's own),
//! HTTP/2 only, each stream a request for a service placed on this node — delivered to the
//! app on `127.0.0.1:<port>` in the HTTP version the calling app spoke — or a CONNECT
//! tunnel to it.
//!
//! Invariant: nothing reaches an app unless the TLS handshake verified the caller's
//! certificate against the site's anchors, and the service's `allow` list (when it has
//! one) names one of the caller's identities.
//!
//! This module accepts the connection, checks the caller and picks the service; `app`
//! hands each request or tunnel to the app, `upgrade` each extended CONNECT (a WebSocket
//! or other HTTP upgrade).

mod app;
pub mod app_pool;
mod upgrade;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pimesh_meshtls::HandshakeFailure;
use pimesh_schema::SpiffeId;
use tokio::net::TcpStream;
use tracing::debug;

use crate::context::Context;
use crate::telemetry::labels::Direction;
use crate::transport::drain;
use crate::transport::handshakes::HandshakeSlot;
use crate::transport::mesh_http::{Body, DST_HEADER};
use app::{deliver, open_tunnel};

/// A peer must finish the TLS handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one peer connection may carry at once.
const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// Serves one connection from a peer proxy until it closes or the drain finishes it.
///
/// The connection holds `handshake` until its peer is authenticated, and then counts
/// against `proxy.max_connections` (inbound) or is closed when that limit is reached.
pub async fn serve(
    context: Arc<Context>,
    stream: TcpStream,
    handshake: HandshakeSlot,
    mut drain: drain::Watch,
) {
    let _ = stream.set_nodelay(true);
    let metrics = Arc::clone(&context.metrics);
    let Some(identity) = context.identity() else {
        metrics
            .connections
            .rejected(Direction::Inbound, "no_identity");
        return;
    };
    let tls =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, identity.acceptor().accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                let reason = HandshakeFailure::of(&err).label();
                metrics
                    .connections
                    .tls_handshake_failure(Direction::Inbound, reason);
                debug!(error = %err, reason, "inbound TLS handshake failed");
                return;
            }
            Err(_) => {
                metrics
                    .connections
                    .tls_handshake_failure(Direction::Inbound, HandshakeFailure::Timeout.label());
                return;
            }
        };
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(pimesh_meshtls::ALPN_H2) {
        metrics
            .connections
            .tls_handshake_failure(Direction::Inbound, HandshakeFailure::Protocol.label());
        return;
    }
    drop(handshake);
    let Some(_admitted) = context.admit(Direction::Inbound) else {
        return;
    };
    let caller: Arc<[SpiffeId]> = pimesh_meshtls::peer_ids(session, &identity.site).into();
    let settings = context.table().settings.clone();
    let service = service_fn(move |request| {
        let context = Arc::clone(&context);
        let caller = Arc::clone(&caller);
        // Boxed: hyper spawns a task per stream holding this future, and moves it as the
        // task is made and ends; a request's future is several KiB, a box one pointer.
        Box::pin(async move { Ok::<_, Infallible>(handle(context, request, caller).await) })
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .enable_connect_protocol()
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = drain.signaled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        debug!(error = %err, "peer connection ended with an error");
    }
}

async fn handle(
    context: Arc<Context>,
    request: Request<Incoming>,
    caller: Arc<[SpiffeId]>,
) -> Response<Body> {
    let table = context.table();
    let named = request
        .headers()
        .get(DST_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.host().to_owned()));
    let route = named.as_deref().and_then(|name| {
        table
            .by_name(name)
            .or_else(|| table.by_authority(name))
            .cloned()
    });
    let Some(route) = route else {
        return context.refuse(
            Direction::Inbound,
            "unknown_service",
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "unknown service {:?} on this node",
                named.unwrap_or_default()
            ),
        );
    };
    let Some(app) = route.local_app().cloned() else {
        return context.refuse(
            Direction::Inbound,
            "not_placed_here",
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("service {} is not placed on this node", route.name),
        );
    };
    if !route.allows(&caller) {
        let who = caller
            .first()
            .map_or_else(|| "an unnamed caller".to_owned(), ToString::to_string);
        return context.refuse(
            Direction::Inbound,
            "unauthorized",
            StatusCode::FORBIDDEN,
            &format!("{who} is not allowed to call service {}", route.name),
        );
    }
    if upgrade::requested(&request) {
        return upgrade::deliver(&table, request, &route, app).await;
    }
    if request.method() == Method::CONNECT {
        return open_tunnel(request, &route, app.addr).await;
    }
    deliver(&context, &table, request, &route, app).await
}
