//! What every Pimesh daemon shares with systemd: structured logs to the journal (stderr off
//! a node), `Type=notify` readiness, status and watchdog, shutdown on SIGTERM, and the
//! `/live` and `/ready` health endpoints.

pub mod atomic_file;
pub mod health;
pub mod logging;
pub mod notify;

/// Resolves on SIGTERM (systemd stopping the unit) or SIGINT (a terminal).
pub async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
