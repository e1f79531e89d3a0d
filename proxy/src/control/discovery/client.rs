//! Talking to the control replicas: one discovery watch at a time, heartbeats to all.
//!
//! The replicas are the live set of `control::replicas` (the start list and the
//! replicas of the servers the accepted documents list), read anew at every failover.
//! The watch stays on one replica while it answers (even one that has since left the
//! set); on a connection error, a refusal, the end of the stream or [`IDLE`] without a
//! line (replicas send a keepalive line every 10 s), it moves on to the replica after it
//! in the set, round robin, after a short backoff with jitter (at most 2 s, [`BACKOFF`]),
//! so that a failover takes about a second. While no replica answers, a warning is logged
//! every [`WARN_EVERY`] naming what is in use.
//!
//! Heartbeats (`heartbeat::Announce`, every [`HEARTBEAT_EVERY`]) go to every replica of
//! the set independently, one task each over its own kept-open HTTP/2 connection, so that
//! any replica the proxies fail over to already knows this node: a replica that joins the
//! set gets a task, one that leaves it has its task stopped. Their failures are logged at
//! debug level and counted (`pimesh_control_heartbeat_failures_total`).
//!
//! Every connection is mutual TLS with the node identity current when it is opened; the
//! replica must prove `spiffe://<site>/svc/pimesh-control` (`Identity::control_connector`).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pimesh_runtime::backoff::{Backoff, Jitter};
use tracing::{debug, info, warn};

use super::heartbeat::{Announce, Answer, MAX_ANSWER_BYTES};
use super::{Shared, Source};
use crate::identity::Identity;

/// No line (document or keepalive) for this long: the replica is taken for dead.
const IDLE: Duration = Duration::from_secs(25);
/// Connecting (TCP and TLS) and each request's answer head must take less than this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The pause before attempt number `failures + 1`: doubling from 100 ms up to 2 s, then
/// between half and all of it (jitter, so that the proxies of a site do not reconnect in
/// step).
const BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).with_jitter(Jitter::HALF);
/// How often each replica is told this node is alive (the replicas keep it 30 s).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// While no replica answers, how often to say so.
const WARN_EVERY: Duration = Duration::from_secs(30);
/// Largest document accepted on the stream.
const MAX_LINE: usize = 4 * 1024 * 1024;

/// Why a watch or a heartbeat to a replica ended; shown as one line.
#[derive(Debug)]
pub enum ReplicaError {
    /// No node identity to authenticate with.
    NoIdentity,
    ConnectTimeout,
    Connect(io::Error),
    HandshakeTimeout,
    Handshake(io::Error),
    Http2(hyper::Error),
    Build(http::Error),
    /// No answer head within [`CONNECT_TIMEOUT`].
    AnswerTimeout,
    Request(hyper::Error),
    /// The replica answered another status: it and the start of the body.
    Refused {
        status: StatusCode,
        body: String,
    },
    /// No line for [`IDLE`].
    Silent,
    Stream(hyper::Error),
    LineTooLong,
    /// The replica ended the stream.
    Ended,
    /// A heartbeat answer that could not be read as `{"servers": {...}}`.
    Answer(String),
}

impl fmt::Display for ReplicaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaError::NoIdentity => f.write_str("no node identity yet"),
            ReplicaError::ConnectTimeout => {
                write!(f, "cannot connect within {CONNECT_TIMEOUT:?}")
            }
            ReplicaError::Connect(err) => write!(f, "cannot connect: {err}"),
            ReplicaError::HandshakeTimeout => {
                write!(f, "no TLS handshake within {CONNECT_TIMEOUT:?}")
            }
            ReplicaError::Handshake(err) => write!(f, "TLS handshake failed: {err}"),
            ReplicaError::Http2(err) => write!(f, "HTTP/2 handshake failed: {err}"),
            ReplicaError::Build(err) => write!(f, "cannot make the request: {err}"),
            ReplicaError::AnswerTimeout => write!(f, "no answer within {CONNECT_TIMEOUT:?}"),
            ReplicaError::Request(err) => write!(f, "request failed: {err}"),
            ReplicaError::Refused { status, body } => {
                write!(f, "refused with {status}: {}", body.trim())
            }
            ReplicaError::Silent => write!(f, "nothing for {IDLE:?}"),
            ReplicaError::Stream(err) => write!(f, "the stream failed: {err}"),
            ReplicaError::LineTooLong => write!(f, "a line longer than {MAX_LINE} bytes"),
            ReplicaError::Ended => f.write_str("the stream ended"),
            ReplicaError::Answer(err) => write!(
                f,
                "a heartbeat answer that is not {{\"servers\": {{...}}}} of at most {MAX_ANSWER_BYTES} bytes: {err}"
            ),
        }
    }
}

impl std::error::Error for ReplicaError {}

/// Starts the watch task and the task that keeps one heartbeat task per replica.
pub fn spawn(shared: &Arc<Shared>) {
    tokio::spawn(watch_loop(Arc::clone(shared)));
    tokio::spawn(heartbeat_tasks(Arc::clone(shared)));
}

