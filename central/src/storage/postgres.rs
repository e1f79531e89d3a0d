//! The PostgreSQL storage that several central replicas share. Each write that another
//! replica must learn of sends a notification on [`CHANNEL`] in the same transaction
//! (delivered on commit, in commit order, never for a write that did not commit): see
//! [`Notice`] and `crate::replication`.
//!
//! Invariants: revisions of a site are stored under a per-site advisory lock that also
//! checks the order (two replicas publishing the same number: one stores it, the other is
//! told it exists); a rollout is changed under a per-rollout advisory lock, read and
//! written in one transaction; a broken connection is dropped and made again at the next
//! call. The calls block: on a multi-thread Tokio runtime they run in
//! `block_in_place`, elsewhere on a scoped thread, never stalling other tasks' workers.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use pimesh_revision::{RecordedReport, Rollout, SignedRevision};
use pimesh_schema::DnsLabel;
use postgres::config::{Host, SslMode};
use postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{info, warn};

use super::{RolloutChange, Storage};

/// The notification channel of every replica's writes.
pub const CHANNEL: &str = "pimesh_central";

/// The longest one statement (a lock wait included) may take before it fails.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a connection may take to set up, unless the connection string says.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The tables, made when missing (under a lock, so that replicas starting together do not
/// race), kept when present.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS pimesh_revisions (
    site text NOT NULL, revision bigint NOT NULL, document bytea NOT NULL,
    PRIMARY KEY (site, revision));
CREATE TABLE IF NOT EXISTS pimesh_rollouts (
    site text NOT NULL, revision bigint NOT NULL, document bytea NOT NULL,
    PRIMARY KEY (site, revision));
CREATE TABLE IF NOT EXISTS pimesh_reports (
    site text NOT NULL, node text NOT NULL, document bytea NOT NULL,
    PRIMARY KEY (site, node));
CREATE TABLE IF NOT EXISTS pimesh_heard (
    site text NOT NULL, node text NOT NULL, at bigint NOT NULL,
    PRIMARY KEY (site, node));
CREATE TABLE IF NOT EXISTS pimesh_sessions (
    digest bytea PRIMARY KEY, site text NOT NULL, expires_at bigint NOT NULL);
";

/// This replica's name in its notifications (random per start), so that it skips its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaId(pub u64);

