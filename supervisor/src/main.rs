//! `pimesh-supervisor`: the daemon on every Pimesh node.
//!
//! Today it reads the seed, gives the node its name and SSH access, and serves the node's
//! status; it is the place where K3s bootstrap, trust provisioning and self-heal grow.

mod atomic_file;
mod cli;
mod node;
mod node_setup;
mod seed_state;
mod status;
mod status_api;

use std::process::ExitCode;
use std::sync::Arc;

use pimesh_daemon::{logging, notify};
use tracing::{error, info};

use crate::cli::Options;
use crate::status::{NodeStatus, StatusHandle};

fn main() -> ExitCode {
    let options = match Options::from_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("pimesh-supervisor: {message}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    if options.help {
        println!("{}", cli::USAGE);
        return ExitCode::SUCCESS;
    }
    logging::init();
    // One thread is plenty for a supervisor and keeps its footprint small on a Pi.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            error!(%err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            error!("{message}");
            notify::status(&format!("failed: {message}"));
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> Result<(), String> {
    info!(version = env!("CARGO_PKG_VERSION"), seed = %options.seed_path.display(), "starting");
    let seed = seed_state::SeedState::load(&options.seed_path);
    seed.log();
    let facts = node::NodeFacts::gather(&options.paths, &seed);
    let tasks = if options.node_setup {
        node_setup::apply(&options.paths, &facts, &seed).await
    } else {
        Vec::new()
    };
    let status = StatusHandle::new(NodeStatus::new(&facts, &seed, tasks));

    let listener = tokio::net::TcpListener::bind(options.status_addr)
        .await
        .map_err(|err| {
            format!(
                "cannot listen on {} for the status API: {err}",
                options.status_addr
            )
        })?;
    info!(addr = %options.status_addr, "status API listening");
    let server = tokio::spawn(status_api::serve(listener, Arc::clone(&status.0)));

    notify::ready(&seed.one_line_summary(&facts.node_name));
    let watchdog = notify::spawn_watchdog();

    pimesh_daemon::shutdown_signal()
        .await
        .map_err(|err| format!("cannot watch for SIGTERM: {err}"))?;
    info!("shutting down");
    notify::stopping();
    server.abort();
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    Ok(())
}
