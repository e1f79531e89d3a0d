//! `fleetman-api-gateway`: the API the web page uses, each call relayed through the mesh:
//! `GET /api/vehicles` (→ `fleetman-position-tracker` `/vehicles`), `GET /api/vehicles/ws`
//! (a WebSocket relayed to the tracker's, or polling when the mesh cannot carry it) and
//! `GET /api/staff/<vehicle>` (→ `fleetman-staff-service` `/staff/<vehicle>`, its status as
//! it is).

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::mesh::{forward, Mesh};
use crate::net::{self, Body, Shutdown};
use crate::position::valid_name;
use crate::trace::TraceContext;
use crate::ws;
use crate::{GATEWAY, STAFF, TRACKER};

pub struct Gateway {
    pub mesh: Mesh,
    pub shutdown: Shutdown,
}

impl Gateway {
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        if request.method() != Method::GET {
            return net::error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
        }
        let trace = TraceContext::of(request.headers());
        let path = request.uri().path().to_owned();
        match path.as_str() {
            "/api/vehicles" => forward(&self.mesh, TRACKER, "/vehicles", &trace).await,
            "/api/vehicles/ws" => {
                let upstream = ws::Upstream {
                    mesh: self.mesh.clone(),
                    from: GATEWAY,
                    service: TRACKER,
                    ws_path: "/vehicles/ws",
                    poll_path: "/vehicles",
                };
                let shutdown = self.shutdown.clone();
                ws::accept(request, move |socket| {
                    ws::relay(socket, upstream, trace, shutdown)
                })
            }
            "/healthz" => net::respond(StatusCode::OK, "text/plain", "ok\n"),
            other => match other.strip_prefix("/api/staff/") {
                Some(vehicle) if valid_name(vehicle) => {
                    forward(&self.mesh, STAFF, &format!("/staff/{vehicle}"), &trace).await
                }
                Some(_) => net::error(
                    StatusCode::BAD_REQUEST,
                    "a vehicle name is 1 to 64 of A-Z a-z 0-9 - _",
                ),
                None => net::not_found(other),
            },
        }
    }
}