impl ReplicaId {
    pub fn random() -> ReplicaId {
        ReplicaId(fastrand::u64(..))
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What one replica tells the others it stored: `<replica> <kind> <site> <key>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Revision { site: DnsLabel, revision: u64 },
    Rollout { site: DnsLabel, revision: u64 },
    Report { site: DnsLabel, node: DnsLabel },
}

impl Notice {
    fn encode(&self, from: ReplicaId) -> String {
        match self {
            Notice::Revision { site, revision } => format!("{from} revision {site} {revision}"),
            Notice::Rollout { site, revision } => format!("{from} rollout {site} {revision}"),
            Notice::Report { site, node } => format!("{from} report {site} {node}"),
        }
    }

    /// The notice in `payload` and the replica it came from; `None` when it is not one.
    pub fn parse(payload: &str) -> Option<(ReplicaId, Notice)> {
        let mut words = payload.split(' ');
        let from = ReplicaId(u64::from_str_radix(words.next()?, 16).ok()?);
        let kind = words.next()?;
        let site = DnsLabel::try_from(words.next()?.to_owned()).ok()?;
        let key = words.next()?;
        if words.next().is_some() {
            return None;
        }
        let notice = match kind {
            "revision" => Notice::Revision {
                site,
                revision: key.parse().ok()?,
            },
            "rollout" => Notice::Rollout {
                site,
                revision: key.parse().ok()?,
            },
            "report" => Notice::Report {
                site,
                node: DnsLabel::try_from(key.to_owned()).ok()?,
            },
            _ => return None,
        };
        Some((from, notice))
    }
}

/// How to reach the server: the connection string, with this server's timeouts added
/// where it sets none.
pub fn connection_config(connect: &str) -> Result<postgres::Config, postgres::Error> {
    let mut config = postgres::Config::from_str(connect)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.keepalives(true);
    if config.get_options().is_none() {
        config.options(&format!(
            "-c statement_timeout={}",
            STATEMENT_TIMEOUT.as_millis()
        ));
    }
    if config.get_application_name().is_none() {
        config.application_name("pimesh-central");
    }
    Ok(config)
}

/// How a replica reaches the database: the connection settings and, when the
/// configuration names the CA of the database server's certificate, TLS.
///
/// Invariant: with TLS the connection is TLS or nothing (`sslmode=require`), the server's
/// certificate must chain to that CA and name the host dialled, and every host is a TCP
/// one (PostgreSQL does not encrypt its Unix sockets); without it, the connection string
/// asks for no TLS.
#[derive(Clone)]
pub struct Database {
    config: postgres::Config,
    tls: Option<MakeRustlsConnect>,
}

impl Database {
    /// `connect` (a libpq connection string or URL, see [`connection_config`]), over TLS
    /// to a server whose certificate chains to `ca_pem` when it is given.
    pub fn new(connect: &str, ca_pem: Option<&[u8]>) -> Result<Database, String> {
        let mut config = Database::settings(connect, ca_pem.is_some())?;
        let Some(ca_pem) = ca_pem else {
            return Ok(Database { config, tls: None });
        };
        let anchors = pimesh_meshtls::pem::certificates(ca_pem).map_err(|err| err.to_string())?;
        let client =
            pimesh_meshtls::named_server_client(&anchors).map_err(|err| err.to_string())?;
        config.ssl_mode(SslMode::Require);
        Ok(Database {
            config,
            tls: Some(MakeRustlsConnect::new(client)),
        })
    }

    /// The connection settings of `connect`, checked for a connection with TLS (`tls`) or
    /// without: TLS needs TCP hosts, and `sslmode=require` needs TLS.
    pub fn settings(connect: &str, tls: bool) -> Result<postgres::Config, String> {
        let config = connection_config(connect).map_err(|err| err.to_string())?;
        if tls
            && config
                .get_hosts()
                .iter()
                .any(|host| matches!(host, Host::Unix(_)))
        {
            return Err(
                "TLS needs a TCP host (host=<name or address>): PostgreSQL does not \
                        encrypt Unix sockets"
                    .to_owned(),
            );
        }
        if !tls && config.get_ssl_mode() == SslMode::Require {
            return Err(
                "sslmode=require needs the CA of the server's certificate: set [postgres] ca"
                    .to_owned(),
            );
        }
        Ok(config)
    }

    /// A new connection.
    pub fn connect(&self) -> Result<Client, postgres::Error> {
        match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(NoTls),
        }
    }

    /// Whether the connection is TLS.
    pub fn encrypted(&self) -> bool {
        self.tls.is_some()
    }
}

pub struct PgStorage {
    database: Database,
    replica: ReplicaId,
    /// The connection, made at the first call after it broke.
    client: Mutex<Option<Client>>,
}

fn db_error(err: postgres::Error) -> io::Error {
    let kind = if err.is_closed() {
        io::ErrorKind::BrokenPipe
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(
        kind,
        format!("PostgreSQL: {}", pimesh_runtime::error_chain(&err)),
    )
}

fn invalid(what: &str, err: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {err}"))
}

/// A revision number as PostgreSQL's `bigint`.
fn number(revision: u64) -> io::Result<i64> {
    i64::try_from(revision).map_err(|_| invalid("revision number", "beyond 2^63 - 1"))
}

/// Runs `f`, which blocks, without stalling the Tokio worker it is called on.
fn blocking<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        Ok(_) => std::thread::scope(|scope| match scope.spawn(f).join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
        Err(_) => f(),
    }
}

impl PgStorage {
    /// Connects, makes the tables that are missing, and returns the storage.
    pub fn open(database: Database, replica: ReplicaId) -> io::Result<PgStorage> {
        let encrypted = database.encrypted();
        let storage = PgStorage {
            database,
            replica,
            client: Mutex::new(None),
        };
        storage.with_client(|client| {
            let mut tx = client.transaction()?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('pimesh-schema'))",
                &[],
            )?;
            tx.batch_execute(SCHEMA)?;
            tx.commit()
        })?;
        info!(replica = %replica, tls = encrypted, "PostgreSQL storage ready");
        Ok(storage)
    }

    /// Runs `f` on the connection (made first when there is none or it broke).
    fn with_client<T: Send>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send,
    ) -> io::Result<T> {
        blocking(|| {
            let mut slot = self.client.lock().unwrap_or_else(PoisonError::into_inner);
            if slot.as_ref().is_none_or(Client::is_closed) {
                *slot = None;
                let client = self.database.connect().map_err(db_error)?;
                *slot = Some(client);
            }
            let Some(client) = slot.as_mut() else {
                return Err(io::Error::other("no PostgreSQL connection"));
            };
            let result = f(client);
            if client.is_closed() {
                warn!("PostgreSQL connection lost; it is made again at the next call");
                *slot = None;
            }
            result.map_err(db_error)
        })
    }

    fn notice(&self, notice: &Notice) -> String {
        notice.encode(self.replica)
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(|err| invalid(what, err))
}

impl Storage for PgStorage {
    fn latest(&self, site: &DnsLabel) -> io::Result<Option<SignedRevision>> {
        let row = self.with_client(|client| {
            client.query_opt(
                "SELECT document FROM pimesh_revisions WHERE site = $1 \
                 ORDER BY revision DESC LIMIT 1",
                &[&site.as_str()],
            )
        })?;
        row.map(|row| decode(&format!("site {site}: newest revision"), row.get(0)))
            .transpose()
    }

    fn store(&self, revision: &SignedRevision) -> io::Result<()> {
        let site = revision.site.as_str();
        let number = number(revision.revision)?;
        let document = revision.to_json();
        let notice = self.notice(&Notice::Revision {
            site: revision.site.clone(),
            revision: revision.revision,
        });
        let newest: Option<i64> = self.with_client(|client| {
            let mut tx = client.transaction()?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('pimesh-revisions:' || $1))",
                &[&site],
            )?;
            let newest: Option<i64> = tx
                .query_one(
                    "SELECT max(revision) FROM pimesh_revisions WHERE site = $1",
                    &[&site],
                )?
                .get(0);
            if newest.is_some_and(|newest| newest >= number) {
                return Ok(newest);
            }
            tx.execute(
                "INSERT INTO pimesh_revisions (site, revision, document) VALUES ($1, $2, $3)",
                &[&site, &number, &document],
            )?;
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &notice])?;
            tx.commit()?;
            Ok(None)
        })?;
        match newest {
            Some(newest) => Err(super::already_stored(
                &revision.site,
                u64::try_from(newest).unwrap_or(0),
            )),
            None => Ok(()),
        }
    }

    fn record_report(
        &self,
        site: &DnsLabel,
        node: &DnsLabel,
        report: &RecordedReport,
    ) -> io::Result<()> {
        let document = serde_json::to_vec(report).map_err(io::Error::other)?;
        let notice = self.notice(&Notice::Report {
            site: site.clone(),
            node: node.clone(),
        });
        self.with_client(|client| {
            // One statement: the report and its notice commit together.
            client.execute(
                "WITH stored AS (
                     INSERT INTO pimesh_reports (site, node, document) VALUES ($1, $2, $3)
                     ON CONFLICT (site, node) DO UPDATE SET document = EXCLUDED.document
                     RETURNING 1)
                 SELECT pg_notify($4, $5) FROM stored",
                &[&site.as_str(), &node.as_str(), &document, &CHANNEL, &notice],
            )
        })
        .map(drop)
    }

    fn reports(&self, site: &DnsLabel) -> io::Result<BTreeMap<DnsLabel, RecordedReport>> {
        let rows = self.with_client(|client| {
            client.query(
                "SELECT node, document FROM pimesh_reports WHERE site = $1",
                &[&site.as_str()],
            )
        })?;
        let mut reports = BTreeMap::new();
        for row in rows {
            let node: String = row.get(0);
            let Ok(label) = DnsLabel::try_from(node.clone()) else {
                warn!(%site, node, "stored report of a node name that is not a DNS label; skipped");
                continue;
            };
            match decode(&format!("site {site}: report of {node}"), row.get(1)) {
                Ok(report) => {
                    reports.insert(label, report);
                }
                Err(err) => warn!(%err, "stored report unreadable; skipped"),
            }
        }
        Ok(reports)
    }

    fn report(&self, site: &DnsLabel, node: &DnsLabel) -> io::Result<Option<RecordedReport>> {
        let row = self.with_client(|client| {
            client.query_opt(
                "SELECT document FROM pimesh_reports WHERE site = $1 AND node = $2",
                &[&site.as_str(), &node.as_str()],
            )
        })?;
        row.map(|row| decode(&format!("site {site}: report of {node}"), row.get(0)))
            .transpose()
    }

    fn revision(&self, site: &DnsLabel, revision: u64) -> io::Result<Option<SignedRevision>> {
        let number = number(revision)?;
        let row = self.with_client(|client| {
            client.query_opt(
                "SELECT document FROM pimesh_revisions WHERE site = $1 AND revision = $2",
                &[&site.as_str(), &number],
            )
        })?;
        row.map(|row| decode(&format!("site {site}: revision {revision}"), row.get(0)))
            .transpose()
    }

    fn update_rollout(
        &self,
        site: &DnsLabel,
        revision: u64,
        change: &mut RolloutChange<'_>,
    ) -> io::Result<Option<Rollout>> {
        let number = number(revision)?;
        let what = format!("site {site}: rollout of revision {revision}");
        let notice = self.notice(&Notice::Rollout {
            site: site.clone(),
            revision,
        });
        let outcome: Result<Option<Rollout>, io::Error> = self.with_client(|client| {
            let mut tx = client.transaction()?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('pimesh-rollout:' || $1 || ':' || ($2::bigint)::text))",
                &[&site.as_str(), &number],
            )?;
            let stored = tx
                .query_opt(
                    "SELECT document FROM pimesh_rollouts WHERE site = $1 AND revision = $2",
                    &[&site.as_str(), &number],
                )?
                .map(|row| decode::<Rollout>(&what, row.get(0)));
            let stored = match stored.transpose() {
                Ok(stored) => stored,
                Err(err) => return Ok(Err(err)),
            };
            let Some(changed) = change(stored.as_ref()) else {
                return Ok(Ok(stored));
            };
            let document = match serde_json::to_vec(&changed) {
                Ok(document) => document,
                Err(err) => return Ok(Err(io::Error::other(err))),
            };
            tx.execute(
                "INSERT INTO pimesh_rollouts (site, revision, document) VALUES ($1, $2, $3)
                 ON CONFLICT (site, revision) DO UPDATE SET document = EXCLUDED.document",
                &[&site.as_str(), &number, &document],
            )?;
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &notice])?;
            tx.commit()?;
            Ok(Ok(Some(changed)))
        })?;
        outcome
    }

    fn rollout(&self, site: &DnsLabel, revision: u64) -> io::Result<Option<Rollout>> {
        let number = number(revision)?;
        let row = self.with_client(|client| {
            client.query_opt(
                "SELECT document FROM pimesh_rollouts WHERE site = $1 AND revision = $2",
                &[&site.as_str(), &number],
            )
        })?;
        row.map(|row| {
            decode(
                &format!("site {site}: rollout of revision {revision}"),
                row.get(0),
            )
        })
        .transpose()
    }

    fn rollouts(&self, site: &DnsLabel) -> io::Result<BTreeMap<u64, Rollout>> {
        let rows = self.with_client(|client| {
            client.query(
                "SELECT revision, document FROM pimesh_rollouts WHERE site = $1",
                &[&site.as_str()],
            )
        })?;
        let mut rollouts = BTreeMap::new();
        for row in rows {
            let number: i64 = row.get(0);
            let Ok(revision) = u64::try_from(number) else {
                continue;
            };
            match decode::<Rollout>(
                &format!("site {site}: rollout of revision {revision}"),
                row.get(1),
            ) {
                Ok(rollout) if rollout.revision == revision && &rollout.site == site => {
                    rollouts.insert(revision, rollout);
                }
                Ok(_) => warn!(%site, revision, "stored rollout names another revision; skipped"),
                Err(err) => warn!(%err, "stored rollout unreadable; skipped"),
            }
        }
        Ok(rollouts)
    }

    fn record_heard(&self, site: &DnsLabel, node: &DnsLabel, at: u64) -> io::Result<()> {
        let at = i64::try_from(at).map_err(|_| invalid("time", "beyond 2^63 - 1"))?;
        self.with_client(|client| {
            client.execute(
                "INSERT INTO pimesh_heard (site, node, at) VALUES ($1, $2, $3)
                 ON CONFLICT (site, node) DO UPDATE SET at = GREATEST(pimesh_heard.at, EXCLUDED.at)",
                &[&site.as_str(), &node.as_str(), &at],
            )
        })
        .map(drop)
    }

    fn record_session(
        &self,
        digest: &[u8; 32],
        site: &DnsLabel,
        expires_at: u64,
        now: u64,
    ) -> io::Result<()> {
        let expires_at =
            i64::try_from(expires_at).map_err(|_| invalid("time", "beyond 2^63 - 1"))?;
        let now = i64::try_from(now).map_err(|_| invalid("time", "beyond 2^63 - 1"))?;
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            transaction.execute(
                "DELETE FROM pimesh_sessions WHERE expires_at <= $1",
                &[&now],
            )?;
            transaction.execute(
                "INSERT INTO pimesh_sessions (digest, site, expires_at) VALUES ($1, $2, $3)",
                &[&digest.as_slice(), &site.as_str(), &expires_at],
            )?;
            transaction.commit()
        })
    }

    fn session(&self, digest: &[u8; 32]) -> io::Result<Option<(DnsLabel, u64)>> {
        let row = self.with_client(|client| {
            client.query_opt(
                "SELECT site, expires_at FROM pimesh_sessions WHERE digest = $1",
                &[&digest.as_slice()],
            )
        })?;
        Ok(row.and_then(|row| {
            let site = DnsLabel::try_from(row.get::<_, String>(0)).ok()?;
            let expires_at = u64::try_from(row.get::<_, i64>(1)).ok()?;
            Some((site, expires_at))
        }))
    }

    fn heard(&self, site: &DnsLabel) -> io::Result<BTreeMap<DnsLabel, u64>> {
        let rows = self.with_client(|client| {
            client.query(
                "SELECT node, at FROM pimesh_heard WHERE site = $1",
                &[&site.as_str()],
            )
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                let node = DnsLabel::try_from(row.get::<_, String>(0)).ok()?;
                let at = u64::try_from(row.get::<_, i64>(1)).ok()?;
                Some((node, at))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    #[test]
    fn a_notice_reads_back_as_written_and_anything_else_is_no_notice() {
        let from = ReplicaId(0x00ab_cdef_0123_4567);
        for notice in [
            Notice::Revision {
                site: label("depot-7"),
                revision: 12,
            },
            Notice::Rollout {
                site: label("depot-7"),
                revision: u64::MAX,
            },
            Notice::Report {
                site: label("depot-7"),
                node: label("pi-a"),
            },
        ] {
            let payload = notice.encode(from);
            assert_eq!(Notice::parse(&payload), Some((from, notice)), "{payload}");
        }
        for payload in [
            "",
            "00abcdef01234567",
            "00abcdef01234567 revision depot-7",
            "00abcdef01234567 revision depot-7 x",
            "00abcdef01234567 revision depot-7 1 2",
            "00abcdef01234567 deleted depot-7 1",
            "00abcdef01234567 report depot-7 Pi_A",
            "zz revision depot-7 1",
        ] {
            assert_eq!(Notice::parse(payload), None, "{payload:?}");
        }
    }
}
