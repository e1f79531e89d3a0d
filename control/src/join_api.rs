//! The join protocol's routes (`pimesh_join`).
//!
//! | side | method and path | what |
//! |---|---|---|
//! | join (TLS name `join.pimesh.invalid`, no client certificate) | `GET /v1/join/bundle` | the anchors, PEM |
//! | join | `POST /v1/join` | a `JoinRequest` (at most `MAX_REQUEST_BYTES`) → a `JoinAnswer`, or a `Refusal` |
//! | mutual TLS | `GET /v1/join/issuer` | → an `IssuerHandover`, to a server node only |
//! | mutual TLS | `POST /v1/join/renew` | the node's CSR (PEM, of the key it presented) → its node certificate chain re-signed by the current issuer (200), or 204 when the one it presented is current |
//!
//! A join is checked in this order, the first failure answering: the source's recent
//! failures (`rate_limit`: `rate_limited`, 429 with `Retry-After`), the body (413 or 400
//! `bad_request`), the token secret against the accepted tokens (`tokens`; constant
//! time: `wrong_token`, `token_expired`), the CSR (a P-256 key: `bad_request`; exactly
//! `spiffe://<site>/node/<node>`: `csr_mismatch`, or `wrong_site` for another site's
//! ID), the name (`name_taken`: a live heartbeat of the node names another key, or this
//! replica granted the name to another key within the heartbeat TTL). The node
//! certificate is signed while checking the CSR and discarded when a later check fails.
//! Then the node is placed (`grants`) and answered: the node certificate
//! (`pimesh_identity::NODE_LIFETIME`, never past the issuer) with the issuer, the
//! anchors, its role and the site's servers.
//!
//! Every attempt is recorded (`join_records`); every failure but `rate_limited` and
//! `unavailable` (the replica's own state, not the client's fault) counts
//! against its source.
//!
//! Invariants: the issuer's key leaves only through [`issuer`], over mutual TLS, to a
//! node that holds a live `role: server` heartbeat or an unexpired grant; a join answer
//! carries a certificate for exactly the node ID the request names, of the key of its CSR;
//! a renewal carries one for exactly the node ID of the certificate presented, of the key
//! presented (the handshake proved its possession).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{header, Method, Request, Response, StatusCode};
use pimesh_identity::{IssueError, SpiffeId};
use pimesh_join::{
    IssuerHandover, JoinAnswer, JoinRequest, Refusal, RefusalCode, Role, ServerEntry, TokenRefusal,
};
use pimesh_runtime::answer;
use pimesh_schema::DnsLabel;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use tracing::{info, warn};

use crate::discovery::Discovery;
use crate::grants::{Grants, Seats, DEFAULT_TARGET};
use crate::identity_api;
use crate::join_records::{Outcome, Record, Records};
use crate::kube_services::KubeServers;
use crate::rate_limit::{self, FailureLimiter};
use crate::state::{Snapshot, State};
use crate::state_dir::StateDir;

/// The most names remembered as recently granted (they expire after the heartbeat TTL).
const MAX_RECENT: usize = 4096;

/// The join side of a replica: its node, its state folder, its rate limit and its
/// recent grants.
pub struct Join {
    replica: u16,
    /// The node this replica runs on (`--node`).
    node: Option<DnsLabel>,
    ttl: Duration,
    grants: Grants,
    records: Records,
    limiter: FailureLimiter,
    /// Before this instant joins are answered `unavailable`: the replica has not heard the
    /// site's live nodes yet.
    answers_from: Instant,
    /// Names this replica answered within the TTL, with the key (hex SPKI SHA-256).
    recent: Mutex<HashMap<DnsLabel, (String, Instant)>>,
    /// K3s's server nodes, when this replica reads K3s's API: they keep their seats.
    k3s_servers: KubeServers,
}

impl Join {
    pub fn new(replica: u16, node: Option<DnsLabel>, state_dir: PathBuf, ttl: Duration) -> Join {
        let dir = StateDir::new(state_dir);
        Join {
            replica,
            node,
            ttl,
            grants: Grants::new(dir.clone()),
            records: Records::new(dir),
            limiter: FailureLimiter::default(),
            recent: Mutex::new(HashMap::new()),
            answers_from: Instant::now(),
            k3s_servers: KubeServers::default(),
        }
    }

    /// Counts `servers` (K3s's server nodes, as the replica reads them) when placing joins.
    pub fn counting_k3s_servers(mut self, servers: KubeServers) -> Join {
        self.k3s_servers = servers;
        self
    }

    /// Answers joins only `warmup` from now (`--join-warmup`).
    pub fn answering_after(mut self, warmup: Duration) -> Join {
        self.answers_from = Instant::now() + warmup;
        self
    }

