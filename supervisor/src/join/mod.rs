//! Plug-in join: how a node whose seed holds nothing but `site`, `role = "join"` and a
//! join token becomes a node of its site, with no step on the operator's side
//! (the protocol is `pimesh_join`'s; the replicas' side is in `pimesh-control`).
//!
//! One round: wait for a sane clock ([`clock`]); find candidates ([`discover`]: the
//! seed's `servers`, else mDNS); for each replica of each candidate fetch the bundle and
//! check the pin, then post the join over the pinned connection ([`exchange`]); store the
//! answer; on a server node fetch the site issuer with the new certificate. Rounds repeat
//! with backoff until one succeeds; a refusal the site means for good (wrong or expired
//! token, another site) is shown as `refused` and retried slowly, since the operator may
//! publish a token that makes it right.
//!
//! A join stores the anchors, then its [`record`], then `node.pem` last: a certificate
//! without a record is one the operator put there by hand (`pimeshctl node sign`), and a
//! node given one while it looks for servers stops joining and runs as a hand-enrolled
//! node (see `plan`).
//!
//! Invariants (a power cut at any instant leaves one of these states, each of which the
//! next start completes): nothing new; a key and request without certificate (the join
//! retries with the same key); the anchors and the record without `node.pem` (the join
//! retries with the same key, which the site allows); the certificate without the issuer
//! on a server node (the issuer is fetched again). One key, one certificate, one name.

pub mod announce;
pub mod clock;
pub mod discover;
pub mod exchange;
mod in_touch;
pub mod lease;
mod mdns;
pub mod plan;
mod reach;
pub mod record;
mod relocate;
mod site_role;
pub mod time;
mod trust_sync;

pub use site_role::SiteRole;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pimesh_join::{JoinAnswer, JoinRequest, Role};
use pimesh_meshtls::{Credential, SiteTrust};
use pimesh_runtime::backoff::{Backoff, Jitter, Retry};
use pimesh_schema::{DnsLabel, JoinToken};
use tracing::{info, warn};

use crate::credential::CredentialFiles;
use crate::join::discover::Candidate;
use crate::join::exchange::{ExchangeError, PinnedBundle, Replica};
use crate::join::record::{JoinRecord, Via};
use crate::status::StatusHandle;
use crate::trust::TrustFiles;

/// Pauses between rounds: 1 s doubling to 8 s, drawn in the upper three quarters. Short,
/// because a board is usually plugged in beside servers that are still starting; a round
/// costs a few small requests (and, without the seed's servers, a 3 s mDNS browse).
const ROUNDS: Backoff =
    Backoff::new(Duration::from_secs(1), Duration::from_secs(8)).with_jitter(Jitter::QUARTER);

/// Called once the node holds its certificate, and again once a server node holds the
/// issuer: the managed set re-places the units.
pub type OnJoined = Box<dyn Fn(&JoinRecord, bool) + Send + Sync>;

/// Called when the operator enrolled the node by hand while it looked for servers: the
/// managed set runs the node's units as a hand-enrolled node's.
pub type OnManual = Box<dyn Fn() + Send + Sync>;

/// Everything a join needs, fixed for its life.
pub struct JoinContext {
    pub site: DnsLabel,
    pub node: DnsLabel,
    pub token: JoinToken,
    /// The seed's `servers` (an override of mDNS when not empty).
    pub seed_servers: Vec<String>,
    /// Whether to browse mDNS when the seed lists no server.
    pub mdns: bool,
    /// The seed's `mdns_interfaces` (`None`: every interface).
    pub mdns_interfaces: Option<Vec<pimesh_schema::InterfaceName>>,
    pub credential: CredentialFiles,
    pub trust: TrustFiles,
    /// `state.json` ([`record`]).
    pub record_file: PathBuf,
    /// Where the site's K3s token from the answer is kept (`crate::k3s::token`).
    pub k3s_token_file: PathBuf,
    pub clock: clock::Clock,
    /// When the supervisor started (the lease grace, [`lease::LEASE_GRACE`], counts from
    /// it).
    pub started: std::time::Instant,
    pub status: StatusHandle,
    pub on_joined: OnJoined,
    pub on_manual: OnManual,
    /// The proxy's `/config` (the supervisor config's `[ota] proxy_config_url`): the
    /// control replicas the running proxy knows.
    pub proxy_config_url: pimesh_schema::ProbeUrl,
}

