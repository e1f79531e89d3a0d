//! `pimesh-central`: the central server. Stores each site's signed configuration
//! revisions, serves the newest to the site's nodes by long-poll over mutual TLS, and
//! records what each node applied.

mod api;
mod config;
mod dashboard;
mod fleet;
mod metrics;
mod offers;
mod operator;
mod release;
mod replication;
mod rollout;
mod sessions;
mod sites;
mod storage;
mod tls;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pimesh_runtime::cli::NonEmptyPath;
use pimesh_runtime::{notify, serve};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::{CentralConfig, StorageChoice};
use crate::sites::{Registry, Site};
use crate::storage::{FileStorage, PgStorage, ReplicaId, Storage};

/// A client must complete its TLS handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The fleet the open-file limit should fit at least: below it, a warning at start.
const PLANNED_NODES: u64 = 10_000;
/// Descriptors per node: its long-poll connection, plus room for reports on a second
/// connection and for reconnect storms (old connections not yet closed).
const DESCRIPTORS_PER_NODE: u64 = 4;

/// The central server: stores each site's signed configuration revisions and serves them
/// to the site's nodes.
#[derive(Debug, Parser)]
#[command(name = "pimesh-central", args_override_self = true)]
struct Cli {
    /// The server's configuration
    #[arg(long = "config", value_name = "PATH", value_parser = NonEmptyPath, default_value = "/etc/pimesh-central/central.toml")]
    config_path: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match CentralConfig::load(&cli.config_path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("pimesh-central: {err}");
            return ExitCode::from(2);
        }
    };
    pimesh_runtime::run(pimesh_runtime::Threads::PerCore, run(config))
}

/// Why the server stops with a failure: the message names the file or address at fault.
type Fatal = Box<dyn std::error::Error + Send + Sync>;

