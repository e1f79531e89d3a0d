//! `fleetman-staff-service-stable` (`staff`): who drives each vehicle; and the
//! `error-injector` (`injector`), which fails every request — the split sends it 10 % of
//! `fleetman-staff-service`.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::net::{self, Body};
use crate::position::valid_name;

const DRIVERS: [&str; 12] = [
    "Ada Lovelace",
    "Grace Hopper",
    "Alan Turing",
    "Katherine Johnson",
    "Edsger Dijkstra",
    "Barbara Liskov",
    "Donald Knuth",
    "Margaret Hamilton",
    "Ken Thompson",
    "Radia Perlman",
    "Dennis Ritchie",
    "Frances Allen",
];

/// The driver of `vehicle`: the same one every time.
pub fn driver_of(vehicle: &str) -> &'static str {
    // FNV-1a: stable across runs and builds, unlike the std hasher.
    let hash = vehicle
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    let index = usize::try_from(hash % DRIVERS.len() as u64).unwrap_or(0);
    DRIVERS[index]
}

/// `GET /staff/<vehicle>` → `{"vehicle", "driver", "photo"}`.
pub async fn stable(request: Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET {
        return net::error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
    }
    let path = request.uri().path();
    if path == "/healthz" {
        return net::respond(StatusCode::OK, "text/plain", "ok\n");
    }
    let Some(vehicle) = path.strip_prefix("/staff/") else {
        return net::not_found(path);
    };
    if !valid_name(vehicle) {
        return net::error(
            StatusCode::BAD_REQUEST,
            "a vehicle name is 1 to 64 of A-Z a-z 0-9 - _",
        );
    }
    let driver = driver_of(vehicle);
    let photo = format!("/photos/{}.jpg", driver.to_lowercase().replace(' ', "-"));
    net::json(
        StatusCode::OK,
        &serde_json::json!({ "vehicle": vehicle, "driver": driver, "photo": photo }),
    )
}

/// Any request → 500 with a JSON error.
pub async fn injector(request: Request<Incoming>) -> Response<Body> {
    if request.uri().path() == "/healthz" {
        return net::respond(StatusCode::OK, "text/plain", "ok\n");
    }
    net::json(
        StatusCode::INTERNAL_SERVER_ERROR,
        &serde_json::json!({
            "error": "injected failure",
            "service": "error-injector",
            "path": request.uri().path(),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vehicle_keeps_its_driver() {
        assert_eq!(driver_of("truck-01"), driver_of("truck-01"));
        let drivers: std::collections::BTreeSet<_> = (1..=8)
            .map(|i| driver_of(&format!("truck-{i:02}")))
            .collect();
        assert!(drivers.len() > 3, "{drivers:?}");
    }
}