/// The index in `replicas` of the replica to try after `replica`: the one following it,
/// or, when `replica` has left the set, the one now at its old `index`.
fn next_index(replicas: &[SocketAddr], replica: SocketAddr, index: usize) -> usize {
    let len = replicas.len().max(1);
    match replicas.iter().position(|r| *r == replica) {
        Some(at) => (at + 1) % len,
        None => index % len,
    }
}

async fn watch_loop(shared: Arc<Shared>) {
    // A random first replica spreads the proxies of a site over the replicas.
    let mut index = fastrand::usize(..shared.options.replicas.current().len().max(1));
    let mut failures: u32 = 0;
    let mut last_answer = Instant::now();
    let mut last_warning: Option<Instant> = None;
    loop {
        let replicas = shared.options.replicas.current();
        let Some(replica) = replicas.get(index % replicas.len().max(1)).copied() else {
            return; // no replica at all: `Control::start` is only called with some
        };
        let outcome = watch(&shared, replica).await;
        shared.metrics.connected.set(0);
        shared.status(|status| status.replica = None);
        if outcome.documents > 0 {
            failures = 0;
            last_answer = Instant::now();
        }
        shared.metrics.failovers.inc();
        let reason = outcome.end;
        if outcome.documents > 0 {
            warn!(%replica, %reason, "discovery watch lost; failing over");
        } else {
            debug!(%replica, %reason, "discovery watch failed; trying the next replica");
        }
        shared.status(|status| status.last_error = Some(format!("{replica}: {reason}")));
        if last_answer.elapsed() >= WARN_EVERY
            && last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY)
        {
            let status = shared.status(|status| status.clone());
            warn!(
                replicas = ?replicas,
                serving_from = status.source.as_str(),
                version = status.version.as_deref().unwrap_or("none"),
                silent_for = ?last_answer.elapsed(),
                "NO CONTROL REPLICA ANSWERS: routing by the last good discovery document (or the config file)"
            );
            last_warning = Some(Instant::now());
        }
        index = next_index(&shared.options.replicas.current(), replica, index);
        failures = failures.saturating_add(1);
        tokio::time::sleep(BACKOFF.delay(failures, fastrand::u64(..))).await;
    }
}

/// How one watch ended.
struct Outcome {
    /// Documents received (accepted or not) before the end.
    documents: u64,
    end: ReplicaError,
}

/// Watches `replica` until the stream fails.
async fn watch(shared: &Shared, replica: SocketAddr) -> Outcome {
    let mut documents = 0;
    let end = match watch_inner(shared, replica, &mut documents).await {
        Ok(()) => ReplicaError::Ended,
        Err(err) => err,
    };
    Outcome { documents, end }
}

async fn watch_inner(
    shared: &Shared,
    replica: SocketAddr,
    documents: &mut u64,
) -> Result<(), ReplicaError> {
    let identity = current_identity(shared)?;
    let mut sender = connect(replica, &identity).await?;
    let request = Request::builder()
        .method(Method::GET)
        .uri(format!("https://{replica}/v1/discovery"))
        .body(Full::new(Bytes::new()))
        .map_err(ReplicaError::Build)?;
    let response = tokio::time::timeout(CONNECT_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| ReplicaError::AnswerTimeout)?
        .map_err(ReplicaError::Request)?;
    if response.status() != StatusCode::OK {
        return Err(refusal(response).await);
    }
    info!(%replica, "discovery watch open");
    shared.metrics.connected.set(1);
    shared.status(|status| status.replica = Some(replica));
    let source = format!("control replica {replica}");
    let mut body = response.into_body();
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let frame = tokio::time::timeout(IDLE, body.frame())
            .await
            .map_err(|_| ReplicaError::Silent)?;
        let Some(frame) = frame else {
            return Ok(());
        };
        let frame = frame.map_err(ReplicaError::Stream)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = &line[..end];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue; // keepalive
            }
            *documents += 1;
            shared.accept(&source, line, Source::Live, SystemTime::now());
        }
        if pending.len() > MAX_LINE {
            return Err(ReplicaError::LineTooLong);
        }
    }
}

/// Keeps one [`heartbeat_loop`] running for each replica of the set, and none for a
/// replica that left it.
async fn heartbeat_tasks(shared: Arc<Shared>) {
    let mut replicas = shared.options.replicas.subscribe();
    let mut tasks: HashMap<SocketAddr, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let now: Vec<SocketAddr> = replicas.borrow_and_update().to_vec();
        tasks.retain(|replica, task| {
            let keep = now.contains(replica);
            if !keep {
                debug!(%replica, "no more heartbeats to this replica: it left the set");
                task.abort();
                shared.options.replicas.heard(*replica, Vec::new());
            }
            keep
        });
        for replica in now {
            tasks
                .entry(replica)
                .or_insert_with(|| tokio::spawn(heartbeat_loop(Arc::clone(&shared), replica)));
        }
        if replicas.changed().await.is_err() {
            break;
        }
    }
    for task in tasks.values() {
        task.abort();
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, replica: SocketAddr) {
    let announce = Announce {
        inbound_port: shared.options.inbound_port,
        role: shared.options.role,
        server_replicas: shared.options.server_replicas.clone(),
    };
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let body = announce.body(shared.node_credential.borrow().as_ref());
        match heartbeat(&shared, replica, &mut sender, body).await {
            Ok(heard) => {
                debug!(%replica, servers = heard.len(), "heartbeat sent");
                shared.options.replicas.heard(replica, heard);
            }
            Err(err) => {
                sender = None;
                shared.metrics.heartbeat_failures.inc();
                debug!(%replica, error = %err, "heartbeat failed");
                shared.options.replicas.heard(replica, Vec::new());
            }
        }
    }
}

