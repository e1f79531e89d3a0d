//! Graceful drain on SIGTERM: the listeners stop, every open connection is told to
//! finish what it carries and close, and the process waits for them up to a deadline.
//!
//! Invariant: [`Signal::drain`] returns only when every [`Watch`] has been dropped (each
//! connection holds one for its whole life, an upgraded connection's copy task too) or
//! the deadline passed. A [`WeakWatch`] never holds the drain up.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Held by the main task; starts the drain.
pub struct Signal {
    draining: watch::Sender<bool>,
    done: mpsc::Receiver<std::convert::Infallible>,
}

/// Held by each connection.
#[derive(Clone)]
pub struct Watch {
    draining: watch::Receiver<bool>,
    _alive: mpsc::Sender<std::convert::Infallible>,
}

/// Held by what makes connections outside an accept loop (the proxy's context, for the
/// upgraded connections its requests turn into); does not keep the drain waiting.
#[derive(Clone)]
pub struct WeakWatch {
    draining: watch::Receiver<bool>,
    alive: mpsc::WeakSender<std::convert::Infallible>,
}

impl WeakWatch {
    /// A [`Watch`] for a new connection; `None` once the drain has finished.
    pub fn upgrade(&self) -> Option<Watch> {
        Some(Watch {
            draining: self.draining.clone(),
            _alive: self.alive.upgrade()?,
        })
    }
}

pub fn channel() -> (Signal, Watch) {
    let (draining_tx, draining_rx) = watch::channel(false);
    let (alive_tx, alive_rx) = mpsc::channel(1);
    (
        Signal {
            draining: draining_tx,
            done: alive_rx,
        },
        Watch {
            draining: draining_rx,
            _alive: alive_tx,
        },
    )
}

impl Signal {
    /// Tells every connection to drain; waits for them all, at most `deadline`. Returns
    /// whether they all finished in time.
    pub async fn drain(mut self, deadline: Duration) -> bool {
        let _ = self.draining.send(true);
        tokio::time::timeout(deadline, self.done.recv())
            .await
            .is_ok()
    }
}

impl Watch {
    pub fn downgrade(&self) -> WeakWatch {
        WeakWatch {
            draining: self.draining.clone(),
            alive: self._alive.downgrade(),
        }
    }

    /// Completes when the drain starts (never, if it never does).
    pub async fn signaled(&mut self) {
        if self.draining.wait_for(|draining| *draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_every_watch() {
        let (signal, watch) = channel();
        let mut held = watch.clone();
        drop(watch);
        let connection = tokio::spawn(async move {
            held.signaled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        assert!(signal.drain(Duration::from_secs(5)).await);
        assert!(connection.is_finished());
    }

    #[tokio::test]
    async fn drain_gives_up_at_the_deadline() {
        let (signal, watch) = channel();
        let stuck = tokio::spawn(async move {
            let _watch = watch;
            std::future::pending::<()>().await;
        });
        assert!(!signal.drain(Duration::from_millis(20)).await);
        stuck.abort();
    }

    #[tokio::test]
    async fn a_weak_watch_holds_nothing_up_and_its_upgrades_do() {
        let (signal, watch) = channel();
        let weak = watch.downgrade();
        let upgraded = weak.upgrade().expect("the drain has not finished");
        drop(watch);
        let connection = tokio::spawn(async move {
            let mut held = upgraded;
            held.signaled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        assert!(signal.drain(Duration::from_secs(5)).await);
        assert!(
            connection.is_finished(),
            "the drain waited for the upgraded watch"
        );
        assert!(
            weak.upgrade().is_none(),
            "no new connection after the drain"
        );
    }
}
