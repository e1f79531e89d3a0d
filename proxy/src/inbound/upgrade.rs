//! Delivering an upgrade (an HTTP/2 extended CONNECT from a peer proxy, RFC 8441) to the
//! app: as an HTTP/1.1 request with `Connection: upgrade` and `Upgrade: <:protocol>` on a
//! fresh connection to the app, whatever HTTP version the calling app spoke (apps speak
//! WebSocket over HTTP/1.1; few accept extended CONNECT).
//!
//! - The app answers `101`: the peer gets `200` with the `101`'s headers (less hop-by-hop
//!   ones), and the bytes are copied both ways (`transport::upgraded`) with the service's
//!   `idle_timeout` (an hour when it sets none).
//! - The app answers anything else: the peer gets that answer with its status in
//!   [`UPGRADE_STATUS_HEADER`]; a `2xx`, which would open the tunnel, goes as `502`.
//!
//! A WebSocket from an HTTP/2 client has no `Sec-WebSocket-Key` (RFC 8441 §5): one is made
//! up for the app, and the app's `Sec-WebSocket-Accept` is not passed back.

use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::ext::Protocol;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::routes::{App, RouteTable, ServiceRoute};
use crate::telemetry::trace;
use crate::transport::mesh_http::{
    self, error_response, strip_hop_by_hop, Body, DST_HEADER, PROTO_HEADER, UPGRADE_METHOD_HEADER,
    UPGRADE_STATUS_HEADER,
};
use crate::transport::peers::CONNECT_TIMEOUT;
use crate::transport::upgraded::{pump, DEFAULT_IDLE_TIMEOUT};

/// Whether `request` is an extended CONNECT (an upgrade) rather than a plain CONNECT (a
/// TCP tunnel) or a request.
pub fn requested(request: &Request<Incoming>) -> bool {
    request.method() == Method::CONNECT && request.extensions().get::<Protocol>().is_some()
}

/// Hands the upgrade `request` to the app at `app` (see the module's doc), with a SERVER
/// span of the upgrade's request (its method as the calling app sent it) when the table
/// exports spans.
pub async fn deliver(
    table: &RouteTable,
    mut request: Request<Incoming>,
    route: &Arc<ServiceRoute>,
    app: App,
) -> Response<Body> {
    let started = Instant::now();
    route.inbound.request();
    let app_addr = app.addr;
    let span = match table.spans {
        Some(_) => {
            let method = request
                .headers()
                .get(UPGRADE_METHOD_HEADER)
                .and_then(|value| Method::from_bytes(value.as_bytes()).ok())
                .unwrap_or(Method::GET);
            let path = request.uri().path().to_owned();
            trace::begin(
                request.headers_mut(),
                trace::Kind::Server,
                &method,
                &path,
                route.name.as_str(),
            )
        }
        None => None,
    };
    let response = upgrade_app(&mut request, route, app).await;
    // Counted as the app answered: 101 when it switched protocols.
    let status = match response.headers().get(UPGRADE_STATUS_HEADER) {
        Some(app_status) => app_status
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        None if response.status() == StatusCode::OK => 101,
        None => response.status().as_u16(),
    };
    route.inbound.response(status, started.elapsed());
    if let Some(mut span) = span {
        span.set_remote(app_addr);
        span.finish(status, table.spans.as_ref());
    }
    response
}

async fn upgrade_app(
    request: &mut Request<Incoming>,
    route: &Arc<ServiceRoute>,
    app: App,
) -> Response<Body> {
    let on_peer = hyper::upgrade::on(&mut *request);
    let protocol = request
        .extensions()
        .get::<Protocol>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let Ok(token) = HeaderValue::from_str(&protocol) else {
        return error_response(StatusCode::BAD_REQUEST, "bad :protocol");
    };
    let mut headers = std::mem::take(request.headers_mut());
    let method = headers
        .remove(UPGRADE_METHOD_HEADER)
        .and_then(|value| Method::from_bytes(value.as_bytes()).ok())
        .unwrap_or(Method::GET);
    headers.remove(DST_HEADER);
    headers.remove(PROTO_HEADER);
    strip_hop_by_hop(&mut headers);
    if !headers.contains_key(header::HOST) {
        if let Some(authority) = request.uri().authority() {
            if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(header::HOST, value);
            }
        }
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, token);
    let websocket = protocol.eq_ignore_ascii_case("websocket");
    let made_up_key = websocket && !headers.contains_key(header::SEC_WEBSOCKET_KEY);
    if made_up_key {
        let key =
            base64::engine::general_purpose::STANDARD.encode(fastrand::u128(..).to_le_bytes());
        if let Ok(value) = HeaderValue::from_str(&key) {
            headers.insert(header::SEC_WEBSOCKET_KEY, value);
        }
    }
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut to_app = Request::new(mesh_http::empty());
    *to_app.method_mut() = method;
    *to_app.uri_mut() = Uri::from(path);
    *to_app.version_mut() = Version::HTTP_11;
    *to_app.headers_mut() = headers;

    let refused = || {
        error_response(
            StatusCode::BAD_GATEWAY,
            &format!(
                "service {} refused the connection at {}",
                route.name, app.addr
            ),
        )
    };
    let Ok(Ok(tcp)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(app.addr)).await
    else {
        return refused();
    };
    let _ = tcp.set_nodelay(true);
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tcp)).await {
            Ok(pair) => pair,
            Err(_) => return refused(),
        };
    tokio::spawn(connection.with_upgrades());
    let mut response = match sender.send_request(to_app).await {
        Ok(response) => response,
        Err(err) => {
            return error_response(
                StatusCode::BAD_GATEWAY,
                &format!("service {} at {} failed: {err}", route.name, app.addr),
            )
        }
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut head, body) = response.into_parts();
        strip_hop_by_hop(&mut head.headers);
        head.headers.insert(
            UPGRADE_STATUS_HEADER,
            HeaderValue::from(head.status.as_u16()),
        );
        if head.status.is_success() {
            head.status = StatusCode::BAD_GATEWAY;
        }
        head.version = Version::HTTP_2;
        return Response::from_parts(head, body.boxed());
    }
    let on_app = hyper::upgrade::on(&mut response);
    let (mut head, _) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    head.headers.remove(header::CONTENT_LENGTH);
    if made_up_key {
        head.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
    }
    head.status = StatusCode::OK;
    head.version = Version::HTTP_2;
    let idle = route.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
    let metrics = route.upgrade_inbound.clone();
    let service = route.name.clone();
    tokio::spawn(async move {
        let (peer, app) = match tokio::try_join!(on_peer, on_app) {
            Ok(both) => both,
            Err(err) => {
                debug!(%service, error = %err, "upgrade did not complete");
                return;
            }
        };
        let end = pump(TokioIo::new(peer), TokioIo::new(app), idle, &metrics).await;
        debug!(%service, ?end, "upgraded connection ended");
    });
    Response::from_parts(head, mesh_http::empty())
}
