//! The sites the server serves: for each, its anchor, its revision verifier, and the
//! newest revision as a watch channel that long-polls wait on.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use pimesh_revision::{FleetView, NodeView, Plan, Rejection, SignedRevision, SiteView, Verifier};
use pimesh_schema::DnsLabel;
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::CertificateDer;
use tokio::sync::{watch, Mutex};

use crate::config::SiteEntry;
use crate::offers::{unix_now, Latest, Offers};
use crate::storage::Storage;

pub struct Site {
    pub name: DnsLabel,
    pub anchor: CertificateDer<'static>,
    /// The people with keys of their own for the site's operator requests.
    pub operators: Vec<crate::config::OperatorEntry>,
    verifier: Verifier,
    latest: watch::Sender<Option<Arc<Latest>>>,
    /// Which revision each node is offered, by the rollouts of the site's revisions.
    pub offers: Offers,
    /// Serialises publishes of this site so that revision order is checked and stored as
    /// one step.
    publishing: Mutex<()>,
}

/// Why a publish was refused.
#[derive(Debug)]
pub enum PublishError {
    /// The revision itself is refused: the publisher's to fix.
    Rejected(Rejection),
    /// The revision is fine but could not be stored: the server's to fix.
    Storage(std::io::Error),
}

/// Why a site of the server's configuration cannot be served.
#[derive(Debug)]
pub enum SiteLoadError {
    /// The site's anchor file is not a PEM certificate (or cannot be read).
    Anchor {
        site: DnsLabel,
        path: PathBuf,
        source: pem::Error,
    },
    /// The stored revisions cannot be listed.
    Storage {
        site: DnsLabel,
        source: std::io::Error,
    },
}

impl fmt::Display for SiteLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SiteLoadError::Anchor { site, path, source } => write!(
                f,
                "site {site}: {}: expected a PEM certificate: {source}",
                path.display()
            ),
            SiteLoadError::Storage { site, source } => {
                write!(f, "site {site}: cannot read stored revisions: {source}")
            }
        }
    }
}

impl std::error::Error for SiteLoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SiteLoadError::Anchor { source, .. } => Some(source),
            SiteLoadError::Storage { source, .. } => Some(source),
        }
    }
}

impl Site {
    /// The site `entry` as `storage` holds it, its rollouts ordered among the fleet's by
    /// `releases`.
    pub fn load(
        entry: &SiteEntry,
        storage: &dyn Storage,
        releases: Arc<crate::release::Releases>,
    ) -> Result<Site, SiteLoadError> {
        let anchor = CertificateDer::from_pem_file(&entry.anchor).map_err(|source| {
            SiteLoadError::Anchor {
                site: entry.name.clone(),
                path: entry.anchor.clone(),
                source,
            }
        })?;
        let storage_error = |source| SiteLoadError::Storage {
            site: entry.name.clone(),
            source,
        };
        let newest = storage.latest(&entry.name).map_err(storage_error)?;
        let offers = Offers::load(&entry.name, newest.as_ref(), storage, releases, unix_now())
            .map_err(storage_error)?;
        let latest = newest.as_ref().map(Latest::of);
        Ok(Site {
            name: entry.name.clone(),
            anchor,
            operators: entry.operators.clone(),
            verifier: Verifier::new(entry.name.clone(), entry.public_key.clone()),
            latest: watch::Sender::new(latest),
            offers,
            publishing: Mutex::new(()),
        })
    }

    /// The site's key: it signs the site's revisions and its operator's requests.
    pub fn verifier_key(&self) -> &pimesh_schema::SigningKey {
        &self.verifier.key
    }

    /// The key revisions of this site are checked with, `ed25519:<base64>`.
    pub fn public_key(&self) -> String {
        self.verifier.key.to_string()
    }

    pub fn latest_revision(&self) -> Option<u64> {
        self.latest.borrow().as_ref().map(|latest| latest.revision)
    }

