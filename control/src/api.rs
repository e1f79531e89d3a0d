//! The routes of the mutual-TLS side: the identity API (`identity_api`), the discovery
//! API (`discovery`) and the join protocol's issuer handover (`join_api::issuer`) on one
//! listener. Every request arrives with the client certificate chain verified at its
//! connection's handshake and the connection's peer address.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use rustls_pki_types::CertificateDer;

use crate::discovery::{self, Body};
use crate::identity_api;
use crate::join_api;
use crate::join_api::Join;
use crate::state::State;
use pimesh_runtime::answer;

/// What every connection of the mutual-TLS side shares.
#[derive(Clone)]
pub struct Shared {
    pub state: Arc<State>,
    pub discovery: Arc<discovery::Discovery>,
    pub join: Arc<Join>,
}

/// Answers one request of a connection from `peer` whose client presented `chain`.
pub async fn route(
    request: Request<Incoming>,
    peer: SocketAddr,
    chain: Arc<Vec<CertificateDer<'static>>>,
    shared: Shared,
) -> Response<Body> {
    let Shared {
        state,
        discovery,
        join,
    } = shared;
    match (request.method(), request.uri().path()) {
        (&Method::POST, "/v1/heartbeat") => {
            let accepts_json = request
                .headers()
                .get_all(hyper::header::ACCEPT)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .any(|value| value.contains("application/json"));
            match discovery::heartbeat(request, peer, &chain, &state, &discovery).await {
                Ok(node) => {
                    // A heartbeat also keeps the node's server grant, if it has one.
                    join.heard_from(&node).await;
                    discovery::heartbeat_answer(accepts_json, &discovery).map(|body| body.boxed())
                }
                Err(refusal) => refusal.map(|body| body.boxed()),
            }
        }
        (&Method::GET, pimesh_join::path::ISSUER) => {
            join_api::issuer(&chain, &state, &discovery, &join)
                .await
                .map(|body| body.boxed())
        }
        (&Method::POST, pimesh_join::path::RENEW) => join_api::renew(request, &chain, &state)
            .await
            .map(|body| body.boxed()),
        (_, pimesh_join::path::ISSUER | pimesh_join::path::RENEW) => {
            answer::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
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
