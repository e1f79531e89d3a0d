//! `pimesh-proxy`: the node's mesh data plane.
//!
//! Local apps reach services through the outbound side (the HTTP proxy port 4140, a
//! service's local port, or iptables redirection to 4140); the proxy routes each request
//! or connection by the site config (`cluster.toml`) — split, faults, timeouts, retries,
//! load balancing — and carries it over pooled mTLS HTTP/2 connections (one per peer
//! node, more while its streams run high) to that node's proxy, whose inbound side (4143)
//! checks the caller's identity and the service's policy and hands it to the app on
//! 127.0.0.1. Trace context is propagated and spans exported; every hop is counted in
//! Prometheus metrics on the admin port (4191: `/live`, `/ready`, `/config`, `/metrics`).
//!
//! With `--control`, the identity in use is a leaf that the control replicas sign for the
//! node and the services placed on it, renewed before it expires (`control::enroll`); the node
//! credential then only authenticates the first request. The config and the node identity
//! reload on SIGHUP and when their files change
//! (polled every 2 s), swapping the routing table without touching open connections; a
//! refused config or identity leaves the last good one in use. With `--control`, the
//! site config comes from the control replicas' discovery stream (`control::discovery`), with
//! live node addresses merged in; the file config serves only until a discovery
//! document (live, or cached from an earlier run) is accepted. The replicas the proxy
//! fails over between are `--control`'s plus every replica of every server node the
//! discovery document lists (`control::replicas`, at most 64). Heartbeats tell every
//! replica the node's inbound port, its node credential's key (SHA-256 of the
//! SubjectPublicKeyInfo) and, with `--role server|agent`, its role — for a server with
//! the ports of its own replicas (`--server-replicas 8086,8087,8088`), which is how the
//! other proxies learn them. SIGTERM drains:
//! listeners close, connections finish what they carry, and the process exits.
//!
//! # Layout
//!
//! - `outbound/`, `inbound/`: the two sides of the data path, request by request and
//!   tunnel by tunnel, with the outbound side's balancer, retry budget and faults;
//! - `transport/`: listeners and accept loops, the pooled mTLS HTTP/2 connections to
//!   peers, protocol detection, splicing, `SO_ORIGINAL_DST`, the drain;
//! - `config/`: the site config in use and the routing table compiled from it;
//! - `identity/`: the node identity, its files, its checks and its reloading;
//! - `control/`: the clients of the control replicas (enrollment, discovery);
//! - `telemetry/`: the metrics registry and the traces;
//! - `admin`: the admin endpoints; `context`: what every connection handler shares;
//!   `cli`: the command line.
//!
//! This file only wires them: it parses the arguments, builds the parts, spawns their
//! tasks, feeds reloads to them, and drains on SIGTERM. The binary (`main.rs`) calls
//! [`main`]; the library exists for that and for [`fuzzing`], the fuzz targets' entry
//! points into the parsers of outside input. Nothing else is public.

mod admin;
mod cli;
mod config;
mod context;
mod control;
#[doc(hidden)]
pub mod fuzzing;
mod identity;
mod inbound;
mod outbound;
mod telemetry;
mod transport;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use pimesh_runtime::notify;
use pimesh_runtime::watched::Triggers;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{state, Routing, SiteConfig};
use crate::context::Context;
use crate::control::replicas::ReplicaSet;
use crate::control::{discovery, enroll};
use crate::identity::{IdentityFiles, IdentityReloader};
use crate::telemetry::metrics::Metrics;
use crate::transport::{drain, listeners};

/// How long open connections get to finish after SIGTERM (the unit allows 10 s).
const DRAIN_DEADLINE: Duration = Duration::from_secs(8);

/// Runs the proxy with the process's arguments until SIGTERM (or a fatal error).
pub fn main() -> ExitCode {
    match cli::parse(std::env::args_os()) {
        Ok(options) => pimesh_runtime::run(pimesh_runtime::Threads::One, run(options)),
        Err(err) => err.exit(),
    }
}

/// Why the proxy stopped before SIGTERM, or could not watch for it.
#[derive(Debug)]
enum Error {
    /// The handler of `signal` could not be installed.
    Signal {
        signal: &'static str,
        err: io::Error,
    },
    /// The port for `what` could not be opened.
    Listen {
        addr: SocketAddr,
        what: &'static str,
        err: io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Signal { signal, err } => write!(f, "cannot watch for {signal}: {err}"),
            Error::Listen { addr, what, err } => {
                write!(f, "cannot listen on {addr} for {what}: {err}")
            }
        }
    }
}

impl std::error::Error for Error {}