    /// Verifies `bytes` as the next revision (signature, site, order, configuration),
    /// stores it durably, then starts its rollout (which wakes the waiting nodes it
    /// offers the revision to).
    pub async fn publish(
        &self,
        bytes: &[u8],
        storage: &dyn Storage,
    ) -> Result<SignedRevision, PublishError> {
        let _turn = self.publishing.lock().await;
        let verified = self
            .verifier
            .verify(bytes, self.latest_revision())
            .map_err(PublishError::Rejected)?;
        if let Err(err) = storage.store(&verified.signed) {
            if err.kind() != io::ErrorKind::AlreadyExists {
                return Err(PublishError::Storage(err));
            }
            // Another replica stored this number or a higher one meanwhile.
            self.catch_up(storage, unix_now());
            return Err(PublishError::Rejected(Rejection::NotNewer {
                current: self.latest_revision().unwrap_or(verified.signed.revision),
                offered: verified.signed.revision,
            }));
        }
        self.serve_newest(&verified.signed);
        self.offers.published(
            &verified.signed,
            Plan::from(&verified.config.rollout),
            storage,
            unix_now(),
        );
        Ok(verified.signed)
    }

    /// Serves `revision` to the long-polls unless a newer one is served already; whether
    /// it now is.
    fn serve_newest(&self, revision: &SignedRevision) -> bool {
        self.latest.send_if_modified(|latest| {
            if latest
                .as_ref()
                .is_some_and(|latest| latest.revision >= revision.revision)
            {
                return false;
            }
            *latest = Some(Latest::of(revision));
            true
        })
    }

    /// Takes the newest revision storage holds (stored by another replica) when it is
    /// newer than the one served here: served, and its rollout followed.
    pub fn catch_up(&self, storage: &dyn Storage, now: u64) {
        let newest = match storage.latest(&self.name) {
            Ok(Some(newest)) => newest,
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(site = %self.name, %err, "cannot read the newest revision");
                return;
            }
        };
        if self.serve_newest(&newest) {
            tracing::info!(site = %self.name, revision = newest.revision, "revision published on another replica");
            self.offers
                .published(&newest, crate::offers::plan_of(&newest), storage, now);
        }
    }
}

pub struct Registry {
    pub sites: BTreeMap<DnsLabel, Site>,
    /// The releases the sites' rollouts carry across the fleet.
    pub releases: Arc<crate::release::Releases>,
    pub storage: Arc<dyn Storage>,
    pub long_poll_max: std::time::Duration,
    /// The fleet view, told of every report and revision stored.
    pub fleet: crate::fleet::FleetCache,
    pub metrics: crate::metrics::CentralMetrics,
    /// The dashboard's sessions.
    pub sessions: crate::sessions::Sessions,
}

impl crate::metrics::FleetSource for Registry {
    fn fleet_view_json(&self) -> Option<hyper::body::Bytes> {
        self.fleet_json().ok()
    }

    fn live_rollouts(&self) -> Vec<(String, pimesh_revision::RolloutState)> {
        self.sites
            .values()
            .flat_map(|site| {
                site.offers
                    .live_states()
                    .into_iter()
                    .map(|state| (site.name.to_string(), state))
            })
            .collect()
    }
}

/// Why the fleet view cannot be built.
#[derive(Debug)]
pub enum FleetError {
    /// A site's reports cannot be read from storage.
    Reports { site: DnsLabel, source: io::Error },
    /// The view cannot be encoded as JSON.
    Encode(serde_json::Error),
}

impl fmt::Display for FleetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FleetError::Reports { site, source } => {
                write!(f, "cannot read the reports of site {site}: {source}")
            }
            FleetError::Encode(err) => write!(f, "cannot encode the fleet view: {err}"),
        }
    }
}

impl std::error::Error for FleetError {}

impl Registry {
    /// Reads again everything other replicas may have stored (notices may have been
    /// missed: a first connection, or after a lost one).
    pub fn catch_up(&self, now: u64) {
        let storage = self.storage.as_ref();
        for site in self.sites.values() {
            site.catch_up(storage, now);
            site.offers.resync(storage, now);
        }
        self.fleet.changed();
    }

    /// Applies what another replica stored, as its `notice` says.
    pub fn notice(&self, notice: crate::storage::Notice, now: u64) {
        use crate::storage::Notice;
        let storage = self.storage.as_ref();
        match notice {
            Notice::Revision { site, .. } => {
                if let Some(site) = self.sites.get(&site) {
                    site.catch_up(storage, now);
                }
            }
            Notice::Rollout { site, revision } => {
                if let Some(site) = self.sites.get(&site) {
                    site.offers.refresh(revision, storage, now);
                }
                return;
            }
            Notice::Report { site, node } => {
                let Some(site) = self.sites.get(&site) else {
                    return;
                };
                match storage.report(&site.name, &node) {
                    Ok(Some(recorded)) => site.offers.reported(&node, &recorded, storage, now),
                    Ok(None) => return,
                    Err(err) => {
                        tracing::warn!(site = %site.name, %node, %err, "cannot read a report stored by another replica");
                        return;
                    }
                }
            }
        }
        self.fleet.changed();
    }

