//! Over-the-air configuration: the node's side of `pimesh-central`.
//!
//! The node long-polls its central server for revisions newer than the ones it has seen,
//! verifies each (size, shape, Ed25519 signature with the seed's key, site, revision
//! order, configuration validity), stores it, makes it the active `cluster.toml` in one
//! atomic step, reloads or restarts only the units that read what changed, and then
//! holds a health gate. Healthy: the revision is committed (or, for `try` revisions, kept
//! on trial until a newer revision confirms it). Unhealthy: the node goes back to the
//! committed revision by itself. Every outcome is reported to the central server through
//! an on-disk outbox that survives outages and restarts; the node's facts (K3s, certificate
//! dates, mesh traffic) refresh the last outcome from memory whenever they change, also
//! after a restart.
//!
//! Crash safety comes from ordering and the [`journal`]: the journal records a pending
//! revision before the active file changes and drops it only after the outcome is queued
//! for the central server; at start, a pending entry is finished (gate again, then commit
//! or roll back), so a power cut anywhere leaves the old or the new revision, complete.

pub mod central_client;
mod certificates;
mod gate;
mod journal;
mod outbox;
mod outcome;
mod revisions;
mod rollout;
pub mod traffic;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pimesh_revision::path::ConfigQuery;
use pimesh_revision::{
    CertificateDates, K3sSummary, MeshTraffic, Mode, Rejection, Verified, Verifier,
};
use pimesh_runtime::backoff::{Backoff, Retry};
use pimesh_schema::cluster::ClusterConfig;
use pimesh_schema::{Central, DnsLabel, OtaSettings, Seed};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::credential::{CredentialError, CredentialFiles};
use crate::paths::NodePaths;
use crate::status::{OtaReport, OtaState, StatusHandle};
use crate::trust::{TrustError, TrustFiles};
use crate::units::heal::DisruptionGuard;
use crate::units::managed_set::ManagedSet;
use crate::units::systemd::Systemd;
use central_client::{CentralClient, Poll, SetupError};
use gate::Gate;
use journal::{Journal, JournalFile, Pending, Phase};
use outbox::Outbox;
use outcome::{ApplyError, Outcome, Rollback};
use revisions::{sha256_hex, Revisions};

/// Waits before reaching the central server again after failures in a row: from 1 s,
/// doubling up to 15 s.
const RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(15));
/// How long to wait before asking again after the server offered something refused that
/// did not move the poll position (garbage, a replay).
const REFUSED_PAUSE: Duration = Duration::from_secs(30);

/// Everything the OTA client needs from the rest of the supervisor.
pub struct OtaContext {
    pub settings: OtaSettings,
    /// The units the node keeps; they follow the active site configuration.
    pub units: Arc<ManagedSet>,
    pub site: DnsLabel,
    pub node: DnsLabel,
    pub central: Central,
    /// `<state>/ota`: journal, stored revisions, outbox.
    pub ota_dir: PathBuf,
    pub credential: CredentialFiles,
    /// The site's issuer, on the node that holds it: signs the node's own request.
    pub trust: TrustFiles,
    /// `/etc/pimesh/cluster.toml`.
    pub active_config: PathBuf,
    pub status: StatusHandle,
    /// What may hold back a restart that takes K3s down (the keeper's guard).
    pub guard: Arc<dyn DisruptionGuard>,
}

impl OtaContext {
    /// The OTA client's context on this node, when the seed names a central server and
    /// the node's name is usable in an identity (logged when it is not).
    pub fn for_node(
        paths: &NodePaths,
        seed: &Seed,
        node_name: &str,
        settings: OtaSettings,
        units: Arc<ManagedSet>,
        status: StatusHandle,
        guard: Arc<dyn DisruptionGuard>,
    ) -> Option<OtaContext> {
        let central = seed.central.clone()?;
        let node = match DnsLabel::try_from(node_name.to_owned()) {
            Ok(node) => node,
            Err(err) => {
                warn!(node = %node_name, %err, "the node name is not usable in an identity; no OTA configuration");
                return None;
            }
        };
        Some(OtaContext {
            settings,
            units,
            site: seed.site.clone(),
            node,
            central,
            ota_dir: paths.ota_dir(),
            credential: CredentialFiles::on_node(paths),
            trust: TrustFiles::on_node(paths),
            active_config: paths.active_site_config(),
            guard,
            status,
        })
    }
}

