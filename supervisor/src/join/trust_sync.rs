//! A node that joined keeps up with the site's trust: a server node keeps the issuer it
//! holds the site's newest; an agent keeps its node certificate signed by the current
//! issuer and its anchors the site's.
//!
//! The issuer and the anchors change only where an anchor key is (the init node, unless
//! the operator moved the key): the issuer rotates when a third of its life is left, and an
//! anchor rotation adds, switches to and retires anchors. A server node that received the
//! issuer when it joined would otherwise sign with the old issuer until it expires, and
//! after an anchor rotation hand out chains the site no longer trusts. So every
//! [`CHECK_EVERY`] it fetches the issuer handover from the replicas of the other server
//! nodes it knows (over mutual TLS, as at its join) and installs the highest-ranked one
//! when it ranks above its own ([`crate::trust::freshness`]); its own node certificate is
//! then re-signed by the new issuer, and the anchors it checks replicas with become the
//! new bundle.
//!
//! An agent holds no issuer: every [`RENEW_EVERY`] it fetches the anchors from a replica of
//! the servers it knows (stored when they differ from its own), then asks for its node
//! certificate to be renewed (`pimesh_join::path::RENEW`, presenting the certificate and
//! sending the request kept beside its key): the replica re-signs it when another issuer
//! signed it or a third of its life is left. No token is needed, so a node keeps its
//! place across token rotations; the key never changes.
//!
//! Invariants: a node holding an anchor key never takes a handover (it makes the site's
//! trust); the trust folder only moves to a strictly higher rank; the node's anchors file
//! is written after the trust folder, with the bundle of the state installed; an agent's
//! `node.pem` is only ever replaced by a chain of its own key naming its own node.

use std::path::Path;
use std::time::Duration;

use pimesh_join::IssuerHandover;
use tracing::{debug, info, warn};

use crate::join::exchange::{ExchangeError, Replica};
use crate::join::record::JoinRecord;
use crate::join::{mesh_identity, JoinContext};
use crate::trust::freshness::{self, Rank};

/// How often a joined server node asks the other servers for their issuer.
pub const CHECK_EVERY: Duration = Duration::from_secs(15);

/// How often an agent refreshes its anchors and asks for its certificate's renewal.
pub const RENEW_EVERY: Duration = Duration::from_secs(30);

/// Follows the site's trust for the node's life: as a server (a node that holds the issuer
/// and no anchor key) or as an agent (no issuer), checked every time since a node's role
/// shows in its trust folder.
pub async fn run(context: &JoinContext) {
    tokio::join!(follow_as_server(context), follow_as_agent(context));
}

async fn follow_as_server(context: &JoinContext) {
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        if !context.trust.follows_site() {
            debug!("not following the site's issuer: no issuer here, or an anchor key");
            continue;
        }
        if let Err(err) = follow(context).await {
            warn!(%err, "cannot follow the site's issuer");
        }
    }
}

async fn follow_as_agent(context: &JoinContext) {
    let mut every = tokio::time::interval(RENEW_EVERY);
    loop {
        every.tick().await;
        if context.trust.holds_issuer() {
            continue;
        }
        if let Err(err) = renew(context).await {
            warn!(%err, "cannot renew the node certificate");
        }
    }
}

/// One agent check, at the first replica that answers: the anchors, then the renewal.
async fn renew(context: &JoinContext) -> Result<(), ExchangeError> {
    let Some(record) = record(context)? else {
        return Ok(());
    };
    let request = std::fs::read(context.credential.request()).map_err(|err| {
        ExchangeError::Setup(format!(
            "cannot read {}: {err}",
            context.credential.request().display()
        ))
    })?;
    let mut last = None;
    for addr in record.replicas_of_others(&context.node) {
        let replica = Replica { addr };
        match renew_at(context, &replica, &request).await {
            Ok(()) => return Ok(()),
            Err(err) => {
                debug!(replica = %addr, error = %err, "no renewal at this replica");
                last = Some(err);
            }
        }
    }
    last.map_or(Ok(()), Err)
}

