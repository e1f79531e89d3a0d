//! The systemd notification protocol (`Type=notify`): readiness, status text, watchdog.
//! Every call is a no-op when the process was not started by systemd.

use sd_notify::NotifyState;
use tracing::warn;

fn send(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        warn!(%err, "cannot notify systemd");
    }
}

/// Tells systemd the service is up, with a one-line status.
pub fn ready(status_line: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status_line)]);
}

pub fn status(status_line: &str) {
    send(&[NotifyState::Status(status_line)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Pings the watchdog at half its interval from the event loop, so that a stalled loop
/// stops the pings and systemd restarts the service. `None` when no watchdog is set.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()? / 2;
    Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}