/// Runs the OTA client for the life of the supervisor.
pub async fn run(context: OtaContext) {
    let mut report = OtaReport {
        state: OtaState::WaitingForCredential,
        central: Some(
            context
                .central
                .url
                .as_url()
                .as_str()
                .trim_end_matches('/')
                .to_owned(),
        ),
        ..OtaReport::default()
    };
    let client = loop {
        match connect(&context) {
            Ok(Some(client)) => break client,
            Ok(None) => {
                report.detail = Some(format!(
                    "waiting for the node certificate {}: sign {} with `pimeshctl node sign`",
                    context.credential.chain().display(),
                    context.credential.request().display()
                ));
                report.last_error = None;
            }
            Err(err) => {
                warn!("{err}");
                report.last_error = Some(err.to_string());
            }
        }
        publish(&context.status, &report);
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    report.detail = None;
    let client = Arc::new(client);
    let wake = Arc::new(Notify::new());
    let outbox = Outbox::new(&context.ota_dir);
    // Refreshed with the node's facts at the first step, so that the central server's
    // view follows a node that restarted with nothing to apply.
    report.last_outcome = outbox.last_outcome();
    tokio::spawn(deliver_reports(
        Arc::clone(&client),
        outbox.clone(),
        Arc::clone(&wake),
        context.status.clone(),
    ));
    let journal_file = JournalFile::new(&context.ota_dir);
    let journal = journal_file.load().unwrap_or_else(|err| {
        error!("{err}; starting from an empty journal (the next revision applies in full)");
        Journal::default()
    });
    let mut verifier = Verifier::new(context.site.clone(), context.central.public_key.clone());
    verifier.max_bytes = context.settings.max_bundle_bytes;
    let mut ota = Ota {
        revisions: Revisions::new(&context.ota_dir, context.active_config.clone()),
        context,
        client,
        journal_file,
        journal,
        verifier,
        outbox,
        wake,
        report,
        bus: None,
        last_refused: None,
        retry: Retry::new(RETRY),
        facts_reported: NodeFacts::default(),
    };
    ota.recover().await;
    loop {
        ota.step().await;
    }
}

/// Why the OTA client cannot reach its central server yet.
#[derive(Debug)]
enum ConnectError {
    /// The node credential cannot be made or read.
    Credential(CredentialError),
    /// The node's own issuer cannot sign its credential.
    SelfEnroll(TrustError),
    Client(SetupError),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Credential(err) => err.fmt(f),
            ConnectError::SelfEnroll(err) => err.fmt(f),
            ConnectError::Client(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Credential(err) => err.source(),
            ConnectError::SelfEnroll(err) => err.source(),
            ConnectError::Client(err) => Some(err),
        }
    }
}

/// The client, once the node has its certificate.
fn connect(context: &OtaContext) -> Result<Option<CentralClient>, ConnectError> {
    let credential = &context.credential;
    credential
        .ensure_request(&context.site, &context.node)
        .map_err(ConnectError::Credential)?;
    context
        .trust
        .self_enroll(credential, &context.site, &context.node)
        .map_err(ConnectError::SelfEnroll)?;
    let Some(credential) = credential.load().map_err(ConnectError::Credential)? else {
        return Ok(None);
    };
    CentralClient::new(
        &context.central,
        &context.site,
        &credential,
        context.settings.long_poll_wait,
    )
    .map(Some)
    .map_err(ConnectError::Client)
}

fn publish(status: &StatusHandle, report: &OtaReport) {
    let report = report.clone();
    status.update(|status| {
        let queued = status.ota.queued_reports;
        status.ota = report;
        status.ota.queued_reports = queued;
    });
}

/// Sends waiting reports, oldest first, whenever there are some and the server answers.
async fn deliver_reports(
    client: Arc<CentralClient>,
    outbox: Outbox,
    wake: Arc<Notify>,
    status: StatusHandle,
) {
    let mut retry = Retry::new(RETRY);
    loop {
        let queued = outbox.len();
        status.update(|status| status.ota.queued_reports = queued);
        let Some(next) = outbox.next() else {
            wake.notified().await;
            continue;
        };
        match client.send_report(next.report()).await {
            Ok(_) => {
                outbox.delivered(&next);
                retry.reset();
            }
            Err(err) => {
                warn!(%err, queued, "cannot deliver a report; keeping it for later");
                tokio::time::sleep(retry.next_delay(0)).await;
            }
        }
    }
}

