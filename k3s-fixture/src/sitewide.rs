//! Leases shared by all the servers of a cluster, as K3s shares them through etcd: a
//! Lease written through any server is read through every server, and of two writes made
//! from the same read through two servers, one fails with 409.
//!
//! The fixture has no etcd, so (the stand-in):
//! - One server is the **leader**: the live server with the smallest node name, while the
//!   server judging has quorum (`cluster`). Each server judges from its own view of who
//!   answered `/ping`, so views differ for a few seconds after a server stops or starts.
//! - A server that is not the leader **forwards** every Lease request to the leader
//!   (same method, path, query and body; basic auth `server:<password>`; header
//!   [`FORWARDED`]) and passes the answer back. A forwarded request is never forwarded
//!   again. When there is no leader, or it cannot be reached, or a forwarded request
//!   reaches a server that is not the leader in its own view, or the leader cannot sync,
//!   writes answer 503 (etcd without quorum cannot write), and so do reads, unless they
//!   ask for `resourceVersion=0`, which answer from this server's copy. This is the API's
//!   contract (Kubernetes' "Resource versions" semantics): a GET or LIST without a
//!   `resourceVersion` is a "most recent" read, served by kube-apiserver as a quorum read
//!   from etcd, never from a copy that may be old; `resourceVersion=0` is "any", which
//!   may be served from the API server's cache. A server that has just restarted holds
//!   an old copy (its disk copy is written every 2 s), so answering it as "most recent"
//!   would show a Lease written moments before the restart as never written.
//! - The leader serialises writes. Before its first write as leader (and after any sign
//!   that another server wrote) it **syncs**: it reads the copy of every live server and
//!   keeps the newest (highest store version), and needs answers from a majority of the
//!   servers (itself included). A write is made on a copy of the store, **pushed** to the
//!   live servers, and answered — and kept by the leader — only when a majority of the
//!   servers (the leader included) stored it; otherwise 503.
//! - A server stores a pushed copy only when the pusher is its own view's leader and the
//!   copy is newer than its own. Servers also pull each other's copies every 2 s (`peers`)
//!   and keep a newer one; each server keeps its copy on disk
//!   (`<data-dir>/server/db/fixture-leases.json`), so a restarted server starts from it.
//!
//! What this guarantees, and where it is simpler than etcd: an answered write is on a
//! majority, so the next leader (which syncs from a majority) starts from it; of two
//! writes made from the same read, the second fails the resourceVersion check at the one
//! leader, or — with two servers briefly both believing they lead — fails to be stored
//! by a majority, since each server stores pushes only from its own leader and only newer
//! versions. It is not a consensus protocol: there are no terms, and a write that reached
//! some servers but not a majority (answered 503) may still show up later, as an etcd
//! write that timed out may; with five or more servers and two leaders at once, such a
//! write could even hide an answered one of the same version. Pimesh's tests run three
//! servers on one host and stop them by killing them, where none of this happens.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::task::JoinSet;

use crate::cluster::{ClusterState, Member};
use crate::leases::{Failure, Leases};
use crate::log::now_secs;
use crate::objects::Selector;

/// Marks a request one server forwarded to the leader.
pub const FORWARDED: &str = "x-pimesh-fixture-forwarded";
/// Names the pushing leader on a push.
pub const LEADER: &str = "x-pimesh-fixture-leader";
/// Servers read (`GET`) and push (`PUT`) copies of the store here (`server:<password>`).
pub const REPLICA_PATH: &str = "/v1-k3s/fixture-leases";
/// A forwarded request's timeout: the leader may sync and push within it.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(8);
/// The largest request body read.
const MAX_BODY: usize = 1024 * 1024;

/// One Lease request.
#[derive(Debug)]
enum Op {
    List(Option<String>, Selector),
    Get(String, String),
    Create(String, Value),
    Update(String, String, Value),
    Delete(String, String, Option<Value>),
}

impl Op {
    fn writes(&self) -> bool {
        matches!(self, Op::Create(..) | Op::Update(..) | Op::Delete(..))
    }
}

type Answer = Result<(StatusCode, Value), Failure>;

fn read(store: &Leases, op: &Op) -> Answer {
    match op {
        Op::List(namespace, selector) => {
            Ok((StatusCode::OK, store.list(namespace.as_deref(), selector)))
        }
        Op::Get(namespace, name) => store.get(namespace, name).map(|l| (StatusCode::OK, l)),
        _ => Err(Failure::Internal("not a read".into())),
    }
}

fn write(store: &mut Leases, op: &Op, now: u64) -> Answer {
    match op {
        Op::Create(namespace, body) => store
            .create(namespace, body, now)
            .map(|l| (StatusCode::CREATED, l)),
        Op::Update(namespace, name, body) => {
            store
                .update(namespace, name, body, now)
                .map(|(created, lease)| {
                    let code = if created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    };
                    (code, lease)
                })
        }
        Op::Delete(namespace, name, options) => store
            .delete(namespace, name, options.as_ref())
            .map(|s| (StatusCode::OK, s)),
        _ => read(store, op),
    }
}

