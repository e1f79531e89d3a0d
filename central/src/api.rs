//! The HTTP API.
//!
//! | method and path | who | what |
//! |---|---|---|
//! | `PUT /v1/sites/<site>/revisions` | operator (the signature is the authority) | publish a signed revision |
//! | `GET /v1/sites/<site>/config?after=<n>&wait=<s>` | node of `<site>` (mTLS) | the newest revision when newer than `n`, else wait up to `s` seconds, then 204 |
//! | `POST /v1/sites/<site>/reports` | node of `<site>` (mTLS) | what the node applied; recorded under the node name of its certificate |
//! | `GET /v1/sites/<site>/rollouts?limit=<n>` | reader of `<site>` (signed with its key, or a listed person's) | the site's rollouts, newest first |
//! | `GET /v1/sites/<site>/revisions/<n>` | reader of `<site>` | stored revision `n` as published |
//! | `POST /v1/sites/<site>/rollouts/<n>/{pause,resume,abort}` | operator of `<site>` (its key, or a person with the operator role), newer than its last command | change the rollout of revision `n` |
//! | `POST /v1/sites/<site>/sessions?ttl=<s>` | reader of `<site>` | a dashboard session token for the site |
//! | `GET /v1/sites/<site>/overview` | a session of `<site>` (`Bearer`) or its operator | the site's nodes, newest revision and rollouts |
//! | `GET /dashboard` (and its `.js`, `.css`) | anyone | the dashboard page, which holds no data |
//! | `GET /v1/fleet` | reader of the site its signature names (`site=`) | that site's newest revision and node reports, in the fleet view's shape |
//! | `GET /v1/version` | anyone reaching the server | `{"version": "<this build's version>"}` |
//! | `GET /metrics` | anyone reaching the server | Prometheus metrics (see `metrics`) |

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{header, Method, Request, Response, StatusCode};
use pimesh_meshtls::{Expected, Refusal as PeerRefusal, SiteTrust, SpiffeVerifier};
use pimesh_revision::path::{ConfigQuery, Route, SiteResource, TRIAL_STOPPED_HEADER};
use pimesh_revision::{NodeReport, RecordedReport};
use pimesh_schema::DnsLabel;
use rustls::pki_types::CertificateDer;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::config::Role;
use crate::metrics::{AnswerLabels, CentralMetrics, PublishLabels};
use crate::offers::unix_now;
use crate::operator;
use crate::sites::{PublishError, Registry, Site};
use pimesh_runtime::answer::{error, json_value as json_response, read_body, Refusal};

/// Largest revision accepted by publish (the nodes apply the same limit).
const MAX_REVISION_BYTES: usize = pimesh_revision::DEFAULT_MAX_BYTES;
const MAX_REPORT_BYTES: usize = 64 * 1024;

