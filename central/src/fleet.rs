//! `GET /v1/fleet`: every site's newest revision and node reports, built once and served
//! to every request until something changed.
//!
//! Invariants: the answer is rebuilt only when a report or a revision was stored since the
//! last build ([`FleetCache::changed`]), so its cost follows the reports that arrive, not
//! the requests; requests in between share the one encoded answer (no copy per request);
//! parallel requests wait for one build instead of making one each; an answer never
//! misses a change stored before the request arrived.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use hyper::body::Bytes;
use pimesh_revision::{FleetView, NodeView, SiteView};

use crate::sites::Registry;

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

    /// The fleet view as JSON: the one built before when nothing changed since, else a
    /// new one. `Err` says why it cannot be built.
    pub fn view(&self, registry: &Registry) -> Result<Bytes, String> {
        let mut built = self.built.lock().unwrap_or_else(PoisonError::into_inner);
        let changes = self.changes.load(Ordering::Acquire);
        if let Some(current) = built.as_ref() {
            if current.after_change == changes {
                return Ok(current.json.clone());
            }
        }
        let json = Bytes::from(build(registry)?);
        *built = Some(Built {
            after_change: changes,
            json: json.clone(),
        });
        Ok(json)
    }
}

fn build(registry: &Registry) -> Result<Vec<u8>, String> {
    let mut sites = Vec::new();
    for site in registry.sites.values() {
        let reports = registry
            .storage
            .reports(&site.name)
            .map_err(|err| format!("cannot read reports: {err}"))?;
        sites.push(SiteView {
            site: site.name.clone(),
            latest_revision: site.latest_revision(),
            nodes: reports
                .into_iter()
                .map(|(node, recorded)| NodeView { node, recorded })
                .collect(),
        });
    }
    serde_json::to_vec(&FleetView { sites })
        .map_err(|err| format!("cannot encode the fleet view: {err}"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use pimesh_revision::{RecordedReport, SignedRevision};
    use pimesh_schema::DnsLabel;

    use super::*;
    use crate::config::SiteEntry;
    use crate::sites::Site;
    use crate::storage::Storage;

    /// Storage that holds reports in memory and counts the reads of them.
    #[derive(Default)]
    struct Counting {
        reports: Mutex<BTreeMap<DnsLabel, RecordedReport>>,
        reads: AtomicUsize,
    }

    impl Storage for Counting {
        fn latest(&self, _: &DnsLabel) -> io::Result<Option<SignedRevision>> {
            Ok(None)
        }
        fn store(&self, _: &SignedRevision) -> io::Result<()> {
            Ok(())
        }
        fn record_report(
            &self,
            _: &DnsLabel,
            node: &DnsLabel,
            report: &RecordedReport,
        ) -> io::Result<()> {
            let mut reports = self.reports.lock().expect("lock");
            reports.insert(node.clone(), report.clone());
            Ok(())
        }
        fn reports(&self, _: &DnsLabel) -> io::Result<BTreeMap<DnsLabel, RecordedReport>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            Ok(self.reports.lock().expect("lock").clone())
        }
    }

    #[test]
    fn the_view_is_built_once_per_change_and_never_misses_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        pimesh_test_support::Site::new("depot-7").write_trust(dir.path());
        let key = pimesh_test_support::central::SigningKey::generate();
        let name = DnsLabel::try_from("depot-7".to_owned()).expect("label");
        let storage = Arc::new(Counting::default());
        let entry = SiteEntry {
            name: name.clone(),
            anchor: dir.path().join("anchor.pem"),
            public_key: key.public_key.clone().try_into().expect("key"),
        };
        let site = Site::load(&entry, storage.as_ref()).expect("site");
        let registry = Registry {
            sites: BTreeMap::from([(name.clone(), site)]),
            storage: Arc::clone(&storage) as Arc<dyn Storage>,
            long_poll_max: std::time::Duration::from_secs(60),
            fleet: FleetCache::default(),
        };
        let first = registry.fleet.view(&registry).expect("view");
        for _ in 0..100 {
            assert_eq!(registry.fleet.view(&registry).expect("view"), first);
        }
        assert_eq!(
            storage.reads.load(Ordering::SeqCst),
            1,
            "one build for 101 requests"
        );

        let report: RecordedReport = serde_json::from_value(serde_json::json!({
            "revision": 3, "state": "applied", "detail": "", "received_at": 1_800_000_000u64,
        }))
        .expect("report");
        let node = DnsLabel::try_from("pi-a".to_owned()).expect("label");
        storage
            .record_report(&name, &node, &report)
            .expect("record");
        registry.fleet.changed();
        let after = registry.fleet.view(&registry).expect("view");
        assert_ne!(after, first, "the report is in the next answer");
        assert!(String::from_utf8_lossy(&after).contains("pi-a"));
        assert_eq!(storage.reads.load(Ordering::SeqCst), 2);
    }
}
