//! When to renew a leaf, and how long to wait after a failed attempt.

use std::time::{Duration, SystemTime};

use pimesh_runtime::backoff::{Backoff, Jitter};

/// The pauses after failed attempts: each drawn from the upper half of a window that
/// doubles from 250 ms up to 4 s, so that a replica that comes back is used within a few
/// seconds.
pub const BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(250), Duration::from_secs(4)).with_jitter(Jitter::HALF);

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

#[cfg(test)]
mod tests {
    use super::*;
    use pimesh_runtime::backoff::Retry;

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
        let start = Duration::from_millis(250);
        let cap = Duration::from_secs(4);
        let mut backoff = Retry::new(BACKOFF);
        assert_eq!(backoff.next_delay(u64::MAX), start);
        assert_eq!(backoff.next_delay(0), start);
        for _ in 0..10 {
            assert!(backoff.next_delay(u64::MAX) <= cap);
        }
        assert_eq!(backoff.next_delay(u64::MAX), cap);
        assert_eq!(backoff.next_delay(0), cap / 2);
        backoff.reset();
        assert_eq!(backoff.next_delay(u64::MAX), start);
    }
}
