//! When to renew a leaf, and how long to wait after a failed attempt.

use std::time::{Duration, SystemTime};

/// The first pause after a failed attempt.
pub const BACKOFF_START: Duration = Duration::from_millis(250);
/// The longest pause between failed attempts: a replica that comes back is used within
/// a few seconds.
pub const BACKOFF_CAP: Duration = Duration::from_secs(4);

/// When to renew a leaf that was received (or read back) at `received` and expires at
/// `not_after`: two thirds into the remaining life, moved by `jitter` (in `-1.0..=1.0`)
/// times a tenth of the last third, so that proxies started together spread their
/// renewals. The leaf's own `not_before` is not used: issuers backdate it.
///
/// Invariant: the result lies strictly between `received` and `not_after` when
/// `not_after` is later than `received`, and is `received` otherwise.
pub fn renew_at(received: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let Ok(left) = not_after.duration_since(received) else {
        return received;
    };
    let third = left / 3;
    let spread = third.mul_f64(0.1 * jitter.abs().min(1.0));
    let base = received + third * 2;
    if jitter < 0.0 {
        base - spread
    } else {
        base + spread
    }
}

/// Exponential backoff with jitter: each pause is drawn from the upper half of a window
/// that doubles from [`BACKOFF_START`] up to [`BACKOFF_CAP`].
#[derive(Debug, Clone)]
pub struct Backoff {
    window: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            window: BACKOFF_START,
        }
    }
}

impl Backoff {
    /// The pause before the next attempt, given `unit` (in `0.0..=1.0`, random).
    pub fn next(&mut self, unit: f64) -> Duration {
        let pause = self.window.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0));
        self.window = (self.window * 2).min(BACKOFF_CAP);
        pause
    }

    /// After a success: start small again.
    pub fn reset(&mut self) {
        self.window = BACKOFF_START;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_two_thirds_within_a_tenth_of_the_last_third() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        let third = day / 3;
        assert_eq!(renew_at(now, now + day, 0.0), now + third * 2);
        assert_eq!(renew_at(now, now + day, 1.0), now + third * 2 + third / 10);
        assert_eq!(renew_at(now, now + day, -1.0), now + third * 2 - third / 10);
        assert_eq!(renew_at(now, now + day, 7.0), now + third * 2 + third / 10);
        assert_eq!(renew_at(now, now - day, 0.5), now, "already expired: now");
        let six = renew_at(now, now + Duration::from_secs(6), 0.0);
        assert_eq!(six, now + Duration::from_secs(4));
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut backoff = Backoff::default();
        assert_eq!(backoff.next(1.0), BACKOFF_START);
        assert_eq!(backoff.next(0.0), BACKOFF_START);
        for _ in 0..10 {
            assert!(backoff.next(1.0) <= BACKOFF_CAP);
        }
        assert_eq!(backoff.next(1.0), BACKOFF_CAP);
        assert_eq!(backoff.next(0.0), BACKOFF_CAP / 2);
        backoff.reset();
        assert_eq!(backoff.next(1.0), BACKOFF_START);
    }
}
