//! Asking the replicas for one leaf without waiting on a dead one.
//!
//! A powered-off server swallows the connection attempt, and a hung replica takes the
//! handshake and never answers: either holds an exchange for its whole timeout, which can
//! be longer than the time a leaf has left when its renewal starts. So the replicas are
//! asked in turn, the next one as soon as an earlier one fails or when none of those asked
//! has answered for the hedging delay; the first answer accepted wins and the exchanges
//! still running are cancelled.
//!
//! Invariants: every replica of `order` is asked at most once, in `order`; while no
//! exchange fails, a new one starts at most once per hedging delay; the result is the
//! first accepted answer, or `None` once every replica was asked and every exchange ended
//! without one. `failed` hears of every exchange that failed or was refused, as it happens.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::error;

/// Asks the replicas of `order` with `ask` as described in the module's documentation,
/// `after` being the hedging delay; `accept` checks an answer.
pub async fn first_accepted<A, Ask, Fut, T, E>(
    order: &[SocketAddr],
    after: Duration,
    ask: Ask,
    mut accept: impl FnMut(SocketAddr, A) -> Result<T, E>,
    mut failed: impl FnMut(SocketAddr, E),
) -> Option<(SocketAddr, T)>
where
    Ask: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = Result<A, E>> + Send + 'static,
    A: Send + 'static,
    E: Send + 'static,
{
    // Dropping the set (on return) cancels the exchanges still running.
    let mut asking = Asking {
        running: JoinSet::new(),
        by_task: HashMap::new(),
        rest: order.iter().copied(),
        ask,
    };
    let mut more = asking.next();
    loop {
        let hedge = tokio::time::sleep(after);
        tokio::select! {
            ended = asking.running.join_next_with_id() => {
                let (id, result) = match ended {
                    None => return None, // nothing running, nobody left to ask
                    Some(Ok(ended)) => ended,
                    Some(Err(err)) => {
                        // Only a panic ends a task early here (none is aborted before return).
                        error!(error = %err, "an exchange with a replica ended without a result");
                        asking.by_task.remove(&err.id());
                        more = more && asking.next();
                        continue;
                    }
                };
                let Some(replica) = asking.by_task.remove(&id) else {
                    continue;
                };
                match result.and_then(|answer| accept(replica, answer)) {
                    Ok(taken) => return Some((replica, taken)),
                    Err(err) => {
                        failed(replica, err);
                        more = more && asking.next();
                    }
                }
            }
            () = hedge, if more => more = asking.next(),
        }
    }
}

/// The exchanges running and the replicas not asked yet.
struct Asking<I, Ask, A, E> {
    running: JoinSet<Result<A, E>>,
    by_task: HashMap<tokio::task::Id, SocketAddr>,
    rest: I,
    ask: Ask,
}

impl<I, Ask, Fut, A, E> Asking<I, Ask, A, E>
where
    I: Iterator<Item = SocketAddr>,
    Ask: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = Result<A, E>> + Send + 'static,
    A: Send + 'static,
    E: Send + 'static,
{
    /// Asks the next replica; false when none is left.
    fn next(&mut self) -> bool {
        let Some(replica) = self.rest.next() else {
            return false;
        };
        let task = self.running.spawn((self.ask)(replica));
        self.by_task.insert(task.id(), replica);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

    fn addrs(count: u16) -> Vec<SocketAddr> {
        (1..=count)
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
            .collect()
    }

    /// How each replica (by port) behaves: answer after a delay, fail after a delay, or
    /// never answer.
    #[derive(Clone, Copy)]
    enum Replica {
        Answers(u64),
        Fails(u64),
        Hangs,
    }

    async fn run(
        plan: &[Replica],
        after_ms: u64,
    ) -> (Option<u16>, Vec<(u16, u64)>, Vec<u16>, Duration) {
        let order = addrs(u16::try_from(plan.len()).expect("small"));
        let plan: Arc<Vec<Replica>> = Arc::new(plan.to_vec());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let mut failures = Vec::new();
        let won = first_accepted(
            &order,
            Duration::from_millis(after_ms),
            |replica| {
                let plan = Arc::clone(&plan);
                let asked = Arc::clone(&asked);
                async move {
                    let port = replica.port();
                    asked
                        .lock()
                        .expect("lock")
                        .push((port, start.elapsed().as_millis() as u64));
                    match plan[usize::from(port) - 1] {
                        Replica::Answers(ms) => {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            Ok(port)
                        }
                        Replica::Fails(ms) => {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            Err(format!("{port} failed"))
                        }
                        Replica::Hangs => std::future::pending().await,
                    }
                }
            },
            |_, port| Ok::<_, String>(port),
            |replica, _| failures.push(replica.port()),
        )
        .await;
        let asked = asked.lock().expect("lock").clone();
        (won.map(|(_, port)| port), asked, failures, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_replica_costs_one_hedging_delay() {
        let (won, asked, failures, took) = run(
            &[Replica::Hangs, Replica::Hangs, Replica::Answers(100)],
            2000,
        )
        .await;
        assert_eq!(won, Some(3));
        assert_eq!(asked, vec![(1, 0), (2, 2000), (3, 4000)]);
        assert!(failures.is_empty());
        assert_eq!(took, Duration::from_millis(4100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_moves_on_at_once_and_is_reported() {
        let (won, asked, failures, took) =
            run(&[Replica::Fails(10), Replica::Answers(50)], 2000).await;
        assert_eq!(won, Some(2));
        assert_eq!(asked, vec![(1, 0), (2, 10)]);
        assert_eq!(failures, vec![1]);
        assert_eq!(took, Duration::from_millis(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_first_answer_still_wins_when_it_comes_first() {
        let (won, asked, _, took) =
            run(&[Replica::Answers(2500), Replica::Answers(1000)], 2000).await;
        assert_eq!(
            won,
            Some(1),
            "the first replica answered at 2.5 s, the second at 3 s"
        );
        assert_eq!(asked, vec![(1, 0), (2, 2000)]);
        assert_eq!(took, Duration::from_millis(2500));
    }

    #[tokio::test(start_paused = true)]
    async fn none_when_every_replica_failed_and_a_refused_answer_counts_as_failed() {
        let (won, asked, failures, _) = run(
            &[Replica::Fails(5), Replica::Fails(1), Replica::Fails(3)],
            2000,
        )
        .await;
        assert_eq!(won, None);
        assert_eq!(asked.len(), 3);
        assert_eq!(failures, vec![1, 2, 3]);

        let order = addrs(2);
        let mut refused = Vec::new();
        let won = first_accepted(
            &order,
            Duration::from_secs(2),
            |replica| async move { Ok::<_, String>(replica.port()) },
            |_, port| {
                if port == 1 {
                    Err("bad leaf".to_owned())
                } else {
                    Ok(port)
                }
            },
            |replica, err| refused.push((replica.port(), err)),
        )
        .await;
        assert_eq!(won.map(|(_, port)| port), Some(2));
        assert_eq!(refused, vec![(1, "bad leaf".to_owned())]);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_to_ask_is_none() {
        let (won, asked, _, _) = run(&[], 2000).await;
        assert_eq!(won, None);
        assert!(asked.is_empty());
    }
}
