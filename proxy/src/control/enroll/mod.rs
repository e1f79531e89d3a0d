//! Workload identity from the control replicas (`--control`): enrollment, renewal, and
//! rotation of issuers and anchors without downtime.
//!
//! The proxy makes a fresh ECDSA P-256 key (it never leaves the process and the state
//! directory) and a CSR for its node ID plus `spiffe://<site>/svc/<s>` for every service the
//! site config in use places on its node, and has it signed by a replica over mutual TLS
//! (`client`), presenting its node credential the first time and its current leaf after.
//! Before use the answer is checked: the chain leads to the bundle the replica served
//! (`GET /v1/trust-bundle`, fetched at every renewal, which is how a new anchor is
//! learnt), is valid now, names exactly the identities asked for, and belongs to the key.
//!
//! The identity in use is published on a `watch`: new connections use the newest, open
//! ones keep the one they were made with. It is, in order of preference: the latest leaf
//! from a replica, a leaf saved by an earlier run (`store`) while still valid, the node
//! credential. A leaf is renewed at two thirds of its life (`schedule`). Each round asks
//! the replicas in turn, starting with the last that signed, without waiting on one that
//! does not answer (`hedge`); when none signs, the next round comes after a growing pause,
//! and while renewals fail a warning names the time left every [`WARN_EVERY`]. The
//! replicas are the live set of `control::replicas` (the start list and the servers'
//! replicas discovery lists), read at every attempt. A change of the services placed on
//! the node re-enrolls at once. A leaf that expires unrenewed gives way to the node
//! credential.
//!
//! Invariant: only an identity that passed `Identity`'s checks at the time it was
//! published is ever published.

mod client;
mod error;
mod hedge;
pub mod metrics;
mod schedule;
mod store;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pimesh_identity::LeafRequest;
use pimesh_runtime::backoff::Retry;
use pimesh_schema::{SpiffeId, Workload};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::SiteConfig;
use crate::identity::{Identity, Source};

use error::{EnrollError, LeafNamesError};
pub use metrics::IdentityMetrics;

/// While renewals fail, a warning naming the time left is logged this often.
pub const WARN_EVERY: Duration = Duration::from_secs(30);

/// When none of the replicas asked for a leaf has answered for this long, the next one is
/// asked too (`hedge`): a healthy replica answers in well under a second, even on a busy
/// board, and a dead one costs a renewal no more than this.
pub const HEDGE_AFTER: Duration = Duration::from_secs(2);

/// One leaf request, as sent to every replica of a round.
struct Prepared {
    /// The identity the proxy authenticates with.
    auth: Identity,
    /// The identities asked for.
    wanted: BTreeSet<SpiffeId>,
    /// The new key and its signing request.
    leaf: LeafRequest,
}

/// What `/config` shows of the enrollment.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub replicas: Vec<SocketAddr>,
    /// The identities the last request asked for.
    pub requested: Vec<String>,
    /// Leaves received since start.
    pub renewals: u64,
    /// The replica that signed the leaf in use, if a replica did in this run.
    pub signed_by: Option<SocketAddr>,
    /// Why the last attempt failed; `None` after a success (or before any attempt).
    pub last_error: Option<String>,
    /// When the next attempt is due, Unix ms.
    pub next_attempt_ms: u64,
}

impl Status {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "replicas": self.replicas.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "requested": self.requested,
            "renewals": self.renewals,
            "signed_by": self.signed_by.map(|addr| addr.to_string()),
            "last_error": self.last_error,
            "next_attempt_ms": self.next_attempt_ms,
        })
    }
}

/// What the enrollment task needs.
pub struct Settings {
    /// The live replica set (`control::replicas`); at least one.
    pub replicas: watch::Receiver<Arc<[SocketAddr]>>,
    pub state_dir: PathBuf,
}

