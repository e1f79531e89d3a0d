//! `pimesh-proxy`: the node's mesh data plane.
//!
//! What it does today: it loads the site config (`cluster.toml`, default
//! `/etc/pimesh/cluster.toml`), validates it with the schema plus the checks only this node
//! can make (open-file limit for `proxy.max_connections`), keeps the last good config in
//! use, and reloads it on SIGHUP and when the file changes (polled every 2 s). Its admin
//! port (4191) serves `/live`, `/ready` (503 with the reason while the last load failed)
//! and `/config` (the SHA-256 of the config in use, so the supervisor can tell which
//! revision runs). A missing file is not an error: the proxy runs with no routes.
//!
//! The data plane (mTLS, routing, traffic split, faults, tracing, metrics) comes next and
//! reads the config through [`state::Snapshot`].

mod admin;
mod balance;
mod budget;
mod cli;
mod metrics;
mod site_config;
mod state;
mod tls;
mod trace;

use std::process::ExitCode;
use std::time::Duration;

use pimesh_daemon::notify;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

/// How often the config file's (mtime, size, inode) is compared with the last load's.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    match cli::parse(std::env::args_os().skip(1)) {
        Ok(cli::Command::Run(options)) => {
            pimesh_daemon::run(pimesh_daemon::Threads::One, run(options))
        }
        Ok(cli::Command::Help) => {
            println!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("pimesh-proxy: {message}\n{}", cli::USAGE);
            ExitCode::from(2)
        }
    }
}

async fn run(options: cli::Options) -> Result<(), String> {
    // Before anything else: SIGHUP's default action would kill the process.
    let mut hangup =
        signal(SignalKind::hangup()).map_err(|err| format!("cannot watch for SIGHUP: {err}"))?;
    let shutdown = pimesh_daemon::shutdown_signal();
    tokio::pin!(shutdown);

    let admin_addr = options.admin_addr;
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|err| format!("cannot listen on {admin_addr} for the admin endpoints: {err}"))?;
    let bound = listener.local_addr().unwrap_or(admin_addr);
    info!(addr = %bound, version = env!("CARGO_PKG_VERSION"), "admin endpoints listening");

    // READY after the first attempt even when it failed: the process is up and /ready
    // tells the truth about the config.
    let (mut reloader, snapshots) = state::Reloader::start(&options.config);
    let admin = tokio::spawn(admin::serve(listener, snapshots));
    notify::ready(&reloader.current().summary());
    let watchdog = notify::spawn_watchdog();

    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await; // the first tick is immediate; the first load just happened
    let result = loop {
        tokio::select! {
            signalled = &mut shutdown => {
                break signalled.map_err(|err| format!("cannot watch for SIGTERM: {err}"));
            }
            Some(()) = hangup.recv() => reloader.reload("SIGHUP"),
            _ = poll.tick() => reloader.poll(),
        }
    };
    info!("shutting down");
    notify::stopping();
    admin.abort();
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    result
}
