//! Failed join attempts per source address: more than [`MAX_FAILURES`] in [`WINDOW`] and
//! the source is refused (`rate_limited`, with the seconds to wait) until the oldest of
//! them leaves the window. A success does not count, nor does a refusal for the limit
//! itself (a waiting client that retries too early does not lock itself out longer).
//!
//! Invariant: at most [`MAX_SOURCES`] sources are remembered (a flood of addresses evicts
//! the source whose last failure is oldest), and each holds at most [`MAX_FAILURES`]
//! failure times; memory is bounded whatever arrives.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Failures a source may have in [`WINDOW`] and still be heard.
pub const MAX_FAILURES: usize = 5;
/// How far back failures count.
pub const WINDOW: Duration = Duration::from_secs(60);
/// How many sources are remembered at most.
pub const MAX_SOURCES: usize = 4096;

/// The failures of recent sources.
#[derive(Debug, Default)]
pub struct FailureLimiter {
    sources: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl FailureLimiter {
    /// `Err(wait)` when `source` has had [`MAX_FAILURES`] failures within [`WINDOW`]
    /// before `now`: it may try again after `wait`.
    pub fn check(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(failures) = sources.get_mut(&source) else {
            return Ok(());
        };
        forget_old(failures, now);
        match failures.front() {
            Some(oldest) if failures.len() >= MAX_FAILURES => {
                Err((*oldest + WINDOW).saturating_duration_since(now))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed attempt of `source` at `now`.
    pub fn failed(&self, source: IpAddr, now: Instant) {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if !sources.contains_key(&source) && sources.len() >= MAX_SOURCES {
            sources.retain(|_, failures| {
                forget_old(failures, now);
                !failures.is_empty()
            });
            if sources.len() >= MAX_SOURCES {
                let stalest = sources
                    .iter()
                    .min_by_key(|(_, failures)| failures.back().copied())
                    .map(|(ip, _)| *ip);
                if let Some(ip) = stalest {
                    sources.remove(&ip);
                }
            }
        }
        let failures = sources.entry(source).or_default();
        forget_old(failures, now);
        if failures.len() >= MAX_FAILURES {
            failures.pop_front();
        }
        failures.push_back(now);
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

fn forget_old(failures: &mut VecDeque<Instant>, now: Instant) {
    while failures
        .front()
        .is_some_and(|at| now.saturating_duration_since(*at) >= WINDOW)
    {
        failures.pop_front();
    }
}

/// The `Retry-After` value for `wait`: whole seconds, rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_a_minute_are_heard_the_sixth_attempt_waits() {
        let limiter = FailureLimiter::default();
        let ip: IpAddr = "10.0.0.9".parse().expect("ip");
        let other: IpAddr = "10.0.0.10".parse().expect("ip");
        let start = Instant::now();
        for i in 0..5 {
            let at = start + Duration::from_secs(i);
            assert_eq!(limiter.check(ip, at), Ok(()), "attempt {i}");
            limiter.failed(ip, at);
        }
        let wait = limiter
            .check(ip, start + Duration::from_secs(10))
            .expect_err("limited");
        assert_eq!(wait, Duration::from_secs(50));
        assert_eq!(retry_after_seconds(wait), 50);
        assert_eq!(limiter.check(other, start), Ok(()), "per source");
        // The oldest failure leaves the window: one more attempt is heard.
        assert_eq!(limiter.check(ip, start + WINDOW), Ok(()));
        limiter.failed(ip, start + WINDOW);
        assert_eq!(
            limiter.check(ip, start + WINDOW + Duration::from_millis(500)),
            Err(Duration::from_millis(500)),
            "five again: until the one at 1 s leaves"
        );
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
    }

    #[test]
    fn the_table_of_sources_is_bounded() {
        let limiter = FailureLimiter::default();
        let start = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 10) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            limiter.failed(ip, start + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(limiter.remembered(), MAX_SOURCES);
        // The first sources went first.
        let first = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000));
        assert!(limiter.sources.lock().expect("lock").get(&first).is_none());
    }
}
