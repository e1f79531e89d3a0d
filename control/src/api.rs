//! The routes of the mutual-TLS side: the identity API (`identity_api`) and the discovery
//! API (`discovery`) on one listener. Every request arrives with the client certificate
//! chain verified at its connection's handshake and the connection's peer address.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use rustls_pki_types::CertificateDer;

use crate::discovery::{self, Body, Discovery};
use crate::identity_api;
use crate::state::State;
use pimesh_runtime::answer;

/// Answers one request of a connection from `peer` whose client presented `chain`.
pub async fn route(
    request: Request<Incoming>,
    peer: SocketAddr,
    chain: Arc<Vec<CertificateDer<'static>>>,
    state: Arc<State>,
    discovery: Arc<Discovery>,
) -> Response<Body> {
    match (request.method(), request.uri().path()) {
        (&Method::POST, "/v1/heartbeat") => {
            discovery::heartbeat(request, peer, &chain, &state, &discovery)
                .await
                .map(|body| body.boxed())
        }
        (&Method::GET, "/v1/discovery") => discovery::watch(&chain, &state, &discovery),
        (_, "/v1/heartbeat" | "/v1/discovery") => {
            answer::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
                .map(|body| body.boxed())
        }
        _ => identity_api::route(request, chain, state)
            .await
            .map(|body| body.boxed()),
    }
}
