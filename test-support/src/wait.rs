//! Waiting for a condition with a deadline, never for a fixed time.
//!
//! Tests poll what a user would check until it holds; the deadline is generous, so that a
//! loaded machine passes, and a passing run never comes near it. Nothing here measures
//! how long a condition took.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long any one condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// How often a condition is checked.
pub const POLL: Duration = Duration::from_millis(50);

/// Polls `done` until it returns true.
///
/// # Panics
/// At [`DEADLINE`], naming `what` was waited for.
pub async fn wait_until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not in time ({DEADLINE:?}): {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// [`wait_until`] for tests without an async runtime.
///
/// # Panics
/// At [`DEADLINE`], naming `what` was waited for.
pub fn wait_until_blocking(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "not in time ({DEADLINE:?}): {what}"
        );
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_comes_true_ends_the_wait() {
        let mut polls = 0;
        wait_until_blocking("the third poll", || {
            polls += 1;
            polls == 3
        });
        assert_eq!(polls, 3);
    }
}
