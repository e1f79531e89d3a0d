//! A server node that joined keeps the site issuer it holds the site's newest.
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
//! Invariants: a node holding an anchor key never takes a handover (it makes the site's
//! trust); the trust folder only moves to a strictly higher rank; the node's anchors file
//! is written after the trust folder, with the bundle of the state installed.

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

/// Follows the site's trust for the node's life (on a node that holds the issuer and no
/// anchor key; checked every time, since a node may become one).
pub async fn run(context: &JoinContext) {
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        if !context.trust.follows_site() {
            continue;
        }
        if let Err(err) = follow(context).await {
            warn!(%err, "cannot follow the site's issuer");
        }
    }
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
        _ => Ok(()),
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
