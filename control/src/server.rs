//! The replica's one port: mutual TLS for the identity and discovery APIs (`api`), TLS
//! without client certificates for the join routes (`join_api`), plain HTTP for `/live`,
//! `/ready` and `/metrics` (`metrics`). TLS and plain HTTP are told apart by the first byte a client sends
//! (`0x16`, a TLS handshake record, or anything else); the two TLS configurations by the
//! ClientHello's server name: `pimesh_join::JOIN_SERVER_NAME` picks the join
//! configuration, anything else (or none) the mutual-TLS one. TLS speaks HTTP/2 and
//! HTTP/1.1 (ALPN `h2`, `http/1.1`); plain HTTP HTTP/1.1.
//!
//! Invariants: plain HTTP never reaches the APIs — it answers `/live`, `/ready`,
//! `/metrics` and a 404 pointing at TLS, nothing else; a connection on the join configuration reaches the join
//! routes `GET /v1/join/bundle` and `POST /v1/join` and nothing else; every other TLS
//! connection has passed the client certificate check of the snapshot current at its
//! handshake. Only such a verified connection from another host teaches the replica its
//! own address (`Heartbeats::learn_own_ip`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use pimesh_runtime::serve;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;
use tracing::debug;

use crate::api::{self, Shared};
use crate::discovery::Discovery;
use crate::join_api;
use crate::state::{Counters, State};

/// The most connections the replica port holds at once (the unit's `LimitNOFILE=4096`
/// leaves room for the rest); the clients in excess wait in the backlog.
const MAX_CONNECTIONS: usize = 2_048;
/// The most connections one source address holds: a node's proxy and supervisor use a
/// handful; a host that opens more is refused the excess, not the other nodes.
const MAX_PER_SOURCE: usize = 64;
/// A client must send its first byte, and complete its TLS handshake, within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Shared) {
    let limits = serve::Limits::named("replica port")
        .with_max_connections(MAX_CONNECTIONS)
        .with_max_per_source(MAX_PER_SOURCE);
    serve::accept_loop(listener, limits, std::future::pending(), |tcp, peer| {
        // Answers are small writes (TLS records, then headers and body): without this,
        // Nagle holds one back for the peer's delayed ACK (40 ms) on a new connection.
        let _ = tcp.set_nodelay(true);
        connection(tcp, peer, shared.clone())
    })
    .await;
}

async fn connection(tcp: TcpStream, peer: SocketAddr, shared: Shared) {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => tls(tcp, peer, shared).await,
        Ok(Ok(1)) => plain(tcp, peer, shared.state, shared.discovery).await,
        Ok(Ok(_)) => {} // closed without a byte
        Ok(Err(err)) => debug!(%peer, %err, "connection failed before its first byte"),
        Err(_) => debug!(%peer, "no first byte in time"),
    }
}

/// Which configuration a TLS connection was accepted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Client certificate required and verified.
    Mutual,
    /// `JOIN_SERVER_NAME`: no client certificate; the join routes only.
    Join,
}

async fn tls(tcp: TcpStream, peer: SocketAddr, shared: Shared) {
    let Shared {
        state,
        discovery,
        join,
    } = shared;
    let local = tcp.local_addr().ok();
    // The snapshot current now decides the handshake: its serving certificate and anchors.
    let Some(serving) = state
        .snapshot()
        .map(|snapshot| Arc::clone(&snapshot.serving))
    else {
        debug!(%peer, "TLS connection while not ready: closed");
        return;
    };
    let handshake = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        let side = match start.client_hello().server_name() {
            Some(pimesh_join::JOIN_SERVER_NAME) => Side::Join,
            _ => Side::Mutual,
        };
        let config = match side {
            Side::Join => Arc::clone(&serving.join_config),
            Side::Mutual => Arc::clone(&serving.config),
        };
        start.into_stream(config).await.map(|stream| (side, stream))
    };
    let (side, stream) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(err)) => {
            Counters::count(&state.counters.handshakes_refused);
            debug!(%peer, %err, "TLS handshake refused");
            return;
        }
        Err(_) => {
            Counters::count(&state.counters.handshakes_refused);
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    if side == Side::Join {
        let local = local.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let service = hyper::service::service_fn(move |request| {
            let state = Arc::clone(&state);
            let discovery = Arc::clone(&discovery);
            let join = Arc::clone(&join);
            async move {
                let answer = join_api::route(request, peer, local, &state, &discovery, &join).await;
                Ok::<_, Infallible>(answer)
            }
        });
        serve::http1_or_2(stream, service, peer, "replica port (TLS, join)").await;
        return;
    }
    let chain: Arc<Vec<_>> = Arc::new(
        stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default(),
    );
    // rustls verified this chain against the anchors at the handshake.
    if let (Some(local), false) = (local, chain.is_empty()) {
        discovery.heartbeats.learn_own_ip(local, peer);
    }
    let service = hyper::service::service_fn(move |request| {
        let chain = Arc::clone(&chain);
        let shared = Shared {
            state: Arc::clone(&state),
            discovery: Arc::clone(&discovery),
            join: Arc::clone(&join),
        };
        async move { Ok::<_, Infallible>(api::route(request, peer, chain, shared).await) }
    });
    serve::http1_or_2(stream, service, peer, "replica port (TLS)").await;
}

async fn plain(tcp: TcpStream, peer: SocketAddr, state: Arc<State>, discovery: Arc<Discovery>) {
    let service = hyper::service::service_fn(move |request| {
        let answer = if request.method() == Method::GET && request.uri().path() == "/metrics" {
            metrics(&state, &discovery)
        } else {
            health(&request, &state)
        };
        async move { Ok::<_, Infallible>(answer) }
    });
    serve::http1(tcp, service, peer, "replica port (plain)").await;
}

/// `GET /metrics` (see `crate::metrics`).
fn metrics(state: &Arc<State>, discovery: &Arc<Discovery>) -> Response<Full<Bytes>> {
    let (code, body, content_type) = match crate::metrics::encode(state, discovery) {
        Ok(text) => (StatusCode::OK, text, crate::metrics::CONTENT_TYPE),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n".to_owned(),
            "text/plain",
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// `/live` (the process answers) and `/ready` (it can issue: 503 with the reason when
/// not), as `pimesh_runtime::health` answers them.
fn health(request: &Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    let (code, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/live") => (StatusCode::OK, "live\n".to_owned()),
        (&Method::GET, "/ready") => match state.readiness() {
            Ok(status) => (StatusCode::OK, format!("ready: {status}\n")),
            Err(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        (_, "/live" | "/ready") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is allowed\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "not found: plain HTTP serves /live, /ready and /metrics; the identity API needs mutual TLS on this port\n"
                .to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response
}
