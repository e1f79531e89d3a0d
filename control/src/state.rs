//! What the replica serves with, and how it is (re)loaded.
//!
//! A [`Snapshot`] is immutable and replaced whole: a connection or request works with the
//! snapshot it started with. The replica is ready while it has one. Loading happens at
//! start, on SIGHUP, when an input file changes and, while the last load failed (in full
//! or in part), every few seconds (so a trust folder provisioned after the replica started
//! is picked up); a part that fails to reload keeps its previous version, so a broken file
//! never takes a serving replica down. Watching the files, and keeping the snapshot when a
//! load fails, is `pimesh_runtime::watched`'s; what is loaded and checked is this module's.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use pimesh_join::AcceptedTokens;
use pimesh_runtime::watched::{Current, Load, Outcome, Trigger, Watched};
use pimesh_schema::cluster::ClusterConfig;
use pimesh_schema::{ConfigError, DnsLabel};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::site_config;
use crate::tls::{Serving, ServingError};
use crate::tokens::{self, TokensError};
use crate::trust::{Trust, TrustError};

/// Where the replica's inputs come from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub trust_dir: PathBuf,
    pub config: PathBuf,
    /// `--site`: when given, every site config must name this site.
    pub site: Option<DnsLabel>,
}

/// Everything a request needs, consistent with itself.
///
/// Invariants: `site` is fixed for the process's life once a first snapshot exists (a
/// later config naming another site is refused); `config`, when present, is of `site`;
/// `serving` was issued from `trust` for `site`.
pub struct Snapshot {
    pub site: DnsLabel,
    /// `None`: no site config file, so no service is placed and nodes get their node
    /// identity only.
    pub config: Option<ClusterConfig>,
    /// The text `config` was parsed from, byte for byte (what discovery serves).
    pub config_text: Option<String>,
    pub trust: Arc<Trust>,
    pub serving: Arc<Serving>,
    /// The trust folder's `join.json` (empty without one).
    pub trust_tokens: Arc<AcceptedTokens>,
}

impl Snapshot {
    /// The join tokens accepted now: the site config's `[join] tokens` when it has them,
    /// else the trust folder's.
    pub fn accepted_tokens(&self) -> AcceptedTokens {
        tokens::effective(self.config.as_ref(), &self.trust_tokens)
    }

    /// One line for logs and systemd's status.
    pub fn summary(&self) -> String {
        let services = self.config.as_ref().map_or(0, |config| {
            config
                .services
                .values()
                .filter(|service| !service.nodes.is_empty())
                .count()
        });
        let config = if self.config.is_some() {
            format!("{services} placed service(s)")
        } else {
            "no site config (node identities only)".to_owned()
        };
        format!(
            "site {}, {config}, {} anchor(s)",
            self.site,
            self.trust.anchors.len()
        )
    }
}

/// Counts since start, in memory only.
#[derive(Debug, Default)]
pub struct Counters {
    pub issued: AtomicU64,
    pub refused: AtomicU64,
    /// TLS handshakes that failed: no client certificate, an untrusted one, or not TLS 1.3.
    pub handshakes_refused: AtomicU64,
}

impl Counters {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Why a part of the snapshot cannot be loaded.
#[derive(Debug)]
pub enum PartError {
    /// The site config file is unreadable or invalid.
    Config(ConfigError),
    /// The site config names another site than the one this replica serves.
    OtherSite {
        file: PathBuf,
        names: DnsLabel,
        serves: DnsLabel,
    },
    /// Neither a site config nor `--site` says which site this is.
    NoSite { file: PathBuf },
    /// The trust folder is unusable.
    Trust(TrustError),
    /// No serving certificate can be made from the trust folder.
    Serving(ServingError),
    /// The trust folder's `join.json` is unusable.
    Tokens(TokensError),
}

impl fmt::Display for PartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartError::Config(err) => write!(f, "{err}"),
            PartError::OtherSite {
                file,
                names,
                serves,
            } => write!(
                f,
                "{}: names site {names}, but this replica serves site {serves}",
                file.display()
            ),
            PartError::NoSite { file } => write!(
                f,
                "no site known: {} does not exist and no --site was given",
                file.display()
            ),
            PartError::Trust(err) => write!(f, "{err}"),
            PartError::Serving(err) => write!(f, "{err}"),
            PartError::Tokens(err) => write!(f, "{err}"),
        }
    }
}

