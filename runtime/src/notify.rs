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

/// Proof that a key task is turning: the task calls [`Heartbeat::beat`] on every turn,
/// and [`spawn_watchdog_fed_by`] pings systemd's watchdog only while its last beat is
/// recent. A task stuck on an `.await` that never completes (or in a blocking call) thus
/// gets the service restarted, even though the runtime itself, and the timer that would
/// otherwise feed the watchdog, still run.
#[derive(Debug)]
pub struct Heartbeat {
    origin: std::time::Instant,
    last_beat_ms: std::sync::atomic::AtomicU64,
}

impl Heartbeat {
    /// A heartbeat that counts as beaten now.
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

/// The key tasks whose progress feeds the watchdog, each by name (for the log).
pub type KeyTasks = Vec<(&'static str, std::sync::Arc<Heartbeat>)>;

/// Pings systemd's watchdog every quarter of its interval while every one of `tasks`
/// beat within half of it; while one has not, pings nothing and warns once, naming it.
/// `None` when no watchdog is set. There is no timer-fed watchdog: a daemon names the
/// tasks whose progress means it is alive.
pub fn spawn_watchdog_fed_by(tasks: KeyTasks) -> Option<tokio::task::JoinHandle<()>> {
    let timeout = sd_notify::watchdog_enabled()?;
    Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(timeout / 4);
        let mut starving = false;
        loop {
            ticker.tick().await;
            let stalled = tasks
                .iter()
                .map(|(name, heartbeat)| (*name, heartbeat.age()))
                .find(|(_, age)| *age >= timeout / 2);
            match stalled {
                None => {
                    send(&[NotifyState::Watchdog]);
                    starving = false;
                }
                Some((task, age)) if !starving => {
                    starving = true;
                    warn!(
                        task,
                        stalled_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                        "a key task stalled: no longer feeding the watchdog"
                    );
                }
                Some(_) => {}
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
