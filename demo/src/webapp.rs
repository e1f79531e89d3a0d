//! `fleetman-webapp`: the page (`GET /`), `/api/*` relayed to `fleetman-api-gateway`
//! through the mesh (the vehicles' WebSocket included), and `GET /mesh`: the mesh's live
//! numbers from the local proxy's admin port.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_SECURITY_POLICY};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tracing::{info, warn};

use crate::mesh::{forward, Mesh};
use crate::net::{self, Body, Shutdown};
use crate::numbers::{Scrape, Window};
use crate::trace::TraceContext;
use crate::ws;
use crate::{GATEWAY, WEBAPP};

const PAGE: &str = include_str!("page.html");

/// Nothing is loaded from anywhere but this server (no tiles, fonts or scripts).
const POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                      connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'";

/// How often the proxy's metrics are read.
pub const SCRAPE_EVERY: Duration = Duration::from_secs(1);

pub struct Webapp {
    pub mesh: Mesh,
    pub numbers: Arc<Mutex<Window>>,
    pub shutdown: Shutdown,
}

impl Webapp {
    pub fn numbers(&self) -> std::sync::MutexGuard<'_, Window> {
        self.numbers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        if request.method() != Method::GET {
            return net::error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
        }
        let trace = TraceContext::of(request.headers());
        let path = request.uri().path().to_owned();
        match path.as_str() {
            "/" | "/index.html" => {
                let mut page = net::respond(StatusCode::OK, "text/html; charset=utf-8", PAGE);
                page.headers_mut()
                    .insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
                page
            }
            "/mesh" => net::json(StatusCode::OK, &self.numbers().view()),
            "/healthz" => net::respond(StatusCode::OK, "text/plain", "ok\n"),
            "/api/vehicles/ws" => {
                let upstream = ws::Upstream {
                    mesh: self.mesh.clone(),
                    from: WEBAPP,
                    service: GATEWAY,
                    ws_path: "/api/vehicles/ws",
                    poll_path: "/api/vehicles",
                };
                let shutdown = self.shutdown.clone();
                ws::accept(request, move |socket| {
                    ws::relay(socket, upstream, trace, shutdown)
                })
            }
            api if api.starts_with("/api/") => {
                let target = request
                    .uri()
                    .path_and_query()
                    .map_or(api, |target| target.as_str());
                forward(&self.mesh, GATEWAY, target, &trace).await
            }
            other => net::not_found(other),
        }
    }
}

/// Reads `admin` (the proxy's `/metrics` URL) every [`SCRAPE_EVERY`] into `window` until
/// shutdown.
pub async fn scrape(admin: Uri, window: Arc<Mutex<Window>>, mut shutdown: Shutdown) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut failing = false;
    let mut tick = tokio::time::interval(SCRAPE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        let result = tokio::time::timeout(Duration::from_secs(2), async {
            let response = client
                .get(admin.clone())
                .await
                .map_err(|err| err.to_string())?;
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), 16 << 20)
                .collect()
                .await
                .map_err(|err| err.to_string())?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(format!("answered {status}"));
            }
            Ok(String::from_utf8_lossy(&body).into_owned())
        })
        .await
        .unwrap_or_else(|_| Err("no answer within 2 s".to_owned()));
        let mut window = window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(text) => {
                if failing {
                    info!("the proxy's metrics at {admin} answer again");
                    failing = false;
                }
                window.push(Scrape::of(&text, Instant::now()));
            }
            Err(err) => {
                let err = format!("the mesh proxy's metrics at {admin}: {err}");
                if !failing {
                    warn!("{err}");
                    failing = true;
                }
                window.failed(err);
            }
        }
    }
}