/// Serves a Lease request (its path is one `leases::route` names). `from_server`: the
/// caller authenticated as `server:<password>`.
pub async fn handle(
    state: &ClusterState,
    request: Request<Incoming>,
    from_server: bool,
) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let path_and_query = request
        .uri()
        .path_and_query()
        .map_or(path.clone(), |p| p.as_str().to_owned());
    let forwarded = from_server && request.headers().contains_key(FORWARDED);
    let Some((namespace, name)) = crate::leases::route(&path) else {
        return crate::answers::method_not_allowed();
    };
    let (namespace, name) = (namespace.map(str::to_owned), name.map(str::to_owned));
    let selector = match crate::answers::query(request.uri(), "labelSelector")
        .and_then(|text| Selector::parse(&text.unwrap_or_default()))
    {
        Ok(selector) => selector,
        Err(err) => return crate::answers::bad_request(&err),
    };
    let any_version = match crate::answers::query(request.uri(), "resourceVersion") {
        Ok(version) => version.as_deref() == Some("0"),
        Err(err) => return crate::answers::bad_request(&err),
    };
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => return crate::answers::bad_request(&format!("cannot read the body: {err}")),
    };
    let json = || -> Result<Value, String> {
        serde_json::from_slice(&body)
            .map_err(|err| format!("Lease in version \"v1\" cannot be handled as a Lease: {err}"))
    };
    let op = match (&method, namespace, name) {
        (&Method::GET, namespace, None) => Op::List(namespace, selector),
        (&Method::GET, Some(namespace), Some(name)) => Op::Get(namespace, name),
        (&Method::POST, Some(namespace), None) => match json() {
            Ok(body) => Op::Create(namespace, body),
            Err(err) => return crate::answers::bad_request(&err),
        },
        (&Method::PUT, Some(namespace), Some(name)) => match json() {
            Ok(body) => Op::Update(namespace, name, body),
            Err(err) => return crate::answers::bad_request(&err),
        },
        (&Method::DELETE, Some(namespace), Some(name)) if body.is_empty() => {
            Op::Delete(namespace, name, None)
        }
        (&Method::DELETE, Some(namespace), Some(name)) => match json() {
            Ok(options) => Op::Delete(namespace, name, Some(options)),
            Err(err) => return crate::answers::bad_request(&err),
        },
        _ => return crate::answers::method_not_allowed(),
    };
    if any_version && !op.writes() {
        return local(state, &op);
    }
    match state.leader() {
        Some(leader) if leader.name == state.own_name => lead(state, &op).await,
        Some(leader) if !forwarded => {
            match forward(state, &leader, &method, &path_and_query, body).await {
                Ok(response) => response,
                Err(err) => unavailable(&format!(
                    "cannot reach the leader {} at {}: {err}",
                    leader.name, leader.url
                )),
            }
        }
        Some(leader) => unavailable(&format!(
            "a forwarded request reached {}, which is not the leader ({} is)",
            state.own_name, leader.name
        )),
        None => unavailable("etcdserver: no quorum (no Lease leader)"),
    }
}

/// A read answered from this server's copy: by the leader once synced, or for
/// `resourceVersion=0`.
fn local(state: &ClusterState, op: &Op) -> Response<Full<Bytes>> {
    respond(read(&state.replica().store, op))
}

fn respond(answer: Answer) -> Response<Full<Bytes>> {
    match answer {
        Ok((code, body)) => crate::answers::json_response(code, &body),
        Err(failure) => {
            let code =
                StatusCode::from_u16(failure.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            crate::answers::status(
                code,
                failure.reason(),
                &failure.message(),
                failure.details(),
            )
        }
    }
}

fn unavailable(why: &str) -> Response<Full<Bytes>> {
    crate::answers::status(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        &format!("k3s fixture: Leases cannot be read or written now: {why}"),
        None,
    )
}

/// The request as the leader serves it.
async fn lead(state: &ClusterState, op: &Op) -> Response<Full<Bytes>> {
    let _writing = state.lease_writes.lock().await;
    let synced = state.replica().synced;
    if !synced {
        if let Err(err) = sync(state).await {
            return unavailable(&err);
        }
    }
    if !op.writes() {
        return local(state, op);
    }
    let (base, mut copy) = {
        let replica = state.replica();
        (replica.store.version(), replica.store.clone())
    };
    let answer = match write(&mut copy, op, now_secs()) {
        Ok(answer) => answer,
        Err(failure) => return respond(Err(failure)),
    };
    let pushed = push(state, &copy).await;
    let mut replica = state.replica();
    match pushed {
        Ok(()) if replica.store.version() == base => {
            replica.store = copy;
            respond(Ok(answer))
        }
        Ok(()) => {
            replica.synced = false;
            unavailable("another server's copy was taken during the write")
        }
        Err(err) => {
            replica.synced = false;
            unavailable(&err)
        }
    }
}

/// `https://…` requests to the other servers with `server:<password>`.
fn peer_request(
    state: &ClusterState,
    method: Method,
    url: &str,
) -> Result<reqwest::RequestBuilder, String> {
    let client = state
        .peer_client
        .as_ref()
        .ok_or_else(|| "this server has no other servers".to_owned())?;
    Ok(client
        .request(method, url)
        .basic_auth("server", Some(&state.password)))
}

/// The other live servers.
fn others(state: &ClusterState) -> Vec<Member> {
    state
        .live_members()
        .into_iter()
        .filter(|m| m.name != state.own_name)
        .collect()
}

/// Takes the newest copy among this server's and the other live servers'; fails unless
/// a majority of the servers answered.
async fn sync(state: &ClusterState) -> Result<(), String> {
    let total = state.members().len();
    let mut tasks = JoinSet::new();
    for member in others(state) {
        let request = peer_request(state, Method::GET, &format!("{}{REPLICA_PATH}", member.url));
        tasks.spawn(async move { fetch(request?).await });
    }
    let mut answered = 1;
    let mut newest: Option<Leases> = None;
    while let Some(done) = tasks.join_next().await {
        if let Ok(Ok(copy)) = done {
            answered += 1;
            if newest.as_ref().is_none_or(|n| copy.version() > n.version()) {
                newest = Some(copy);
            }
        }
    }
    if answered * 2 <= total {
        return Err(format!(
            "only {answered} of {total} servers answered for their copy of the Leases"
        ));
    }
    let mut replica = state.replica();
    if let Some(newest) = newest.filter(|n| n.version() > replica.store.version()) {
        crate::log::info(&format!(
            "k3s fixture: Leases: took a newer copy (version {}) as leader",
            newest.version()
        ));
        replica.store = newest;
    }
    replica.synced = true;
    Ok(())
}

async fn fetch(request: reqwest::RequestBuilder) -> Result<Leases, String> {
    let response = request.send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("answered {}", response.status()));
    }
    let snapshot = crate::client::json_value(response).await?;
    Leases::restore(&snapshot).ok_or_else(|| "not a copy of the Leases".to_owned())
}