/// One heartbeat to `replica`; the replicas of the servers its answer says it hears
/// (none from a replica that answers `204`).
async fn heartbeat(
    shared: &Shared,
    replica: SocketAddr,
    sender: &mut Option<SendRequest<Full<Bytes>>>,
    body: Bytes,
) -> Result<Vec<SocketAddr>, ReplicaError> {
    let open = match sender.take() {
        Some(open) if !open.is_closed() => open,
        _ => connect(replica, &current_identity(shared)?).await?,
    };
    let mut open = open;
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("https://{replica}/v1/heartbeat"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, "application/json")
        .body(Full::new(body))
        .map_err(ReplicaError::Build)?;
    let response = tokio::time::timeout(CONNECT_TIMEOUT, open.send_request(request))
        .await
        .map_err(|_| ReplicaError::AnswerTimeout)?
        .map_err(ReplicaError::Request)?;
    let heard = match response.status() {
        StatusCode::NO_CONTENT => Vec::new(),
        StatusCode::OK => {
            let body = tokio::time::timeout(
                CONNECT_TIMEOUT,
                http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES).collect(),
            )
            .await
            .map_err(|_| ReplicaError::AnswerTimeout)?
            .map_err(|err| ReplicaError::Answer(err.to_string()))?
            .to_bytes();
            Answer::parse(&body)
                .map_err(|err| ReplicaError::Answer(err.to_string()))?
                .server_replicas()
        }
        _ => return Err(refusal(response).await),
    };
    *sender = Some(open);
    Ok(heard)
}

fn current_identity(shared: &Shared) -> Result<Identity, ReplicaError> {
    shared
        .identities
        .borrow()
        .clone()
        .ok_or(ReplicaError::NoIdentity)
}

/// An HTTP/2 connection over mutual TLS to `replica`.
async fn connect(
    replica: SocketAddr,
    identity: &Identity,
) -> Result<SendRequest<Full<Bytes>>, ReplicaError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(replica))
        .await
        .map_err(|_| ReplicaError::ConnectTimeout)?
        .map_err(ReplicaError::Connect)?;
    let _ = tcp.set_nodelay(true);
    // Not checked by the control verifier; sent as SNI.
    let name = pimesh_meshtls::control_server_name();
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        identity.control_connector().connect(name, tcp),
    )
    .await
    .map_err(|_| ReplicaError::HandshakeTimeout)?
    .map_err(ReplicaError::Handshake)?;
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .handshake(TokioIo::new(tls))
        .await
        .map_err(ReplicaError::Http2)?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            debug!(%replica, %err, "control connection ended");
        }
    });
    Ok(sender)
}

/// A refusal's status and the start of its body, for logs.
async fn refusal(response: hyper::Response<hyper::body::Incoming>) -> ReplicaError {
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), 1024)
        .collect()
        .await
        .map(|collected| String::from_utf8_lossy(&collected.to_bytes()).into_owned())
        .unwrap_or_default();
    ReplicaError::Refused { status, body }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_moves_to_the_replica_after_the_failed_one() {
        let addrs: Vec<SocketAddr> = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
            .iter()
            .map(|a| a.parse().expect("addr"))
            .collect();
        assert_eq!(next_index(&addrs, addrs[0], 0), 1);
        assert_eq!(next_index(&addrs, addrs[2], 2), 0);
        // The set grew in front of the failed one: still the one after it.
        assert_eq!(next_index(&addrs, addrs[1], 0), 2);
        // The failed one left the set: the one now at its place.
        let gone: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        assert_eq!(next_index(&addrs, gone, 1), 1);
        assert_eq!(next_index(&addrs, gone, 7), 1);
        assert_eq!(next_index(&[], gone, 3), 0);
    }

    #[test]
    fn the_backoff_grows_to_two_seconds_with_jitter() {
        let backoff = |failures| BACKOFF.delay(failures, fastrand::u64(..));
        for failures in 1..40 {
            let pause = backoff(failures);
            assert!(pause <= BACKOFF.cap(), "{failures}: {pause:?}");
            assert!(pause >= BACKOFF.initial() / 2, "{failures}: {pause:?}");
        }
        assert!(backoff(1) <= Duration::from_millis(100));
        assert!(backoff(30) >= Duration::from_secs(2) / 2);
    }
}
