//! Upgrades from a local app: an HTTP/1.1 request with `Connection: upgrade` and
//! `Upgrade: <token>` (a WebSocket handshake, or any other token but `h2c`), or an HTTP/2
//! extended CONNECT (RFC 8441, `:protocol <token>`).
//!
//! Between the proxies an upgrade is an HTTP/2 extended CONNECT on a pooled peer
//! connection: `:method CONNECT`, `:protocol` the token, `:path` the request's, the
//! client's headers (less hop-by-hop ones) and the mesh's own. The inbound proxy hands it
//! to the app as an HTTP/1.1 upgrade and answers `200` when the app switched protocols
//! (its `101`'s headers, e.g. `Sec-WebSocket-Accept`, ride along), or the app's answer
//! otherwise (see [`UPGRADE_STATUS_HEADER`]). The client then gets a `101` (HTTP/1.1) or a
//! `200` (extended CONNECT), and the bytes are copied both ways
//! (`transport::upgraded`) until either side closes or the connection stays idle for the
//! service's `idle_timeout` (an hour when it sets none).
//!
//! A refused upgrade is an ordinary response: the app's status and body. An HTTP/2
//! client, to which a `2xx` would mean that the tunnel is open, gets a `502` instead of
//! an app's `2xx`.
//!
//! The request holds the service's in-flight permit and its peer stream for as long as
//! the upgraded connection lasts. Only a peer that could not be reached is retried (on
//! another endpoint): once sent, an upgrade is not repeated.

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body as _, Incoming};
use hyper::ext::Protocol;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use super::{ClientProto, MAX_REDIALS};
use crate::config::routes::{Endpoint, ServiceRoute};
use crate::context::Context;
use crate::transport::mesh_http::{
    self, error_response, holding, strip_hop_by_hop, Body, DST_HEADER, ERROR_HEADER, PROTO_HEADER,
    UPGRADE_METHOD_HEADER, UPGRADE_STATUS_HEADER,
};
use crate::transport::peers::Lease;
use crate::transport::upgraded::{pump, DEFAULT_IDLE_TIMEOUT};

/// An upgrade a client asked for.
pub struct Upgrade {
    /// The token: `Upgrade`'s value, or the extended CONNECT's `:protocol`.
    protocol: Protocol,
}

/// The upgrade `parts` ask for, if any: an HTTP/1.1 request without a body whose
/// `Connection` names `upgrade` and whose `Upgrade` is not `h2c` (which a server may
/// ignore, and which the proxy serves request by request), or an extended CONNECT.
pub fn requested(parts: &Parts, body: &Incoming, proto: ClientProto) -> Option<Upgrade> {
    match proto {
        ClientProto::H2 => {
            let protocol = parts.extensions.get::<Protocol>()?;
            (parts.method == Method::CONNECT).then(|| Upgrade {
                protocol: protocol.clone(),
            })
        }
        ClientProto::H1 => {
            if parts.version != Version::HTTP_11 || !body.is_end_stream() {
                return None;
            }
            let connection_upgrade = parts
                .headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(','))
                .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
            let token = parts.headers.get(header::UPGRADE)?.to_str().ok()?.trim();
            if !connection_upgrade || token.is_empty() || token.eq_ignore_ascii_case("h2c") {
                return None;
            }
            Some(Upgrade {
                protocol: Protocol::from(token),
            })
        }
    }
}

