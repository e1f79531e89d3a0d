//! The fixture server's HTTPS port (K3s's supervisor and Kubernetes API share it): a
//! small part of both, enough for Pimesh's supervisor and the fixture's own nodes.
//!
//! Without credentials: `GET /ping` (`pong`), `GET /cacerts` (the CA PEM).
//! With a client certificate the cluster CA signed, or HTTP basic auth
//! `server:<password>` / `node:<password>` (the token's password), else 401 with a
//! kube-apiserver `Status`:
//! - `GET /readyz`, `GET /v1-k3s/readyz`: `ok`, or 503 with the reason;
//! - `GET /api/v1/nodes`, `GET /api/v1/nodes/<name>`: NodeList, Node (404 Status);
//! - `POST /api/v1/nodes`: fixture registration and heartbeat of a Node (body: the Node,
//!   with its password in annotation `k3s.io/node-password`); 403 on a password mismatch;
//! - `GET /api/v1/namespaces[/<name>]`, `GET /api/v1[/namespaces/<ns>]/services`,
//!   `GET /api/v1/namespaces/<ns>/services/<name>`,
//!   `GET /apis/discovery.k8s.io/v1[/namespaces/<ns>]/endpointslices[/<name>]`,
//!   `GET /apis/apiextensions.k8s.io/v1/customresourcedefinitions[/<name>]`,
//!   `GET /apis/gateway.networking.k8s.io/v1[/namespaces/<ns>]/{httproutes,grpcroutes}[/<name>]`
//!   (404 while their CRD is not stored): the objects of the manifests (see `objects`);
//!   lists take an equality-based `labelSelector` (400 Status when malformed);
//! - `GET/POST /apis/coordination.k8s.io/v1/namespaces/<ns>/leases`,
//!   `GET/PUT/DELETE …/leases/<name>`, `GET /apis/coordination.k8s.io/v1/leases`: Leases,
//!   shared by all servers (see `leases`, `sitewide`);
//! - `GET/PUT /v1-k3s/fixture-leases` (`server:<password>` only): a server's copy of the
//!   Leases, and the leader's push of a new one (fixture-only, see `sitewide`);
//! - `GET /v1-k3s/apiservers`: JSON list of `host:port` of the live servers;
//! - `GET /v1-k3s/client-kubelet.crt` (headers `K3s-Node-Name`, `K3s-Node-Password`): a
//!   kubelet client certificate and its key, PEM, as in K3s;
//! - `GET /v1-k3s/server-bootstrap` (`server:<password>` only): the cluster CA and its key,
//!   for a joining server (K3s hands servers its bootstrap data on the same path).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::answers::{
    bad_request, forbidden, json_response, method_not_allowed, not_found, query, respond, status,
    text,
};
use crate::cluster::ClusterState;
use crate::log::now_secs;
use crate::nodes::Refused;
use crate::objects::{Kind, Selector};
use crate::pki::Leaf;

/// The largest request body read.
const MAX_BODY: usize = 1024 * 1024;
/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// A client certificate the cluster CA signed.
    Certificate,
    /// `server:<password>`.
    Server,
    /// `node:<password>`.
    Node,
    Anonymous,
}

