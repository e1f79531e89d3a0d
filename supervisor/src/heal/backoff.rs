//! Exponential backoff with jitter, as a pure function of the attempt number.

use std::time::Duration;

/// The wait before heal attempt number `attempt` (1 for the first retry).
///
/// The base doubles from `initial` with each attempt and never exceeds `cap`; `random`
/// (any `u64`, e.g. from a hasher) spreads the result over `[3/4 base, base]`, so that
/// several units failing together do not retry in lock-step. The result is never shorter
/// than `3/4 initial` and never longer than `cap`: the caller can never hot-loop.
pub fn delay(attempt: u32, initial: Duration, cap: Duration, random: u64) -> Duration {
    let doublings = attempt.saturating_sub(1).min(32);
    let base = initial
        .checked_mul(1u32 << doublings.min(31))
        .unwrap_or(cap)
        .min(cap);
    let quarter = base / 4;
    let quarter_nanos = u64::try_from(quarter.as_nanos()).unwrap_or(u64::MAX);
    let spread = match quarter_nanos {
        0 => 0,
        nanos => random % (nanos + 1),
    };
    base - quarter + Duration::from_nanos(spread)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INITIAL: Duration = Duration::from_millis(200);
    const CAP: Duration = Duration::from_secs(30);

    #[test]
    fn doubles_from_initial_up_to_the_cap() {
        // With the largest jitter the delay is the base itself.
        let top = |attempt| delay(attempt, INITIAL, CAP, u64::MAX - 1);
        let bases: Vec<_> = (1..=10).map(|a| delay(a, INITIAL, CAP, 0)).collect();
        assert_eq!(bases[0], Duration::from_millis(150));
        assert_eq!(bases[1], Duration::from_millis(300));
        assert!(top(1) <= INITIAL);
        assert_eq!(delay(9, INITIAL, CAP, 0), Duration::from_millis(22_500));
        assert_eq!(delay(40, INITIAL, CAP, 0), Duration::from_millis(22_500));
        assert!(top(40) <= CAP);
        assert!(top(u32::MAX) <= CAP);
    }

    #[test]
    fn jitter_stays_within_a_quarter_and_never_below_the_floor() {
        for random in [0, 1, 7, 1 << 20, 1 << 40, u64::MAX] {
            for attempt in 1..=20 {
                let d = delay(attempt, INITIAL, CAP, random);
                assert!(d >= INITIAL * 3 / 4, "{d:?}");
                assert!(d <= CAP, "{d:?}");
            }
        }
        let spread: std::collections::BTreeSet<_> = (0..50u64)
            .map(|r| delay(3, INITIAL, CAP, r.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            .collect();
        assert!(spread.len() > 10, "jitter spreads the delays");
    }
}