    /// A heartbeat of `node` arrived: its grant, if any, is refreshed.
    pub async fn heard_from(&self, node: &DnsLabel) {
        let grants = self.grants.clone();
        let name = node.as_str().to_owned();
        let refreshed =
            tokio::task::spawn_blocking(move || grants.refresh(&name, SystemTime::now(), true))
                .await;
        if let Ok(Err(err)) = refreshed {
            warn!(%node, %err, "cannot refresh the node's server grant");
        }
    }

    /// Notes that `node` was answered for `key`, unless another key holds the name within
    /// the TTL.
    fn claim(&self, node: &DnsLabel, key: &str, now: Instant) -> Result<(), NameHeld> {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.retain(|_, (_, at)| now.saturating_duration_since(*at) < self.ttl);
        match recent.get(node) {
            Some((held, _)) if held != key => Err(NameHeld { key: held.clone() }),
            _ => {
                if recent.len() >= MAX_RECENT && !recent.contains_key(node) {
                    let oldest = recent
                        .iter()
                        .min_by_key(|(_, (_, at))| *at)
                        .map(|(n, _)| n.clone());
                    if let Some(oldest) = oldest {
                        recent.remove(&oldest);
                    }
                }
                recent.insert(node.clone(), (key.to_owned(), now));
                Ok(())
            }
        }
    }
}

/// A node name held by another key: the fingerprint of that key.
#[derive(Debug)]
struct NameHeld {
    key: String,
}

/// A refused attempt.
struct Refused {
    code: RefusalCode,
    reason: String,
    /// Instead of the code's own status (413 for a body too large).
    status: Option<StatusCode>,
    /// Seconds for `Retry-After`.
    retry_after: Option<u64>,
}

impl Refused {
    fn new(code: RefusalCode, reason: impl Into<String>) -> Refused {
        Refused {
            code,
            reason: reason.into(),
            status: None,
            retry_after: None,
        }
    }

    /// `code` with the status and reason of a generic refusal.
    fn stating(code: RefusalCode, answer::Refusal(status, reason): answer::Refusal) -> Refused {
        Refused {
            status: Some(status),
            ..Refused::new(code, reason)
        }
    }

    fn response(&self) -> Response<Full<Bytes>> {
        let status = self.status.unwrap_or_else(|| {
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::BAD_REQUEST)
        });
        let body = Refusal {
            error: self.code,
            reason: self.reason.clone(),
        };
        let text = serde_json::to_string(&body).unwrap_or_default();
        let mut response = answer::json(status, text);
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        response
    }
}

/// Answers one request of a connection on the join configuration from `peer`, accepted
/// at `local`.
pub async fn route(
    request: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    state: &State,
    discovery: &Discovery,
    join: &Join,
) -> Response<Full<Bytes>> {
    use pimesh_join::path::{BUNDLE, JOIN};
    match (request.method(), request.uri().path()) {
        (&Method::GET, BUNDLE) => bundle(state),
        (&Method::POST, JOIN) => join_request(request, peer, local, state, discovery, join).await,
        (_, BUNDLE | JOIN) => {
            answer::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        }
        _ => answer::error(
            StatusCode::NOT_FOUND,
            "no such resource on a join connection (TLS name join.pimesh.invalid): \
             GET /v1/join/bundle and POST /v1/join only; everything else needs mutual TLS",
        ),
    }
}