async fn run(config: CentralConfig) -> Result<(), Fatal> {
    raise_open_file_limit();
    // Bursts of connections must not pin their peak memory (see pimesh_runtime::memory).
    pimesh_runtime::memory::spawn_trimmer(pimesh_runtime::memory::TRIM_EVERY);
    let mut metrics = metrics::CentralMetrics::default();
    let (storage, replication) = open_storage(&config, &mut metrics)?;
    let mut sites = BTreeMap::new();
    let releases = Arc::new(release::Releases::new(
        config.sites.iter().map(|entry| entry.name.clone()),
    ));
    for entry in &config.sites {
        let site = Site::load(entry, storage.as_ref(), Arc::clone(&releases))?;
        info!(site = %site.name, latest = ?site.latest_revision(), "site loaded");
        sites.insert(site.name.clone(), site);
    }
    let anchors: Vec<_> = sites.values().map(|site| site.anchor.clone()).collect();
    let acceptor = TlsAcceptor::from(tls::server_config(
        &config.tls_cert,
        &config.tls_key,
        &anchors,
    )?);
    let registry = Arc::new(Registry {
        sites,
        releases,
        storage,
        long_poll_max: config.long_poll_max.0,
        fleet: fleet::FleetCache::default(),
        metrics,
        sessions: sessions::Sessions::default(),
    });
    registry.metrics.watch(&registry);
    let replicas = Arc::clone(&registry);
    let replicating = async move {
        match replication {
            Some(changes) => replication::apply(replicas, changes).await,
            None => std::future::pending().await,
        }
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", config.listen))?;
    info!(addr = %config.listen, "central server listening");
    notify::ready(&format!(
        "serving {} site(s) on {}",
        registry.sites.len(),
        config.listen
    ));
    let own_port = self_probe_target(&listener);
    let accepting = notify::Heartbeat::new();
    let rollouts_ticking = notify::Heartbeat::new();
    let watchdog = notify::spawn_watchdog_fed_by(vec![
        ("accept loop", Arc::clone(&accepting)),
        ("rollout clock", Arc::clone(&rollouts_ticking)),
    ]);
    tokio::select! {
        () = rollout_clock(Arc::clone(&registry), rollouts_ticking) => {}
        () = replicating => return Err("the PostgreSQL listener stopped".into()),
        () = serve(listener, acceptor, registry, accepting) => {}
        () = probe_own_port(own_port) => {}
        signal = pimesh_runtime::shutdown_signal() => {
            signal.map_err(|err| format!("cannot watch for SIGTERM: {err}"))?;
            info!("shutting down");
            notify::stopping();
        }
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    Ok(())
}

/// What the other replicas stored, as the PostgreSQL listener hears it.
type Changes = tokio::sync::mpsc::UnboundedReceiver<replication::Change>;

/// The storage the configuration names and, on PostgreSQL, the changes the other replicas
/// make to it.
fn open_storage(
    config: &CentralConfig,
    metrics: &mut metrics::CentralMetrics,
) -> Result<(Arc<dyn Storage>, Option<Changes>), Fatal> {
    match config.storage() {
        StorageChoice::Files(dir) => {
            let storage = FileStorage::new(dir)
                .map_err(|err| format!("{}: cannot use as state folder: {err}", dir.display()))?;
            Ok((Arc::new(storage), None))
        }
        StorageChoice::Postgres(settings) => {
            let ca = match &settings.ca {
                Some(path) => Some(std::fs::read(path).map_err(|err| {
                    format!("[postgres] ca: {}: cannot read: {err}", path.display())
                })?),
                None => None,
            };
            let connection =
                storage::Database::new(&settings.connect, ca.as_deref()).map_err(|err| {
                    match &settings.ca {
                        Some(path) => format!("[postgres] ca ({}): {err}", path.display()),
                        None => format!("[postgres] connect: {err}"),
                    }
                })?;
            let me = ReplicaId::random();
            // Listening first: nothing stored while the sites load is missed.
            let (changes, applied) = tokio::sync::mpsc::unbounded_channel();
            replication::spawn_listener(
                connection.clone(),
                me,
                changes,
                metrics.replication_gauge(),
            )
            .map_err(|err| format!("cannot start the PostgreSQL listener: {err}"))?;
            let storage = PgStorage::open(connection, me)
                .map_err(|err| format!("[postgres] cannot use the database: {err}"))?;
            Ok((Arc::new(storage), Some(applied)))
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: each node holds a connection (one
/// descriptor) open for as long as it long-polls. Warns when even the hard limit leaves
/// fewer than [`DESCRIPTORS_PER_NODE`] descriptors for each of [`PLANNED_NODES`] nodes.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(err) => {
            warn!(%err, "cannot read the open-file limit (RLIMIT_NOFILE)");
            return;
        }
    };
    let mut raised = soft;
    if soft < hard {
        // An unlimited hard limit still stops at the kernel's fs.nr_open.
        let target = if hard == RLIM_INFINITY {
            std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(hard)
        } else {
            hard
        };
        match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            Ok(()) => raised = target,
            Err(err) => warn!(%err, soft, hard, "cannot raise the open-file limit (RLIMIT_NOFILE)"),
        }
    }
    info!(
        soft = raised,
        hard,
        was = soft,
        "open-file limit (RLIMIT_NOFILE)"
    );
    let wanted = PLANNED_NODES * DESCRIPTORS_PER_NODE;
    if hard < wanted {
        warn!(
            hard,
            wanted,
            "the open-file hard limit (RLIMIT_NOFILE) serves only about {} long-polling nodes; raise it (LimitNOFILE= in the unit)",
            hard / DESCRIPTORS_PER_NODE
        );
    }
}

/// How often the server connects to its own port: the accept loop beats on every
/// accepted connection, so the watchdog is fed only while the loop accepts.
const SELF_PROBE_EVERY: Duration = Duration::from_secs(2);

/// The listener's address, an unspecified IP (all interfaces) as loopback.
fn self_probe_target(listener: &TcpListener) -> std::net::SocketAddr {
    let mut addr = listener
        .local_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// How often rollouts look at the time (a node of a wave going offline).
const ROLLOUT_TICK: Duration = Duration::from_secs(2);

/// Advances every site's rollouts every [`ROLLOUT_TICK`] and whenever a site's rollout of a
/// release changes state (it may open or halt another site's), for ever; `ticking` beats
/// each round.
async fn rollout_clock(registry: Arc<Registry>, ticking: Arc<notify::Heartbeat>) {
    let mut every = tokio::time::interval(ROLLOUT_TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut releases = registry.releases.subscribe();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = releases.changed() => {}
        }
        let now = offers::unix_now();
        for site in registry.sites.values() {
            site.offers.tick(
                registry.storage.as_ref(),
                now,
                registry.long_poll_max.as_secs(),
            );
        }
        ticking.beat();
    }
}

/// Opens (and at once closes) a connection to `addr` every [`SELF_PROBE_EVERY`], for ever.
async fn probe_own_port(addr: std::net::SocketAddr) {
    let mut every = tokio::time::interval(SELF_PROBE_EVERY);
    loop {
        every.tick().await;
        let _ = tokio::time::timeout(SELF_PROBE_EVERY, tokio::net::TcpStream::connect(addr)).await;
    }
}

/// Serves the API on `listener`: each connection's TLS handshake (within
/// [`HANDSHAKE_TIMEOUT`]), then HTTP/1.1 with the client's certificate chain at hand.
/// `accepting` beats on every accepted connection.
async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    registry: Arc<Registry>,
    accepting: Arc<notify::Heartbeat>,
) {
    let limits = serve::Limits::named("central API");
    serve::accept_loop(
        listener,
        limits,
        std::future::pending(),
        |tcp, peer_addr| {
            accepting.beat();
            let acceptor = acceptor.clone();
            let registry = Arc::clone(&registry);
            async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(err)) => {
                        debug!(%peer_addr, %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer_addr, "TLS handshake timed out");
                        return;
                    }
                };
                // The chain and, once a request needs it, what it authorizes: for this
                // connection's every request.
                let peer = Arc::new(api::Peer::new(
                    tls.get_ref()
                        .1
                        .peer_certificates()
                        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
                        .unwrap_or_default(),
                ));
                let service = hyper::service::service_fn(move |request| {
                    let peer = Arc::clone(&peer);
                    let registry = Arc::clone(&registry);
                    async move { Ok::<_, Infallible>(api::route(request, peer, registry).await) }
                });
                serve::http1(tls, service, peer_addr, limits.name).await;
            }
        },
    )
    .await;
}
