//! The whole fleet's view (every site's newest revision and node reports), which the
//! metrics' per-site gauges are read from at each scrape, built once and shared until
//! something changed. (`GET /v1/fleet` answers one site's operator with that site alone,
//! see `operator::fleet`.)
//!
//! Invariants: the view is rebuilt only when a report or a revision was stored since the
//! last build ([`FleetCache::changed`]), so its cost follows the reports that arrive, not
//! the scrapes; scrapes in between share the one encoded view (no copy per scrape);
//! parallel scrapes wait for one build instead of making one each; a view never misses a
//! change stored before the scrape arrived.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use hyper::body::Bytes;

/// The encoded fleet view and the change it was built after.
#[derive(Default)]
pub struct FleetCache {
    /// Bumped by every report and revision stored.
    changes: AtomicU64,
    built: Mutex<Option<Built>>,
}

struct Built {
    after_change: u64,
    json: Bytes,
}

impl FleetCache {
    /// Records that a report or a revision was stored.
    pub fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// The fleet view: the one built before when nothing changed since, else the one
    /// `build` makes now (whose error is returned as it is, and nothing kept).
    pub fn view<E>(&self, build: impl FnOnce() -> Result<Vec<u8>, E>) -> Result<Bytes, E> {
        let mut built = self.built.lock().unwrap_or_else(PoisonError::into_inner);
        let changes = self.changes.load(Ordering::Acquire);
        if let Some(current) = built.as_ref() {
            if current.after_change == changes {
                return Ok(current.json.clone());
            }
        }
        let json = Bytes::from(build()?);
        *built = Some(Built {
            after_change: changes,
            json: json.clone(),
        });
        Ok(json)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn the_view_is_built_once_per_change_and_never_misses_one() {
        let cache = FleetCache::default();
        let builds = Cell::new(0u32);
        let build = || -> Result<Vec<u8>, ()> {
            builds.set(builds.get() + 1);
            Ok(format!("build {}", builds.get()).into_bytes())
        };
        let first = cache.view(build).expect("view");
        for _ in 0..100 {
            assert_eq!(cache.view(build).expect("view"), first);
        }
        assert_eq!(builds.get(), 1, "one build for 101 requests");

        cache.changed();
        let after = cache.view(build).expect("view");
        assert_eq!(&after[..], b"build 2", "a change is in the next answer");
        assert_eq!(cache.view(build).expect("view"), after);
        assert_eq!(builds.get(), 2);
    }

    #[test]
    fn a_failed_build_is_not_kept() {
        let cache = FleetCache::default();
        assert_eq!(cache.view(|| Err::<Vec<u8>, _>("disk")), Err("disk"));
        let view = cache.view(|| Ok::<_, &str>(b"ok".to_vec())).expect("view");
        assert_eq!(&view[..], b"ok");
    }
}
