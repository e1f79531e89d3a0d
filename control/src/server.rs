//! The replica's one port: mutual TLS for the identity and discovery APIs (`api`), plain
//! HTTP for `/live` and `/ready`, told apart by the first byte a client sends (`0x16`, a
//! TLS handshake record, or anything else: plain HTTP). The TLS side speaks HTTP/2 and
//! HTTP/1.1 (ALPN `h2`, `http/1.1`); the plain side HTTP/1.1.
//!
//! Invariant: plain HTTP never reaches the APIs — it answers `/live`, `/ready` and a 404
//! pointing at TLS, nothing else; every TLS connection has passed the client certificate
//! check of the snapshot current at its handshake.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use pimesh_runtime::serve;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::api;
use crate::discovery::Discovery;
use crate::state::{Counters, State};

/// A client must send its first byte, and complete its TLS handshake, within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<State>, discovery: Arc<Discovery>) {
    let limits = serve::Limits::named("replica port");
    serve::accept_loop(listener, limits, std::future::pending(), |tcp, peer| {
        // Answers are small writes (TLS records, then headers and body): without this,
        // Nagle holds one back for the peer's delayed ACK (40 ms) on a new connection.
        let _ = tcp.set_nodelay(true);
        connection(tcp, peer, Arc::clone(&state), Arc::clone(&discovery))
    })
    .await;
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    discovery: Arc<Discovery>,
) {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => tls(tcp, peer, state, discovery).await,
        Ok(Ok(1)) => plain(tcp, peer, state).await,
        Ok(Ok(_)) => {} // closed without a byte
        Ok(Err(err)) => debug!(%peer, %err, "connection failed before its first byte"),
        Err(_) => debug!(%peer, "no first byte in time"),
    }
}

async fn tls(tcp: TcpStream, peer: SocketAddr, state: Arc<State>, discovery: Arc<Discovery>) {
    if let Ok(local) = tcp.local_addr() {
        discovery.heartbeats.learn_own_ip(local, peer);
    }
    // The snapshot current now decides the handshake: its serving certificate and anchors.
    let Some(config) = state
        .snapshot()
        .map(|snapshot| Arc::clone(&snapshot.serving.config))
    else {
        debug!(%peer, "TLS connection while not ready: closed");
        return;
    };
    let stream = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TlsAcceptor::from(config).accept(tcp),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
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
    let chain: Arc<Vec<_>> = Arc::new(
        stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default(),
    );
    let service = hyper::service::service_fn(move |request| {
        let chain = Arc::clone(&chain);
        let state = Arc::clone(&state);
        let discovery = Arc::clone(&discovery);
        async move { Ok::<_, Infallible>(api::route(request, peer, chain, state, discovery).await) }
    });
    serve::http1_or_2(stream, service, peer, "replica port (TLS)").await;
}

async fn plain(tcp: TcpStream, peer: SocketAddr, state: Arc<State>) {
    let service = hyper::service::service_fn(move |request| {
        let answer = health(&request, &state);
        async move { Ok::<_, Infallible>(answer) }
    });
    serve::http1(tcp, service, peer, "replica port (plain)").await;
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
            "not found: plain HTTP serves /live and /ready; the identity API needs mutual TLS on this port\n"
                .to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response
}
