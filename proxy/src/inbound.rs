//! The inbound side: mTLS connections from other nodes' proxies (and this node's own),
//! HTTP/2 only, each stream a request for a service placed on this node — delivered to the
//! app on `127.0.0.1:<port>` in the HTTP version the calling app spoke — or a CONNECT
//! tunnel to it.
//!
//! Invariant: nothing reaches an app unless the TLS handshake verified the caller's
//! certificate against the site's anchors, and the service's `allow` list (when it has
//! one) names one of the caller's identities.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pimesh_meshtls::HandshakeFailure;
use pimesh_schema::SpiffeId;
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::routes::{RouteTable, ServiceRoute};
use crate::context::{Admitted, Context};
use crate::metrics::Direction;
use crate::trace;
use crate::transport::drain;
use crate::transport::mesh_http::Body;
use crate::transport::mesh_http::{
    self, error_response, strip_hop_by_hop, DST_HEADER, PROTO_HEADER,
};

/// A peer must finish the TLS handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one peer connection may carry at once.
const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// Serves one connection from a peer proxy until it closes or the drain finishes it.
pub async fn serve(
    context: Arc<Context>,
    stream: TcpStream,
    admitted: Admitted,
    mut drain: drain::Watch,
) {
    let _admitted = admitted;
    let _ = stream.set_nodelay(true);
    let metrics = Arc::clone(&context.metrics);
    let Some(identity) = context.identity() else {
        metrics.rejected(Direction::Inbound, "no_identity");
        return;
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, identity.acceptor().accept(stream))
        .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            let reason = HandshakeFailure::of(&err).label();
            metrics.tls_handshake_failure(Direction::Inbound, reason);
            debug!(error = %err, reason, "inbound TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics.tls_handshake_failure(Direction::Inbound, HandshakeFailure::Timeout.label());
            return;
        }
    };
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(pimesh_meshtls::ALPN_H2) {
        metrics.tls_handshake_failure(Direction::Inbound, HandshakeFailure::Protocol.label());
        return;
    }
    let caller: Arc<[SpiffeId]> = pimesh_meshtls::peer_ids(session, &identity.site).into();
    let settings = context.table().settings.clone();
    let service = service_fn(move |request| {
        let context = Arc::clone(&context);
        let caller = Arc::clone(&caller);
        async move { Ok::<_, Infallible>(handle(context, request, caller).await) }
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
        context
            .metrics
            .rejected(Direction::Inbound, "unknown_service");
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "unknown service {:?} on this node",
                named.unwrap_or_default()
            ),
        );
    };
    let (Some(port), true) = (route.port, route.local) else {
        context
            .metrics
            .rejected(Direction::Inbound, "not_placed_here");
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("service {} is not placed on this node", route.name),
        );
    };
    if !route.allows(&caller) {
        context.metrics.rejected(Direction::Inbound, "unauthorized");
        let who = caller
            .first()
            .map_or_else(|| "an unnamed caller".to_owned(), ToString::to_string);
        return error_response(
            StatusCode::FORBIDDEN,
            &format!("{who} is not allowed to call service {}", route.name),
        );
    }
    let app = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    if request.method() == Method::CONNECT {
        return open_tunnel(request, &route, app).await;
    }
    deliver(&context, &table, request, &route, app).await
}

/// Sends one request to the app at `app` and its response back.
async fn deliver(
    context: &Context,
    table: &RouteTable,
    request: Request<Incoming>,
    route: &Arc<ServiceRoute>,
    app: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    route.inbound.request();
    let (mut parts, body) = request.into_parts();
    // Spans are made only where they can be exported: otherwise the next hop would
    // name a parent that no collector ever receives.
    let span = match table.spans {
        Some(_) => trace::begin(
            &mut parts.headers,
            trace::Kind::Server,
            &parts.method,
            parts.uri.path(),
            route.name.as_str(),
        ),
        None => None,
    };
    let h2 = parts.headers.get(PROTO_HEADER) == Some(&HeaderValue::from_static("h2"));
    parts.headers.remove(DST_HEADER);
    parts.headers.remove(PROTO_HEADER);
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, value);
            }
        }
    }
    let Some(authority) = route.app_authority.clone() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("service {} has no port", route.name),
        );
    };
    parts.uri = match mesh_http::rebase(&parts.uri, authority) {
        Ok(uri) => uri,
        Err(err) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("bad request target: {err}"),
            )
        }
    };
    parts.version = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let request = Request::from_parts(parts, body.boxed());
    let client = if h2 { &context.app_h2 } else { &context.app_h1 };
    let response = match client.request(request).await {
        Ok(response) => {
            let (mut head, body) = response.into_parts();
            strip_hop_by_hop(&mut head.headers);
            head.version = Version::HTTP_2;
            Response::from_parts(head, body.boxed())
        }
        Err(err) if err.is_connect() => error_response(
            StatusCode::BAD_GATEWAY,
            &format!("service {} refused the connection at {app}", route.name),
        ),
        Err(err) => error_response(
            StatusCode::BAD_GATEWAY,
            &format!("service {} at {app} failed: {err}", route.name),
        ),
    };
    let status = response.status().as_u16();
    route.inbound.response(status, started.elapsed());
    if let Some(mut span) = span {
        span.set_remote(app);
        span.finish(status, table.spans.as_ref());
    }
    response
}

/// Answers a CONNECT: dials the app first (so a refusal is a 502, not a dead tunnel),
/// then splices the upgraded stream to it.
async fn open_tunnel(
    mut request: Request<Incoming>,
    route: &Arc<ServiceRoute>,
    app: SocketAddr,
) -> Response<Body> {
    let mut server = match tokio::time::timeout(
        crate::transport::peers::CONNECT_TIMEOUT,
        TcpStream::connect(app),
    )
    .await
    {
        Ok(Ok(server)) => server,
        _ => {
            return error_response(
                StatusCode::BAD_GATEWAY,
                &format!("service {} refused the connection at {app}", route.name),
            )
        }
    };
    let _ = server.set_nodelay(true);
    let upgrade = hyper::upgrade::on(&mut request);
    let route = Arc::clone(route);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        route.tcp_inbound.open();
        let mut upgraded = TokioIo::new(upgraded);
        let (read, written) =
            crate::transport::splice::splice(&mut upgraded, &mut server, route.idle_timeout).await;
        route.tcp_inbound.close(read, written);
    });
    Response::new(mesh_http::empty())
}
