//! The faults a service's config injects into its requests: a delay, then an abort, each
//! for its share of the requests.

use http::header::HeaderValue;
use http::{Response, StatusCode};

use super::metrics::FaultKind;
use crate::config::routes::ServiceRoute;
use crate::transport::mesh_http::{self, Body, FAULT_HEADER};

fn hit(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

/// Applies `route`'s faults; `Some` is the response of an injected abort.
pub async fn inject_faults(route: &ServiceRoute) -> Option<Response<Body>> {
    let fault = route.fault.as_ref()?;
    if let Some(delay) = &fault.delay {
        if hit(delay.percent.0) {
            route.policy.fault(FaultKind::Delay);
            tokio::time::sleep(delay.duration.0).await;
        }
    }
    if let Some(abort) = &fault.abort {
        if hit(abort.percent.0) {
            route.policy.fault(FaultKind::Abort);
            let status =
                StatusCode::from_u16(abort.status.0).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut response = Response::new(mesh_http::full(format!(
                "fault injected by the mesh for service {}\n",
                route.name
            )));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(FAULT_HEADER, HeaderValue::from_static("abort"));
            return Some(response);
        }
    }
    None
}