/// `GET /v1/join/bundle`: the anchors, to anyone (a joining node pins one of them).
fn bundle(state: &State) -> Response<Full<Bytes>> {
    let Some(snapshot) = state.snapshot() else {
        return Refused::new(RefusalCode::Unavailable, "the replica is not ready").response();
    };
    let mut response = Response::new(Full::new(Bytes::from(crate::pem::anchors(&snapshot))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(crate::pem::CONTENT_TYPE),
    );
    response
}

/// `POST /v1/join`: checks, answers, records.
async fn join_request(
    request: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    state: &State,
    discovery: &Discovery,
    join: &Join,
) -> Response<Full<Bytes>> {
    let from = peer.ip().to_canonical();
    let mut node = None;
    let outcome = attempt(request, from, local, state, discovery, join, &mut node).await;
    let now = SystemTime::now();
    let (record, response) = match outcome {
        Ok(answer) => {
            let record = Record::new(
                node.as_ref(),
                from,
                Outcome::Joined(answer.role),
                join.replica,
                now,
            );
            let text = serde_json::to_string(&answer).unwrap_or_default();
            (record, answer::json(StatusCode::OK, text))
        }
        Err(refused) => {
            // The client's failures count; the replica's own ("try later") do not.
            if !matches!(
                refused.code,
                RefusalCode::RateLimited | RefusalCode::Unavailable
            ) {
                join.limiter.failed(from, Instant::now());
            }
            let record = Record::new(
                node.as_ref(),
                from,
                Outcome::Refused(refused.code),
                join.replica,
                now,
            );
            record.log(&refused.reason);
            let response = refused.response();
            write_record(join, record).await;
            return response;
        }
    };
    record.log("");
    write_record(join, record).await;
    response
}

async fn write_record(join: &Join, record: Record) {
    let records = join.records.clone();
    let written = tokio::task::spawn_blocking(move || records.append(&record)).await;
    if let Ok(Err(err)) = written {
        warn!(%err, "cannot append to the join records");
    }
}

async fn attempt(
    request: Request<Incoming>,
    from: IpAddr,
    local: SocketAddr,
    state: &State,
    discovery: &Discovery,
    join: &Join,
    named: &mut Option<DnsLabel>,
) -> Result<JoinAnswer, Refused> {
    if let Err(wait) = join.limiter.check(from, Instant::now()) {
        let seconds = rate_limit::retry_after_seconds(wait);
        return Err(Refused {
            retry_after: Some(seconds),
            ..Refused::new(
                RefusalCode::RateLimited,
                format!(
                    "more than {} failed join attempts from {from} within {} s; try again in {seconds} s",
                    rate_limit::MAX_FAILURES,
                    rate_limit::WINDOW.as_secs()
                ),
            )
        });
    }
    if let Some(wait) = join.answers_from.checked_duration_since(Instant::now()) {
        return Err(Refused {
            retry_after: Some(wait.as_secs().max(1)),
            ..Refused::new(
                RefusalCode::Unavailable,
                format!(
                    "this server joined the site a moment ago and answers joins in {} s, once it \
                     has heard the site's nodes; ask another server",
                    wait.as_secs().max(1)
                ),
            )
        });
    }
    let Some(snapshot) = state.snapshot() else {
        return Err(Refused::new(
            RefusalCode::Unavailable,
            "the replica is not ready",
        ));
    };
    let body = answer::read_body(request, pimesh_join::MAX_REQUEST_BYTES)
        .await
        .map_err(|refusal| Refused::stating(RefusalCode::BadRequest, refusal))?;
    let request: JoinRequest = serde_json::from_slice(&body).map_err(|err| {
        Refused::new(
            RefusalCode::BadRequest,
            format!("expected a JSON join request {{\"node\", \"token_secret\", \"csr\"}}: {err}"),
        )
    })?;
    let node = request.node.clone();
    *named = Some(node.clone());
    let site = &snapshot.site;

    let tokens = snapshot.accepted_tokens();
    if tokens.is_empty() {
        return Err(Refused::new(
            RefusalCode::WrongToken,
            format!(
                "site {site} accepts no join tokens (no join.json in the trust folder and no \
                 [join] tokens in the site config)"
            ),
        ));
    }
    let now = SystemTime::now();
    tokens
        .check(&request.token_secret, now)
        .map_err(|refusal| {
            let code = match refusal {
                TokenRefusal::Wrong => RefusalCode::WrongToken,
                TokenRefusal::Expired => RefusalCode::TokenExpired,
            };
            Refused::new(code, refusal.to_string())
        })?;

    let csr =
        CertificateSigningRequestDer::from_pem_slice(request.csr.as_bytes()).map_err(|err| {
            Refused::new(
                RefusalCode::BadRequest,
                format!("csr: expected a PEM CERTIFICATE REQUEST: {err}"),
            )
        })?;
    let key = pimesh_identity::request_key_sha256(&csr)
        .map_err(|err| Refused::new(RefusalCode::BadRequest, format!("csr: {err}")))?;
    let key = pimesh_join::hex(&key);
    let certificate = sign(&snapshot, &csr, &node, now)?;

    let instant = Instant::now();
    if let Some(held) = discovery
        .heartbeats
        .about(&node, instant)
        .and_then(|about| about.credential)
        .filter(|held| *held != key)
    {
        return Err(name_taken(&node, &held, "a live heartbeat", join.ttl));
    }
    join.claim(&node, &key, instant)
        .map_err(|held| name_taken(&node, &held.key, "a join this replica answered", join.ttl))?;

    let servers = discovery.heartbeats.servers();
    let live: BTreeSet<String> = servers.keys().cloned().collect();
    let target = snapshot
        .config
        .as_ref()
        .map_or(DEFAULT_TARGET, |config| usize::from(config.k3s.servers));
    let grants = join.grants.clone();
    let own = join.node.as_ref().map(|n| n.as_str().to_owned());
    let name = node.as_str().to_owned();
    let k3s_servers = join.k3s_servers.current();
    let role = tokio::task::spawn_blocking(move || {
        let seats = Seats {
            live_servers: &live,
            own: own.as_deref(),
            k3s_servers: &k3s_servers,
            target,
        };
        grants.place(&name, &seats, now)
    })
    .await
    .map_err(|err| err.to_string())
    .and_then(|placed| placed.map_err(|err| err.to_string()))
    .map_err(|err| {
        Refused::new(
            RefusalCode::Unavailable,
            format!("cannot keep the server grants: {err}"),
        )
    })?;

    // This node is named at the address the joiner reached it by: its own heartbeat may be
    // on record at loopback (its proxy beats over 127.0.0.1 until another node has dialled
    // this one), which no other node can dial. A heartbeat over loopback is this node's.
    let reached = local.ip().to_canonical();
    let mut entries: Vec<ServerEntry> = servers
        .into_iter()
        .filter_map(|(name, server)| {
            let node = DnsLabel::try_from(name).ok()?;
            let own = join.node.as_ref() == Some(&node) || server.address.is_loopback();
            Some(ServerEntry {
                node,
                address: if own { reached } else { server.address },
                replicas: server.replicas,
            })
        })
        .collect();
    if let Some(own) = &join.node {
        if !entries.iter().any(|entry| &entry.node == own) {
            entries.push(ServerEntry {
                node: own.clone(),
                address: reached,
                replicas: vec![local.port()],
            });
            entries.sort_by(|a, b| a.node.cmp(&b.node));
        }
    }
    Ok(JoinAnswer {
        certificate,
        anchors: crate::pem::anchors(&snapshot),
        role,
        servers: entries,
        k3s_token: snapshot.trust.k3s_token.clone(),
    })
}

/// The node certificate chain for `csr`, which must ask for exactly the node ID.
fn sign(
    snapshot: &Snapshot,
    csr: &CertificateSigningRequestDer<'_>,
    node: &DnsLabel,
    now: SystemTime,
) -> Result<String, Refused> {
    let site = &snapshot.site;
    let expected = SpiffeId::node(site, node);
    snapshot
        .trust
        .issuer
        .sign_node_chain(csr, site, node, now, pimesh_identity::NODE_LIFETIME)
        .map_err(|err| match err {
            IssueError::MalformedRequest(why) => {
                Refused::new(RefusalCode::BadRequest, format!("csr: {why}"))
            }
            IssueError::ForeignSite(id) => Refused::new(
                RefusalCode::WrongSite,
                format!("the CSR asks for {id}, of another site; this is site {site}, expected {expected}"),
            ),
            IssueError::NotPermitted(id) | IssueError::UnsupportedName(id) => Refused::new(
                RefusalCode::CsrMismatch,
                format!("the CSR asks for {id}; expected {expected}"),
            ),
            IssueError::NoIdentity => Refused::new(
                RefusalCode::CsrMismatch,
                format!("the CSR asks for no identity; expected {expected}"),
            ),
            IssueError::Sign(why) => Refused::new(
                RefusalCode::Unavailable,
                format!("cannot sign the node certificate: {why}"),
            ),
        })
}

fn name_taken(node: &DnsLabel, held: &str, by: &str, ttl: Duration) -> Refused {
    let short = held.get(..16).unwrap_or(held);
    Refused::new(
        RefusalCode::NameTaken,
        format!(
            "node {node} is held by another key ({short}…, from {by}); the name is free again \
             {} s after that node's last heartbeat",
            ttl.as_secs()
        ),
    )
}

/// The replica's snapshot and the node that presented `chain` over mutual TLS; a refusal
/// with `code` (and the status the check chose) for a client that is no node of the site.
fn calling_node(
    chain: &[CertificateDer<'static>],
    state: &State,
    now: SystemTime,
    code: RefusalCode,
) -> Result<(std::sync::Arc<Snapshot>, DnsLabel), Refused> {
    let Some(snapshot) = state.snapshot() else {
        return Err(Refused::new(
            RefusalCode::Unavailable,
            "the replica is not ready",
        ));
    };
    match identity_api::requesting_node(chain, &snapshot, now) {
        Ok(node) => Ok((snapshot, node)),
        Err(refusal) => Err(Refused::stating(code, refusal)),
    }
}

/// A node certificate is renewed once less than this share of its life is left (or when
/// another issuer than the current one signed it).
const RENEW_WHEN_LEFT: u32 = 3;

/// `POST /v1/join/renew` over mutual TLS: a node that joined keeps a node certificate of
/// the current issuer without its token (rotated since, perhaps). The node presents its
/// node certificate and sends a CSR of the same key; the answer is the node certificate
/// chain re-signed by the current issuer when the presented one is of another issuer or
/// has less than a third of its life left, else 204.
pub async fn renew(
    request: Request<Incoming>,
    chain: &[CertificateDer<'static>],
    state: &State,
) -> Response<Full<Bytes>> {
    let now = SystemTime::now();
    let (snapshot, node) = match calling_node(chain, state, now, RefusalCode::BadRequest) {
        Ok(caller) => caller,
        Err(refused) => return refused.response(),
    };
    let body = match answer::read_body(request, pimesh_join::MAX_REQUEST_BYTES).await {
        Ok(body) => body,
        Err(refusal) => return Refused::stating(RefusalCode::BadRequest, refusal).response(),
    };
    let Ok(csr) = CertificateSigningRequestDer::from_pem_slice(&body) else {
        return Refused::new(
            RefusalCode::BadRequest,
            "expected a PEM CERTIFICATE REQUEST",
        )
        .response();
    };
    let presented = chain.first().map(pimesh_identity::certificate_key_sha256);
    let requested = pimesh_identity::request_key_sha256(&csr);
    match (presented, requested) {
        (Some(Ok(presented)), Ok(requested)) if presented == requested => {}
        _ => {
            warn!(%node, "renewal refused: the CSR is not of the key presented");
            return Refused::new(
                RefusalCode::CsrMismatch,
                format!("the CSR must be of the key node {node} presented"),
            )
            .response();
        }
    }
    if !renewal_due(chain, &snapshot, now) {
        return Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Full::new(Bytes::new()))
            .unwrap_or_default();
    }
    match sign(&snapshot, &csr, &node, now) {
        Ok(certificate) => {
            info!(%node, "node certificate renewed");
            let mut response = Response::new(Full::new(Bytes::from(certificate)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(identity_api::PEM_CONTENT_TYPE),
            );
            response
        }
        Err(refused) => refused.response(),
    }
}

/// Whether the presented `chain` (a node certificate and its issuer) should be re-signed:
/// another issuer than `snapshot`'s signed it, or less than a [`RENEW_WHEN_LEFT`]th of its
/// life is left at `now`.
fn renewal_due(chain: &[CertificateDer<'static>], snapshot: &Snapshot, now: SystemTime) -> bool {
    if chain.get(1) != Some(snapshot.trust.issuer.cert_der()) {
        return true;
    }
    let Some(Ok((not_before, not_after))) = chain.first().map(pimesh_identity::cert_validity)
    else {
        return true;
    };
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_after
        .checked_sub(life / RENEW_WHEN_LEFT)
        .is_none_or(|renew_from| now >= renew_from)
}

/// `GET /v1/join/issuer` over mutual TLS: the issuer, to a server node of the site.
pub async fn issuer(
    chain: &[CertificateDer<'static>],
    state: &State,
    discovery: &Discovery,
    join: &Join,
) -> Response<Full<Bytes>> {
    let now = SystemTime::now();
    let (snapshot, node) = match calling_node(chain, state, now, RefusalCode::NotAServer) {
        Ok(caller) => caller,
        Err(refused) => return refused.response(),
    };
    let heartbeat_says_server = discovery
        .heartbeats
        .about(&node, Instant::now())
        .is_some_and(|about| about.role == Some(Role::Server));
    let grants = join.grants.clone();
    let name = node.as_str().to_owned();
    // Fetching the issuer keeps the grant, if any.
    let granted = tokio::task::spawn_blocking(move || grants.refresh(&name, now, false))
        .await
        .is_ok_and(|refreshed| refreshed.unwrap_or(false));
    if !(heartbeat_says_server || granted || join.node.as_ref() == Some(&node)) {
        warn!(%node, "issuer refused: not a server node");
        return Refused::new(
            RefusalCode::NotAServer,
            format!(
                "node {node} is not a server node of site {}: the issuer goes to server nodes only",
                snapshot.site
            ),
        )
        .response();
    }
    info!(%node, "issuer handed over");
    let handover = IssuerHandover {
        issuer_cert: snapshot.trust.issuer_pem.clone(),
        issuer_key: snapshot.trust.issuer_key_pem.clone(),
        anchors: crate::pem::anchors(&snapshot),
        tokens: (*snapshot.trust_tokens).clone(),
        k3s_token: snapshot.trust.k3s_token.clone(),
    };
    answer::json(
        StatusCode::OK,
        serde_json::to_string(&handover).unwrap_or_default(),
    )
}
