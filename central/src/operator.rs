//! The operator's requests: a site's fleet view, rollouts, stored revisions, dashboard
//! sessions and overview, and the commands that pause, resume or abort a rollout. Each is
//! authorized by a signature over the request (`pimesh_revision::operator`) of the site's
//! key, or of a person the site lists with a role ([`Role`]: readers read, operators also
//! steer): the operator of one site can neither read nor steer another, and a node's
//! certificate is worth nothing here.

use std::time::{SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{header, Request, Response, StatusCode};
use pimesh_revision::operator;
use pimesh_revision::rollout::Command;
use pimesh_runtime::answer::{error, json, json_value, Refusal};
use tracing::{info, warn};

use crate::config::Role;
use crate::offers::{unix_now, CommandError};
use crate::sessions;
use crate::sites::{Registry, Site};

/// Rollouts listed when the request names no `limit`, and the most it may name.
const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 1_000;

/// The request's signing time when it carries a valid signature over its method, path,
/// query and `body` of `site`'s key, or of a person the site lists whose role is at least
/// `needs`.
pub fn authorize(
    request: &Request<Incoming>,
    site: &Site,
    body: &[u8],
    needs: Role,
) -> Result<u64, Refusal> {
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
    let person = match operator::claimed_operator(header) {
        None => None,
        Some(name) => match site.operators.iter().find(|o| o.name.as_str() == name) {
            Some(person) => Some(person),
            None => {
                warn!(site = %site.name, operator = name, "operator request refused: unknown operator");
                return Err(Refusal(
                    StatusCode::FORBIDDEN,
                    format!("{name} is not an operator of site {}", site.name),
                ));
            }
        },
    };
    let key = person.map_or_else(|| site.verifier_key(), |person| &person.public_key);
    let at_ms = operator::verify(
        header,
        key,
        &site.name,
        request.method().as_str(),
        path,
        body,
        now_ms,
    )
    .map_err(|refusal| {
        warn!(site = %site.name, operator = ?person.map(|p| p.name.as_str()), %refusal, "operator request refused");
        let code = match refusal {
            operator::Refusal::Missing | operator::Refusal::Malformed => StatusCode::UNAUTHORIZED,
            _ => StatusCode::FORBIDDEN,
        };
        Refusal(code, refusal.to_string())
    })?;
    if let Some(person) = person {
        if person.role < needs {
            warn!(site = %site.name, operator = %person.name, role = person.role.as_str(), "operator request refused: role");
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                format!(
                    "{} is a {} of site {}: this needs the {} role",
                    person.name,
                    person.role.as_str(),
                    site.name,
                    needs.as_str()
                ),
            ));
        }
        info!(site = %site.name, operator = %person.name, method = %request.method(), path, "operator request");
    }
    Ok(at_ms)
}

/// Whether the request may read `site`'s overview: a live session token of that site
/// (`Authorization: Bearer <token>`), or the operator's signature.
pub fn authorize_reader(
    request: &Request<Incoming>,
    site: &Site,
    registry: &Registry,
) -> Result<(), Refusal> {
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match bearer {
        Some(token) => registry
            .sessions
            .check(
                registry.storage.as_ref(),
                token.trim(),
                &site.name,
                unix_now(),
            )
            .map_err(|err| match err {
                sessions::SessionError::Storage(_) => {
                    Refusal(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
                }
                _ => Refusal(StatusCode::FORBIDDEN, err.to_string()),
            }),
        None => authorize(request, site, b"", Role::Reader).map(drop),
    }
}

/// `POST /v1/sites/<site>/sessions?ttl=<seconds>`: a dashboard session for the site.
pub fn session(query: Option<&str>, site: &Site, registry: &Registry) -> Response<Full<Bytes>> {
    let mut ttl = sessions::DEFAULT_TTL_SECS;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if key == "ttl" {
            match value.parse::<u64>() {
                Ok(secs) if (60..=sessions::MAX_TTL_SECS).contains(&secs) => ttl = secs,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!(
                            "ttl must be a whole number of seconds from 60 to {}",
                            sessions::MAX_TTL_SECS
                        ),
                    )
                }
            }
        }
    }
    let now = unix_now();
    match registry
        .sessions
        .open(registry.storage.as_ref(), &site.name, ttl, now)
    {
        Ok(token) => {
            tracing::info!(site = %site.name, ttl, "dashboard session opened");
            json_value(
                StatusCode::CREATED,
                &serde_json::json!({
                    "site": site.name.as_str(), "token": token, "expires_at": now + ttl,
                }),
            )
        }
        Err(err @ sessions::SessionError::Full) => {
            error(StatusCode::TOO_MANY_REQUESTS, &err.to_string())
        }
        Err(err) => error(StatusCode::SERVICE_UNAVAILABLE, &err.to_string()),
    }
}

/// `GET /v1/fleet` for the operator of `site`: the fleet view of that site alone.
pub fn fleet(site: &Site) -> Response<Full<Bytes>> {
    let view = pimesh_revision::FleetView {
        sites: vec![pimesh_revision::SiteView {
            site: site.name.clone(),
            latest_revision: site.latest_revision(),
            public_key: Some(site.public_key()),
            nodes: site.offers.node_views(),
        }],
    };
    encoded(&view)
}

/// What the dashboard shows of a site.
#[derive(serde::Serialize)]
struct Overview {
    site: String,
    latest_revision: Option<u64>,
    /// The server's clock, for the reports' ages.
    now: u64,
    nodes: Vec<pimesh_revision::NodeView>,
    /// The newest rollouts, newest first.
    rollouts: Vec<pimesh_revision::Rollout>,
}

/// How many rollouts the overview carries.
const OVERVIEW_ROLLOUTS: usize = 10;

/// `GET /v1/sites/<site>/overview`.
pub fn overview(site: &Site, registry: &Registry) -> Response<Full<Bytes>> {
    let rollouts = match site
        .offers
        .rollouts(registry.storage.as_ref(), OVERVIEW_ROLLOUTS)
    {
        Ok(rollouts) => rollouts,
        Err(err) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("cannot read the stored rollouts: {err}"),
            )
        }
    };
    let overview = Overview {
        site: site.name.to_string(),
        latest_revision: site.latest_revision(),
        now: unix_now(),
        nodes: site.offers.node_views(),
        rollouts,
    };
    encoded(&overview)
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
        Ok(rollouts) => encoded(&rollouts),
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
            encoded(&rollout)
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

/// `value` as a 200 JSON answer (a 500 should it not encode, which typed values do).
fn encoded<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => json(StatusCode::OK, body),
        Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
    }
}
