//! The HTTP API.
//!
//! | method and path | who | what |
//! |---|---|---|
//! | `PUT /v1/sites/<site>/revisions` | operator (the signature is the authority) | publish a signed revision |
//! | `GET /v1/sites/<site>/config?after=<n>&wait=<s>` | node of `<site>` (mTLS) | the newest revision when newer than `n`, else wait up to `s` seconds, then 204 |
//! | `POST /v1/sites/<site>/reports` | node of `<site>` (mTLS) | what the node applied; recorded under the node name of its certificate |
//! | `GET /v1/fleet` | anyone reaching the server | every site's newest revision and node reports |

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{header, Method, Request, Response, StatusCode};
use pimesh_identity::{verify_leaf, Usage};
use pimesh_schema::{DnsLabel, Workload};
use rustls::pki_types::CertificateDer;
use serde_json::json;
use tracing::{info, warn};

use crate::sites::{PublishError, Registry, Site};
use crate::storage::NodeReport;

/// Largest revision accepted by publish (the nodes apply the same limit).
const MAX_REVISION_BYTES: usize = pimesh_bundle::DEFAULT_MAX_BYTES;
const MAX_REPORT_BYTES: usize = 64 * 1024;

/// A refusal: the status and what to tell the client.
struct Refusal(StatusCode, String);

impl Refusal {
    fn into_response(self) -> Response<Full<Bytes>> {
        error(self.0, &self.1)
    }
}

/// The certificate chain a client presented at the handshake (empty: none).
pub type PeerChain = Arc<Vec<CertificateDer<'static>>>;

