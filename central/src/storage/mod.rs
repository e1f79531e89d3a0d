//! Where revisions, rollouts and node reports live. [`Storage`] is what the server needs;
//! [`FileStorage`] is the embedded default for a single central server, [`PgStorage`] the
//! PostgreSQL one that several central replicas share.
//!
//! Invariants every implementation keeps: a revision is stored whole or not at all, and
//! never below or at a number already stored for its site; a rollout is changed only by
//! [`Storage::update_rollout`], one change at a time per rollout, each change made on the
//! version stored at that instant (so that two replicas never undo each other's steps:
//! a halt stays a halt); every write has survived a power cut when the call returns.

mod files;
mod postgres;

use std::collections::BTreeMap;
use std::io;

use pimesh_revision::{RecordedReport, Rollout, SignedRevision};
use pimesh_schema::DnsLabel;

pub use self::files::FileStorage;
pub use self::postgres::{connection_config, Database, Notice, PgStorage, ReplicaId, CHANNEL};

/// A change to a stored rollout: given the version stored now (if any), the version to
/// store instead, or `None` to leave it as it is.
pub type RolloutChange<'a> = dyn FnMut(Option<&Rollout>) -> Option<Rollout> + Send + 'a;

pub trait Storage: Send + Sync {
    /// The newest stored revision of `site`.
    fn latest(&self, site: &DnsLabel) -> io::Result<Option<SignedRevision>>;
    /// Stores a revision durably; returns once it survives a power cut. Fails with
    /// [`io::ErrorKind::AlreadyExists`] when the site already has this revision number or a
    /// higher one (published meanwhile on another replica).
    fn store(&self, revision: &SignedRevision) -> io::Result<()>;
    /// Keeps `report` as `node`'s latest, replacing the one before.
    fn record_report(
        &self,
        site: &DnsLabel,
        node: &DnsLabel,
        report: &RecordedReport,
    ) -> io::Result<()>;
    /// The latest report of each node of `site`.
    fn reports(&self, site: &DnsLabel) -> io::Result<BTreeMap<DnsLabel, RecordedReport>>;
    /// The latest report of `node`, when there is one.
    fn report(&self, site: &DnsLabel, node: &DnsLabel) -> io::Result<Option<RecordedReport>>;
    /// Revision `number` of `site`, when stored.
    fn revision(&self, site: &DnsLabel, number: u64) -> io::Result<Option<SignedRevision>>;
    /// Applies `change` to the rollout of `site`'s revision `revision` as stored at this
    /// instant, no other change of that rollout in between, and returns the rollout as
    /// stored afterwards. Returns once the change survives a power cut.
    fn update_rollout(
        &self,
        site: &DnsLabel,
        revision: u64,
        change: &mut RolloutChange<'_>,
    ) -> io::Result<Option<Rollout>>;
    /// The stored rollout of `site`'s revision `revision`.
    fn rollout(&self, site: &DnsLabel, revision: u64) -> io::Result<Option<Rollout>>;
    /// Every stored rollout of `site`, by revision.
    fn rollouts(&self, site: &DnsLabel) -> io::Result<BTreeMap<u64, Rollout>>;
    /// Notes that this replica heard from `node` at `at` (seconds since the epoch), for the
    /// other replicas; a storage that serves one replica keeps nothing.
    fn record_heard(&self, _site: &DnsLabel, _node: &DnsLabel, _at: u64) -> io::Result<()> {
        Ok(())
    }
    /// When any replica last noted hearing from each node of `site` ([`Self::record_heard`]).
    fn heard(&self, _site: &DnsLabel) -> io::Result<BTreeMap<DnsLabel, u64>> {
        Ok(BTreeMap::new())
    }
    /// Keeps a dashboard session for the other replicas — the SHA-256 of its token, its
    /// site, its expiry — and drops the sessions expired at `now`; a storage that serves
    /// one replica keeps nothing (the replica's memory holds its sessions).
    fn record_session(
        &self,
        _digest: &[u8; 32],
        _site: &DnsLabel,
        _expires_at: u64,
        _now: u64,
    ) -> io::Result<()> {
        Ok(())
    }
    /// The site and expiry of the session whose token's SHA-256 is `digest`, as any
    /// replica recorded it ([`Self::record_session`]).
    fn session(&self, _digest: &[u8; 32]) -> io::Result<Option<(DnsLabel, u64)>> {
        Ok(None)
    }
}

/// The error of storing a revision of `site` at or below `newest`, already stored.
fn already_stored(site: &DnsLabel, newest: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("site {site} already has revision {newest} stored"),
    )
}
