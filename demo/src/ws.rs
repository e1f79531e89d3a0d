//! WebSockets: answering an upgrade, and relaying one through the mesh to another part —
//! or, when the mesh does not carry the upgrade, polling that part's JSON instead.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::header::{
    HeaderMap, HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE,
};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info};

use crate::mesh::Mesh;
use crate::net::{error, Body, Shutdown};
use crate::trace::TraceContext;

/// A WebSocket a browser or another part opened to us.
pub type ServerSocket = WebSocketStream<TokioIo<Upgraded>>;

/// How often the fallback polls.
pub const POLL_EVERY: Duration = Duration::from_millis(500);

/// How many times a relay tries to open its upstream WebSocket, [`OPEN_RETRY_EVERY`]
/// apart, before it polls instead: a part that starts before the mesh carries its
/// upstream (a proxy still loading its routes, a peer proxy not yet reached) gets its
/// WebSocket a moment later rather than polling for the connection's whole life.
const OPEN_ATTEMPTS: u32 = 10;
const OPEN_RETRY_EVERY: Duration = Duration::from_secs(1);

pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"))
}

/// Answers a WebSocket handshake with 101 and runs `run` on the socket once upgraded; a
/// plain request gets 426 naming the path.
pub fn accept<F, Fut>(mut request: Request<Incoming>, run: F) -> Response<Body>
where
    F: FnOnce(ServerSocket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let path = request.uri().path().to_owned();
    if !is_upgrade(request.headers()) {
        let mut response = error(
            StatusCode::UPGRADE_REQUIRED,
            &format!("{path} is a WebSocket: ask with Upgrade: websocket"),
        );
        response
            .headers_mut()
            .insert(UPGRADE, HeaderValue::from_static("websocket"));
        return response;
    }
    let Some(accept) = request
        .headers()
        .get(SEC_WEBSOCKET_KEY)
        .map(|key| derive_accept_key(key.as_bytes()))
        .and_then(|accept| HeaderValue::from_str(&accept).ok())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake needs Sec-WebSocket-Key",
        );
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let socket =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                run(socket).await;
            }
            Err(err) => debug!("{path}: the upgrade failed: {err}"),
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// Where a relay goes: `ws_path` of `service` through the mesh, or `poll_path` of it
/// every [`POLL_EVERY`] when the WebSocket cannot be opened.
#[derive(Clone)]
pub struct Upstream {
    pub mesh: Mesh,
    /// The relaying part's service name (for the mode message).
    pub from: &'static str,
    pub service: &'static str,
    pub ws_path: &'static str,
    pub poll_path: &'static str,
}

/// The first message of every relay: `{"relay": "<from> → <service>", "mode": ...}`, so the
/// page can show how each hop carries the feed.
fn mode_message(upstream: &Upstream, mode: &str) -> Message {
    let text = serde_json::json!({
        "relay": format!("{} → {}", upstream.from, upstream.service),
        "mode": mode,
    })
    .to_string();
    Message::text(text)
}

/// Relays `client` to the upstream WebSocket (tried [`OPEN_ATTEMPTS`] times), or polls,
/// until either side closes or shutdown.
pub async fn relay(
    mut client: ServerSocket,
    upstream: Upstream,
    trace: TraceContext,
    mut shutdown: Shutdown,
) {
    let mut opened = upstream
        .mesh
        .websocket(upstream.service, upstream.ws_path, &trace)
        .await;
    for _ in 1..OPEN_ATTEMPTS {
        let Err(err) = &opened else { break };
        debug!("{err}; trying again in {OPEN_RETRY_EVERY:?}");
        tokio::select! {
            () = tokio::time::sleep(OPEN_RETRY_EVERY) => {}
            () = shutdown.wait() => return,
        }
        opened = upstream
            .mesh
            .websocket(upstream.service, upstream.ws_path, &trace)
            .await;
    }
    match opened {
        Ok(server) => {
            debug!(
                "relaying a WebSocket to {} {}",
                upstream.service, upstream.ws_path
            );
            if client
                .send(mode_message(&upstream, "websocket"))
                .await
                .is_ok()
            {
                pipe(client, server, shutdown).await;
            }
        }
        Err(err) => {
            info!(
                "{err}; polling {} {} every {POLL_EVERY:?} instead",
                upstream.service, upstream.poll_path
            );
            if client
                .send(mode_message(&upstream, "polling"))
                .await
                .is_ok()
            {
                poll(client, &upstream, &trace, shutdown).await;
            }
        }
    }
}

fn going_away() -> Option<CloseFrame> {
    Some(CloseFrame {
        code: CloseCode::Away,
        reason: "shutting down".into(),
    })
}

async fn pipe<S>(mut client: ServerSocket, mut server: WebSocketStream<S>, mut shutdown: Shutdown)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        tokio::select! {
            message = client.next() => match message {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    if server.send(message).await.is_err() {
                        let _ = client.close(None).await;
                        return;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    let _ = server.close(None).await;
                    return;
                }
            },
            message = server.next() => match message {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    if client.send(message).await.is_err() {
                        let _ = server.close(None).await;
                        return;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    let _ = client.close(None).await;
                    return;
                }
            },
            () = shutdown.wait() => {
                let _ = client.close(going_away()).await;
                let _ = server.close(None).await;
                return;
            }
        }
    }
}

async fn poll(
    mut client: ServerSocket,
    upstream: &Upstream,
    trace: &TraceContext,
    mut shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match upstream.mesh.get(upstream.service, upstream.poll_path, trace).await {
                    Ok(answer) if answer.status == StatusCode::OK => {
                        let text = String::from_utf8_lossy(&answer.body).into_owned();
                        if client.send(Message::text(text)).await.is_err() {
                            return;
                        }
                    }
                    Ok(answer) => debug!(
                        "{} {} answered {}",
                        upstream.service, upstream.poll_path, answer.status
                    ),
                    Err(err) => debug!("{err}"),
                }
            }
            message = client.next() => match message {
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            () = shutdown.wait() => {
                let _ = client.close(going_away()).await;
                return;
            }
        }
    }
}
