//! A Pi has no real-time clock and an edge site may have no Internet: a node must not
//! check a certificate against a clock that says 1970. The join waits until the clock is
//! no earlier than a floor: the image's build time, or the last time this node saw (saved
//! in `<state>/clock` whenever the clock was sane), whichever is later. Time itself comes
//! from chrony, which takes it from the site's server nodes.
//!
//! Invariant: [`Clock::wait_until_sane`] returns only when `now >= floor`, and the status's
//! `join.clock` says what it waits for meanwhile.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tracing::info;

use crate::status::StatusHandle;

/// How often a clock below the floor is looked at again.
const RECHECK: Duration = Duration::from_secs(2);

/// The floor and where the node keeps the last sane time.
pub struct Clock {
    floor: SystemTime,
    saved: PathBuf,
}

impl Clock {
    /// The floor of `built_at` (the image manifest's `built_at`, RFC 3339) and the time
    /// saved in `saved`.
    pub fn new(built_at: Option<&str>, saved: PathBuf) -> Clock {
        let parse = |text: &str| humantime::parse_rfc3339_weak(text.trim()).ok();
        let built = built_at.and_then(parse);
        let last = std::fs::read_to_string(&saved).ok().and_then(|t| parse(&t));
        let floor = built
            .into_iter()
            .chain(last)
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Clock { floor, saved }
    }

    pub fn is_sane(&self, now: SystemTime) -> bool {
        now >= self.floor
    }

    /// Waits until the clock reaches the floor, then saves the time as the next floor.
    pub async fn wait_until_sane(&self, status: &StatusHandle) {
        let mut told = false;
        loop {
            let now = SystemTime::now();
            let sane = self.is_sane(now);
            status.update(|status| {
                let clock = &mut status.join.clock;
                clock.sane = sane;
                clock.now = Some(rfc3339(now));
                clock.floor = Some(rfc3339(self.floor));
                if !sane {
                    status.join.state = "waiting-for-clock";
                }
            });
            if sane {
                let _ = pimesh_runtime::atomic_file::replace(
                    &self.saved,
                    format!("{}\n", rfc3339(now)).as_bytes(),
                    0o644,
                );
                return;
            }
            if !told {
                info!(now = %rfc3339(now), floor = %rfc3339(self.floor), "waiting for a sane clock before checking any certificate");
                told = true;
            }
            tokio::time::sleep(RECHECK).await;
        }
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_the_later_of_the_build_and_the_saved_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let saved = dir.path().join("clock");
        let clock = Clock::new(Some("2026-11-30T10:00:00Z"), saved.clone());
        assert_eq!(rfc3339(clock.floor), "2026-11-30T10:00:00Z");
        std::fs::write(&saved, "2026-12-01T08:00:00Z\n").expect("save");
        let clock = Clock::new(Some("2026-11-30T10:00:00Z"), saved.clone());
        assert_eq!(rfc3339(clock.floor), "2026-12-01T08:00:00Z");
        assert!(!clock.is_sane(SystemTime::UNIX_EPOCH + Duration::from_secs(3600)));
        assert!(clock.is_sane(clock.floor));
        std::fs::write(&saved, "garbage").expect("save");
        let clock = Clock::new(None, saved);
        assert_eq!(
            clock.floor,
            SystemTime::UNIX_EPOCH,
            "nothing usable: no floor"
        );
    }
}