impl JoinContext {
    /// The site's server nodes announced on the LAN now ([`discover::browse`] with the
    /// seed's site, the token's pin and the seed's interfaces), heard as `listen` says.
    async fn browse(
        &self,
        listen: discover::Listen,
    ) -> Result<Vec<Candidate>, discover::BrowseError> {
        discover::browse(
            &self.site,
            self.token.anchor_sha256(),
            self.mdns_interfaces.as_deref(),
            listen,
        )
        .await
    }
}

/// Runs the join to its end — once the node holds its certificate and, on a server node,
/// the site issuer — and then keeps the site's servers within reach ([`relocate`]) and
/// follows the site's trust: the newest issuer on a server node, a node certificate of the
/// current issuer on an agent ([`trust_sync`]);
/// returns once the operator enrolled the node by hand.
pub async fn run(context: JoinContext) {
    let context = Arc::new(context);
    let mut retry = Retry::new(ROUNDS);
    loop {
        context.clock.wait_until_sane(&context.status).await;
        let addresses = lease::own_ipv4(context.mdns_interfaces.as_deref());
        match round(&context).await {
            Ok(Finished::Joined) => {
                tokio::join!(relocate::run(&context), trust_sync::run(&context));
                return;
            }
            Ok(Finished::ByHand) => {
                info!("a node certificate was put here by hand: the node stops joining by itself");
                context.status.update(|status| {
                    status.join.state = "manual";
                    status.join.last_error = None;
                });
                (context.on_manual)();
                return;
            }
            Err(err) => {
                let state = if err.is_final() {
                    "refused"
                } else {
                    "discovering"
                };
                warn!(error = %err, "join round failed");
                context.status.update(|status| {
                    status.join.state = state;
                    status.join.last_error = Some(err.to_string());
                });
            }
        }
        let pause = retry.next_delay(fastrand::u64(..));
        if pause_between_rounds(&context, pause, &addresses).await {
            // A new address is a new start: the servers may need a moment to hear of it.
            retry.reset();
        }
    }
}

/// How often a pause between rounds looks for a certificate put there by hand and for a
/// change of the node's addresses.
const PAUSE_CHECK: Duration = Duration::from_millis(500);

/// Waits `pause`, or less: a node the operator enrolled by hand stops joining (and runs
/// its units) within [`PAUSE_CHECK`], not a round later; and a node whose IPv4 addresses
/// on the site LAN differ from `addresses`, read before the round (its DHCP lease came:
/// boards that boot together wait for one, and every round before it failed; or it came
/// during the round's browse, which then heard nothing), starts its next round within
/// [`PAUSE_CHECK`], not at the end of a backoff of up to 8 s. Returns whether the
/// addresses changed.
async fn pause_between_rounds(
    context: &JoinContext,
    pause: Duration,
    addresses: &[std::net::Ipv4Addr],
) -> bool {
    let interfaces = context.mdns_interfaces.as_deref();
    let end = tokio::time::Instant::now() + pause;
    loop {
        if context.credential.has_certificate() {
            return false;
        }
        if lease::own_ipv4(interfaces) != addresses {
            info!("this node's addresses changed: looking for the site's servers again");
            return true;
        }
        let now = tokio::time::Instant::now();
        if now >= end {
            return false;
        }
        tokio::time::sleep(PAUSE_CHECK.min(end - now)).await;
    }
}

/// How the join ended.
enum Finished {
    Joined,
    /// A certificate without a join record: the operator enrolled the node.
    ByHand,
}

/// One round: join when not joined yet, then fetch the issuer when the node is a server
/// without it.
async fn round(context: &JoinContext) -> Result<Finished, ExchangeError> {
    let has_certificate = context.credential.has_certificate();
    let record = match JoinRecord::load(&context.record_file) {
        Ok(Some(record)) if has_certificate => record,
        Ok(None) if has_certificate => return Ok(Finished::ByHand),
        Ok(_) => join(context).await?,
        Err(err) => {
            warn!(%err, "the join record is unreadable; joining again with the same key");
            join(context).await?
        }
    };
    let holds_issuer = context.trust.holds_issuer();
    (context.on_joined)(&record, holds_issuer);
    if record.role == Role::Server && !holds_issuer {
        context
            .status
            .update(|status| status.join.state = "fetching-issuer");
        fetch_issuer(context, &record).await?;
        (context.on_joined)(&record, true);
    }
    context.status.update(|status| {
        status.join.state = "joined";
        status.join.last_error = None;
    });
    Ok(Finished::Joined)
}

