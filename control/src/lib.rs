//! `pimesh-control --replica N`: control replica N of a server node, one of the stateless
//! replicas that sign proxy identities and serve discovery and policy to proxies.
//!
//! # One port per replica
//!
//! Replica N listens on `0.0.0.0:(8085+N)` (`--listen` overrides), the design's one port
//! per replica, and serves on it both:
//!
//! - the identity API (`identity_api`) and the discovery API (`discovery`: heartbeats in,
//!   a stream of site config and live node addresses out) over mutual TLS 1.3, HTTP/2 or
//!   HTTP/1.1: a client certificate chaining to the site's trust bundle is required at
//!   the handshake;
//! - `/live` and `/ready` in plain HTTP, so the supervisor's default readiness URL
//!   `http://127.0.0.1:(8085+N)/ready` is unchanged.
//!
//! - the join protocol (`join_api`): on a TLS connection whose ClientHello names
//!   `join.pimesh.invalid`, with no client certificate asked for, `GET /v1/join/bundle`
//!   and `POST /v1/join` and nothing else; over mutual TLS, `GET /v1/join/issuer` to
//!   server nodes.
//!
//! TLS and plain HTTP are told apart by a connection's first byte, the two TLS
//! configurations by the server name (`server`). Plain HTTP reaches nothing but the
//! health endpoints. This beats a second port per replica: no new port to open, reserve,
//! or list in a proxy's replica list.
//!
//! # Inputs
//!
//! - the trust folder (`--trust-dir`, default `/var/lib/pimesh/trust`): `anchor.pem`
//!   (the bundle), `issuer.pem`, `issuer.key` (`trust`), and `join.json`, the join tokens
//!   accepted (`tokens`; none without it);
//! - the site config (`--config`, default `/etc/pimesh/cluster.toml`): which services are
//!   placed on which node; a missing file places none (`site_config`);
//! - the site: from the site config, or `--site` while there is none;
//! - the node it runs on (`--node`; the supervisor passes it in `control.env`): counted
//!   as a server when joins are placed (`grants`);
//! - K3s's API (`--kubeconfig`, on a server node running K3s): the Services of namespaces
//!   labelled `pimesh.dev/mesh=enabled`, carried in discovery (`kube_services`).
//!
//! # Node-local state
//!
//! `--state-dir` (default `/var/lib/pimesh-control`, systemd's
//! `StateDirectory=pimesh-control`, shared by all replicas of the node under a `flock`):
//! `servers.json`, the server seats this node granted (`grants`), and `joins.jsonl`, the
//! last 200 join attempts (`join_records`).
//!
//! Ready (`/ready` 200, systemd status) once the site, the config (or its absence) and the
//! issuer are loaded; until then `/ready` answers 503 with the reason and loading is
//! retried every [`TICK`]. SIGHUP, and a change of an input file (polled every 2 s,
//! `pimesh_runtime::watched`), reloads both inputs, each part keeping its previous version when the new one fails
//! (`state`). Heartbeats are soft state: nothing is written to disk. SIGTERM stops
//! accepting and exits; a request cut short is simply retried by the proxy (issuing is
//! idempotent).
//!
//! The binary (`main.rs`) calls [`main`]; the library exists for that and for
//! [`fuzzing`], the fuzz targets' entry points into the parsers of outside input. Nothing
//! else is public.

mod api;
mod cli;
mod discovery;
#[doc(hidden)]
pub mod fuzzing;
mod grants;
mod heartbeats;
mod identity_api;
mod join_api;
mod join_records;
mod kube_services;
mod metrics;
mod pem;
mod rate_limit;
mod server;
mod site_config;
mod state;
mod state_dir;
mod tls;
mod tokens;
mod trust;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pimesh_runtime::notify;
use pimesh_runtime::watched::{Trigger, Triggers};
use tracing::info;

use crate::discovery::Discovery;
use crate::state::{Sources, State};

/// How often the serving certificate's age is checked and, while not ready, loading is
/// retried.
const TICK: Duration = Duration::from_secs(5);
/// How often expired heartbeats are dropped: an expiry shows within this of the TTL.
const EXPIRE: Duration = Duration::from_millis(500);

/// Runs the replica with the process's arguments until SIGTERM (or a fatal error).
pub fn main() -> ExitCode {
    match cli::parse(std::env::args_os()) {
        Ok(options) => pimesh_runtime::run(pimesh_runtime::Threads::One, run(options)),
        Err(err) => err.exit(),
    }
}

