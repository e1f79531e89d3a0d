//! How a central replica on PostgreSQL learns what the other replicas stored: a
//! connection of its own that `LISTEN`s on [`CHANNEL`], whose notices are applied to the
//! registry (a publish wakes the long-polls parked here, a report moves the rollouts, a
//! rollout step replaces the live one).
//!
//! Invariants: after every (re)connection, `LISTEN` is in place before the registry
//! catches up with everything stored ([`Change::CatchUp`]), so no write of another replica
//! falls between the two; this replica's own notices are skipped; a lost connection is
//! made again with backoff, for as long as the server runs.

use std::sync::Arc;
use std::time::Duration;

use pimesh_runtime::backoff::{Backoff, Jitter, Retry};
use postgres::fallible_iterator::FallibleIterator as _;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::offers::unix_now;
use crate::sites::Registry;
use crate::storage::{Database, Notice, ReplicaId, CHANNEL};

/// Waits before connecting again: from 1 s, doubling, at most 30 s.
const RECONNECT: Backoff =
    Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).with_jitter(Jitter::QUARTER);
/// With no notice for this long, the connection is checked with a query.
const IDLE_CHECK: Duration = Duration::from_secs(15);

/// What the registry applies.
#[derive(Debug)]
pub enum Change {
    /// Another replica stored something.
    Notice(Notice),
    /// Notices may have been missed (first connection, or after a lost one): read
    /// everything again.
    CatchUp,
}

/// Listens on its own thread (the client blocks) for as long as `changes` is open.
pub fn spawn_listener(
    database: Database,
    me: ReplicaId,
    changes: mpsc::UnboundedSender<Change>,
    listening: Gauge,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pg-listen".to_owned())
        .spawn(move || {
            let mut retry = Retry::new(RECONNECT);
            while !changes.is_closed() {
                let outcome = listen(&database, me, &changes, &mut retry, &listening);
                listening.set(0);
                if let Err(err) = outcome {
                    let wait = retry.next_delay(fastrand::u64(..));
                    warn!(err = %pimesh_runtime::error_chain(&err), ?wait, "not listening for the other replicas' changes; connecting again");
                    std::thread::sleep(wait);
                }
            }
        })
}

/// One connection's life: `LISTEN`, catch up, then pass on notices until it breaks or
/// nobody takes them.
fn listen(
    database: &Database,
    me: ReplicaId,
    changes: &mpsc::UnboundedSender<Change>,
    retry: &mut Retry,
    listening: &Gauge,
) -> Result<(), postgres::Error> {
    let mut client = database.connect()?;
    client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    retry.reset();
    listening.set(1);
    info!(
        channel = CHANNEL,
        "listening for the other replicas' changes"
    );
    if changes.send(Change::CatchUp).is_err() {
        return Ok(());
    }
    loop {
        {
            let mut notifications = client.notifications();
            let mut arriving = notifications.timeout_iter(IDLE_CHECK);
            while let Some(notification) = arriving.next()? {
                if notification.channel() != CHANNEL {
                    continue;
                }
                match Notice::parse(notification.payload()) {
                    Some((from, _)) if from == me => {}
                    Some((_, notice)) => {
                        if changes.send(Change::Notice(notice)).is_err() {
                            return Ok(());
                        }
                    }
                    None => {
                        warn!(
                            payload = notification.payload(),
                            "notice not understood; skipped"
                        )
                    }
                }
            }
        }
        if changes.is_closed() {
            return Ok(());
        }
        client.simple_query("SELECT 1")?;
    }
}

/// Applies every change as it arrives, for as long as the listener runs.
pub async fn apply(registry: Arc<Registry>, mut changes: mpsc::UnboundedReceiver<Change>) {
    while let Some(change) = changes.recv().await {
        match change {
            Change::CatchUp => registry.catch_up(unix_now()),
            Change::Notice(notice) => registry.notice(notice, unix_now()),
        }
    }
}