struct Ota {
    context: OtaContext,
    client: Arc<CentralClient>,
    journal_file: JournalFile,
    journal: Journal,
    revisions: Revisions,
    verifier: Verifier,
    outbox: Outbox,
    wake: Arc<Notify>,
    report: OtaReport,
    bus: Option<Systemd>,
    /// The SHA-256 of the last refused document, so that one bad offer is reported once.
    last_refused: Option<String>,
    /// Failed attempts in a row to reach the central server, and the wait before the next.
    retry: Retry,
    /// K3s's summary, the certificate dates and the mesh traffic in the last report
    /// queued (none after a start): when the node's differ at the next step, the last
    /// outcome goes out again with the new ones.
    facts_reported: NodeFacts,
}

impl Ota {
    /// One long-poll and what follows from it; also ends a trial whose window passed.
    async fn step(&mut self) {
        self.report_facts_change();
        if let Some(until) = self.trial_deadline() {
            if until <= Instant::now() {
                let window = humantime::format_duration(self.context.settings.try_window);
                self.roll_back(
                    Rollback::Unconfirmed,
                    format!("not confirmed by a newer revision within {window}"),
                )
                .await;
                return;
            }
        }
        self.set_state();
        let wait = self.context.settings.long_poll_wait;
        let query = ConfigQuery {
            after: self.journal.poll_after,
            wait,
            trial: self.trial_revision(),
        };
        let poll = self.client.poll(query, self.verifier.max_bytes);
        let answer = match self.trial_deadline() {
            Some(until) => tokio::select! {
                answer = poll => answer,
                () = tokio::time::sleep_until(until) => return,
            },
            None => poll.await,
        };
        match answer {
            Ok(Poll::Nothing) => self.reached(),
            Ok(Poll::TrialStopped(state)) => {
                self.reached();
                let Some(trial) = self.trial_revision() else {
                    return;
                };
                warn!(revision = trial, %state, "the trial revision's rollout stopped at the central server; going back");
                self.roll_back(
                    Rollback::Unconfirmed,
                    format!("the rollout of revision {trial} was {state} at the central server"),
                )
                .await;
            }
            Ok(Poll::TooLarge { size }) => {
                self.reached();
                let max = self.verifier.max_bytes;
                self.refuse(
                    &format!("too-large:{size}"),
                    None,
                    Rejection::TooLarge { size, max },
                )
                .await;
            }
            Ok(Poll::Offered(bytes)) => {
                self.reached();
                let current =
                    (self.journal.highest_verified > 0).then_some(self.journal.highest_verified);
                match self.verifier.verify(&bytes, current) {
                    Ok(verified) => self.apply(verified, &bytes).await,
                    Err(rejection) => {
                        let claimed = claimed_revision(&bytes);
                        self.refuse(&sha256_hex(&bytes), claimed, rejection).await;
                    }
                }
            }
            Err(err) => {
                warn!(%err, "central server unreachable");
                self.report.last_error = Some(err.to_string());
                self.publish();
                let wait = self.retry.next_delay(0);
                self.pause(wait).await;
            }
        }
    }

    fn reached(&mut self) {
        self.retry.reset();
        let replica = self.client.current_url();
        let moved = self.report.central.as_deref() != Some(replica);
        if moved {
            self.report.central = Some(replica.to_owned());
        }
        if self.report.last_error.take().is_some() || moved {
            self.publish();
        }
    }

    fn trial_deadline(&self) -> Option<Instant> {
        match &self.journal.pending {
            Some(Pending {
                phase: Phase::Trying { until_ms },
                ..
            }) => {
                let left = until_ms.saturating_sub(unix_millis());
                Some(Instant::now() + Duration::from_millis(left))
            }
            _ => None,
        }
    }

    /// The revision on trial, if any.
    fn trial_revision(&self) -> Option<u64> {
        match &self.journal.pending {
            Some(Pending {
                revision,
                phase: Phase::Trying { .. },
                ..
            }) => Some(*revision),
            _ => None,
        }
    }

    /// Sleeps for `duration`, but not past the end of a trial.
    async fn pause(&self, duration: Duration) {
        let mut until = Instant::now() + duration;
        if let Some(trial) = self.trial_deadline() {
            until = until.min(trial);
        }
        tokio::time::sleep_until(until).await;
    }

    /// The revision the node runs now: on trial, or committed.
    fn running(&self) -> Option<u64> {
        self.trial_revision().or(self.journal.committed)
    }