/// Finds a replica that accepts the join, and stores what it answered.
async fn join(context: &JoinContext) -> Result<JoinRecord, ExchangeError> {
    context.status.update(|status| {
        status.join.state = "discovering";
        status.join.attempts += 1;
    });
    let mut candidates = candidates(context).await;
    if awaits_leases(context) {
        // The addresses after the browse: a lease or a link-local address may have come
        // during it.
        let own = lease::own_ipv4(context.mdns_interfaces.as_deref());
        let grace = lease::LEASE_GRACE.as_secs();
        match lease::in_grace(&own, &mut candidates) {
            lease::InGrace::Join => {}
            lease::InGrace::OverLinkLocal { told_by } => info!(
                server = %told_by,
                "joining over this node's link-local address: the server has held only a \
                 link-local address for the whole lease grace, so the LAN has no DHCP server"
            ),
            lease::InGrace::AwaitOwnLease => {
                return Err(ExchangeError::Unreachable {
                    replica: SocketAddr::from(([0, 0, 0, 0], 0)),
                    detail: format!(
                        "this node has only a link-local address: it waits up to {grace} s \
                         after its start for a DHCP lease, which would remove that address \
                         (or for a server of the site to announce that the LAN has none)"
                    ),
                })
            }
            lease::InGrace::AwaitServersLeases => {
                return Err(ExchangeError::Unreachable {
                    replica: SocketAddr::from(([0, 0, 0, 0], 0)),
                    detail: format!(
                        "the site's servers announce only link-local addresses while this \
                         node holds a leased one: it waits up to {grace} s after its start \
                         for their DHCP leases"
                    ),
                })
            }
        }
    }
    if candidates.is_empty() {
        return Err(ExchangeError::Unreachable {
            replica: SocketAddr::from(([0, 0, 0, 0], 0)),
            detail: if context.seed_servers.is_empty() {
                "no server of the site announced itself on the LAN (mDNS _pimesh._tcp)".into()
            } else {
                "none of the seed's servers resolves".into()
            },
        });
    }
    context
        .credential
        .ensure_request(&context.site, &context.node)
        .map_err(|err| ExchangeError::Setup(err.to_string()))?;
    let csr = std::fs::read_to_string(context.credential.request())
        .map_err(|err| ExchangeError::Setup(format!("cannot read the node's request: {err}")))?;
    let request = JoinRequest {
        node: context.node.clone(),
        token_secret: context.token.secret().to_owned(),
        csr,
    };
    context
        .status
        .update(|status| status.join.state = "joining");
    // What the round reports when no replica accepts: what a site said (a refusal, a
    // rogue server) over "try later" (rate limited) over a replica that could not be
    // reached.
    let mut said = None;
    let mut limited = None;
    let mut unreachable = None;
    let mut dead: Vec<std::net::IpAddr> = Vec::new();
    for candidate in &candidates {
        for addr in &candidate.replicas {
            if dead.contains(&addr.ip()) {
                continue;
            }
            let replica = Replica { addr: *addr };
            match try_replica(context, &replica, &request).await {
                Ok((bundle, answer)) => {
                    return store(context, candidate, &replica, &bundle, answer)
                }
                Err(err) if err.is_final() => return Err(err),
                Err(err) => {
                    info!(replica = %addr, error = %err, "join through this replica failed; trying the next");
                    match &err {
                        ExchangeError::NoConnection { .. } => {
                            dead.push(addr.ip());
                            unreachable = Some(err);
                        }
                        ExchangeError::Unreachable { .. } => unreachable = Some(err),
                        ExchangeError::Refused { refusal, .. }
                            if refusal.error == pimesh_join::RefusalCode::RateLimited =>
                        {
                            limited = Some(err)
                        }
                        _ => said = Some(err),
                    }
                }
            }
        }
    }
    Err(said
        .or(limited)
        .or(unreachable)
        .unwrap_or(ExchangeError::Setup("no replica to try".into())))
}

/// Whether the join still waits for DHCP leases rather than use link-local addresses:
/// within [`lease::LEASE_GRACE`] of the start, when the servers are found by mDNS.
fn awaits_leases(context: &JoinContext) -> bool {
    context.mdns
        && context.seed_servers.is_empty()
        && context.started.elapsed() < lease::LEASE_GRACE
}

async fn candidates(context: &JoinContext) -> Vec<Candidate> {
    if !context.seed_servers.is_empty() {
        return discover::from_seed(&context.seed_servers).await;
    }
    if !context.mdns {
        return Vec::new();
    }
    match context.browse(discover::Listen::UntilFirst).await {
        Ok(found) => {
            for candidate in &found {
                info!(node = ?candidate.node, replicas = ?candidate.replicas, "server announced on the LAN");
            }
            found
        }
        Err(err) => {
            warn!(%err, "cannot look for servers on the LAN");
            Vec::new()
        }
    }
}