pub async fn route(
    request: Request<Incoming>,
    peer: PeerChain,
    registry: Arc<Registry>,
) -> Response<Full<Bytes>> {
    let path: Vec<String> = request
        .uri()
        .path()
        .split('/')
        .skip(1)
        .map(str::to_owned)
        .collect();
    let segments: Vec<&str> = path.iter().map(String::as_str).collect();
    match (request.method().clone(), segments.as_slice()) {
        (Method::GET, ["v1", "fleet"]) => fleet(&registry),
        (method, ["v1", "sites", site, action]) => {
            let Some(site) = DnsLabel::try_from((*site).to_owned())
                .ok()
                .and_then(|s| registry.sites.get(&s))
            else {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!("no site {site:?} on this server"),
                );
            };
            match (method, *action) {
                (Method::PUT, "revisions") => publish(request, site, &registry).await,
                (Method::GET, "config") => match authorize_node(&peer, site) {
                    Ok(node) => config(request.uri().query(), site, &node, &registry).await,
                    Err(refusal) => refusal.into_response(),
                },
                (Method::POST, "reports") => match authorize_node(&peer, site) {
                    Ok(node) => report(request, site, &node, &registry).await,
                    Err(refusal) => refusal.into_response(),
                },
                (_, "revisions" | "config" | "reports") => {
                    error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
                }
                _ => error(StatusCode::NOT_FOUND, "no such resource"),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such resource; see /v1/fleet"),
    }
}

/// The node name in the client certificate, when it is a valid node identity of `site`
/// under `site`'s own anchor.
fn authorize_node(peer: &PeerChain, site: &Site) -> Result<DnsLabel, Refusal> {
    let Some((leaf, intermediates)) = peer.split_first() else {
        let message = "a node certificate is required".to_owned();
        return Err(Refusal(StatusCode::UNAUTHORIZED, message));
    };
    let anchors = std::slice::from_ref(&site.anchor);
    let now = SystemTime::now();
    let ids = verify_leaf(leaf, intermediates, anchors, &site.name, Usage::Client, now).map_err(
        |err| {
            let message = format!("not a node of site {}: {err}", site.name);
            Refusal(StatusCode::FORBIDDEN, message)
        },
    )?;
    ids.into_iter()
        .find_map(|id| match id.workload {
            Workload::Node(node) => Some(node),
            Workload::Service(_) => None,
        })
        .ok_or_else(|| {
            Refusal(
                StatusCode::FORBIDDEN,
                "the certificate names no node".to_owned(),
            )
        })
}

async fn publish(
    request: Request<Incoming>,
    site: &Site,
    registry: &Registry,
) -> Response<Full<Bytes>> {
    let body = match read_body(request, MAX_REVISION_BYTES).await {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    match site.publish(&body, registry.storage.as_ref()).await {
        Ok(signed) => {
            info!(site = %site.name, revision = signed.revision, "revision published");
            json_response(
                StatusCode::CREATED,
                &json!({ "site": site.name.as_str(), "revision": signed.revision }),
            )
        }
        Err(PublishError::Rejected(rejection)) => {
            use pimesh_bundle::Rejection::*;
            let code = match rejection {
                BadSignature | WrongSite { .. } => StatusCode::FORBIDDEN,
                NotNewer { .. } => StatusCode::CONFLICT,
                TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                Malformed(_) | UnknownFormat(_) | InvalidConfig(_) => StatusCode::BAD_REQUEST,
            };
            warn!(site = %site.name, %rejection, "publish refused");
            error(code, &rejection.to_string())
        }
        Err(PublishError::Storage(err)) => {
            warn!(site = %site.name, %err, "cannot store revision");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("cannot store the revision: {err}"),
            )
        }
    }
}

async fn config(
    query: Option<&str>,
    site: &Site,
    node: &DnsLabel,
    registry: &Registry,
) -> Response<Full<Bytes>> {
    let mut after = 0u64;
    let mut wait = Duration::ZERO;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match (key.as_ref(), value.parse::<u64>()) {
            ("after", Ok(n)) => after = n,
            ("wait", Ok(s)) => wait = Duration::from_secs(s).min(registry.long_poll_max),
            ("after" | "wait", Err(_)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("{key} must be a whole number"),
                )
            }
            _ => {}
        }
    }
    let mut latest = site.subscribe();
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    loop {
        if let Some(current) = latest.borrow_and_update().clone() {
            if current.revision > after {
                tracing::debug!(site = %site.name, %node, revision = current.revision, "serving revision");
                let mut response = Response::new(Full::new(Bytes::from(current.json.clone())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                return response;
            }
        }
        tokio::select! {
            changed = latest.changed() => if changed.is_err() {
                return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
            },
            () = &mut deadline => {
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = StatusCode::NO_CONTENT;
                return response;
            }
        }
    }
}

async fn report(
    request: Request<Incoming>,
    site: &Site,
    node: &DnsLabel,
    registry: &Registry,
) -> Response<Full<Bytes>> {
    let body = match read_body(request, MAX_REPORT_BYTES).await {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    let mut report: NodeReport = match serde_json::from_slice(&body) {
        Ok(report) => report,
        Err(err) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("expected a report {{revision, state, detail}}: {err}"),
            )
        }
    };
    report.received_at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match registry.storage.record_report(&site.name, node, &report) {
        Ok(()) => {
            info!(site = %site.name, %node, state = %report.state, revision = ?report.revision, "node report");
            json_response(StatusCode::OK, &json!({ "recorded": true }))
        }
        Err(err) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cannot store the report: {err}"),
        ),
    }
}

fn fleet(registry: &Registry) -> Response<Full<Bytes>> {
    let mut sites = Vec::new();
    for site in registry.sites.values() {
        let nodes = match registry.storage.reports(&site.name) {
            Ok(reports) => reports,
            Err(err) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("cannot read reports: {err}"),
                )
            }
        };
        sites.push(json!({
            "site": site.name.as_str(),
            "latest_revision": site.latest_revision(),
            "nodes": nodes.iter().map(|(node, report)| json!({
                "node": node.as_str(),
                "revision": report.revision,
                "state": report.state,
                "detail": report.detail,
                "received_at": report.received_at,
            })).collect::<Vec<_>>(),
        }));
    }
    json_response(StatusCode::OK, &json!({ "sites": sites }))
}

async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, Refusal> {
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err)
            if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            let message = format!("body larger than {limit} bytes");
            Err(Refusal(StatusCode::PAYLOAD_TOO_LARGE, message))
        }
        Err(err) => {
            let message = format!("cannot read the body: {err}");
            Err(Refusal(StatusCode::BAD_REQUEST, message))
        }
    }
}

fn json_response(code: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(code: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(code, &json!({ "error": message }))
}
