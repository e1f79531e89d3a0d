//! Exponential backoff with jitter, as a pure function of its inputs.
//!
//! A [`Backoff`] is a policy: the first pause, the cap, and the share of each pause that
//! is drawn at random. The base of attempt `n` (1 for the first retry) is
//! `initial * 2^(n-1)`, never more than `cap`; the pause lies in
//! `[base - share * base, base]`, placed in that range by a random `u64` that the caller
//! passes in (`fastrand::u64(..)`, a hash), so that daemons failing together do not retry
//! in lock-step and tests can choose the draw.
//!
//! Invariants: a pause is never longer than `cap` and never shorter than the first base
//! less its random share (no hot loop while the share is below 100 %); the draw `0` gives
//! the bottom of the range, `u64::MAX` its top (the base itself).
//!
//! [`Retry`] counts failures in a row for a loop that retries one thing: each failure
//! takes the next pause, a success starts again from the first.

use std::time::Duration;

/// The share of each pause drawn at random, in percent of the base: the pause lies in
/// `[base - percent% of base, base]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jitter {
    percent: u8,
}

impl Jitter {
    /// No randomness: every pause is the base.
    pub const NONE: Jitter = Jitter { percent: 0 };
    /// Pauses in `[3/4 base, base]`.
    pub const QUARTER: Jitter = Jitter { percent: 25 };
    /// Pauses in `[1/2 base, base]`.
    pub const HALF: Jitter = Jitter { percent: 50 };

    /// `percent` of the base drawn at random; more than 100 counts as 100.
    pub const fn percent(percent: u8) -> Jitter {
        Jitter {
            percent: if percent > 100 { 100 } else { percent },
        }
    }
}

/// An exponential backoff policy; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// Pauses doubling from `initial` up to `cap`, without jitter (see
    /// [`Backoff::with_jitter`]). A `cap` below `initial` caps every pause, the first too.
    pub const fn new(initial: Duration, cap: Duration) -> Backoff {
        Backoff {
            initial,
            cap,
            jitter: Jitter::NONE,
        }
    }

    pub const fn with_jitter(self, jitter: Jitter) -> Backoff {
        Backoff { jitter, ..self }
    }

    pub const fn initial(&self) -> Duration {
        self.initial
    }

    pub const fn cap(&self) -> Duration {
        self.cap
    }

    /// The base of attempt `attempt` (1 for the first retry; 0 counts as 1): `initial`
    /// doubled `attempt - 1` times, at most `cap`.
    pub fn base(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The pause before attempt `attempt`, placed in its jitter range by `random`.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let base = self.base(attempt);
        let base_nanos = base.as_nanos();
        let range = base_nanos * u128::from(self.jitter.percent) / 100;
        let drawn = range * u128::from(random) / u128::from(u64::MAX);
        let nanos = base_nanos - range + drawn;
        Duration::new(
            u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX),
            // Below 10^9: fits.
            u32::try_from(nanos % 1_000_000_000).unwrap_or(0),
        )
    }
}

/// Failures in a row under one [`Backoff`].
#[derive(Debug, Clone)]
pub struct Retry {
    policy: Backoff,
    failures: u32,
}

impl Retry {
    pub fn new(policy: Backoff) -> Retry {
        Retry {
            policy,
            failures: 0,
        }
    }

    /// Counts one more failure and gives the pause before the next attempt.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.policy.delay(self.failures, random)
    }

    /// After a success: the next failure pauses [`Backoff::initial`] again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Supervisor heal policy: 200 ms, capped at 30 s, pauses in [3/4 base, base].
    const HEAL: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30))
        .with_jitter(Jitter::QUARTER);
    // Proxy enrollment: windows doubling from 250 ms up to 4 s, pauses in their upper half.
    const ENROLL: Backoff =
        Backoff::new(Duration::from_millis(250), Duration::from_secs(4)).with_jitter(Jitter::HALF);
    // Proxy discovery watch: 100 ms up to 2 s, upper half.
    const DISCOVERY: Backoff =
        Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).with_jitter(Jitter::HALF);
    // Supervisor OTA client: 1 s doubling to 15 s, no jitter.
    const OTA: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(15));

    #[test]
    fn doubles_from_initial_up_to_the_cap() {
        let initial = HEAL.initial();
        let cap = HEAL.cap();
        // With the largest draw the delay is the base itself.
        let top = |attempt| HEAL.delay(attempt, u64::MAX - 1);
        let bases: Vec<_> = (1..=10).map(|a| HEAL.delay(a, 0)).collect();
        assert_eq!(bases[0], Duration::from_millis(150));
        assert_eq!(bases[1], Duration::from_millis(300));
        assert!(top(1) <= initial);
        assert_eq!(HEAL.delay(9, 0), Duration::from_millis(22_500));
        assert_eq!(HEAL.delay(40, 0), Duration::from_millis(22_500));
        assert!(top(40) <= cap);
        assert!(top(u32::MAX) <= cap);
    }

    #[test]
    fn jitter_stays_within_a_quarter_and_never_below_the_floor() {
        let initial = HEAL.initial();
        for random in [0, 1, 7, 1 << 20, 1 << 40, u64::MAX] {
            for attempt in 1..=20 {
                let d = HEAL.delay(attempt, random);
                assert!(d >= initial * 3 / 4, "{d:?}");
                assert!(d <= HEAL.cap(), "{d:?}");
            }
        }
        let spread: std::collections::BTreeSet<_> = (0..50u64)
            .map(|r| HEAL.delay(3, r.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            .collect();
        assert!(spread.len() > 10, "jitter spreads the delays");
    }

    #[test]
    fn retries_double_to_the_cap_and_reset() {
        let start = ENROLL.initial();
        let cap = ENROLL.cap();
        let mut retry = Retry::new(ENROLL);
        assert_eq!(retry.next_delay(u64::MAX), start);
        assert_eq!(retry.next_delay(0), start);
        for _ in 0..10 {
            assert!(retry.next_delay(u64::MAX) <= cap);
        }
        assert_eq!(retry.next_delay(u64::MAX), cap);
        assert_eq!(retry.next_delay(0), cap / 2);
        retry.reset();
        assert_eq!(retry.failures(), 0);
        assert_eq!(retry.next_delay(u64::MAX), start);
    }

    #[test]
    fn the_discovery_backoff_grows_to_two_seconds_with_jitter() {
        let first = DISCOVERY.initial();
        let max = DISCOVERY.cap();
        for failures in 1..40 {
            for random in [0, 1 << 31, u64::MAX] {
                let pause = DISCOVERY.delay(failures, random);
                assert!(pause <= max, "{failures}: {pause:?}");
                assert!(pause >= first / 2, "{failures}: {pause:?}");
            }
        }
        assert!(DISCOVERY.delay(1, u64::MAX) <= first);
        assert!(DISCOVERY.delay(30, 0) >= max / 2);
    }

    #[test]
    fn without_jitter_the_pause_is_the_base() {
        let pauses: Vec<_> = (1..=6).map(|a| OTA.delay(a, 12_345).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 15, 15]);
        assert_eq!(OTA.delay(0, u64::MAX), Duration::from_secs(1));
    }

    #[test]
    fn a_jitter_share_above_all_of_it_counts_as_all() {
        let all = Backoff::new(Duration::from_secs(1), Duration::from_secs(1))
            .with_jitter(Jitter::percent(200));
        assert_eq!(all.delay(1, 0), Duration::ZERO);
        assert_eq!(all.delay(1, u64::MAX), Duration::from_secs(1));
    }
}