    /// A refused offer: reported once, never applied, and not asked for again.
    async fn refuse(&mut self, fingerprint: &str, claimed: Option<u64>, rejection: Rejection) {
        let repeated = self.last_refused.as_deref() == Some(fingerprint);
        if !repeated {
            let outcome = Outcome::Refused {
                running: self.running(),
                offered: claimed,
                rejection,
            };
            warn!(detail = %outcome.detail(), "revision refused; the current configuration stays");
            self.last_refused = Some(fingerprint.to_owned());
            self.queue(&outcome);
        }
        match claimed {
            Some(n) if n > self.journal.poll_after => {
                self.journal.poll_after = n;
                self.save();
            }
            _ => self.pause(REFUSED_PAUSE).await,
        }
    }

    async fn apply(&mut self, verified: Verified, bytes: &[u8]) {
        let revision = verified.signed.revision;
        let mode = verified.signed.mode;
        info!(revision, ?mode, "applying a new revision");
        if let Err(err) = self.revisions.store(revision, bytes) {
            // Nothing changed yet; the next poll offers it again.
            error!("{err}");
            self.report.last_error = Some(err.to_string());
            self.publish();
            self.pause(RETRY.cap()).await;
            return;
        }
        self.journal.highest_verified = revision;
        self.journal.poll_after = self.journal.poll_after.max(revision);
        self.journal.pending = Some(Pending {
            revision,
            mode,
            phase: Phase::Applying,
        });
        self.save();
        let from = self.revisions.active_text().ok().flatten();
        self.finish_apply(revision, mode, &verified.signed.config, from.as_deref())
            .await;
    }

    /// From an `Applying` journal entry: activate, touch, gate, then commit, trial or
    /// roll back. `from` is the configuration the units run now (`None`: unknown).
    async fn finish_apply(&mut self, revision: u64, mode: Mode, config: &str, from: Option<&str>) {
        self.set_state();
        match self.switch_to(Some(config), from).await {
            Ok(()) => match mode {
                Mode::Apply => self.commit(revision),
                Mode::Try => self.start_trial(revision),
            },
            Err(reason) => {
                warn!(revision, %reason, "revision unhealthy; rolling back");
                self.roll_back(Rollback::Unhealthy, reason.to_string())
                    .await;
            }
        }
    }

    fn commit(&mut self, revision: u64) {
        let previous = self.journal.committed;
        self.queue(&Outcome::Applied { revision });
        self.journal.committed = Some(revision);
        self.journal.pending = None;
        self.save();
        let keep: Vec<u64> = [Some(revision), previous].into_iter().flatten().collect();
        self.revisions.prune(&keep);
        info!(revision, "revision committed");
        self.set_state();
    }