/// Starts enrolling: returns the identity in use (for the listeners, the peer pool and the
/// admin endpoints) and the enrollment status. `node_credential` is the node credential
/// as loaded from its files; `config` is the site config in use.
pub fn spawn(
    settings: Settings,
    node_credential: watch::Receiver<Option<Identity>>,
    config: watch::Receiver<Option<Arc<SiteConfig>>>,
    metrics: IdentityMetrics,
) -> (
    watch::Receiver<Option<Identity>>,
    watch::Receiver<Status>,
    tokio::task::JoinHandle<()>,
) {
    let credential = node_credential.borrow().clone();
    let cached = match store::load(&settings.state_dir) {
        // A state directory from another node (moved disk, changed credential): not ours.
        Ok(Some(identity))
            if credential
                .as_ref()
                .is_some_and(|c| c.site != identity.site || c.node != identity.node) =>
        {
            warn!(
                dir = %store::dir(&settings.state_dir).display(),
                saved = %SpiffeId::node(&identity.site, &identity.node),
                "the saved leaf is another node's; ignoring it"
            );
            None
        }
        Ok(Some(identity)) => {
            info!(
                dir = %store::dir(&settings.state_dir).display(),
                ids = ?identity.ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
                expires_in = ?left(identity.not_after),
                "using the leaf saved by an earlier run until a replica signs a new one"
            );
            Some(identity)
        }
        Ok(None) => None,
        Err(err) => {
            warn!(error = %err, "the saved leaf is not usable; using the node credential until a replica signs one");
            None
        }
    };
    let first = cached.clone().or(credential);
    let (identity_tx, identity_rx) = watch::channel(first);
    let (status_tx, status_rx) = watch::channel(Status {
        replicas: settings.replicas.borrow().to_vec(),
        ..Status::default()
    });
    let enroller = Enroller {
        settings,
        node_credential,
        config,
        metrics,
        identity_tx,
        status_tx,
        leaf: cached,
        cursor: 0,
        backoff: Retry::new(schedule::BACKOFF),
        failing_since: None,
    };
    (identity_rx, status_rx, tokio::spawn(enroller.run()))
}

struct Enroller {
    settings: Settings,
    node_credential: watch::Receiver<Option<Identity>>,
    config: watch::Receiver<Option<Arc<SiteConfig>>>,
    metrics: IdentityMetrics,
    identity_tx: watch::Sender<Option<Identity>>,
    status_tx: watch::Sender<Status>,
    /// The leaf in use, from a replica or the store; `None`: the node credential is used.
    leaf: Option<Identity>,
    /// The replica to ask next: an index into the current `settings.replicas` (modulo
    /// its length, which may change between attempts).
    cursor: usize,
    backoff: Retry,
    /// When the first of the current run of failed attempts was made.
    failing_since: Option<SystemTime>,
}