async fn run(options: cli::Options) -> Result<(), Error> {
    // Before anything else: SIGHUP's default action would kill the process.
    let mut triggers = Triggers::install().map_err(|err| Error::Signal {
        signal: "SIGHUP",
        err,
    })?;
    let shutdown = pimesh_runtime::shutdown_signal();
    tokio::pin!(shutdown);
    // Bursts of connections must not pin their peak memory (see pimesh_runtime::memory).
    pimesh_runtime::memory::spawn_trimmer(pimesh_runtime::memory::TRIM_EVERY);

    let bind = |addr: SocketAddr, what: &'static str| {
        listeners::bind(addr).map_err(|err| Error::Listen { addr, what, err })
    };
    let admin_listener = bind(options.admin_addr, "the admin endpoints")?;
    let outbound_listener = bind(options.outbound_addr, "outbound traffic")?;
    let inbound_listener = bind(options.inbound_addr, "inbound mesh traffic")?;
    info!(
        admin = %options.admin_addr,
        outbound = %options.outbound_addr,
        inbound = %options.inbound_addr,
        version = env!("CARGO_PKG_VERSION"),
        "listening"
    );

    let metrics = Arc::new(Metrics::new());
    let (mut reloader, mut snapshots) = state::Reloader::start(&options.config);
    let files = match &options.identity_dir {
        Some(dir) => IdentityFiles::in_dir(dir),
        None => identity::default_files(),
    };
    let (mut identity_reloader, node_credential) = IdentityReloader::start(files);
    let mut routing = Routing::new(
        options.inbound_addr,
        Arc::clone(&metrics),
        snapshots.borrow().value.site_config.as_ref(),
        options.state_dir.clone(),
    );
    let replica_set = Arc::new(ReplicaSet::new(
        options.control.clone(),
        metrics.control.replicas.clone(),
    ));
    let node_credential_files = node_credential.clone();
    let (mut identities, enrollment, enroll_task) = if options.control.is_empty() {
        (node_credential, None, None)
    } else {
        let settings = enroll::Settings {
            replicas: replica_set.subscribe(),
            state_dir: options.state_dir.clone(),
        };
        let (identities, status, task) = enroll::spawn(
            settings,
            node_credential,
            routing.site_configs(),
            metrics.identity.clone(),
        );
        (identities, Some(status), Some(task))
    };
    if let Some(identity) = identities.borrow().as_ref() {
        metrics.identity.expires_at(identity.not_after);
    }
    // Without --control, a watch that never changes: the file config is always used.
    let (_no_control, mut discovered) = watch::channel(None::<Arc<SiteConfig>>);
    let control = (!options.control.is_empty()).then(|| {
        let control = discovery::Control::start(
            discovery::Options {
                replicas: Arc::clone(&replica_set),
                inbound_port: options.inbound_addr.port(),
                role: options.role,
                server_replicas: options.server_replicas.clone(),
                state_dir: options.state_dir.clone(),
            },
            identities.clone(),
            node_credential_files,
            metrics.control.clone(),
        );
        discovered = control.configs();
        Arc::new(control)
    });
    routing.compile(
        &snapshots.borrow(),
        &discovered.borrow(),
        &identities.borrow(),
    );
    let (drain_signal, drain_watch) = drain::channel();
    let context = Arc::new(Context::new(
        routing.routes(),
        identities.clone(),
        Arc::clone(&metrics),
        drain_watch.downgrade(),
    ));

    let mut bindings = listeners::LocalBindings::new(options.local_ip);
    bindings.update(&context.table(), &context, &drain_watch);
    let accept_loops = [
        tokio::spawn(listeners::outbound_loop(
            outbound_listener,
            None,
            Arc::clone(&context),
            drain_watch.clone(),
        )),
        tokio::spawn(listeners::inbound_loop(
            inbound_listener,
            Arc::clone(&context),
            drain_watch.clone(),
        )),
    ];
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        snapshots.clone(),
        identities.clone(),
        enrollment,
        Arc::clone(&metrics),
        control.clone(),
    ));
    // READY after the first attempt even when it failed: the process is up and /ready
    // tells the truth about the config.
    notify::ready(&state::summary(&reloader.current()));
    // The main loop turns at least every `watched::POLL_EVERY` (the files' poll).
    let main_loop = notify::Heartbeat::new();
    let watchdog = notify::spawn_watchdog_fed_by(vec![("main loop", Arc::clone(&main_loop))]);

    let result = loop {
        main_loop.beat();
        tokio::select! {
            signalled = &mut shutdown => {
                break signalled.map_err(|err| Error::Signal { signal: "SIGTERM", err });
            }
            trigger = triggers.next() => {
                reloader.on(trigger);
                identity_reloader.on(trigger);
            }
            Ok(()) = snapshots.changed() => {
                let ok = snapshots.borrow_and_update().problem.is_none();
                metrics.config.reload(ok);
            }
            Ok(()) = discovered.changed() => {
                discovered.borrow_and_update();
            }
            Ok(()) = identities.changed() => {
                if let Some(identity) = identities.borrow_and_update().as_ref() {
                    metrics.identity.expires_at(identity.not_after);
                }
                // New connections to peers use the new certificate; open streams finish.
                context.peers.clear();
            }
        }
        routing.update(
            &snapshots.borrow(),
            &discovered.borrow(),
            &identities.borrow(),
        );
        bindings.update(&context.table(), &context, &drain_watch);
    };
    info!("draining");
    notify::stopping();
    for task in accept_loops {
        task.abort();
    }
    bindings.close_all();
    drop(drain_watch);
    if drain_signal.drain(DRAIN_DEADLINE).await {
        info!("all connections finished; exiting");
    } else {
        warn!(deadline = ?DRAIN_DEADLINE, "connections still open at the drain deadline; exiting");
    }
    admin.abort();
    if let Some(task) = enroll_task {
        task.abort();
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    result
}