/// The TLS configuration of the port: `serving` as the certificate; client certificates
/// optional, and verified against the cluster CA when given.
pub fn tls_config(ca_pem: &str, serving: &Leaf) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("bad CA PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("bad CA certificate: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("cannot verify client certificates: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad serving certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes())
        .map_err(|e| format!("bad serving key: {e}"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("TLS: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves the port on `listener` until the process ends.
pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, state: Arc<ClusterState>) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                crate::log::error(&format!("accept: {err}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            let certified = tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|certs| !certs.is_empty());
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(handle(&state, request, certified).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

async fn handle(
    state: &ClusterState,
    request: Request<Incoming>,
    certified: bool,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/ping") => return text(StatusCode::OK, "pong"),
        (&Method::GET, "/cacerts") => return text(StatusCode::OK, &state.ca.cert_pem),
        _ => {}
    }
    let caller = caller(state, &request, certified);
    if caller == Caller::Anonymous {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
            None,
        );
    }
    if crate::leases::route(&path).is_some() {
        return crate::sitewide::handle(state, request, caller == Caller::Server).await;
    }
    if path == crate::sitewide::REPLICA_PATH {
        return replica(state, request, caller).await;
    }
    if let Some((kind, namespace, name)) = crate::objects::route(&path) {
        if method != Method::GET {
            return method_not_allowed();
        }
        return objects(state, request.uri(), kind, namespace, name);
    }
    let now = now_secs();
    match (&method, path.as_str()) {
        (&Method::GET, "/readyz" | "/v1-k3s/readyz") => match state.readiness() {
            Ok(()) => text(StatusCode::OK, "ok"),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, &reason),
        },
        (&Method::GET, "/api/v1/nodes") => json_response(StatusCode::OK, &state.table().list(now)),
        (&Method::POST, "/api/v1/nodes") => register(state, request, now).await,
        (&Method::GET, _) if path.starts_with("/api/v1/nodes/") => {
            let name = &path["/api/v1/nodes/".len()..];
            match state.table().get(name, now) {
                Some(node) => json_response(StatusCode::OK, &node),
                None => not_found("nodes", name),
            }
        }
        (&Method::GET, "/v1-k3s/apiservers") => {
            json_response(StatusCode::OK, &json!(state.live_servers()))
        }
        (&Method::GET, "/v1-k3s/server-bootstrap") => {
            if caller != Caller::Server {
                return forbidden("only servers may read the bootstrap data");
            }
            let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
            json_response(
                StatusCode::OK,
                &json!({
                    "ServerCA": {"Content": b64(&state.ca.cert_pem)},
                    "ServerCAKey": {"Content": b64(state.ca.key_pem())},
                }),
            )
        }
        (&Method::GET, "/v1-k3s/client-kubelet.crt") => kubelet_cert(state, &request, now),
        (_, "/readyz" | "/api/v1/nodes" | "/v1-k3s/apiservers") => method_not_allowed(),
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
            None,
        ),
    }
}

/// `GET`/`PUT` [`crate::sitewide::REPLICA_PATH`]: this server's copy of the Leases, or a
/// copy the leader pushes (servers only).
async fn replica(
    state: &ClusterState,
    request: Request<Incoming>,
    caller: Caller,
) -> Response<Full<Bytes>> {
    if caller != Caller::Server {
        return forbidden("only servers may read or push the Leases");
    }
    match *request.method() {
        Method::GET => json_response(StatusCode::OK, &state.replica().store.snapshot()),
        Method::PUT => {
            let pusher = request
                .headers()
                .get(crate::sitewide::LEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(err) => return bad_request(&format!("cannot read the body: {err}")),
            };
            let snapshot = match serde_json::from_slice(&body) {
                Ok(snapshot) => snapshot,
                Err(err) => return bad_request(&format!("not a copy of the Leases: {err}")),
            };
            match crate::sitewide::accept(state, &pusher, &snapshot) {
                Ok(()) => text(StatusCode::OK, "stored"),
                Err(why) => status(StatusCode::CONFLICT, "Conflict", &why, None),
            }
        }
        _ => method_not_allowed(),
    }
}

/// An object of the manifests, or a list of them (query `labelSelector`).
fn objects(
    state: &ClusterState,
    uri: &http::Uri,
    kind: Kind,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Response<Full<Bytes>> {
    if !state.objects().serves(kind) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
            None,
        );
    }
    if let Some(name) = name {
        return match state.objects().get(kind, namespace, name) {
            Some(object) => json_response(StatusCode::OK, &object),
            None => not_found(kind.resource(), name),
        };
    }
    let selector =
        query(uri, "labelSelector").and_then(|text| Selector::parse(&text.unwrap_or_default()));
    match selector {
        Ok(selector) => respond(
            StatusCode::OK,
            "application/json",
            state.objects().list(kind, namespace, &selector),
        ),
        Err(err) => bad_request(&err),
    }
}

fn caller(state: &ClusterState, request: &Request<Incoming>, certified: bool) -> Caller {
    if certified {
        return Caller::Certificate;
    }
    let Some((user, password)) = basic_auth(request) else {
        return Caller::Anonymous;
    };
    if !same(password.as_bytes(), state.password.as_bytes()) {
        return Caller::Anonymous;
    }
    match user.as_str() {
        "server" => Caller::Server,
        "node" => Caller::Node,
        _ => Caller::Anonymous,
    }
}

/// The user and password of an `Authorization: Basic` header.
fn basic_auth(request: &Request<Incoming>) -> Option<(String, String)> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn register(
    state: &ClusterState,
    request: Request<Incoming>,
    now: u64,
) -> Response<Full<Bytes>> {
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => return bad_request(&format!("cannot read the body: {err}")),
    };
    let node: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(node) => node,
        Err(err) => return bad_request(&format!("the body is not a Node: {err}")),
    };
    let name = node
        .pointer("/metadata/name")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut table = state.table();
    match table.register(node, now) {
        Ok(created) => {
            if created {
                crate::log::info(&format!("k3s fixture: node {name} registered"));
            }
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            match table.get(&name, now) {
                Some(node) => json_response(code, &node),
                None => not_found("nodes", &name),
            }
        }
        Err(Refused::Invalid(why)) => bad_request(&why),
        Err(Refused::Password) => {
            crate::log::error(&format!(
                "k3s fixture: node {name}: {}",
                crate::nodes::PASSWORD_REJECTED
            ));
            forbidden(crate::nodes::PASSWORD_REJECTED)
        }
    }
}

/// A kubelet client certificate for the node named in `K3s-Node-Name`, after K3s's
/// node password check (`K3s-Node-Password`).
fn kubelet_cert(
    state: &ClusterState,
    request: &Request<Incoming>,
    now: u64,
) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .filter(|v| !v.is_empty())
    };
    let (Some(name), Some(password)) = (header("K3s-Node-Name"), header("K3s-Node-Password"))
    else {
        return bad_request("K3s-Node-Name and K3s-Node-Password are required");
    };
    if !state.table().password_matches(&name, &password, now) {
        return forbidden(crate::nodes::PASSWORD_REJECTED);
    }
    match state
        .ca
        .client(&format!("system:node:{name}"), &["system:nodes"])
    {
        Ok(leaf) => text(
            StatusCode::OK,
            &format!("{}{}", leaf.cert_pem, leaf.key_pem),
        ),
        Err(err) => status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            &err,
            None,
        ),
    }
}