impl Enroller {
    async fn run(mut self) {
        // Ask at once even with a saved leaf in use: the bundle or the placement may have
        // changed while the proxy was down, and a replica that does not answer is then
        // reported (and warned about) from the start, not only at renewal time.
        let mut next = SystemTime::now();
        let mut warn_tick = tokio::time::interval(WARN_EVERY);
        warn_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        warn_tick.tick().await;
        loop {
            self.status_tx
                .send_modify(|status| status.next_attempt_ms = unix_ms(next));
            let expiry = self
                .leaf
                .as_ref()
                .map(|leaf| leaf.not_after)
                .unwrap_or(next);
            let wake = next.min(expiry);
            let sleep =
                tokio::time::sleep(wake.duration_since(SystemTime::now()).unwrap_or_default());
            tokio::select! {
                () = sleep => {
                    if self.expire() {
                        continue;
                    }
                    if SystemTime::now() >= next {
                        next = self.attempt().await;
                    }
                }
                changed = self.config.changed() => {
                    if changed.is_err() {
                        return; // the proxy is shutting down
                    }
                    let placed = self.wanted();
                    let held = self.leaf.as_ref().map(ids_of);
                    if placed.is_some() && held.is_some() && placed != held {
                        info!(
                            wanted = ?placed.iter().flatten().map(ToString::to_string).collect::<Vec<_>>(),
                            "the services placed on this node changed: asking for a new leaf now"
                        );
                        self.backoff.reset();
                        next = SystemTime::now();
                    }
                }
                changed = self.node_credential.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if self.leaf.is_none() {
                        self.publish();
                        next = next.min(SystemTime::now());
                    }
                }
                _ = warn_tick.tick() => self.warn_if_failing(),
            }
        }
    }

    /// Drops a leaf that expired unrenewed; true when it did.
    fn expire(&mut self) -> bool {
        let Some(leaf) = &self.leaf else {
            return false;
        };
        if SystemTime::now() < leaf.not_after {
            return false;
        }
        error!(
            source = leaf.source.as_str(),
            "the leaf expired before any control replica renewed it: falling back to the node credential (services on this node lose their service identities)"
        );
        self.leaf = None;
        self.publish();
        true
    }

    /// The identities to ask for: the node ID (of the node credential, else of the leaf
    /// in use), plus the services the site config in use places on the node (never the
    /// replicas' reserved one). `None` with neither a node credential nor a leaf.
    fn wanted(&self) -> Option<BTreeSet<SpiffeId>> {
        let (site, node) = {
            let credential = self.node_credential.borrow();
            match credential.as_ref() {
                Some(id) => (id.site.clone(), id.node.clone()),
                None => {
                    let leaf = self.leaf.as_ref()?;
                    (leaf.site.clone(), leaf.node.clone())
                }
            }
        };
        let in_use = self.config.borrow().clone();
        let mut ids = match in_use.as_deref() {
            Some(loaded) if loaded.config.site == site => loaded.config.identities_of_node(&node),
            _ => BTreeSet::from([SpiffeId::node(&site, &node)]),
        };
        ids.retain(|id| match &id.workload {
            Workload::Service(name) => name.as_str() != pimesh_meshtls::CONTROL_SERVICE,
            Workload::Node(_) => true,
        });
        Some(ids)
    }

    /// One round of requests to the replicas, starting with the one at the cursor (the
    /// last that signed); returns when to try again (or renew).
    async fn attempt(&mut self) -> SystemTime {
        let replicas = self.settings.replicas.borrow().clone();
        self.status_tx
            .send_modify(|status| status.replicas = replicas.to_vec());
        self.cursor %= replicas.len().max(1);
        if replicas.is_empty() {
            // No replica at all (`spawn` is only called with some): nothing to ask.
            return SystemTime::now() + schedule::BACKOFF.cap();
        }
        let order: Vec<SocketAddr> = replicas[self.cursor..]
            .iter()
            .chain(&replicas[..self.cursor])
            .copied()
            .collect();
        let signed = match self.prepare() {
            Ok(request) => self.ask_in_turn(&order, &request).await,
            Err(err) => {
                self.failed(None, &err);
                None
            }
        };
        match signed {
            Some((replica, identity)) => {
                let now = SystemTime::now();
                let renew_at = schedule::renew_at(now, identity.not_after, jitter());
                info!(
                    %replica,
                    ids = ?identity.ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    issuer_sha256 = identity.issuer_sha256.as_deref().unwrap_or("-"),
                    anchors = identity.anchors().len(),
                    expires_in = ?left(identity.not_after),
                    renew_in = ?renew_at.duration_since(now).unwrap_or_default(),
                    "new leaf in use"
                );
                self.metrics.renewal(true);
                self.leaf = Some(identity);
                self.publish();
                self.backoff.reset();
                self.failing_since = None;
                self.cursor = replicas
                    .iter()
                    .position(|r| *r == replica)
                    .unwrap_or(self.cursor);
                self.status_tx.send_modify(|status| {
                    status.renewals += 1;
                    status.signed_by = Some(replica);
                    status.last_error = None;
                });
                renew_at
            }
            None => {
                self.failing_since.get_or_insert_with(SystemTime::now);
                // The next round starts one further, so that no replica is always first.
                self.cursor = (self.cursor + 1) % replicas.len();
                SystemTime::now() + self.backoff.next_delay(fastrand::u64(..))
            }
        }
    }

    /// Asks the replicas of `order` for `request` (see `hedge`), checking each answer;
    /// the first good leaf and the replica that signed it.
    async fn ask_in_turn(
        &self,
        order: &[SocketAddr],
        request: &Prepared,
    ) -> Option<(SocketAddr, Identity)> {
        let auth = request.auth.clone();
        let csr_pem: Arc<str> = Arc::from(request.leaf.csr_pem.as_str());
        hedge::first_accepted(
            order,
            HEDGE_AFTER,
            |replica| {
                let (auth, csr_pem) = (auth.clone(), Arc::clone(&csr_pem));
                async move {
                    client::exchange(replica, &auth, &csr_pem)
                        .await
                        .map_err(EnrollError::from)
                }
            },
            |replica, answer| self.check_answer(request, replica, &answer),
            |replica, err| self.failed(Some(replica), &err),
        )
        .await
    }

    /// Records a failed exchange (or a request that could not be made: no replica).
    fn failed(&self, replica: Option<SocketAddr>, err: &EnrollError) {
        match replica {
            Some(replica) => {
                warn!(%replica, error = %err, "no leaf from this replica; trying the next")
            }
            None => warn!(error = %err, "cannot ask the control replicas for a leaf"),
        }
        self.metrics.renewal(false);
        self.status_tx
            .send_modify(|status| status.last_error = Some(err.to_string()));
    }

    /// The credential to authenticate with, the identities to ask for and a new key's
    /// signing request for them.
    fn prepare(&self) -> Result<Prepared, EnrollError> {
        let now = SystemTime::now();
        // Authenticate with the current leaf while valid, else with the node credential.
        let current = self
            .leaf
            .as_ref()
            .cloned()
            .filter(|identity| identity.not_after > now);
        let auth = current
            .or_else(|| self.node_credential.borrow().clone())
            .ok_or(EnrollError::NoCredential)?;
        let wanted = self.wanted().ok_or(EnrollError::NothingToAsk)?;
        let wanted_list: Vec<SpiffeId> = wanted.iter().cloned().collect();
        self.status_tx.send_modify(|status| {
            status.requested = wanted_list.iter().map(ToString::to_string).collect();
        });
        let leaf = LeafRequest::new(&wanted_list).map_err(EnrollError::Request)?;
        Ok(Prepared { auth, wanted, leaf })
    }

    /// Checks what `replica` answered to `request`, and saves the leaf when it passes.
    fn check_answer(
        &self,
        request: &Prepared,
        replica: SocketAddr,
        answer: &client::Answer,
    ) -> Result<Identity, EnrollError> {
        let Prepared { auth, wanted, leaf } = request;
        let what = format!("replica {replica}: answer");
        let anchors: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(answer.bundle_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|err| EnrollError::BundleNotPem { replica, err })?;
        if anchors.is_empty() {
            return Err(EnrollError::EmptyBundle { replica });
        }
        let key_pem = leaf.key.serialize_pem();
        // Chains to the bundle, valid now, one node ID, the key is the leaf's.
        let identity =
            Identity::from_pem_named(&answer.chain_pem, &key_pem, &answer.bundle_pem, &what)
                .map_err(EnrollError::Leaf)?
                .with_source(Source::Control);
        if identity.site != auth.site || identity.node != auth.node {
            return Err(EnrollError::OtherNode {
                replica,
                leaf: Box::new((identity.site, identity.node)),
                this: Box::new((auth.site.clone(), auth.node.clone())),
            });
        }
        // Every name of the leaf, of any kind or site, must be one asked for, and all of them.
        let asked: BTreeSet<String> = wanted.iter().map(ToString::to_string).collect();
        let named = identity
            .chain()
            .first()
            .map(|leaf| leaf_names(leaf))
            .transpose()
            .map_err(|err| EnrollError::LeafNames { replica, err })?
            .unwrap_or_default();
        if named != asked {
            return Err(EnrollError::NamesDiffer {
                replica,
                named,
                asked,
            });
        }
        if let Err(err) = store::save(
            &self.settings.state_dir,
            &answer.chain_pem,
            &key_pem,
            &answer.bundle_pem,
        ) {
            // The leaf is good; only a restart loses it.
            warn!(error = %err, "cannot save the new leaf; it is used anyway");
        }
        Ok(identity)
    }

    /// Publishes the identity to use now: the leaf, else the node credential.
    fn publish(&self) {
        let identity = match &self.leaf {
            Some(leaf) => Some(leaf.clone()),
            None => self.node_credential.borrow().clone(),
        };
        self.identity_tx.send_replace(identity);
    }

    fn warn_if_failing(&self) {
        let Some(since) = self.failing_since else {
            return;
        };
        let last_error = self
            .status_tx
            .borrow()
            .last_error
            .clone()
            .unwrap_or_default();
        let failing_for = SystemTime::now().duration_since(since).unwrap_or_default();
        match self.identity_tx.borrow().as_ref() {
            Some(identity) => warn!(
                source = identity.source.as_str(),
                expires_in = ?left(identity.not_after),
                failing_for = ?failing_for,
                last_error,
                "NO CONTROL REPLICA SIGNS A LEAF: the identity in use expires in {:?}; the mesh stops at expiry unless a replica answers",
                left(identity.not_after)
            ),
            None => warn!(
                failing_for = ?failing_for,
                last_error,
                "NO CONTROL REPLICA SIGNS A LEAF and there is no node credential: the mesh ports stay closed"
            ),
        }
    }
}

