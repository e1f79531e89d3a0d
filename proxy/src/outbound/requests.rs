//! HTTP from a local app, request by request: route (unknown service → 503), split,
//! faults, trace context, endpoint choice, send with the service's timeout (→ 504),
//! retries within the retry budget, and a 502 naming the peer when no node can be reached.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::header;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::debug;

use super::faults::inject_faults;
use super::{ClientProto, MAX_REDIALS};
use crate::config::http_routes::RulePolicy;
use crate::config::routes::{Endpoint, RouteTable, ServiceRoute, MAX_REQUESTS_IN_FLIGHT};
use crate::context::Context;
use crate::telemetry::labels::Direction;
use crate::telemetry::{grpc, trace};
use crate::transport::drain;
use crate::transport::mesh_http::{
    self, error_response, holding, strip_hop_by_hop, Body, DST_HEADER, PROTO_HEADER,
};
use crate::transport::peers::Lease;

/// Serves `proto` on a client connection until it closes or the drain finishes it.
/// `fixed`: the service of a local port or an intercepted address; `None` on the proxy
/// port, where each request names its service.
pub async fn serve_http(
    context: Arc<Context>,
    stream: TcpStream,
    fixed: Option<Arc<ServiceRoute>>,
    proto: ClientProto,
    mut drain: drain::Watch,
) {
    let settings = context.table().settings.clone();
    let metrics = Arc::clone(&context.metrics);
    let io = TokioIo::new(stream);
    let service = service_fn(move |request| {
        let context = Arc::clone(&context);
        let fixed = fixed.clone();
        // Boxed: hyper keeps room for one in-flight future in every HTTP/1 connection for
        // the connection's life, and a request's future is several KiB. Boxed, an idle
        // connection holds a pointer, and that state exists only while a request does.
        Box::pin(async move { Ok::<_, Infallible>(handle(context, request, fixed, proto).await) })
    });
    let result = match proto {
        ClientProto::H1 => {
            let max_header = usize::try_from(settings.max_header_bytes).unwrap_or(usize::MAX);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_timeout.0)
                .max_header_size(max_header)
                // Request heads are buffered whole; bodies stream through.
                .max_buf_size(max_header.max(8192));
            let connection = builder.serve_connection(io, service).with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => result,
                () = drain.signaled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            }
        }
        ClientProto::H2 => {
            let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(settings.max_header_bytes)
                .enable_connect_protocol()
                .serve_connection(io, service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => result,
                () = drain.signaled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            }
        }
    };
    if let Err(err) = result {
        let reason = client_error_reason(&err);
        metrics.connections.rejected(Direction::Outbound, reason);
        debug!(error = %err, reason, "client connection ended with an error");
    }
}

/// The metric label for a client connection that hyper ended with `err`.
fn client_error_reason(err: &hyper::Error) -> &'static str {
    if err.is_parse_too_large() {
        "header_too_large"
    } else if err.is_parse() || err.is_parse_status() {
        "malformed_http"
    } else if err.is_timeout() {
        "header_timeout"
    } else if err.is_incomplete_message() {
        "incomplete_message"
    } else {
        "connection_error"
    }
}