pub async fn route(
    request: Request<Incoming>,
    peer: Arc<Peer>,
    registry: Arc<Registry>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    if path == "/metrics" && request.method() == Method::GET {
        return metrics(&registry);
    }
    if request.method() == Method::GET {
        if let Some(file) = crate::dashboard::file(&path) {
            return file;
        }
    }
    match (request.method().clone(), Route::parse(&path)) {
        (Method::GET, Some(Route::Fleet)) => {
            let header = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok());
            let Some(claimed) = pimesh_revision::operator::claimed_site(header) else {
                return error(
                    StatusCode::UNAUTHORIZED,
                    &pimesh_revision::operator::Refusal::Missing.to_string(),
                );
            };
            let Some(site) = served_site(&registry, claimed) else {
                return no_site(claimed);
            };
            match operator::authorize(&request, site, b"", Role::Reader) {
                Ok(_) => operator::fleet(site),
                Err(refusal) => refusal.into_response(),
            }
        }
        (Method::GET, Some(Route::Version)) => json_response(
            StatusCode::OK,
            &json!({ "version": env!("CARGO_PKG_VERSION") }),
        ),
        (method, Some(Route::Site { site, resource })) => {
            let Some(site) = served_site(&registry, site) else {
                return no_site(site);
            };
            match (method, resource) {
                (Method::PUT, Some(SiteResource::Revisions)) => {
                    publish(request, site, &registry).await
                }
                (Method::GET, Some(SiteResource::Config)) => {
                    match peer.authorize(&site.name, &site.anchor, SystemTime::now()) {
                        Ok(node) => config(request.uri().query(), site, &node, &registry).await,
                        Err(refusal) => refusal.into_response(),
                    }
                }
                (Method::POST, Some(SiteResource::Reports)) => {
                    match peer.authorize(&site.name, &site.anchor, SystemTime::now()) {
                        Ok(node) => report(request, site, &node, &registry).await,
                        Err(refusal) => refusal.into_response(),
                    }
                }
                (Method::POST, Some(SiteResource::Sessions)) => {
                    match operator::authorize(&request, site, b"", Role::Reader) {
                        Ok(_) => operator::session(request.uri().query(), site, &registry),
                        Err(refusal) => refusal.into_response(),
                    }
                }
                (Method::GET, Some(SiteResource::Overview)) => {
                    match operator::authorize_reader(&request, site, &registry) {
                        Ok(()) => operator::overview(site, &registry),
                        Err(refusal) => refusal.into_response(),
                    }
                }
                (Method::GET, Some(SiteResource::Rollouts)) => {
                    match operator::authorize(&request, site, b"", Role::Reader) {
                        Ok(_) => operator::rollouts(request.uri().query(), site, &registry),
                        Err(refusal) => refusal.into_response(),
                    }
                }
                (_, Some(_)) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here"),
                (_, None) => error(StatusCode::NOT_FOUND, "no such resource"),
            }
        }
        (method, Some(Route::Revision { site, revision })) => {
            let Some(site) = served_site(&registry, site) else {
                return no_site(site);
            };
            if method != Method::GET {
                return error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here");
            }
            let Some(revision) = revision else {
                return error(StatusCode::NOT_FOUND, "a revision is a whole number");
            };
            match operator::authorize(&request, site, b"", Role::Reader) {
                Ok(_) => operator::revision(site, revision, &registry),
                Err(refusal) => refusal.into_response(),
            }
        }
        (
            method,
            Some(Route::RolloutCommand {
                site,
                revision,
                command,
            }),
        ) => {
            let Some(site) = served_site(&registry, site) else {
                return no_site(site);
            };
            if method != Method::POST {
                return error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here");
            }
            let (Some(revision), Some(command)) = (revision, command) else {
                return error(
                    StatusCode::NOT_FOUND,
                    "expected /v1/sites/<site>/rollouts/<revision>/{pause,resume,abort}",
                );
            };
            match operator::authorize(&request, site, b"", Role::Operator) {
                Ok(at_ms) => operator::command(site, revision, command, at_ms, &registry),
                Err(refusal) => refusal.into_response(),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such resource; see /v1/fleet"),
    }
}

fn served_site<'r>(registry: &'r Registry, site: &str) -> Option<&'r Site> {
    DnsLabel::try_from(site.to_owned())
        .ok()
        .and_then(|s| registry.sites.get(&s))
}

fn no_site(site: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::NOT_FOUND,
        &format!("no site {site:?} on this server"),
    )
}

/// How long one connection reuses an answer at most, even when no certificate of its chain
/// changes validity sooner: a bound on top of the validity window should a site's anchor
/// ever change while the server runs (it does not today).
const AUTHORIZATION_TTL: Duration = Duration::from_secs(5 * 60);

/// The client at the other end of one connection: the certificate chain it presented at
/// the handshake (empty: none) and what that chain authorizes, per site.
///
/// rustls checked the chain at the handshake against the union of every site's anchor;
/// which site it belongs to is checked here against that site's anchor alone
/// (`pimesh_meshtls::SpiffeVerifier::check_client`, on `verify_leaf`). Invariant: per
/// connection and site, that check runs at most once per validity window, not per
/// request. Its answer — the node name or the refusal — is reused
/// by the connection's later requests to that site while the clock stays in
/// `[checked_at, fresh_until)`, `fresh_until` being the earliest of
/// `checked_at + AUTHORIZATION_TTL` and the next instant at which a certificate of the
/// chain becomes valid (its `not_before`) or expires (one second past its `not_after`, as
/// webpki counts). So the answer is exactly what a check per request would give: a
/// connection that outlives its certificate is checked again, and refused, once past its
/// `not_after`; a clock set back is checked again too. Nothing else goes into the answer:
/// the chain is fixed for the connection's life, a site's anchor for the server's.
pub struct Peer {
    chain: Vec<CertificateDer<'static>>,
    /// At most one per site of the registry (a node's connection addresses one).
    verdicts: Mutex<Vec<Verdict>>,
}

