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

/// Proof that an event loop is turning: the loop calls [`Heartbeat::beat`] on every turn,
/// and [`spawn_watchdog_fed_by`] pings systemd's watchdog only while the last beat is
/// recent. A loop stuck on an `.await` that never completes thus gets the service
/// restarted, even though the runtime itself still runs.
#[derive(Debug)]
pub struct Heartbeat {
    origin: std::time::Instant,
    last_beat_ms: std::sync::atomic::AtomicU64,
}

impl Heartbeat {
    pub fn new() -> std::sync::Arc<Heartbeat> {
        std::sync::Arc::new(Heartbeat {
            origin: std::time::Instant::now(),
            last_beat_ms: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn beat(&self) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_beat_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> std::time::Duration {
        let last = self.last_beat_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.origin
            .elapsed()
            .saturating_sub(std::time::Duration::from_millis(last))
    }
}

/// Like [`spawn_watchdog`], but pings only while `heartbeat` beat within half the
/// watchdog interval. `None` when no watchdog is set.
pub fn spawn_watchdog_fed_by(
    heartbeat: std::sync::Arc<Heartbeat>,
) -> Option<tokio::task::JoinHandle<()>> {
    let timeout = sd_notify::watchdog_enabled()?;
    Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(timeout / 4);
        let mut starving = false;
        loop {
            ticker.tick().await;
            let age = heartbeat.age();
            if age < timeout / 2 {
                send(&[NotifyState::Watchdog]);
                starving = false;
            } else if !starving {
                starving = true;
                warn!(
                    stalled_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                    "event loop stalled: no longer feeding the watchdog"
                );
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_ages_until_the_next_beat() {
        let heartbeat = Heartbeat::new();
        heartbeat.beat();
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(heartbeat.age() >= std::time::Duration::from_millis(30));
        heartbeat.beat();
        assert!(heartbeat.age() < std::time::Duration::from_millis(30));
    }
}
