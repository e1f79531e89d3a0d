//! The sites the server serves: for each, its anchor, its revision verifier, and the
//! newest revision as a watch channel that long-polls wait on.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use pimesh_revision::{Rejection, SignedRevision, Verifier};
use pimesh_schema::DnsLabel;
use rustls::pki_types::pem::{self, PemObject as _};
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
    pub fn load(entry: &SiteEntry, storage: &dyn Storage) -> Result<Site, SiteLoadError> {
        let anchor = CertificateDer::from_pem_file(&entry.anchor).map_err(|source| {
            SiteLoadError::Anchor {
                site: entry.name.clone(),
                path: entry.anchor.clone(),
                source,
            }
        })?;
        let latest = storage
            .latest(&entry.name)
            .map_err(|source| SiteLoadError::Storage {
                site: entry.name.clone(),
                source,
            })?
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
    /// The fleet view, told of every report and revision stored.
    pub fleet: crate::fleet::FleetCache,
}