/// Why the replica stops with a failure; each happens before it serves, or is the loss of
/// its signal handling.
#[derive(Debug)]
enum Fatal {
    /// SIGHUP or SIGTERM cannot be watched.
    Signal(&'static str, std::io::Error),
    /// The replica's port cannot be bound.
    Listen(std::net::SocketAddr, std::io::Error),
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fatal::Signal(signal, err) => write!(f, "cannot watch for {signal}: {err}"),
            Fatal::Listen(addr, err) => write!(f, "cannot listen on {addr}: {err}"),
        }
    }
}

async fn run(options: cli::Options) -> Result<(), Fatal> {
    // Before anything else: SIGHUP's default action would kill the process.
    let mut triggers = Triggers::install().map_err(|err| Fatal::Signal("SIGHUP", err))?;
    let shutdown = pimesh_runtime::shutdown_signal();
    // Bursts of connections must not pin their peak memory (see pimesh_runtime::memory).
    pimesh_runtime::memory::spawn_trimmer(pimesh_runtime::memory::TRIM_EVERY);
    tokio::pin!(shutdown);

    let replica = options.replica;
    let addr = options.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|err| Fatal::Listen(addr, err))?;
    info!(replica, %addr, version = env!("CARGO_PKG_VERSION"), "listening");

    let mut state = State::new(
        replica,
        Sources {
            trust_dir: options.trust_dir,
            config: options.config,
            site: options.site,
        },
    );
    state.leaf_lifetime = options.leaf_lifetime;
    let state = Arc::new(state);
    state.reload("start", SystemTime::now());
    let discovery = Arc::new(Discovery::new(options.heartbeat_ttl));
    discovery.refresh(&state);
    let k3s_servers = kube_services::KubeServers::default();
    let kube_services = options.kubeconfig.map(|path| {
        let discovery = Arc::clone(&discovery);
        let state = Arc::clone(&state);
        let servers = k3s_servers.clone();
        tokio::spawn(async move { kube_services::follow(&path, discovery, state, servers).await })
    });
    let join = Arc::new(
        join_api::Join::new(
            replica,
            options.node,
            options.state_dir,
            options.heartbeat_ttl,
        )
        .answering_after(options.join_warmup)
        .counting_k3s_servers(k3s_servers),
    );
    let server = tokio::spawn(server::serve(
        listener,
        api::Shared {
            state: Arc::clone(&state),
            discovery: Arc::clone(&discovery),
            join,
        },
    ));
    // READY once the port is open, even when loading failed: the process is up, and
    // /ready and the status tell the truth.
    notify::ready(&status_line(replica, &state));
    // The main loop turns at least every EXPIRE and takes the state's lock every TICK: a
    // lock that is never released stalls it, and the watchdog then stops.
    let main_loop = notify::Heartbeat::new();
    let watchdog = notify::spawn_watchdog_fed_by(vec![("main loop", Arc::clone(&main_loop))]);

    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the first load just happened
    let mut expire = tokio::time::interval(EXPIRE);
    expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        main_loop.beat();
        tokio::select! {
            signalled = &mut shutdown => {
                break signalled.map_err(|err| Fatal::Signal("SIGTERM", err));
            }
            trigger = triggers.next() => {
                let was_ready = state.snapshot().is_some();
                state.on(trigger, SystemTime::now());
                discovery.refresh(&state);
                if trigger == Trigger::Hangup || (!was_ready && state.snapshot().is_some()) {
                    notify::status(&status_line(replica, &state));
                }
            }
            _ = expire.tick() => discovery.expire(&state, Instant::now()),
            _ = tick.tick() => {
                let was_ready = state.snapshot().is_some();
                state.tick(SystemTime::now());
                discovery.refresh(&state);
                if !was_ready && state.snapshot().is_some() {
                    notify::status(&status_line(replica, &state));
                }
            }
        }
    };
    info!(replica, "shutting down");
    notify::stopping();
    server.abort();
    if let Some(task) = kube_services {
        task.abort();
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    result
}

fn status_line(replica: u16, state: &State) -> String {
    match state.readiness() {
        Ok(status) => format!("replica {replica}: {status}"),
        Err(reason) => format!("replica {replica}: not ready: {reason}"),
    }
}
