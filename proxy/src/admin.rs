//! The admin endpoints on port 4191: `/live` (the process answers), `/ready` (the last
//! site config load succeeded, or there is no file yet; otherwise 503 and why),
//! `/config` (which config and identity are in use, and with `--control` the state of
//! discovery and of enrollment, as JSON) and `/metrics`
//! (Prometheus text). Everything else is 404.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use pimesh_runtime::serve;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::state::Snapshot;
use crate::control::discovery::Control;
use crate::control::enroll;
use crate::identity::Identity;
use crate::telemetry::metrics::Metrics;

/// At most this many admin connections are served at once; more wait in the listen
/// backlog (each open one leaves within the header timeout when idle). The admin port
/// can then never take the descriptors mesh traffic needs.
const MAX_CONNECTIONS: usize = 64;

/// Serves the admin endpoints on `listener` until the task is dropped. Each request reads
/// the latest snapshot, so answers never mix two configs.
pub async fn serve(
    listener: TcpListener,
    snapshots: watch::Receiver<Snapshot>,
    identity: watch::Receiver<Option<Identity>>,
    enrollment: Option<watch::Receiver<enroll::Status>>,
    metrics: Arc<Metrics>,
    control: Option<Arc<Control>>,
) {
    let limits = serve::Limits::named("admin endpoints").with_max_connections(MAX_CONNECTIONS);
    serve::serve_http1(listener, limits, std::future::pending(), move |_peer| {
        let snapshots = snapshots.clone();
        let identity = identity.clone();
        let enrollment = enrollment.clone();
        let metrics = Arc::clone(&metrics);
        let control = control.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let snapshot = snapshots.borrow().clone();
            let response = if request.uri().path() == "/metrics" {
                metrics_response(request.method(), &metrics)
            } else {
                let identity = identity.borrow().clone();
                let control_plane = ControlPlane {
                    control: control.as_ref().map(|c| c.status().json()),
                    enrollment: enrollment.as_ref().map(|status| status.borrow().to_json()),
                };
                route(
                    request.method(),
                    request.uri().path(),
                    &snapshot,
                    identity.as_ref(),
                    control_plane,
                )
            };
            async move { Ok::<_, Infallible>(response) }
        })
    })
    .await;
}

fn metrics_response(method: &Method, metrics: &Metrics) -> Response<Full<Bytes>> {
    if method != Method::GET {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is allowed\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(crate::telemetry::metrics::CONTENT_TYPE),
    );
    response
}

/// What `/config` shows of the control plane with `--control`: the discovery watch and
/// enrollment (each `null` without `--control`).
#[derive(Default)]
struct ControlPlane {
    control: Option<serde_json::Value>,
    enrollment: Option<serde_json::Value>,
}

fn route(
    method: &Method,
    path: &str,
    snapshot: &Snapshot,
    identity: Option<&Identity>,
    control_plane: ControlPlane,
) -> Response<Full<Bytes>> {
    let known = matches!(path, "/live" | "/ready" | "/config");
    if known && method != Method::GET {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is allowed\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    match path {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" => match &snapshot.problem {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(err) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {err}\n"),
            ),
        },
        "/config" => {
            let mut json = config_json(snapshot);
            json["identity"] = identity_json(identity);
            json["control"] = control_plane.control.unwrap_or_default();
            json["enrollment"] = control_plane.enrollment.unwrap_or_default();
            json_response(&json)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready, /config or /metrics\n".into(),
        ),
    }
}

fn json_response(json: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = json.to_string();
    body.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `{"node", "site", "ids", "not_after_ms", "not_after", "source", "issuer",
/// "issuer_sha256", "anchor_sha256", "bundle_sha256"}` of the identity in use, or null:
/// `source` is `node-credential`, `control` or `cache`; `anchor_sha256` is the anchor the
/// leaf chains to, `bundle_sha256` every anchor trusted.
fn identity_json(identity: Option<&Identity>) -> serde_json::Value {
    let Some(identity) = identity else {
        return serde_json::Value::Null;
    };
    let not_after_ms = identity
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    serde_json::json!({
        "node": identity.node.as_str(),
        "site": identity.site.as_str(),
        "ids": identity.ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "not_after_ms": not_after_ms,
        "not_after": not_after_ms / 1000,
        "source": identity.source.as_str(),
        "issuer": identity.issuer_subject,
        "issuer_sha256": identity.issuer_sha256,
        "anchor_sha256": identity.anchor_sha256,
        "bundle_sha256": identity.anchors().iter().map(crate::identity::sha256_hex).collect::<Vec<_>>(),
    })
}

/// `{"file", "sha256", "site", "services", "loaded_at_ms", "last_error", "refused_sha256"}`:
/// the config in use (`sha256` and `site` null when there is no file), why the last load
/// failed, and the SHA-256 of the refused file.
pub fn config_json(snapshot: &Snapshot) -> serde_json::Value {
    let in_use = &snapshot.value;
    let loaded = in_use.site_config.as_ref();
    let refusal = snapshot.problem.as_ref();
    serde_json::json!({
        "file": in_use.file.to_string_lossy(),
        "sha256": loaded.map(|l| l.sha256_hex()),
        "site": loaded.map(|l| l.config.site.to_string()),
        "services": loaded.map_or(0, |l| l.config.services.len()),
        "loaded_at_ms": in_use.loaded_at_ms,
        "last_error": refusal.map(|r| r.message.as_str()),
        "refused_sha256": refusal.and_then(|r| r.sha256.as_deref()),
    })
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::state::{InUse, Refusal};

    fn snapshot(last_error: Option<&str>) -> Snapshot {
        Snapshot {
            value: Arc::new(InUse {
                file: "/etc/pimesh/cluster.toml".into(),
                site_config: None,
                loaded_at_ms: 42,
            }),
            problem: last_error.map(|message| Refusal {
                message: message.to_owned(),
                sha256: None,
            }),
        }
    }

    #[test]
    fn routes_and_readiness() {
        let ok = snapshot(None);
        let bad = snapshot(Some("cluster.toml: key `x`: nope"));
        assert_eq!(
            route(&Method::GET, "/live", &bad, None, ControlPlane::default()).status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&Method::GET, "/ready", &ok, None, ControlPlane::default()).status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&Method::GET, "/ready", &bad, None, ControlPlane::default()).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            route(&Method::GET, "/config", &bad, None, ControlPlane::default()).status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&Method::POST, "/config", &ok, None, ControlPlane::default()).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            route(&Method::GET, "/nope", &ok, None, ControlPlane::default()).status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn config_json_without_a_file() {
        let json = config_json(&snapshot(None));
        assert_eq!(
            json,
            serde_json::json!({
                "file": "/etc/pimesh/cluster.toml",
                "sha256": null,
                "site": null,
                "services": 0,
                "loaded_at_ms": 42,
                "last_error": null,
                "refused_sha256": null,
            })
        );
    }
}