/// The parts of a snapshot, as a failed load names what it kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    SiteConfig,
    Trust,
    /// The trust folder's `join.json`; with no previous version, none is accepted.
    JoinTokens,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::SiteConfig => "site config",
            Part::Trust => "trust",
            Part::JoinTokens => "join tokens",
        })
    }
}

/// What went wrong in the last load.
///
/// Invariant: `Kept` is never empty (a load with nothing wrong is not a problem).
#[derive(Debug)]
pub enum LoadProblem {
    /// Nothing was loaded: a part failed and there was no previous version of it.
    Failed(PartError),
    /// These parts failed and their previous versions are still in use.
    Kept(Vec<(PartError, Part)>),
}

impl fmt::Display for LoadProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadProblem::Failed(err) => write!(f, "{err}"),
            LoadProblem::Kept(parts) => {
                for (i, (err, part)) in parts.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{err} (keeping the {part} loaded before)")?;
                }
                Ok(())
            }
        }
    }
}

/// Why the replica is not ready.
#[derive(Debug)]
pub enum NotReady {
    /// No load has been attempted yet.
    NothingLoaded,
    /// The last load failed and no earlier one succeeded.
    Failed(Arc<LoadProblem>),
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotReady::NothingLoaded => f.write_str("nothing loaded yet"),
            NotReady::Failed(problem) => write!(f, "{problem}"),
        }
    }
}

/// The snapshot in use, and why the last load failed (shared: readers take a copy).
type Snapshots = Watched<Option<Arc<Snapshot>>, Arc<LoadProblem>>;

pub struct State {
    pub replica: u16,
    /// How long the leaves this replica signs live (`--leaf-lifetime`); set before the
    /// state is shared, [`pimesh_identity::LEAF_LIFETIME`] by default.
    pub leaf_lifetime: Duration,
    sources: Sources,
    /// The site config and the three trust files, watched; the one writer of `current`.
    watched: Mutex<Snapshots>,
    /// The snapshot in use (`None`: nothing loaded yet) and what went wrong in the last
    /// load, whole or in part (`None`: all of it loaded).
    current: watch::Receiver<Current<Option<Arc<Snapshot>>, Arc<LoadProblem>>>,
    pub counters: Counters,
}

impl State {
    /// A replica with nothing loaded yet: not ready until [`State::reload`] succeeds.
    pub fn new(replica: u16, sources: Sources) -> State {
        let trust = &sources.trust_dir;
        let files = vec![
            sources.config.clone(),
            trust.join("anchor.pem"),
            trust.join("issuer.pem"),
            trust.join("issuer.key"),
            trust.join(tokens::FILE),
            trust.join(crate::trust::K3S_TOKEN),
        ];
        let watched = Watched::new("site config and trust", files, None).retrying_failures();
        State {
            replica,
            leaf_lifetime: pimesh_identity::LEAF_LIFETIME,
            sources,
            current: watched.subscribe(),
            watched: Mutex::new(watched),
            counters: Counters::default(),
        }
    }

    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.current.borrow().value.clone()
    }

    /// `Ok(status)` when ready (the status names a failed reload, if any), `Err(reason)`
    /// when not.
    pub fn readiness(&self) -> Result<String, NotReady> {
        let current = self.current.borrow();
        match (&current.value, &current.problem) {
            (Some(snapshot), None) => Ok(snapshot.summary()),
            (Some(snapshot), Some(problem)) => Ok(format!(
                "{}; last reload failed: {problem}",
                snapshot.summary()
            )),
            (None, Some(problem)) => Err(NotReady::Failed(Arc::clone(problem))),
            (None, None) => Err(NotReady::NothingLoaded),
        }
    }

    /// Reads the site config and the trust folder again (`why`: for the log). Parts that
    /// fail keep their previous version; with no previous version, the replica stays (or
    /// becomes) not ready. A failure is logged when it differs from the last one.
    pub fn reload(&self, why: &str, now: SystemTime) {
        let outcome = self
            .watched()
            .reload(why, |previous| self.load(previous, now));
        self.loaded(why, outcome);
    }

    /// What `trigger` asks for: [`State::reload`] on SIGHUP; on a poll, a load when an
    /// input file changed (mtime, size, inode) since the last attempt, or when the last
    /// attempt failed in part: a supervisor swapping the issuer's certificate and key one
    /// file at a time leaves a moment where they do not match; that load keeps the last
    /// good issuer, and the next poll tries again.
    pub fn on(&self, trigger: Trigger, now: SystemTime) {
        let attempt = self
            .watched()
            .on(trigger, |previous| self.load(previous, now));
        if let Some(attempt) = attempt {
            self.loaded(attempt.trigger, attempt.outcome);
        }
    }

    fn load(
        &self,
        previous: &Option<Arc<Snapshot>>,
        now: SystemTime,
    ) -> Load<Option<Arc<Snapshot>>, Arc<LoadProblem>> {
        match assemble(&self.sources, previous.as_deref(), now) {
            Ok((snapshot, kept)) if kept.is_empty() => Load::Loaded(Some(Arc::new(snapshot))),
            Ok((snapshot, kept)) => {
                Load::Partly(Some(Arc::new(snapshot)), Arc::new(LoadProblem::Kept(kept)))
            }
            Err(err) => Load::Failed(Arc::new(LoadProblem::Failed(err))),
        }
    }

    /// A load in full is logged with what is in use; failures were, by the watched files.
    fn loaded(&self, why: &str, outcome: Outcome) {
        if outcome != Outcome::Loaded {
            return;
        }
        if let Some(snapshot) = self.snapshot() {
            info!(why, "loaded: {}", snapshot.summary());
        }
    }

    fn watched(&self) -> MutexGuard<'_, Snapshots> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps the serving certificate fresh and, while not ready, retries loading. Called
    /// every few seconds.
    pub fn tick(&self, now: SystemTime) {
        let Some(snapshot) = self.snapshot() else {
            self.reload("retry", now);
            return;
        };
        if now < snapshot.serving.renew_at {
            return;
        }
        match Serving::issue(&snapshot.trust, &snapshot.site, now) {
            Ok(serving) => {
                info!("serving certificate renewed");
                let renewed = Arc::new(Snapshot {
                    site: snapshot.site.clone(),
                    config: snapshot.config.clone(),
                    config_text: snapshot.config_text.clone(),
                    trust: Arc::clone(&snapshot.trust),
                    serving: Arc::new(serving),
                    trust_tokens: Arc::clone(&snapshot.trust_tokens),
                });
                self.watched().update(Some(renewed));
            }
            // The old certificate serves until it expires; the next tick tries again.
            Err(err) => warn!(
                "cannot renew the serving certificate (it expires at {:?}): {err}",
                snapshot.serving.not_after
            ),
        }
    }
}