/// Every subject alternative name of the DER certificate `leaf`: URIs as written, other
/// kinds as `other:<value>` (never equal to a SPIFFE ID).
fn leaf_names(leaf: &CertificateDer<'_>) -> Result<BTreeSet<String>, LeafNamesError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(LeafNamesError::NotX509)?;
    let names = cert
        .subject_alternative_name()
        .map_err(LeafNamesError::Malformed)?
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    Ok(names
        .iter()
        .map(|name| match name {
            GeneralName::URI(uri) => (*uri).to_owned(),
            other => format!("other:{other}"),
        })
        .collect())
}

/// The site IDs of `identity`, as a set.
fn ids_of(identity: &Identity) -> BTreeSet<SpiffeId> {
    identity.ids.iter().cloned().collect()
}

/// How long until `at` (zero when past), whole seconds.
fn left(at: SystemTime) -> Duration {
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    Duration::from_secs(left.as_secs())
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// In `-1.0..1.0`.
fn jitter() -> f64 {
    fastrand::f64() * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use pimesh_identity::TrustRoot;
    use pimesh_schema::DnsLabel;

    #[test]
    fn every_name_of_a_leaf_is_listed_whatever_its_kind_or_site() {
        let site = DnsLabel::try_from("depot".to_owned()).expect("label");
        let root = TrustRoot::generate(&site, SystemTime::now()).expect("root");
        let id = pimesh_meshtls::control_id(&site).expect("id");
        let (leaf, _) = root
            .issuer
            .issue_server_leaf(
                &id,
                &["localhost".to_owned()],
                &[std::net::Ipv4Addr::LOCALHOST.into()],
                SystemTime::now(),
            )
            .expect("leaf");
        let names = leaf_names(&leaf.der).expect("names");
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(
            names.contains("spiffe://depot/svc/pimesh-control"),
            "{names:?}"
        );
        assert!(
            names
                .iter()
                .filter(|name| name.starts_with("other:"))
                .count()
                == 2,
            "{names:?}"
        );
        assert!(leaf_names(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }
}