/// One site's answer for a connection, and while it holds.
struct Verdict {
    site: DnsLabel,
    checked_at: SystemTime,
    fresh_until: SystemTime,
    answer: Result<DnsLabel, Refusal>,
}

impl Peer {
    /// The client of a new connection, with the chain it presented (empty: none).
    pub fn new(chain: Vec<CertificateDer<'static>>) -> Peer {
        Peer {
            chain,
            verdicts: Mutex::new(Vec::new()),
        }
    }

    /// The node name in the client certificate, when it is a valid node identity of
    /// `site` under `anchor` (that site's own) at `now`; checked once per connection, site
    /// and validity window (see [`Peer`]).
    fn authorize(
        &self,
        site: &DnsLabel,
        anchor: &CertificateDer<'static>,
        now: SystemTime,
    ) -> Result<DnsLabel, Refusal> {
        self.authorize_with(site, now, || verify_node(&self.chain, site, anchor, now))
    }

    /// [`Peer::authorize`] with the check as `verify`, which runs only when this
    /// connection has no fresh answer for `site` at `now`.
    fn authorize_with(
        &self,
        site: &DnsLabel,
        now: SystemTime,
        verify: impl FnOnce() -> Result<DnsLabel, Refusal>,
    ) -> Result<DnsLabel, Refusal> {
        if self.chain.is_empty() {
            return Err(no_certificate());
        }
        // Held across the check, so that it runs once even if requests ever overlap.
        let mut verdicts = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(verdict) = verdicts.iter().find(|verdict| &verdict.site == site) {
            if verdict.checked_at <= now && now < verdict.fresh_until {
                return verdict.answer.clone();
            }
        }
        let answer = verify();
        let ttl_end = now + AUTHORIZATION_TTL;
        let fresh_until =
            next_validity_change(&self.chain, now).map_or(ttl_end, |change| change.min(ttl_end));
        debug!(%site, node = ?answer.as_ref().ok().map(DnsLabel::as_str), "client certificate checked");
        verdicts.retain(|verdict| &verdict.site != site);
        verdicts.push(Verdict {
            site: site.clone(),
            checked_at: now,
            fresh_until,
            answer: answer.clone(),
        });
        answer
    }
}

/// The first instant after `now` at which a certificate of `chain` becomes valid or
/// expires, i.e. at which `verify_leaf`'s answer may change (webpki compares whole
/// seconds: valid from `not_before` through `not_after`). A certificate whose validity does
/// not parse is skipped: webpki refuses it whatever the time (and the TTL bounds the answer
/// anyway).
fn next_validity_change(chain: &[CertificateDer<'_>], now: SystemTime) -> Option<SystemTime> {
    let at = |seconds: i64| {
        u64::try_from(seconds).map_or(Some(SystemTime::UNIX_EPOCH), |s| {
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s))
        })
    };
    chain
        .iter()
        .filter_map(|cert| {
            let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
            let validity = parsed.validity();
            Some((
                validity.not_before.timestamp(),
                validity.not_after.timestamp(),
            ))
        })
        .flat_map(|(not_before, not_after)| [at(not_before), at(not_after.saturating_add(1))])
        .flatten()
        .filter(|&change| change > now)
        .min()
}

fn no_certificate() -> Refusal {
    let message = "a node certificate is required".to_owned();
    Refusal(StatusCode::UNAUTHORIZED, message)
}

