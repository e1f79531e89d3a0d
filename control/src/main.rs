//! `pimesh-control --replica N`: control replica N of the node, one of the stateless
//! replicas that will sign proxy certificates and serve discovery and policy (issue 5).
//!
//! This skeleton is honest about what it is: it serves `/live` and `/ready` on
//! `127.0.0.1:(8085+N)`, tells systemd it is ready (`Type=notify`) and feeds the watchdog,
//! so that the supervisor has a real replica to start, probe and heal.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use pimesh_daemon::{health, notify};
use tracing::info;

const USAGE: &str =
    "usage: pimesh-control --replica N   (N in 1..=64; listens on 127.0.0.1:8085+N)";

/// Replica numbers are small: the ports 8086.. must stay below other well-known ones.
const MAX_REPLICA: u16 = 64;
const BASE_PORT: u16 = 8085;

/// Parses the command line into the replica number.
fn replica_from_args(args: impl IntoIterator<Item = String>) -> Result<u16, String> {
    let mut args = args.into_iter();
    let mut replica = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--replica" => {
                let value = args.next().ok_or("--replica needs a value")?;
                let number = value
                    .parse::<u16>()
                    .ok()
                    .filter(|n| (1..=MAX_REPLICA).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "--replica: expected a number in 1..={MAX_REPLICA}, found {value:?}"
                        )
                    })?;
                replica = Some(number);
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    replica.ok_or_else(|| "--replica is required".to_owned())
}

/// Where replica `replica` serves its health endpoints.
fn health_addr(replica: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], BASE_PORT + replica))
}

fn main() -> ExitCode {
    let replica = match replica_from_args(std::env::args().skip(1)) {
        Ok(replica) => replica,
        Err(message) => {
            eprintln!("pimesh-control: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    pimesh_daemon::run(pimesh_daemon::Threads::One, run(replica))
}

async fn run(replica: u16) -> Result<(), String> {
    let addr = health_addr(replica);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|err| format!("cannot listen on {addr} for the health endpoints: {err}"))?;
    info!(replica, %addr, version = env!("CARGO_PKG_VERSION"), "health endpoints listening");
    let readiness = health::Readiness::new();
    let server = tokio::spawn(health::serve(listener, Arc::clone(&readiness)));
    // No site config to load yet (issue 5): ready once the endpoints answer.
    readiness.set(true);
    notify::ready(&format!("replica {replica} on {addr}; no site config yet"));
    let watchdog = notify::spawn_watchdog();
    pimesh_daemon::shutdown_signal()
        .await
        .map_err(|err| format!("cannot watch for SIGTERM: {err}"))?;
    info!(replica, "shutting down");
    notify::stopping();
    server.abort();
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<u16, String> {
        replica_from_args(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn the_replica_number_picks_the_port() {
        assert_eq!(parse(&["--replica", "1"]), Ok(1));
        assert_eq!(health_addr(1).to_string(), "127.0.0.1:8086");
        assert_eq!(health_addr(3).to_string(), "127.0.0.1:8088");
    }

    #[test]
    fn bad_arguments_are_named() {
        assert!(parse(&[]).unwrap_err().contains("--replica is required"));
        assert!(parse(&["--replica"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["--replica", "0"]).unwrap_err().contains("1..=64"));
        assert!(parse(&["--replica", "x"]).unwrap_err().contains("\"x\""));
        assert!(parse(&["--frob"]).unwrap_err().contains("--frob"));
    }
}