    /// The fleet view as JSON, from the cache unless a report or revision was stored
    /// since it was built.
    pub fn fleet_json(&self) -> Result<hyper::body::Bytes, FleetError> {
        self.fleet.view(|| self.build_fleet_json())
    }

    fn build_fleet_json(&self) -> Result<Vec<u8>, FleetError> {
        let mut sites = Vec::new();
        for site in self.sites.values() {
            let reports =
                self.storage
                    .reports(&site.name)
                    .map_err(|source| FleetError::Reports {
                        site: site.name.clone(),
                        source,
                    })?;
            sites.push(SiteView {
                site: site.name.clone(),
                latest_revision: site.latest_revision(),
                public_key: Some(site.public_key()),
                nodes: reports
                    .into_iter()
                    .map(|(node, recorded)| NodeView { node, recorded })
                    .collect(),
            });
        }
        serde_json::to_vec(&FleetView { sites }).map_err(FleetError::Encode)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use pimesh_revision::RecordedReport;

    use super::*;
    use crate::config::SiteEntry;
    use crate::fleet::FleetCache;

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
        fn report(&self, _: &DnsLabel, node: &DnsLabel) -> io::Result<Option<RecordedReport>> {
            Ok(self.reports.lock().expect("lock").get(node).cloned())
        }
        fn revision(&self, _: &DnsLabel, _: u64) -> io::Result<Option<SignedRevision>> {
            Ok(None)
        }
        fn update_rollout(
            &self,
            _: &DnsLabel,
            _: u64,
            change: &mut crate::storage::RolloutChange<'_>,
        ) -> io::Result<Option<pimesh_revision::Rollout>> {
            Ok(change(None))
        }
        fn rollout(&self, _: &DnsLabel, _: u64) -> io::Result<Option<pimesh_revision::Rollout>> {
            Ok(None)
        }
        fn rollouts(&self, _: &DnsLabel) -> io::Result<BTreeMap<u64, pimesh_revision::Rollout>> {
            Ok(BTreeMap::new())
        }
    }

    #[test]
    fn the_fleet_view_reads_the_reports_once_per_change() {
        let dir = tempfile::tempdir().expect("temp dir");
        pimesh_test_support::Site::new("depot-7").write_trust(dir.path());
        let key = pimesh_test_support::central::SigningKey::generate();
        let name = DnsLabel::try_from("depot-7".to_owned()).expect("label");
        let storage = Arc::new(Counting::default());
        let entry = SiteEntry {
            name: name.clone(),
            anchor: dir.path().join("anchor.pem"),
            public_key: key.public_key.clone().try_into().expect("key"),
            operators: Vec::new(),
        };
        let releases = Arc::new(crate::release::Releases::new([name.clone()]));
        let site = Site::load(&entry, storage.as_ref(), Arc::clone(&releases)).expect("site");
        let registry = Registry {
            sites: BTreeMap::from([(name.clone(), site)]),
            releases,
            storage: Arc::clone(&storage) as Arc<dyn Storage>,
            long_poll_max: std::time::Duration::from_secs(60),
            fleet: FleetCache::default(),
            metrics: crate::metrics::CentralMetrics::default(),
            sessions: crate::sessions::Sessions::default(),
        };
        let loaded = storage.reads.load(Ordering::SeqCst);
        let first = registry.fleet_json().expect("view");
        for _ in 0..100 {
            assert_eq!(registry.fleet_json().expect("view"), first);
        }
        assert_eq!(
            storage.reads.load(Ordering::SeqCst) - loaded,
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
        let after = registry.fleet_json().expect("view");
        assert_ne!(after, first, "the report is in the next answer");
        assert!(String::from_utf8_lossy(&after).contains("pi-a"));
        assert_eq!(storage.reads.load(Ordering::SeqCst) - loaded, 2);
    }
}