    fn start_trial(&mut self, revision: u64) {
        let window = self.context.settings.try_window;
        let until_ms =
            unix_millis().saturating_add(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
        self.journal.pending = Some(Pending {
            revision,
            mode: Mode::Try,
            phase: Phase::Trying { until_ms },
        });
        self.save();
        self.queue(&Outcome::OnTrial { revision, window });
        let window = humantime::format_duration(window);
        info!(revision, %window, "trial revision healthy; on trial");
        self.set_state();
    }

    /// Goes back to the committed revision and reports `outcome` with `reason`.
    async fn roll_back(&mut self, outcome: Rollback, reason: String) {
        let Some(pending) = self.journal.pending.clone() else {
            return;
        };
        self.journal.pending = Some(Pending {
            phase: Phase::RollingBack {
                outcome,
                reason: reason.clone(),
            },
            ..pending.clone()
        });
        self.save();
        self.set_state();
        let target = match self.journal.committed {
            Some(committed) => match self.revisions.load(committed, &self.verifier) {
                Ok(signed) => Some(signed.config),
                Err(err) => {
                    // Without the committed revision there is nothing whole to go back
                    // to: keep what runs and say so loudly.
                    error!(%err, "cannot roll back: the committed revision is unreadable");
                    self.report.last_error = Some(format!("cannot roll back: {err}"));
                    self.publish();
                    return;
                }
            },
            None => None,
        };
        let from = self.revisions.active_text().ok().flatten();
        let still_failing = self
            .switch_to(target.as_deref(), from.as_deref())
            .await
            .err();
        if let Some(err) = &still_failing {
            error!(%err, "the previous revision is not healthy either");
        }
        let went_back = Outcome::WentBack {
            rollback: outcome,
            revision: pending.revision,
            running: self.journal.committed,
            reason,
            still_failing,
        };
        self.queue(&went_back);
        self.journal.pending = None;
        self.save();
        info!(
            outcome = outcome.state().as_str(),
            revision = pending.revision,
            "back on the committed revision"
        );
        self.set_state();
    }

    /// Makes `target` the active configuration, touches the units that read what
    /// changed since `from`, and holds the health gate.
    async fn switch_to(
        &mut self,
        target: Option<&str>,
        from: Option<&str>,
    ) -> Result<(), ApplyError> {
        let deadline = Instant::now() + self.context.settings.health_deadline;
        self.revisions
            .activate(target)
            .map_err(ApplyError::Activate)?;
        self.report.active_sha256 = target.map(|text| sha256_hex(text.as_bytes()));
        self.publish();
        let parse = |text: &str| ClusterConfig::parse(self.revisions.active_path(), text).ok();
        let target_config = target.and_then(parse);
        self.context.units.follow(target_config.as_ref());
        let units = self.context.units.current();
        let plan = rollout::plan(
            &units,
            from.and_then(parse).as_ref(),
            target_config.as_ref(),
        );
        let bus = match self.bus.take() {
            Some(bus) => bus,
            None => Systemd::connect_unsubscribed()
                .await
                .map_err(ApplyError::Bus)?,
        };
        if let Err(err) = rollout::touch(&bus, &plan, self.context.guard.as_ref(), deadline).await {
            self.bus = Some(bus);
            return Err(ApplyError::Touch(err));
        }
        // A restart that waited its turn (K3s) may have used the deadline: the gate then
        // gets a whole one of its own.
        let deadline = if plan
            .iter()
            .any(|(_, touch)| *touch == rollout::Touch::Restart)
        {
            deadline.max(Instant::now() + self.context.settings.health_deadline)
        } else {
            deadline
        };
        let gate = Gate {
            units: &units,
            proxy_config_url: &self.context.settings.proxy_config_url,
            proxy_probe_url: &self.context.settings.proxy_probe_url,
            expected_sha256: target.map(|text| sha256_hex(text.as_bytes())),
            settle: self.context.settings.settle,
        };
        // After a failed gate the bus connection is dropped, in case it is what broke; the
        // next use makes a new one.
        gate.pass(&bus, deadline)
            .await
            .map_err(ApplyError::Unhealthy)?;
        self.bus = Some(bus);
        Ok(())
    }

    /// Finishes whatever the journal says was under way when the supervisor stopped.
    async fn recover(&mut self) {
        self.report.active_sha256 = self
            .revisions
            .active_text()
            .ok()
            .flatten()
            .map(|text| sha256_hex(text.as_bytes()));
        let Some(pending) = self.journal.pending.clone() else {
            self.restore_committed().await;
            self.set_state();
            return;
        };
        info!(revision = pending.revision, phase = ?pending.phase, "finishing an interrupted change");
        match pending.phase {
            Phase::Applying => match self.revisions.load(pending.revision, &self.verifier) {
                // The units may or may not have seen the new file: touch them all.
                Ok(signed) => {
                    self.finish_apply(pending.revision, pending.mode, &signed.config, None)
                        .await;
                }
                Err(err) => self.roll_back(Rollback::Unhealthy, err.to_string()).await,
            },
            Phase::Trying { .. } => match self.revisions.load(pending.revision, &self.verifier) {
                Ok(signed) => {
                    if self.revisions.active_text().ok().flatten().as_deref()
                        != Some(signed.config.as_str())
                    {
                        if let Err(reason) = self.switch_to(Some(&signed.config), None).await {
                            self.roll_back(Rollback::Unhealthy, reason.to_string())
                                .await;
                        }
                    }
                }
                Err(err) => self.roll_back(Rollback::Unhealthy, err.to_string()).await,
            },
            Phase::RollingBack { outcome, reason } => self.roll_back(outcome, reason).await,
        }
        self.set_state();
    }

    /// With nothing pending, the active file must hold the committed revision; anything
    /// else (an edit by hand) is put back.
    async fn restore_committed(&mut self) {
        let target = match self.journal.committed {
            Some(committed) => match self.revisions.load(committed, &self.verifier) {
                Ok(signed) => Some(signed.config),
                Err(err) => {
                    error!(%err, "the committed revision is unreadable; keeping the active file");
                    return;
                }
            },
            None => return,
        };
        let active = self.revisions.active_text().ok().flatten();
        if active == target {
            return;
        }
        warn!(file = %self.revisions.active_path().display(), "the active configuration differs from the committed revision; restoring it");
        if let Err(err) = self.switch_to(target.as_deref(), active.as_deref()).await {
            error!(%err, "the committed revision is not healthy after restoring it");
        }
    }

    /// Queues the report of `outcome` for the central server and shows it in the status.
    fn queue(&mut self, outcome: &Outcome) {
        self.queue_report(outcome.report(), Kind::Outcome);
    }

    /// What the node's reports say of it beside the outcome, now.
    fn facts(&self) -> NodeFacts {
        NodeFacts {
            k3s: k3s_summary(&self.context.status),
            certificates: certificates::dates(&self.context.credential, &self.context.trust),
            traffic: measured_traffic(&self.context.status),
        }
    }

    /// Sends the last report again when K3s's summary, a certificate date or the mesh
    /// traffic changed since it was queued (once per step: within one long-poll; the
    /// traffic changes at most once per measurement), so that the central server's view
    /// of the node follows it.
    fn report_facts_change(&mut self) {
        let now = self.facts();
        if now == self.facts_reported {
            return;
        }
        if let Some(last) = self.report.last_outcome.clone() {
            let node_days = now
                .certificates
                .and_then(|dates| dates.node)
                .map(|at| certificates::days_left(at, SystemTime::now()));
            if now.k3s != self.facts_reported.k3s
                || now.certificates != self.facts_reported.certificates
            {
                info!(k3s = ?now.k3s, node_certificate_days_left = ?node_days, "K3s or a certificate changed since the last report; reporting again");
            } else {
                // The traffic alone: routine, not worth a journal line at info.
                debug!("the mesh traffic changed since the last report; reporting again");
            }
            self.queue_report(last, Kind::Refresh);
        }
    }

    /// Queues `report`, with the node's K3s summary, certificate dates and mesh traffic,
    /// and shows it in the status.
    fn queue_report(&mut self, mut report: pimesh_revision::NodeReport, kind: Kind) {
        let facts = self.facts();
        report.k3s = facts.k3s.clone();
        report.certificates = facts.certificates;
        report.traffic = facts.traffic.clone();
        self.facts_reported = facts;
        match kind {
            Kind::Outcome => {
                if let Err(err) = self.outbox.push(&report) {
                    error!(%err, "cannot queue a report on disk; keeping it in memory");
                }
            }
            Kind::Refresh => self.outbox.refresh(report.clone()),
        }
        self.report.last_outcome = Some(report);
        self.wake.notify_one();
        self.publish();
    }

    fn save(&mut self) {
        if let Err(err) = self.journal_file.store(&self.journal) {
            error!(%err, "cannot write the OTA journal");
            self.report.last_error = Some(err.to_string());
        }
    }

    fn set_state(&mut self) {
        self.report.state = match &self.journal.pending {
            None => OtaState::Idle,
            Some(Pending { phase, .. }) => match phase {
                Phase::Applying => OtaState::Applying,
                Phase::Trying { .. } => OtaState::Trying,
                Phase::RollingBack { .. } => OtaState::RollingBack,
            },
        };
        self.report.committed = self.journal.committed;
        self.report.pending = self.journal.pending.as_ref().map(|p| p.revision);
        self.report.highest_verified = self.journal.highest_verified;
        self.publish();
    }

    fn publish(&self) {
        publish(&self.context.status, &self.report);
    }
}

/// Why a report is queued (`outbox`: an outcome waits on disk, a refresh in memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Something happened to a revision.
    Outcome,
    /// The last outcome again, with the node's facts as they are now.
    Refresh,
}

/// What a report says of the node beside its outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NodeFacts {
    k3s: Option<K3sSummary>,
    certificates: Option<CertificateDates>,
    traffic: Option<MeshTraffic>,
}

/// The mesh traffic last measured (`traffic::keep_measuring`).
fn measured_traffic(status: &StatusHandle) -> Option<MeshTraffic> {
    match status.0.read() {
        Ok(guard) => guard.traffic.clone(),
        Err(poisoned) => poisoned.into_inner().traffic.clone(),
    }
}

/// The node's K3s in one line, while K3s runs here (it has a unit).
fn k3s_summary(status: &StatusHandle) -> Option<K3sSummary> {
    let status = match status.0.read() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    let k3s = &status.k3s;
    k3s.placement.unit.as_ref()?;
    Some(K3sSummary {
        role: k3s.placement.role?.to_owned(),
        ready: k3s.ready == Some(true),
        version: k3s.presence.version.clone(),
    })
}

/// The revision number a document claims, read without trusting it.
fn claimed_revision(bytes: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()?
        .get("revision")?
        .as_u64()
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
