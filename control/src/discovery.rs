//! The discovery and policy API, over mutual TLS.
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/heartbeat` | body `{"port": P, "credential"?: "<64 hex>", "role"?: "server"\|"agent", "replicas"?: [ports]}` (at most [`MAX_HEARTBEAT_BYTES`]): the requesting node's proxy takes mesh traffic at the connection's peer IP, port `P`; `credential` is the hex SHA-256 of its node credential's SubjectPublicKeyInfo, `role` what the node is, `replicas` a server node's control replica ports; answer 204. Kept for the TTL (`--heartbeat-ttl`); other fields are refused (400) |
//! | `GET /v1/discovery` | a stream, `application/x-ndjson`: one [`Document`] per line at once, a new one whenever its content changes, an empty line after [`KEEPALIVE`] without one |
//!
//! A document is `{"version","site","config","nodes","servers"}`, plus `"kube_services"`
//! when the replica reads meshed Kubernetes Services (a list of
//! [`pimesh_schema::kube_services::KubeService`]; absent when empty) and `"kube_routes"`
//! when it reads Gateway API routes of their namespaces (a list of
//! [`pimesh_schema::kube_services::KubeRoute`]; absent when empty): `config` is the text of
//! the site config the replica has loaded (or null), so a proxy validates it with the very
//! same schema as a file config; `nodes` maps each node with a live heartbeat to
//! `IP:PORT`; `servers` maps each node whose live heartbeat says `role: server` to
//! `{"address": IP, "replicas": [ports]}` (ordered by name; a proxy dials every listed
//! replica); `version` is the hex SHA-256 of the content (`site`, `config`, `nodes`,
//! `servers`, `kube_services`, `kube_routes`).
//!
//! Invariant: the document depends on nothing but the site config, the live heartbeats
//! and the meshed Kubernetes Services — no replica number, no time — so two replicas with
//! the same inputs serve the same `version`, and a proxy may switch replicas without
//! seeing a change.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{header, Request, Response, StatusCode};
use pimesh_schema::kube_services::KubeMesh;
use pimesh_schema::DnsLabel;
use rustls_pki_types::CertificateDer;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info};

use crate::heartbeats::{About, Heartbeats, Server};
use crate::identity_api;
use crate::state::{Snapshot, State};
use pimesh_runtime::answer::{self, Refusal};

/// Largest heartbeat body accepted: `{"port": 65535}` is 15 bytes.
pub const MAX_HEARTBEAT_BYTES: usize = 4 * 1024;
/// An empty line is sent after this long without a document, so that a proxy can tell a
/// quiet stream from a dead one.
pub const KEEPALIVE: Duration = Duration::from_secs(10);
/// The content type of the discovery stream: newline-delimited JSON.
pub const NDJSON: &str = "application/x-ndjson";

/// One discovery answer, serialized once for every stream.
///
/// Invariant: `line` is the JSON document followed by one `\n`, and `version` is the hex
/// SHA-256 of its content without the version.
#[derive(Debug, PartialEq, Eq)]
pub struct Document {
    pub version: String,
    pub line: Bytes,
}

impl Document {
    /// The document for `snapshot`'s site and config, the live `nodes` and the live
    /// `servers`.
    pub fn new(
        snapshot: &Snapshot,
        nodes: &BTreeMap<String, String>,
        servers: &BTreeMap<String, Server>,
        kube: &KubeMesh,
    ) -> Document {
        let servers = servers_json(servers);
        let mut content = json!({
            "site": snapshot.site.as_str(),
            "config": snapshot.config_text,
            "nodes": nodes,
            "servers": servers,
        });
        if !kube.services.is_empty() {
            content["kube_services"] = json!(kube.services);
        }
        if !kube.routes.is_empty() {
            content["kube_routes"] = json!(kube.routes);
        }
        // serde_json's maps are ordered by key: the same content, the same bytes.
        let digest = ring::digest::digest(&ring::digest::SHA256, content.to_string().as_bytes());
        let version: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let mut document = content;
        document["version"] = json!(version);
        let mut line = document.to_string();
        line.push('\n');
        Document {
            version,
            line: Bytes::from(line),
        }
    }
}

/// `servers` as the document lists them: `{"<node>": {"address": IP, "replicas":
/// [ports]}}`.
fn servers_json(servers: &BTreeMap<String, Server>) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = servers
        .iter()
        .map(|(node, server)| {
            let entry = json!({
                "address": server.address.to_string(),
                "replicas": server.replicas,
            });
            (node.clone(), entry)
        })
        .collect();
    serde_json::Value::Object(map)
}

/// The answer to a heartbeat that accepts JSON: `200` with `{"servers": ...}`, the live
/// server nodes this replica hears, so that a proxy learns the replicas of servers that
/// do not heartbeat the replica it watches (a server that joined while another was
/// away); `204` for a caller that does not ask for it.
pub fn heartbeat_answer(accepts_json: bool, discovery: &Discovery) -> Response<Full<Bytes>> {
    if !accepts_json {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        return response;
    }
    let body = json!({ "servers": servers_json(&discovery.heartbeats.servers()) });
    answer::json_value(StatusCode::OK, &body)
}

/// The heartbeats, the meshed Kubernetes Services and routes, and the current document,
/// shared by all connections.
pub struct Discovery {
    pub heartbeats: Heartbeats,
    kube: Mutex<Arc<KubeMesh>>,
    current: watch::Sender<Option<Arc<Document>>>,
}

impl Discovery {
    pub fn new(ttl: Duration) -> Discovery {
        Discovery {
            heartbeats: Heartbeats::new(ttl),
            kube: Mutex::new(Arc::new(KubeMesh::default())),
            current: watch::Sender::new(None),
        }
    }

    /// Replaces the meshed Kubernetes Services and routes; `true` (and a refreshed
    /// document) when they changed.
    pub fn set_kube(&self, kube: KubeMesh, state: &State) -> bool {
        {
            let mut current = self
                .kube
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if **current == kube {
                return false;
            }
            *current = Arc::new(kube);
        }
        self.refresh(state);
        true
    }

    pub fn kube(&self) -> Arc<KubeMesh> {
        Arc::clone(
            &self
                .kube
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Recomputes the document from `state`'s snapshot and the live heartbeats; streams
    /// see it only when its version differs from the current one.
    pub fn refresh(&self, state: &State) {
        let Some(snapshot) = state.snapshot() else {
            return;
        };
        let document = Document::new(
            &snapshot,
            &self.heartbeats.live(),
            &self.heartbeats.servers(),
            &self.kube(),
        );
        self.current.send_if_modified(|current| {
            if current.as_ref().map(|d| &d.version) == Some(&document.version) {
                return false;
            }
            info!(version = %document.version, "discovery document changed");
            *current = Some(Arc::new(document));
            true
        });
    }

    /// Forgets expired heartbeats and refreshes the document when any was forgotten.
    pub fn expire(&self, state: &State, now: Instant) {
        if self.heartbeats.expire(now) {
            self.refresh(state);
        }
    }

    /// The current document's version, if there is one.
    #[cfg(test)]
    fn version(&self) -> Option<String> {
        self.current.borrow().as_ref().map(|d| d.version.clone())
    }
}

/// The response body of every route: whole answers and the discovery stream alike.
pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `POST /v1/heartbeat` from the node of `chain`, connected from `peer`: `Ok` with the
/// node whose heartbeat was recorded, or the refusal to answer.
pub async fn heartbeat(
    request: Request<Incoming>,
    peer: SocketAddr,
    chain: &[CertificateDer<'static>],
    state: &State,
    discovery: &Discovery,
) -> Result<DnsLabel, Response<Full<Bytes>>> {
    let Some(snapshot) = state.snapshot() else {
        return Err(answer::error(StatusCode::SERVICE_UNAVAILABLE, "not ready"));
    };
    let node = identity_api::requesting_node(chain, &snapshot, SystemTime::now())
        .map_err(|Refusal(code, message)| answer::error(code, &message))?;
    let body = answer::read_body(request, MAX_HEARTBEAT_BYTES)
        .await
        .map_err(|Refusal(code, message)| answer::error(code, &message))?;
    let (port, about) = heartbeat_body(&body).map_err(|err| {
        debug!(%node, %peer, "heartbeat refused: {err}");
        answer::error(StatusCode::BAD_REQUEST, &err.to_string())
    })?;
    let addr = SocketAddr::new(peer.ip().to_canonical(), port);
    if discovery
        .heartbeats
        .beat(&node, addr, about, Instant::now())
    {
        discovery.refresh(state);
    }
    Ok(node)
}

/// Why a heartbeat body is refused; shown to the caller after what is expected.
#[derive(Debug, PartialEq)]
pub enum HeartbeatError {
    NotJson(String),
    NotAnObject(serde_json::Value),
    UnknownField(String),
    NoPort,
    BadPort(serde_json::Value),
    BadCredential(serde_json::Value),
    BadRole(serde_json::Value),
    BadReplicas(serde_json::Value),
}

impl fmt::Display for HeartbeatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "expected a JSON object {\"port\": P}, P the proxy's inbound port in 1..=65535, \
             optionally with \"credential\" (64 hex digits), \"role\" (\"server\" or \"agent\") \
             and \"replicas\" (ports); ",
        )?;
        match self {
            HeartbeatError::NotJson(err) => write!(f, "the body is not JSON: {err}"),
            HeartbeatError::NotAnObject(value) => write!(f, "found {value}"),
            HeartbeatError::UnknownField(name) => write!(f, "found an unknown field {name:?}"),
            HeartbeatError::NoPort => f.write_str("the field \"port\" is missing"),
            HeartbeatError::BadPort(port) => write!(f, "found \"port\": {port}"),
            HeartbeatError::BadCredential(value) => write!(f, "found \"credential\": {value}"),
            HeartbeatError::BadRole(value) => write!(f, "found \"role\": {value}"),
            HeartbeatError::BadReplicas(value) => write!(f, "found \"replicas\": {value}"),
        }
    }
}

/// The most replica ports a heartbeat may list.
const MAX_REPLICA_PORTS: usize = 16;

/// The port and the rest of a heartbeat body: `{"port": P}` with P in 1..=65535, and
/// optionally `credential`, `role` and `replicas`; nothing else.
pub fn heartbeat_body(body: &[u8]) -> Result<(u16, About), HeartbeatError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|err| HeartbeatError::NotJson(err.to_string()))?;
    let serde_json::Value::Object(fields) = value else {
        return Err(HeartbeatError::NotAnObject(value));
    };
    let known = ["port", "credential", "role", "replicas"];
    if let Some(other) = fields.keys().find(|key| !known.contains(&key.as_str())) {
        return Err(HeartbeatError::UnknownField(other.clone()));
    }
    let as_port = |value: &serde_json::Value| {
        value
            .as_u64()
            .and_then(|port| u16::try_from(port).ok())
            .filter(|port| *port != 0)
    };
    let port = match fields.get("port") {
        None => return Err(HeartbeatError::NoPort),
        Some(port) => as_port(port).ok_or_else(|| HeartbeatError::BadPort(port.clone()))?,
    };
    let mut about = About::default();
    if let Some(value) = fields.get("credential") {
        let hex = value
            .as_str()
            .filter(|text| text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| HeartbeatError::BadCredential(value.clone()))?;
        about.credential = Some(hex.to_ascii_lowercase());
    }
    if let Some(value) = fields.get("role") {
        about.role = Some(match value.as_str() {
            Some("server") => pimesh_join::Role::Server,
            Some("agent") => pimesh_join::Role::Agent,
            _ => return Err(HeartbeatError::BadRole(value.clone())),
        });
    }
    if let Some(value) = fields.get("replicas") {
        let bad = || HeartbeatError::BadReplicas(value.clone());
        let list = value
            .as_array()
            .filter(|list| list.len() <= MAX_REPLICA_PORTS);
        let mut ports = list
            .ok_or_else(bad)?
            .iter()
            .map(|port| as_port(port).ok_or_else(bad))
            .collect::<Result<Vec<u16>, _>>()?;
        ports.sort_unstable();
        ports.dedup();
        about.replicas = ports;
    }
    Ok((port, about))
}