async fn handle(
    context: Arc<Context>,
    request: Request<Incoming>,
    fixed: Option<Arc<ServiceRoute>>,
    proto: ClientProto,
) -> Response<Body> {
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    let table = context.table();
    let apex = match fixed {
        Some(route) => table.by_name(route.name.as_str()).cloned().or(Some(route)),
        None => authority_of(&parts).and_then(|authority| table.by_authority(authority).cloned()),
    };
    let Some(apex) = apex else {
        let named = authority_of(&parts).unwrap_or("(none)").to_owned();
        return context.refuse(
            Direction::Outbound,
            "unknown_service",
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("unknown service: the authority {named:?} names no service of this site"),
        );
    };
    // A service with routes sends a request by the rule whose match it meets, and
    // answers 404 when none does (Gateway API).
    let rule = match table.http_routes(apex.name.as_str()) {
        None => None,
        Some(routes) => match routes.select(&parts) {
            Some(rule) => Some(Arc::clone(rule)),
            None => {
                return context.refuse(
                    Direction::Outbound,
                    "no_route",
                    StatusCode::NOT_FOUND,
                    &format!(
                        "no route of service {} matches {} {}",
                        apex.name,
                        parts.method,
                        parts.uri.path()
                    ),
                );
            }
        },
    };
    if let Some(rule) = &rule {
        rule.matched.inc();
        rule.edit(&mut parts.headers);
    }
    apex.outbound.request();
    table.budget.deposit();
    // Spans are made only where they can be exported: otherwise the next hop would
    // name a parent that no collector ever receives.
    let span = match table.spans {
        Some(_) => trace::begin(
            &mut parts.headers,
            trace::Kind::Client,
            &parts.method,
            parts.uri.path(),
            apex.name.as_str(),
        ),
        None => None,
    };
    let limit = rule
        .as_ref()
        .and_then(|rule| rule.timeout)
        .unwrap_or(apex.timeout);
    // Boxed: `forward`'s state is several KiB, and a future is moved by value into
    // `timeout` (and again as they are polled); a box moves as one pointer.
    let forwarded = Box::pin(forward(
        &context,
        &table,
        &apex,
        rule.as_deref(),
        parts,
        body,
        proto,
    ));
    let response = match tokio::time::timeout(limit, forwarded).await {
        Ok(response) => response,
        Err(_) => error_response(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "service {} did not answer within its timeout of {limit:?}",
                apex.name
            ),
        ),
    };
    let response = grpc::record(response, &apex.outbound, started.elapsed());
    let status = response.status().as_u16();
    if let Some(span) = span {
        span.finish(status, table.spans.as_ref());
    }
    response
}