/// Pushes `copy` to the other live servers: `Ok` once a majority (this one included)
/// stored it.
async fn push(state: &ClusterState, copy: &Leases) -> Result<(), String> {
    let total = state.members().len();
    let body = copy.snapshot().to_string();
    let mut tasks = JoinSet::new();
    for member in others(state) {
        let request = peer_request(state, Method::PUT, &format!("{}{REPLICA_PATH}", member.url))
            .map(|r| {
                r.header(LEADER, &state.own_name)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
            });
        tasks.spawn(async move {
            let response = request?.send().await.map_err(|e| e.to_string())?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(response.text().await.unwrap_or_default())
            }
        });
    }
    let mut stored = 1;
    let mut refusals = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => stored += 1,
            Ok(Err(err)) => refusals.push(err),
            Err(err) => refusals.push(err.to_string()),
        }
    }
    if stored * 2 > total {
        Ok(())
    } else {
        Err(format!(
            "only {stored} of {total} servers stored the write ({})",
            refusals.join("; ")
        ))
    }
}

/// A copy pushed by `pusher` (`PUT` [`REPLICA_PATH`]): stored when `pusher` is this
/// server's leader and the copy is newer than this server's.
pub fn accept(state: &ClusterState, pusher: &str, snapshot: &Value) -> Result<(), String> {
    let copy = Leases::restore(snapshot).ok_or_else(|| "not a copy of the Leases".to_owned())?;
    match state.leader() {
        Some(leader) if leader.name == pusher => {}
        Some(leader) => {
            return Err(format!(
                "{} takes Lease writes from its leader {}, not {pusher}",
                state.own_name, leader.name
            ))
        }
        None => return Err(format!("{} has no quorum", state.own_name)),
    }
    let mut replica = state.replica();
    if copy.version() <= replica.store.version() {
        return Err(format!(
            "{} has version {}, not older than {}",
            state.own_name,
            replica.store.version(),
            copy.version()
        ));
    }
    replica.store = copy;
    replica.synced = false;
    Ok(())
}

/// Pulls the copy of the server at `url` (every exchange of `peers`) and keeps it when
/// newer; a leader then syncs again before its next write.
pub async fn catch_up(state: &ClusterState, url: &str) -> Result<(), String> {
    let copy = fetch(peer_request(
        state,
        Method::GET,
        &format!("{url}{REPLICA_PATH}"),
    )?)
    .await?;
    let mut replica = state.replica();
    if copy.version() > replica.store.version() {
        replica.store = copy;
        replica.synced = false;
    }
    Ok(())
}

/// Forwards a Lease request to the leader; its answer, or why it could not be asked.
async fn forward(
    state: &ClusterState,
    leader: &Member,
    method: &Method,
    path_and_query: &str,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, String> {
    let mut request = peer_request(
        state,
        method.clone(),
        &format!("{}{path_and_query}", leader.url),
    )?
    .header(FORWARDED, &state.own_name)
    .timeout(FORWARD_TIMEOUT);
    if !body.is_empty() {
        request = request
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    let code = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let bytes = response.bytes().await.map_err(|e| e.to_string())?;
    let mut answer = Response::new(Full::new(bytes));
    *answer.status_mut() = code;
    if let Ok(value) = header::HeaderValue::from_str(&content_type) {
        answer.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    Ok(answer)
}