/// A new snapshot from `sources`, taking from `previous` the parts that fail to load, with
/// what failed; `Err` when a part fails and there is no previous version of it.
fn assemble(
    sources: &Sources,
    previous: Option<&Snapshot>,
    now: SystemTime,
) -> Result<(Snapshot, Vec<(PartError, Part)>), PartError> {
    let mut kept = Vec::new();
    let fixed_site = previous
        .map(|snapshot| snapshot.site.clone())
        .or_else(|| sources.site.clone());
    let loaded = site_config::load(&sources.config)
        .map_err(PartError::Config)
        .and_then(|config| match (&config, &fixed_site) {
            (Some(loaded), Some(site)) if &loaded.config.site != site => {
                Err(PartError::OtherSite {
                    file: sources.config.clone(),
                    names: loaded.config.site.clone(),
                    serves: site.clone(),
                })
            }
            _ => Ok(config),
        });
    let (config, config_text) = match (loaded, previous) {
        (Ok(Some(loaded)), _) => (Some(loaded.config), Some(loaded.text)),
        (Ok(None), _) => (None, None),
        (Err(err), Some(previous)) => {
            kept.push((err, Part::SiteConfig));
            (previous.config.clone(), previous.config_text.clone())
        }
        (Err(err), None) => return Err(err),
    };
    let site = fixed_site
        .or_else(|| config.as_ref().map(|config| config.site.clone()))
        .ok_or_else(|| PartError::NoSite {
            file: sources.config.clone(),
        })?;
    let fresh = Trust::load(&sources.trust_dir)
        .map_err(PartError::Trust)
        .and_then(|trust| {
            let serving = Serving::issue(&trust, &site, now).map_err(PartError::Serving)?;
            Ok((Arc::new(trust), Arc::new(serving)))
        });
    let (trust, serving) = match (fresh, previous) {
        (Ok(pair), _) => pair,
        (Err(err), Some(previous)) => {
            kept.push((err, Part::Trust));
            (Arc::clone(&previous.trust), Arc::clone(&previous.serving))
        }
        (Err(err), None) => return Err(err),
    };
    // A broken join.json never makes a replica unready: it keeps the list it had (none,
    // at the first load), and the status and the log name the file and the fault.
    let trust_tokens = match (tokens::load(&sources.trust_dir), previous) {
        (Ok(tokens), _) => Arc::new(tokens),
        (Err(err), previous) => {
            kept.push((PartError::Tokens(err), Part::JoinTokens));
            previous.map_or_else(Default::default, |p| Arc::clone(&p.trust_tokens))
        }
    };
    Ok((
        Snapshot {
            site,
            config,
            config_text,
            trust,
            serving,
            trust_tokens,
        },
        kept,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pimesh_identity::TrustRoot;
    use std::path::Path;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    fn write_trust(dir: &Path, site: &str) {
        let root = TrustRoot::generate(&label(site), SystemTime::now()).expect("root");
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join("anchor.pem"), root.anchor.cert_pem()).expect("anchor");
        std::fs::write(dir.join("issuer.pem"), root.issuer.cert_pem()).expect("issuer");
        std::fs::write(dir.join("issuer.key"), root.issuer.key_pem()).expect("key");
    }

    fn state(dir: &Path, site: Option<&str>) -> State {
        State::new(
            1,
            Sources {
                trust_dir: dir.join("trust"),
                config: dir.join("cluster.toml"),
                site: site.map(label),
            },
        )
    }

    const WEB_ON_PI_A: &str =
        "site = \"depot-7\"\n[services.web]\nport = 8080\nnodes = [\"pi-a\"]\n";

    #[test]
    fn without_a_site_or_a_trust_folder_the_replica_is_not_ready_and_says_why() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = state(dir.path(), None);
        let now = SystemTime::now();
        state.reload("start", now);
        let reason = state.readiness().expect_err("no site").to_string();
        assert!(reason.contains("no site known"), "{reason}");

        std::fs::write(dir.path().join("cluster.toml"), WEB_ON_PI_A).expect("config");
        state.tick(now);
        let reason = state.readiness().expect_err("no trust").to_string();
        assert!(reason.contains("anchor.pem"), "{reason}");

        write_trust(&dir.path().join("trust"), "depot-7");
        state.tick(now);
        let status = state.readiness().expect("ready");
        assert!(
            status.contains("site depot-7, 1 placed service(s)"),
            "{status}"
        );
    }

    #[test]
    fn a_missing_config_with_a_site_flag_is_ready_with_node_identities_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_trust(&dir.path().join("trust"), "depot-7");
        let state = state(dir.path(), Some("depot-7"));
        state.reload("start", SystemTime::now());
        let status = state.readiness().expect("ready");
        assert!(status.contains("node identities only"), "{status}");
    }

    #[test]
    fn a_broken_reload_keeps_what_was_loaded_and_the_site_never_changes() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_trust(&dir.path().join("trust"), "depot-7");
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, WEB_ON_PI_A).expect("config");
        let state = state(dir.path(), None);
        let now = SystemTime::now();
        state.reload("start", now);
        let first = state.snapshot().expect("loaded");

        std::fs::write(&config, "site = \"depot-7\"\nfrob = 1\n").expect("broken");
        std::fs::remove_file(dir.path().join("trust/issuer.key")).expect("rm");
        state.reload("SIGHUP", now);
        let status = state.readiness().expect("still ready");
        assert!(
            status.contains("frob") && status.contains("issuer.key"),
            "{status}"
        );
        let kept = state.snapshot().expect("kept");
        assert_eq!(kept.config, first.config);
        assert!(Arc::ptr_eq(&kept.trust, &first.trust));

        std::fs::write(&config, WEB_ON_PI_A.replace("depot-7", "depot-8")).expect("other");
        state.reload("SIGHUP", now);
        let status = state.readiness().expect("still ready");
        assert!(status.contains("names site depot-8"), "{status}");
        assert_eq!(state.snapshot().expect("kept").site, label("depot-7"));
    }

    #[test]
    fn the_serving_certificate_is_renewed_from_two_thirds_of_its_life() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_trust(&dir.path().join("trust"), "depot-7");
        let state = state(dir.path(), Some("depot-7"));
        let now = SystemTime::now();
        state.reload("start", now);
        let first = state.snapshot().expect("loaded");
        state.tick(now);
        let same = state.snapshot().expect("loaded");
        assert!(Arc::ptr_eq(&first.serving, &same.serving), "not due yet");
        state.tick(first.serving.renew_at);
        let renewed = state.snapshot().expect("loaded");
        assert!(!Arc::ptr_eq(&first.serving, &renewed.serving));
        assert!(renewed.serving.not_after > first.serving.not_after);
        assert!(Arc::ptr_eq(&first.trust, &renewed.trust));
    }
}