/// `GET /v1/discovery` from the node of `chain`: the stream of documents.
pub fn watch(
    chain: &[CertificateDer<'static>],
    state: &State,
    discovery: &Discovery,
) -> Response<Body> {
    use http_body_util::BodyExt as _;
    let whole = |response: Response<Full<Bytes>>| response.map(|body| body.boxed());
    let Some(snapshot) = state.snapshot() else {
        return whole(answer::error(StatusCode::SERVICE_UNAVAILABLE, "not ready"));
    };
    let node = match identity_api::requesting_node(chain, &snapshot, SystemTime::now()) {
        Ok(node) => node,
        Err(Refusal(code, message)) => return whole(answer::error(code, &message)),
    };
    let mut documents = discovery.current.subscribe();
    if documents.borrow().is_none() {
        return whole(answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no discovery document yet",
        ));
    }
    debug!(%node, "discovery stream opened");
    let (lines, receiver) = mpsc::channel::<Bytes>(2);
    tokio::spawn(async move {
        loop {
            let line = documents
                .borrow_and_update()
                .as_ref()
                .map(|d| d.line.clone());
            if let Some(line) = line {
                if lines.send(line).await.is_err() {
                    break;
                }
            }
            // Wait for a change, sending keepalives meanwhile.
            loop {
                tokio::select! {
                    changed = documents.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                    () = tokio::time::sleep(KEEPALIVE) => {
                        if lines.send(Bytes::from_static(b"\n")).await.is_err() {
                            debug!(%node, "discovery stream closed");
                            return;
                        }
                    }
                    () = lines.closed() => {
                        debug!(%node, "discovery stream closed");
                        return;
                    }
                }
            }
        }
        debug!(%node, "discovery stream closed");
    });
    let mut response = Response::new(Lines(receiver).boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(NDJSON),
    );
    response
}