/// Carries `upgrade` to a node running `backend` and, when the app there switches
/// protocols, the upgraded connection (see the module's doc).
pub async fn forward(
    context: &Context,
    apex: &Arc<ServiceRoute>,
    backend: &Arc<ServiceRoute>,
    mut parts: Parts,
    upgrade: Upgrade,
    proto: ClientProto,
    in_flight: OwnedSemaphorePermit,
) -> Response<Body> {
    let Some(on_client) = parts.extensions.remove::<OnUpgrade>() else {
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "this client connection cannot be upgraded",
        );
    };
    let authority = authority_of(&parts).unwrap_or_else(|| backend.host.clone());
    let uri = match mesh_http::rebase(&parts.uri, authority.as_str()) {
        Ok(uri) => uri,
        Err(err) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("bad request target: {err}"),
            )
        }
    };
    let method = match proto {
        ClientProto::H1 => parts.method.clone(),
        // RFC 8441: an extended CONNECT is what a `GET` with `Upgrade` is in HTTP/1.1.
        ClientProto::H2 => Method::GET,
    };
    let mut headers = std::mem::take(&mut parts.headers);
    strip_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(DST_HEADER, backend.dst_header.clone());
    headers.insert(PROTO_HEADER, proto.header());
    if method != Method::GET {
        if let Ok(value) = HeaderValue::from_str(method.as_str()) {
            headers.insert(UPGRADE_METHOD_HEADER, value);
        }
    }

    let mut refused: Vec<Endpoint> = Vec::new();
    loop {
        let pick = if refused.is_empty() {
            backend.endpoints.pick()
        } else {
            backend.endpoints.pick_except(&refused)
        };
        let Some(pick) = pick else {
            let reason = if refused.is_empty() {
                format!(
                    "service {} has no endpoints: no node with a known address runs it",
                    backend.name
                )
            } else {
                format!("no node running service {} could be reached", backend.name)
            };
            let status = if refused.is_empty() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::BAD_GATEWAY
            };
            return error_response(status, &reason);
        };
        let node = pick.endpoint.node.clone();
        let Lease { mut sender, stream } = match context
            .peers
            .sender(|| context.identity(), &node, pick.endpoint.addr)
            .await
        {
            Ok(lease) => lease,
            Err(err) => {
                refused.push(pick.endpoint.clone());
                pick.failure();
                if refused.len() <= usize::from(MAX_REDIALS)
                    && context.table().budget.try_withdraw()
                {
                    apex.policy.retry();
                    continue;
                }
                return error_response(StatusCode::BAD_GATEWAY, &err.to_string());
            }
        };
        let mut request = Request::new(mesh_http::empty());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_2;
        *request.headers_mut() = headers;
        request.extensions_mut().insert(upgrade.protocol.clone());
        let sent = Instant::now();
        let mut response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(err) => {
                pick.failure();
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("node {node} failed the upgrade: {err}"),
                );
            }
        };
        let proxy_failed = response.headers().contains_key(ERROR_HEADER)
            && matches!(response.status().as_u16(), 502 | 503);
        if proxy_failed {
            pick.failure();
        } else {
            pick.success(sent.elapsed());
        }
        if response.status() != StatusCode::OK {
            return refused_upgrade(response, proto, (stream, in_flight));
        }
        let on_peer = hyper::upgrade::on(&mut response);
        let (mut head, _) = response.into_parts();
        strip_hop_by_hop(&mut head.headers);
        head.headers.remove(header::CONTENT_LENGTH);
        match proto {
            ClientProto::H1 => {
                head.status = StatusCode::SWITCHING_PROTOCOLS;
                head.version = Version::HTTP_11;
                head.headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                if let Ok(token) = HeaderValue::from_str(upgrade.protocol.as_str()) {
                    head.headers.insert(header::UPGRADE, token);
                }
            }
            ClientProto::H2 => head.version = Version::HTTP_2,
        }
        let idle = apex
            .idle_timeout
            .or(backend.idle_timeout)
            .unwrap_or(DEFAULT_IDLE_TIMEOUT);
        let metrics = apex.upgrade_outbound.clone();
        let service = apex.name.clone();
        let drain = context.drain.upgrade();
        tokio::spawn(async move {
            // Held for the upgraded connection's life: a SIGTERM drain waits for it.
            let _held = (stream, in_flight, drain);
            let (client, peer) = match tokio::try_join!(on_client, on_peer) {
                Ok(both) => both,
                Err(err) => {
                    debug!(%service, error = %err, "upgrade did not complete");
                    return;
                }
            };
            let end = pump(TokioIo::new(client), TokioIo::new(peer), idle, &metrics).await;
            debug!(%service, ?end, "upgraded connection ended");
        });
        return Response::from_parts(head, mesh_http::empty());
    }
}

/// The app's answer to an upgrade it refused, as an ordinary response.
fn refused_upgrade<T>(response: Response<Incoming>, proto: ClientProto, held: T) -> Response<Body>
where
    T: Send + Sync + Unpin + 'static,
{
    let (mut head, body) = response.into_parts();
    let app_status = head
        .headers
        .remove(UPGRADE_STATUS_HEADER)
        .and_then(|value| value.to_str().ok()?.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok());
    if let Some(status) = app_status {
        head.status = status;
    }
    strip_hop_by_hop(&mut head.headers);
    head.version = match proto {
        ClientProto::H1 => Version::HTTP_11,
        ClientProto::H2 => Version::HTTP_2,
    };
    if proto == ClientProto::H2 && head.status.is_success() {
        return error_response(
            StatusCode::BAD_GATEWAY,
            &format!(
                "the app answered the extended CONNECT with {} instead of switching protocols",
                head.status
            ),
        );
    }
    Response::from_parts(head, holding(body, held))
}

/// The authority a request names: the URI's (absolute form, HTTP/2) or the Host header.
fn authority_of(parts: &Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| Some(parts.headers.get(header::HOST)?.to_str().ok()?.to_owned()))
}