/// The node name in `chain`'s leaf, when it is a valid identity of exactly one node of
/// `site` under `anchor` at `now` (`Expected::OneNode`).
fn verify_node(
    chain: &[CertificateDer<'static>],
    site: &DnsLabel,
    anchor: &CertificateDer<'static>,
    now: SystemTime,
) -> Result<DnsLabel, Refusal> {
    let forbidden = |why: String| Refusal(StatusCode::FORBIDDEN, why);
    let trust = SiteTrust::new(site.clone(), vec![anchor.clone()])
        .map_err(|err| forbidden(format!("not a node of site {site}: {err}")))?;
    let verified = SpiffeVerifier::new(trust, Expected::OneNode)
        .check_client(chain, now)
        .map_err(|refusal| match refusal {
            PeerRefusal::NoCertificate => no_certificate(),
            PeerRefusal::Invalid(err) => forbidden(format!("not a node of site {site}: {err}")),
            PeerRefusal::SeveralNodes => {
                forbidden("the certificate names more than one node".to_owned())
            }
            _ => forbidden("the certificate names no node".to_owned()),
        })?;
    verified
        .node()
        .cloned()
        .ok_or_else(|| forbidden("the certificate names no node".to_owned()))
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
    let outcome = |outcome| {
        registry
            .metrics
            .publishes
            .get_or_create(&PublishLabels {
                site: site.name.to_string(),
                outcome,
            })
            .inc();
    };
    match site.publish(&body, registry.storage.as_ref()).await {
        Ok(signed) => {
            outcome("stored");
            registry.fleet.changed();
            info!(site = %site.name, revision = signed.revision, "revision published");
            json_response(
                StatusCode::CREATED,
                &json!({ "site": site.name.as_str(), "revision": signed.revision }),
            )
        }
        Err(PublishError::Rejected(rejection)) => {
            outcome("refused");
            use pimesh_revision::Rejection::*;
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
            outcome("failed");
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
    let (after, wait, trial) = match ConfigQuery::parse(query) {
        Ok(query) => (
            query.after,
            query.wait.min(registry.long_poll_max),
            query.trial,
        ),
        Err(err) => return error(StatusCode::BAD_REQUEST, &err.to_string()),
    };
    let mut changes = site.offers.subscribe();
    let _parked = site
        .offers
        .park(node, registry.storage.as_ref(), unix_now());
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    let label = CentralMetrics::site(&site.name);
    // Counted down again however the wait ends, the connection dropped included.
    let _waiting = Waiting::new(registry.metrics.long_polls.get_or_create(&label).clone());
    let answered = |answer| {
        registry
            .metrics
            .long_poll_answers
            .get_or_create(&AnswerLabels {
                site: site.name.to_string(),
                answer,
            })
            .inc();
    };
    loop {
        changes.borrow_and_update();
        if let Some(current) = site.offers.offer(node, after) {
            debug!(site = %site.name, %node, revision = current.revision, "serving revision");
            answered("revision");
            let mut response = Response::new(Full::new(Bytes::from(current.json.clone())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            return response;
        }
        if let Some(stopped) = trial.and_then(|trial| site.offers.stopped(trial)) {
            debug!(site = %site.name, %node, trial = ?trial, state = %stopped, "the node's trial revision's rollout stopped");
            answered("trial_stopped");
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response.headers_mut().insert(
                TRIAL_STOPPED_HEADER,
                header::HeaderValue::from_static(stopped.as_str()),
            );
            return response;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() {
                return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
            },
            () = &mut deadline => {
                answered("nothing_newer");
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
    let report: NodeReport = match serde_json::from_slice(&body) {
        Ok(report) => report,
        Err(err) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("expected a report {{revision, state, detail}}: {err}"),
            )
        }
    };
    let recorded = RecordedReport {
        report,
        received_at: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    match registry.storage.record_report(&site.name, node, &recorded) {
        Ok(()) => {
            registry.fleet.changed();
            site.offers
                .reported(node, &recorded, registry.storage.as_ref(), unix_now());
            registry
                .metrics
                .reports
                .get_or_create(&CentralMetrics::site(&site.name))
                .inc();
            let report = &recorded.report;
            info!(site = %site.name, %node, state = %report.state, revision = ?report.revision, "node report");
            json_response(StatusCode::OK, &json!({ "recorded": true }))
        }
        Err(err) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cannot store the report: {err}"),
        ),
    }
}

/// A node counted in `pimesh_central_long_polls` for as long as this lives.
struct Waiting(prometheus_client::metrics::gauge::Gauge);

impl Waiting {
    fn new(gauge: prometheus_client::metrics::gauge::Gauge) -> Waiting {
        gauge.inc();
        Waiting(gauge)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn metrics(registry: &Registry) -> Response<Full<Bytes>> {
    match registry.metrics.encode() {
        Ok(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            response
        }
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics",
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::BTreeSet;

    use pimesh_identity::{LeafRequest, SpiffeId, TrustRoot};

    use super::*;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    /// A node certificate of `site` for `node`, valid for `lifetime` from `now`, with its
    /// issuer: the chain a node presents.
    fn node_chain(
        root: &TrustRoot,
        site: &DnsLabel,
        node: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Vec<CertificateDer<'static>> {
        let id = SpiffeId::node(site, &label(node));
        let request = LeafRequest::new(std::slice::from_ref(&id)).expect("request");
        let leaf = root
            .issuer
            .sign_leaf_for(&request.csr, site, &BTreeSet::from([id]), now, lifetime)
            .expect("leaf");
        vec![leaf.der, root.issuer.cert_der().clone()]
    }

    #[test]
    fn checked_once_per_connection_and_site_refusals_included() {
        let now = SystemTime::now();
        let (a, b) = (label("depot-7"), label("depot-8"));
        let peer = Peer::new(vec![CertificateDer::from(b"not parsed here".to_vec())]);
        let checks = Cell::new(0);
        let accept = || {
            checks.set(checks.get() + 1);
            Ok(label("pi-a"))
        };
        let refuse = || {
            checks.set(checks.get() + 1);
            Err(Refusal(
                StatusCode::FORBIDDEN,
                "not a node of depot-8".to_owned(),
            ))
        };
        assert_eq!(peer.authorize_with(&a, now, accept), Ok(label("pi-a")));
        let later = now + Duration::from_secs(60);
        assert_eq!(peer.authorize_with(&a, later, accept), Ok(label("pi-a")));
        assert_eq!(checks.get(), 1, "the second request reuses the answer");
        let refused = peer.authorize_with(&b, now, refuse);
        assert_eq!(
            refused.as_ref().map_err(|r| r.0),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(peer.authorize_with(&b, later, refuse), refused);
        assert_eq!(checks.get(), 2, "each site once, a refusal too");
        // Checked again past the TTL, and when the clock was set back.
        peer.authorize_with(&a, now + AUTHORIZATION_TTL, accept)
            .expect("a");
        assert_eq!(checks.get(), 3);
        peer.authorize_with(&a, now, accept).expect("a");
        assert_eq!(checks.get(), 4);
        // Without a certificate there is nothing to check.
        let anonymous = Peer::new(Vec::new()).authorize_with(&a, now, accept);
        assert_eq!(anonymous.map_err(|r| r.0), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(checks.get(), 4);
    }

    #[test]
    fn a_connection_outliving_its_certificate_is_refused() {
        let now = SystemTime::now();
        let site = label("depot-7");
        let root = TrustRoot::generate(&site, now).expect("root");
        // Expires in a minute: well before the TTL would end the answer.
        let peer = Peer::new(node_chain(
            &root,
            &site,
            "pi-a",
            now,
            Duration::from_secs(60),
        ));
        let anchor = root.anchor.cert_der().clone();
        let at = |seconds: u64| now + Duration::from_secs(seconds);
        assert_eq!(peer.authorize(&site, &anchor, now), Ok(label("pi-a")));
        assert_eq!(peer.authorize(&site, &anchor, at(30)), Ok(label("pi-a")));
        let expired = peer.authorize(&site, &anchor, at(62)).expect_err("expired");
        assert_eq!(expired.0, StatusCode::FORBIDDEN);
        assert!(
            expired.1.contains("not a node of site depot-7"),
            "{}",
            expired.1
        );
    }

    #[test]
    fn a_node_of_another_site_is_refused() {
        let now = SystemTime::now();
        let (site, other) = (label("depot-7"), label("depot-8"));
        let root = TrustRoot::generate(&site, now).expect("root");
        let other_root = TrustRoot::generate(&other, now).expect("root");
        let lifetime = Duration::from_secs(3600);
        let stranger = Peer::new(node_chain(&other_root, &other, "pi-a", now, lifetime));
        let anchor = root.anchor.cert_der().clone();
        for _ in 0..2 {
            let refused = stranger
                .authorize(&site, &anchor, now)
                .expect_err("stranger");
            assert_eq!(refused.0, StatusCode::FORBIDDEN);
        }
        // The same connection is a node of its own site.
        let other_anchor = other_root.anchor.cert_der().clone();
        assert_eq!(
            stranger.authorize(&other, &other_anchor, now),
            Ok(label("pi-a"))
        );
    }
}
