//! The sites the server serves: for each, its anchor, its revision verifier, and the
//! newest revision as a watch channel that long-polls wait on.

use std::collections::BTreeMap;
use std::sync::Arc;

use pimesh_revision::{Rejection, SignedRevision, Verifier};
use pimesh_schema::DnsLabel;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use tokio::sync::{watch, Mutex};

use crate::config::SiteEntry;
use crate::storage::Storage;

/// The newest revision of a site, serialised once for every node that fetches it.
#[derive(Debug)]
pub struct Latest {
    pub revision: u64,
    pub json: Vec<u8>,
}

pub struct Site {
    pub name: DnsLabel,
    pub anchor: CertificateDer<'static>,
    verifier: Verifier,
    latest: watch::Sender<Option<Arc<Latest>>>,
    /// Serialises publishes of this site so that revision order is checked and stored as
    /// one step.
    publishing: Mutex<()>,
}

/// Why a publish was refused.
pub enum PublishError {
    Rejected(Rejection),
    Storage(std::io::Error),
}

impl Site {
    pub fn load(entry: &SiteEntry, storage: &dyn Storage) -> Result<Site, String> {
        let anchor = CertificateDer::from_pem_file(&entry.anchor).map_err(|err| {
            format!(
                "site {}: {}: expected a PEM certificate: {err}",
                entry.name,
                entry.anchor.display()
            )
        })?;
        let latest = storage
            .latest(&entry.name)
            .map_err(|err| format!("site {}: cannot read stored revisions: {err}", entry.name))?
            .map(|revision| {
                Arc::new(Latest {
                    revision: revision.revision,
                    json: revision.to_json(),
                })
            });
        Ok(Site {
            name: entry.name.clone(),
            anchor,
            verifier: Verifier::new(entry.name.clone(), entry.public_key.clone()),
            latest: watch::Sender::new(latest),
            publishing: Mutex::new(()),
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Latest>>> {
        self.latest.subscribe()
    }

    pub fn latest_revision(&self) -> Option<u64> {
        self.latest.borrow().as_ref().map(|latest| latest.revision)
    }

    /// Verifies `bytes` as the next revision (signature, site, order, configuration),
    /// stores it durably, then wakes every waiting node.
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
        storage
            .store(&verified.signed)
            .map_err(PublishError::Storage)?;
        let json = verified.signed.to_json();
        self.latest.send_replace(Some(Arc::new(Latest {
            revision: verified.signed.revision,
            json,
        })));
        Ok(verified.signed)
    }
}

pub struct Registry {
    pub sites: BTreeMap<DnsLabel, Site>,
    pub storage: Arc<dyn Storage>,
    pub long_poll_max: std::time::Duration,
}