async fn try_replica(
    context: &JoinContext,
    replica: &Replica,
    request: &JoinRequest,
) -> Result<(PinnedBundle, JoinAnswer), ExchangeError> {
    let bundle = replica
        .bundle(&context.site, context.token.anchor_sha256())
        .await?;
    let answer = replica.join(&bundle, request).await?;
    Ok((bundle, answer))
}

/// Stores the answer: the anchors, then the record, then the certificate (see the module
/// invariants for why in this order).
fn store(
    context: &JoinContext,
    candidate: &Candidate,
    replica: &Replica,
    bundle: &PinnedBundle,
    answer: JoinAnswer,
) -> Result<JoinRecord, ExchangeError> {
    let local = |what: &str, err: &dyn std::fmt::Display| {
        ExchangeError::Setup(format!("cannot store {what}: {err}"))
    };
    // The anchors the node trusts are the pinned bundle, not what the answer repeats.
    pimesh_runtime::atomic_file::replace(
        &context.credential.anchors(),
        bundle.pem.as_bytes(),
        0o644,
    )
    .map_err(|err| local("the site's anchors", &err))?;
    // Before the record: a record means the token, if the site has one, is kept.
    if let Some(k3s_token) = answer.k3s_token {
        crate::k3s::token::K3sToken::new(k3s_token)
            .store(&context.k3s_token_file)
            .map_err(|err| local("the site's K3s token", &err))?;
    }
    let record = JoinRecord {
        role: answer.role,
        via: Via {
            node: candidate.node.clone(),
            address: replica.addr,
        },
        servers: answer.servers,
        joined_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    };
    record
        .store(&context.record_file)
        .map_err(|err| local("the join record", &err))?;
    context
        .credential
        .install_chain(&answer.certificate)
        .map_err(|err| local("the node certificate", &err))?;
    info!(
        role = %record.role,
        via = %replica.addr,
        servers = record.servers.len(),
        "joined the site"
    );
    context
        .status
        .update(|status| show(&mut status.join, &record));
    Ok(record)
}

/// Fetches the site issuer from the replica that answered the join, else from any
/// replica of the site's servers.
async fn fetch_issuer(context: &JoinContext, record: &JoinRecord) -> Result<(), ExchangeError> {
    let (credential, trust) = mesh_identity(context)?;
    let mut last = None;
    for addr in record.replicas_of_others(&context.node) {
        match (Replica { addr }).issuer(&credential, &trust).await {
            Ok(handover) => {
                context
                    .trust
                    .install_handover(&handover)
                    .map_err(|err| ExchangeError::Setup(err.to_string()))?;
                return Ok(());
            }
            Err(err) => {
                info!(replica = %addr, error = %err, "cannot fetch the issuer here; trying the next");
                last = Some(err);
            }
        }
    }
    Err(last.unwrap_or(ExchangeError::Setup(
        "no replica to fetch the issuer from".into(),
    )))
}

/// The node's credential and the anchors it checks replicas against, for mutual TLS with
/// the site's replicas: the anchors stored at the join, and on a server node those of its
/// trust folder too (during an anchor rotation, replicas may present either anchor's
/// chains).
pub(crate) fn mesh_identity(
    context: &JoinContext,
) -> Result<(Credential, SiteTrust), ExchangeError> {
    let credential = context
        .credential
        .load()
        .ok()
        .flatten()
        .and_then(|c| Credential::from_pem(c.chain_pem.as_bytes(), c.key_pem.as_bytes()).ok())
        .ok_or_else(|| ExchangeError::Setup("the node credential is not usable".into()))?;
    let mut anchors = Vec::new();
    for file in [
        context.credential.anchors(),
        context.trust.dir.join(crate::trust::store::ANCHOR_BUNDLE),
    ] {
        let read = std::fs::read(&file)
            .ok()
            .and_then(|pem| pimesh_meshtls::pem::certificates(&pem).ok())
            .unwrap_or_default();
        for anchor in read {
            if !anchors.contains(&anchor) {
                anchors.push(anchor);
            }
        }
    }
    let trust = SiteTrust::new(context.site.clone(), anchors)
        .map_err(|err| ExchangeError::Setup(format!("the site's anchors: {err}")))?;
    Ok((credential, trust))
}

/// Shows a stored join in the status.
pub fn show(report: &mut crate::status::JoinReport, record: &JoinRecord) {
    report.role = Some(record.role.as_str());
    report.via = serde_json::to_value(&record.via).ok();
    report.servers = record.servers.clone();
    report.joined_at = Some(record.joined_at.clone());
}