/// The authority a request names: the URI's (absolute form, HTTP/2) or the Host header.
fn authority_of(parts: &http::request::Parts) -> Option<&str> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| parts.headers.get(header::HOST)?.to_str().ok())
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Sends one request of `apex` (by `rule`, when the service has routes) and returns the
/// answer to give the client.
async fn forward(
    context: &Context,
    table: &RouteTable,
    apex: &Arc<ServiceRoute>,
    rule: Option<&RulePolicy>,
    mut parts: http::request::Parts,
    body: Incoming,
    proto: ClientProto,
) -> Response<Body> {
    let (backend, splits) = match rule {
        Some(rule) => (rule.choose(apex), rule.splits()),
        None => (apex.choose_backend(), !apex.split.is_empty()),
    };
    if splits {
        context
            .metrics
            .outbound
            .split(apex.name.as_str(), backend.name.as_str());
    }
    // The service's own faults, then the backend's when the request goes elsewhere.
    if !Arc::ptr_eq(&backend, apex) {
        if let Some(aborted) = inject_faults(apex).await {
            return aborted;
        }
    }
    if let Some(aborted) = inject_faults(&backend).await {
        return aborted;
    }
    if !context.has_identity() {
        return context.refuse(
            Direction::Outbound,
            "no_identity",
            StatusCode::SERVICE_UNAVAILABLE,
            "this proxy has no node identity yet, so it cannot reach other nodes",
        );
    }

    // Held until the response body ends; a service at its limit is refused at once
    // rather than queued behind its own stalled requests.
    let Ok(in_flight) = Arc::clone(&backend.in_flight).try_acquire_owned() else {
        return context.refuse(
            Direction::Outbound,
            "service_overflow",
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "service {} has {MAX_REQUESTS_IN_FLIGHT} requests in flight from this node, \
                 its limit; try again later",
                backend.name
            ),
        );
    };

    if let Some(upgrade) = super::upgrade::requested(&parts, &body, proto) {
        return super::upgrade::forward(context, apex, &backend, parts, upgrade, proto, in_flight)
            .await;
    }
    strip_hop_by_hop(&mut parts.headers);
    let authority = authority_of(&parts)
        .map(str::to_owned)
        .unwrap_or_else(|| backend.host.clone());
    let uri = match mesh_http::rebase(&parts.uri, authority.as_str()) {
        Ok(uri) => uri,
        Err(err) => {
            return context.refuse(
                Direction::Outbound,
                "malformed_http",
                StatusCode::BAD_REQUEST,
                &format!("bad request target: {err}"),
            );
        }
    };
    parts.uri = uri;
    parts.version = Version::HTTP_2;
    parts.headers.insert(DST_HEADER, backend.dst_header.clone());
    parts.headers.insert(PROTO_HEADER, proto.header());

    let retryable = idempotent(&parts.method) && body.is_end_stream();
    // A route's retry settings replace its service's (as Linkerd's annotations do).
    let route_retries = rule.filter(|rule| rule.retries > 0 || !rule.retry_on.is_empty());
    let max_retries = route_retries
        .map_or(apex.retries, |rule| rule.retries)
        .max(backend.retries);
    let attempt_limit = rule.and_then(|rule| rule.attempt_timeout);
    let mut body = Some(body.boxed());
    let mut retries = 0u8;
    // Endpoints that could not be reached for this request; a redial goes elsewhere.
    let mut refused: Vec<Endpoint> = Vec::new();
    loop {
        let pick = if refused.is_empty() {
            backend.endpoints.pick()
        } else {
            backend.endpoints.pick_except(&refused)
        };
        let Some(pick) = pick else {
            if !refused.is_empty() {
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("no node running service {} could be reached", backend.name),
                );
            }
            return context.refuse(
                Direction::Outbound,
                "no_endpoints",
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "service {} has no endpoints: no node with a known address runs it",
                    backend.name
                ),
            );
        };
        let may_retry = |done: u8, limit: u8| {
            if done >= limit {
                return false;
            }
            if table.budget.try_withdraw() {
                apex.policy.retry();
                true
            } else {
                apex.policy.retry_budget_exhausted();
                false
            }
        };
        let node = pick.endpoint.node.clone();
        let Lease { mut sender, stream } = match context
            .peers
            .sender(|| context.identity(), &node, pick.endpoint.addr)
            .await
        {
            Ok(lease) => lease,
            Err(err) => {
                // Nothing was sent: any request may go to another endpoint, whatever the
                // service's `retries`.
                let redials = u8::try_from(refused.len()).unwrap_or(u8::MAX);
                refused.push(pick.endpoint.clone());
                pick.failure();
                if may_retry(redials, MAX_REDIALS) {
                    continue;
                }
                return error_response(StatusCode::BAD_GATEWAY, &err.to_string());
            }
        };
        let this_body = match body.take() {
            Some(body) => body,
            None => mesh_http::empty(),
        };
        let mut attempt = Request::new(this_body);
        *attempt.method_mut() = parts.method.clone();
        *attempt.uri_mut() = parts.uri.clone();
        *attempt.version_mut() = Version::HTTP_2;
        *attempt.headers_mut() = if retryable && retries < max_retries {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let sent = Instant::now();
        let answer = match attempt_limit {
            None => Ok(sender.send_request(attempt).await),
            Some(limit) => tokio::time::timeout(limit, sender.send_request(attempt)).await,
        };
        let Ok(answer) = answer else {
            pick.failure();
            if retryable && may_retry(retries, max_retries) {
                retries += 1;
                continue;
            }
            return error_response(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "node {node} did not answer for service {} within the backend timeout \
                     of route {}",
                    backend.name,
                    rule.map_or("", |rule| rule.name.as_str())
                ),
            );
        };
        match answer {
            Ok(response) => {
                let retry_answer = route_retries.is_some_and(|rule| {
                    rule.retries_answer(response.status().as_u16(), response.headers())
                });
                if retry_answer && retryable && may_retry(retries, max_retries) {
                    // The answer is dropped unread; its stream is reset.
                    pick.success(sent.elapsed());
                    retries += 1;
                    continue;
                }
                let proxy_failed = response.headers().contains_key(mesh_http::ERROR_HEADER)
                    && matches!(response.status().as_u16(), 502 | 503);
                let (mut head, body) = response.into_parts();
                let mut body = holding(body, (stream, in_flight));
                if proxy_failed {
                    pick.failure();
                } else {
                    body = grpc::judge(pick, sent.elapsed(), &head.headers, body);
                }
                strip_hop_by_hop(&mut head.headers);
                head.version = match proto {
                    ClientProto::H1 => Version::HTTP_11,
                    ClientProto::H2 => Version::HTTP_2,
                };
                return Response::from_parts(head, body);
            }
            Err(err) => {
                pick.failure();
                if retryable && may_retry(retries, max_retries) {
                    retries += 1;
                    continue;
                }
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("node {node} failed the request: {err}"),
                );
            }
        }
    }
}
