//! `pimesh-proxy`: the node's mesh data plane.
//!
//! This first cut serves only the admin endpoints (`/live`, `/ready` on port 4191) so that
//! the supervisor and the image can manage a real proxy process; the data plane (mTLS,
//! routing, traffic split, faults, tracing, metrics) is built on this skeleton.

use std::net::SocketAddr;
use std::process::ExitCode;

use pimesh_daemon::{health, notify};
use tracing::info;

const USAGE: &str = "usage: pimesh-proxy [--admin-addr IP:PORT]   (default 0.0.0.0:4191)";

fn main() -> ExitCode {
    let mut admin_addr = SocketAddr::from(([0, 0, 0, 0], 4191));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--admin-addr", Some(value)) => match value.parse() {
                Ok(addr) => admin_addr = addr,
                Err(err) => {
                    eprintln!(
                        "pimesh-proxy: --admin-addr: expected IP:PORT, found {value:?} ({err})"
                    );
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    pimesh_daemon::run(pimesh_daemon::Threads::One, run(admin_addr))
}

async fn run(admin_addr: SocketAddr) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|err| format!("cannot listen on {admin_addr} for the admin endpoints: {err}"))?;
    info!(addr = %admin_addr, version = env!("CARGO_PKG_VERSION"), "admin endpoints listening");
    let readiness = health::Readiness::new();
    let admin = tokio::spawn(health::serve(listener, std::sync::Arc::clone(&readiness)));
    // Nothing else to bring up yet: ready as soon as the admin endpoints answer.
    readiness.set(true);
    notify::ready("admin endpoints up; no mesh routes configured");
    let watchdog = notify::spawn_watchdog();
    pimesh_daemon::shutdown_signal()
        .await
        .map_err(|err| format!("cannot watch for SIGTERM: {err}"))?;
    info!("shutting down");
    notify::stopping();
    admin.abort();
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    Ok(())
}
