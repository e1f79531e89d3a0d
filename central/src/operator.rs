//! The operator's requests: a site's rollouts, its stored revisions, and the commands that
//! pause, resume or abort a rollout. Each is authorized by a signature of the site's key
//! over the request (`pimesh_revision::operator`): the operator of one site can neither
//! read nor steer another, and a node's certificate is worth nothing here.

use std::time::{SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{header, Request, Response, StatusCode};
use pimesh_revision::operator;
use pimesh_revision::rollout::Command;
use pimesh_runtime::answer::{error, json, Refusal};
use tracing::warn;

use crate::offers::{unix_now, CommandError};
use crate::sites::{Registry, Site};

/// Rollouts listed when the request names no `limit`, and the most it may name.
const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 1_000;

/// The request's signing time when it carries a valid signature of `site`'s key over its
/// method, path, query and `body`.
pub fn authorize(request: &Request<Incoming>, site: &Site, body: &[u8]) -> Result<u64, Refusal> {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| request.uri().path(), |p| p.as_str());
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    operator::verify(
        header,
        site.verifier_key(),
        &site.name,
        request.method().as_str(),
        path,
        body,
        now_ms,
    )
    .map_err(|refusal| {
        warn!(site = %site.name, %refusal, "operator request refused");
        let code = match refusal {
            operator::Refusal::Missing | operator::Refusal::Malformed => StatusCode::UNAUTHORIZED,
            _ => StatusCode::FORBIDDEN,
        };
        Refusal(code, refusal.to_string())
    })
}

/// `GET /v1/sites/<site>/rollouts?limit=<n>`.
pub fn rollouts(query: Option<&str>, site: &Site, registry: &Registry) -> Response<Full<Bytes>> {
    let mut limit = DEFAULT_LIMIT;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if key == "limit" {
            match value.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => limit = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("limit must be a whole number from 1 to {MAX_LIMIT}"),
                    )
                }
            }
        }
    }
    match site.offers.rollouts(registry.storage.as_ref(), limit) {
        Ok(rollouts) => match serde_json::to_vec(&rollouts) {
            Ok(body) => json(StatusCode::OK, body),
            Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
        },
        Err(err) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cannot read the stored rollouts: {err}"),
        ),
    }
}

/// `GET /v1/sites/<site>/revisions/<n>`.
pub fn revision(site: &Site, number: u64, registry: &Registry) -> Response<Full<Bytes>> {
    match registry.storage.revision(&site.name, number) {
        Ok(Some(revision)) => json(StatusCode::OK, revision.to_json()),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            &format!("site {} has no revision {number}", site.name),
        ),
        Err(err) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cannot read the stored revision: {err}"),
        ),
    }
}

/// `POST /v1/sites/<site>/rollouts/<n>/<command>`, signed at `at_ms`.
pub fn command(
    site: &Site,
    revision: u64,
    command: Command,
    at_ms: u64,
    registry: &Registry,
) -> Response<Full<Bytes>> {
    match site.offers.command(
        revision,
        command,
        at_ms,
        registry.storage.as_ref(),
        unix_now(),
    ) {
        Ok(rollout) => {
            registry.fleet.changed();
            match serde_json::to_vec(&rollout) {
                Ok(body) => json(StatusCode::OK, body),
                Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
            }
        }
        Err(err) => {
            let code = match err {
                CommandError::NotFound(_) => StatusCode::NOT_FOUND,
                CommandError::Conflict(_) | CommandError::Replayed { .. } => StatusCode::CONFLICT,
                CommandError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            error(code, &err.to_string())
        }
    }
}