async fn renew_at(
    context: &JoinContext,
    replica: &Replica,
    request: &[u8],
) -> Result<(), ExchangeError> {
    let bad = |detail: String| ExchangeError::BadAnswer {
        replica: replica.addr,
        detail,
    };
    let (credential, trust) = mesh_identity(context)?;
    let bundle = replica.trust_bundle(&credential, &trust).await?;
    if pimesh_meshtls::pem::certificates(bundle.as_bytes()).is_ok_and(|certs| !certs.is_empty()) {
        let written = pimesh_runtime::atomic_file::replace(
            &context.credential.anchors(),
            bundle.as_bytes(),
            0o644,
        )
        .map_err(|err| ExchangeError::Setup(format!("cannot store the site's anchors: {err}")))?;
        if written {
            info!(replica = %replica.addr, "the site's anchors changed; stored");
        }
    } else {
        return Err(bad("a trust bundle without certificates".into()));
    }
    let (credential, trust) = mesh_identity(context)?;
    let Some(chain) = replica.renew(&credential, &trust, request).await? else {
        return Ok(());
    };
    let key = context
        .credential
        .load()
        .ok()
        .flatten()
        .map(|own| own.key_pem)
        .unwrap_or_default();
    pimesh_meshtls::Credential::from_pem(chain.as_bytes(), key.as_bytes()).map_err(|err| {
        bad(format!(
            "a renewed certificate unusable with this node's key: {err}"
        ))
    })?;
    let leaf = pimesh_meshtls::pem::certificates(chain.as_bytes())
        .ok()
        .and_then(|certs| certs.into_iter().next())
        .ok_or_else(|| bad("an empty renewed chain".into()))?;
    let names = crate::credential::node_ids(&leaf);
    if names.len() != 1
        || names
            .iter()
            .any(|id| id.workload != pimesh_schema::Workload::Node(context.node.clone()))
    {
        return Err(bad(format!(
            "a renewed certificate for {names:?}, not node {}",
            context.node
        )));
    }
    context
        .credential
        .install_chain(&chain)
        .map_err(|err| ExchangeError::Setup(err.to_string()))?;
    info!(replica = %replica.addr, "node certificate renewed by the current issuer");
    Ok(())
}

fn record(context: &JoinContext) -> Result<Option<JoinRecord>, ExchangeError> {
    JoinRecord::load(&context.record_file)
        .map_err(|err| ExchangeError::Setup(format!("the join record: {err}")))
}

/// One check: installs the newest handover of the other servers when it ranks above the
/// node's own trust.
async fn follow(context: &JoinContext) -> Result<(), ExchangeError> {
    let setup =
        |what: &str, err: &dyn std::fmt::Display| ExchangeError::Setup(format!("{what}: {err}"));
    let record = match JoinRecord::load(&context.record_file) {
        Ok(Some(record)) => record,
        Ok(None) => return Ok(()),
        Err(err) => return Err(setup("the join record", &err)),
    };
    let replicas = record.replicas_of_others(&context.node);
    if replicas.is_empty() {
        return Ok(());
    }
    let ours = context
        .trust
        .rank()
        .map_err(|err| setup("this node's trust folder", &err))?;
    let (credential, trust) = mesh_identity(context)?;
    let mut newest: Option<(Rank, IssuerHandover)> = None;
    for addr in replicas {
        let handover = match (Replica { addr }).issuer(&credential, &trust).await {
            Ok(handover) => handover,
            Err(err) => {
                debug!(replica = %addr, error = %err, "no issuer from this replica");
                continue;
            }
        };
        let source = format!("the issuer handed over by {addr}");
        match freshness::rank(&handover.issuer_cert, &handover.anchors, Path::new(&source)) {
            Ok(rank) if newest.as_ref().is_none_or(|(best, _)| rank > *best) => {
                newest = Some((rank, handover));
            }
            Ok(_) => {}
            Err(err) => warn!(replica = %addr, %err, "a replica handed over an unusable issuer"),
        }
    }
    match newest {
        Some((rank, handover)) if rank > ours => install(context, &handover),
        newest => {
            debug!(?ours, newest = ?newest.map(|(rank, _)| rank), "no newer issuer at the site's servers");
            Ok(())
        }
    }
}

/// Makes `handover` the node's trust, re-signs the node's certificate with it and trusts
/// its anchors.
fn install(context: &JoinContext, handover: &IssuerHandover) -> Result<(), ExchangeError> {
    let generation = context
        .trust
        .install_handover(handover)
        .map_err(|err| ExchangeError::Setup(err.to_string()))?;
    pimesh_runtime::atomic_file::replace(
        &context.credential.anchors(),
        handover.anchors.as_bytes(),
        0o644,
    )
    .map_err(|err| ExchangeError::Setup(format!("cannot store the site's anchors: {err}")))?;
    let report = context.trust.check(&context.site, &context.credential);
    context.status.update(|status| {
        let source = status.trust.source;
        status.trust = report;
        status.trust.source = source;
    });
    info!(
        generation,
        "took the site's newer issuer from its servers; the node certificate follows it"
    );
    Ok(())
}