/// A body made of the lines a task sends; it ends when the task drops its sender.
struct Lines(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Lines {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|line| Ok(Frame::data(line))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_a_port_and_what_it_says_about_its_node() {
        assert_eq!(
            heartbeat_body(br#"{"port": 4143}"#),
            Ok((4143, About::default()))
        );
        let credential = "AB".repeat(32);
        let full = format!(
            r#"{{"port": 4143, "credential": "{credential}", "role": "server", "replicas": [8088, 8086, 8087, 8086]}}"#
        );
        assert_eq!(
            heartbeat_body(full.as_bytes()),
            Ok((
                4143,
                About {
                    credential: Some("ab".repeat(32)),
                    role: Some(pimesh_join::Role::Server),
                    replicas: vec![8086, 8087, 8088],
                }
            ))
        );
        for (body, says) in [
            (&b"4143"[..], "found 4143"),
            (b"{}", "missing"),
            (br#"{"port": 0}"#, "\"port\": 0"),
            (br#"{"port": 70000}"#, "70000"),
            (br#"{"port": "4143"}"#, "\"4143\""),
            (br#"{"port": 4143, "ip": "1.2.3.4"}"#, "\"ip\""),
            (b"port=4143", "not JSON"),
            (
                br#"{"port": 1, "credential": "ab"}"#,
                "\"credential\": \"ab\"",
            ),
            (br#"{"port": 1, "role": "boss"}"#, "\"role\": \"boss\""),
            (br#"{"port": 1, "replicas": [0]}"#, "\"replicas\": [0]"),
            (br#"{"port": 1, "replicas": 8086}"#, "\"replicas\": 8086"),
        ] {
            let err = heartbeat_body(body).expect_err("refused").to_string();
            assert!(err.contains("{\"port\": P}") && err.contains(says), "{err}");
        }
    }

    #[test]
    fn the_version_depends_on_the_content_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let trust = dir.path().join("trust");
        std::fs::create_dir_all(&trust).expect("mkdir");
        let site = pimesh_schema::DnsLabel::try_from("depot-7".to_owned()).expect("label");
        let root =
            pimesh_identity::TrustRoot::generate(&site, SystemTime::now()).expect("trust root");
        std::fs::write(trust.join("anchor.pem"), root.anchor.cert_pem()).expect("anchor");
        std::fs::write(trust.join("issuer.pem"), root.issuer.cert_pem()).expect("issuer");
        std::fs::write(trust.join("issuer.key"), root.issuer.key_pem()).expect("key");
        let versions: Vec<Option<String>> = (1..=2)
            .map(|replica| {
                let state = State::new(
                    replica,
                    crate::state::Sources {
                        trust_dir: trust.clone(),
                        config: dir.path().join("cluster.toml"),
                        site: Some(site.clone()),
                    },
                );
                state.reload("test", SystemTime::now());
                let discovery = Discovery::new(Duration::from_secs(30));
                let node = pimesh_schema::DnsLabel::try_from("pi-a".to_owned()).expect("label");
                let addr: SocketAddr = "10.0.0.1:4143".parse().expect("addr");
                discovery
                    .heartbeats
                    .beat(&node, addr, About::default(), Instant::now());
                discovery.refresh(&state);
                discovery.version()
            })
            .collect();
        assert!(versions[0].is_some());
        assert_eq!(versions[0], versions[1], "separately issued serving certs");
    }
}
