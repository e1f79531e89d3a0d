//! The status API on 127.0.0.1:4200: `GET /status` (JSON), `GET /metrics` (OpenMetrics, see
//! `super::metrics`), `GET /live`, and
//! `GET /k3s/ready` (200 when K3s on this node answers ready through its kubeconfig, 503
//! with the reason otherwise: the keeper's probe of the K3s unit).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use pimesh_runtime::answer::{error, json};
use pimesh_runtime::serve;
use tokio::net::TcpListener;

use crate::status::NodeStatus;

/// What answers `GET /k3s/ready`: `Ok(detail)` when ready, `Err(reason)` when not.
pub trait ReadyCheck: Send + Sync + 'static {
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>>;
}

/// At most this many connections are served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;

pub async fn serve(
    listener: TcpListener,
    status: Arc<RwLock<NodeStatus>>,
    k3s: Arc<dyn ReadyCheck>,
) {
    let limits = serve::Limits::named("status API").with_max_connections(MAX_CONNECTIONS);
    serve::serve_http1(listener, limits, std::future::pending(), move |_peer| {
        let status = Arc::clone(&status);
        let k3s = Arc::clone(&k3s);
        hyper::service::service_fn(move |request| {
            let status = Arc::clone(&status);
            let k3s = Arc::clone(&k3s);
            async move {
                if request.method() == Method::GET && request.uri().path() == "/k3s/ready" {
                    return Ok::<_, Infallible>(match k3s.check().await {
                        Ok(detail) => json(
                            StatusCode::OK,
                            serde_json::json!({ "ready": true, "detail": detail }).to_string(),
                        ),
                        Err(why) => error(StatusCode::SERVICE_UNAVAILABLE, &why),
                    });
                }
                Ok::<_, Infallible>(route(&request, &status))
            }
        })
    })
    .await;
}

fn route(request: &Request<Incoming>, status: &RwLock<NodeStatus>) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/status") => {
            let body = match status.read() {
                Ok(status) => serde_json::to_vec_pretty(&*status),
                Err(poisoned) => serde_json::to_vec_pretty(&*poisoned.into_inner()),
            };
            match body {
                Ok(body) => json(StatusCode::OK, body),
                Err(err) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("cannot encode status: {err}"),
                ),
            }
        }
        (&Method::GET, "/metrics") => {
            let text = match status.read() {
                Ok(status) => super::metrics::encode(&status),
                Err(poisoned) => super::metrics::encode(&poisoned.into_inner()),
            };
            match text {
                Ok(text) => {
                    let mut response = Response::new(Full::new(Bytes::from(text)));
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(super::metrics::CONTENT_TYPE),
                    );
                    response
                }
                Err(_) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot encode the metrics",
                ),
            }
        }
        (&Method::GET, "/live") => json(StatusCode::OK, b"{\"live\":true}".to_vec()),
        (_, "/status" | "/live" | "/metrics") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed")
        }
        (_, path) => error(
            StatusCode::NOT_FOUND,
            &format!("no such path {path:?}; try /status"),
        ),
    }
}
