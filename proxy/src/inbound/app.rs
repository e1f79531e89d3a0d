//! Delivering to the app on `127.0.0.1:<port>`: each request in the HTTP version the
//! calling app spoke, each CONNECT as a tunnel spliced to a fresh connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::app_pool::AppError;
use crate::config::routes::{App, RouteTable, ServiceRoute};
use crate::context::Context;
use crate::telemetry::{grpc, trace};
use crate::transport::mesh_http::{
    self, error_response, strip_hop_by_hop, Body, DST_HEADER, PROTO_HEADER,
};

/// Sends one request to the app at `app` and its response back.
pub async fn deliver(
    context: &Context,
    table: &RouteTable,
    request: Request<Incoming>,
    route: &Arc<ServiceRoute>,
    app: App,
) -> Response<Body> {
    let App {
        addr: app,
        authority,
    } = app;
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
    // The protocol header is read and removed in one lookup (the request path hashes
    // each header name it touches).
    let h2 = parts
        .headers
        .remove(PROTO_HEADER)
        .is_some_and(|proto| proto == "h2");
    parts.headers.remove(DST_HEADER);
    strip_hop_by_hop(&mut parts.headers);
    let answer = if h2 {
        // HTTP/2 names the authority in `:authority` (the app's address); a `host`
        // header that says otherwise makes the request malformed (RFC 9113 §8.3.1), and
        // strict servers (nginx) refuse it.
        parts.headers.remove(header::HOST);
        parts.uri = match mesh_http::rebase(&parts.uri, authority) {
            Ok(uri) => uri,
            Err(err) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    &format!("bad request target: {err}"),
                )
            }
        };
        parts.version = Version::HTTP_2;
        let request = Request::from_parts(parts, body.boxed());
        match context.app_h2.request(request).await {
            Ok(response) => Ok(response.map(BodyExt::boxed)),
            Err(err) if err.is_connect() => Err(Undelivered::Refused),
            Err(err) => Err(Undelivered::Failed(err.to_string())),
        }
    } else {
        // HTTP/1.1 to an origin server: the target in origin form, the authority in `Host`.
        if !parts.headers.contains_key(header::HOST) {
            if let Some(authority) = parts.uri.authority() {
                if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
                    parts.headers.insert(header::HOST, value);
                }
            }
        }
        parts.uri = mesh_http::origin_form(&parts.uri);
        parts.version = Version::HTTP_11;
        let request = Request::from_parts(parts, body.boxed());
        match context.app_h1.send(app, request).await {
            Ok(response) => Ok(response),
            Err(AppError::Connect(_)) => Err(Undelivered::Refused),
            Err(err) => Err(Undelivered::Failed(err.to_string())),
        }
    };
    let response = match answer {
        Ok(response) => {
            let (mut head, body) = response.into_parts();
            strip_hop_by_hop(&mut head.headers);
            head.version = Version::HTTP_2;
            Response::from_parts(head, body)
        }
        Err(Undelivered::Refused) => error_response(
            StatusCode::BAD_GATEWAY,
            &format!("service {} refused the connection at {app}", route.name),
        ),
        Err(Undelivered::Failed(err)) => error_response(
            StatusCode::BAD_GATEWAY,
            &format!("service {} at {app} failed: {err}", route.name),
        ),
    };
    let response = grpc::record(response, &route.inbound, started.elapsed());
    let status = response.status().as_u16();
    if let Some(mut span) = span {
        span.set_remote(app);
        span.finish(status, table.spans.as_ref());
    }
    response
}

/// Why an app gave no answer.
enum Undelivered {
    /// Nothing accepted a connection on the app's address.
    Refused,
    /// The app broke off the exchange; the client's error says how.
    Failed(String),
}

/// Answers a CONNECT: dials the app first (so a refusal is a 502, not a dead tunnel),
/// then splices the upgraded stream to it.
pub async fn open_tunnel(
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
