//! Retry budget, as in Finagle and Linkerd: retries may add at most `percent`% to the
//! requests of the last `ttl`, plus a floor of `min_per_second` retries per second (averaged
//! over the window) so that low traffic can still retry.
//!
//! Accounting, in integer units so that it is exact: a deposit (an original request) adds
//! `percent` units; a retry costs 100. Both land in the bucket of the current whole second and
//! expire with it once it leaves the window of `ttl` (rounded up to whole seconds, 1..=60). The
//! floor is a fixed reserve of `min_per_second × window seconds × 100` units. A withdrawal
//! succeeds while reserve + the window's sum ≥ 100.
//!
//! Example (percent 20, floor 10/s, ttl 10 s): 100 requests allow 20 retries, plus 100 from
//! the floor, within any 10 s.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Units one retry costs; a deposit adds `percent` of them.
const RETRY_COST: i64 = 100;
/// The longest window, in seconds (one bucket per second).
const MAX_WINDOW_SECS: u64 = 60;

pub struct RetryBudget {
    /// Units a deposit adds.
    deposit: i64,
    /// The floor's units, always available on top of the buckets.
    reserve: i64,
    epoch: Instant,
    window: Mutex<Window>,
}

/// Invariant: `sum` is the sum of `buckets`, and `buckets[s % len]` holds second `s` for
/// `s` in `(second - len, second]`.
struct Window {
    buckets: Box<[i64]>,
    /// The second (since `epoch`) of the newest bucket.
    second: u64,
    sum: i64,
}

impl Window {
    /// Moves the window to `second`, expiring the buckets that leave it.
    fn advance(&mut self, second: u64) {
        if second <= self.second {
            return;
        }
        let len = self.buckets.len() as u64;
        let expired = (second - self.second).min(len);
        for s in (second - expired + 1)..=second {
            let slot = &mut self.buckets[(s % len) as usize];
            self.sum -= *slot;
            *slot = 0;
        }
        self.second = second;
    }

    fn current(&mut self) -> &mut i64 {
        let len = self.buckets.len() as u64;
        &mut self.buckets[(self.second % len) as usize]
    }
}

impl RetryBudget {
    /// Retries may add at most `percent`% to the requests of the last `ttl` (rounded up to
    /// whole seconds, clamped to 1..=60), plus `min_per_second` retries per second.
    pub fn new(percent: u8, min_per_second: u32, ttl: Duration) -> RetryBudget {
        let secs = ttl
            .as_secs()
            .saturating_add(u64::from(ttl.subsec_nanos() > 0))
            .clamp(1, MAX_WINDOW_SECS);
        RetryBudget {
            deposit: i64::from(percent),
            reserve: i64::from(min_per_second) * secs as i64 * RETRY_COST,
            epoch: Instant::now(),
            window: Mutex::new(Window {
                buckets: vec![0; secs as usize].into_boxed_slice(),
                second: 0,
                sum: 0,
            }),
        }
    }

    /// Records one original request.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Asks for one retry; `true` when it is within budget (and then counted).
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    pub fn deposit_at(&self, now: Instant) {
        let mut window = self.window_at(now);
        *window.current() += self.deposit;
        window.sum += self.deposit;
    }

    pub fn try_withdraw_at(&self, now: Instant) -> bool {
        let mut window = self.window_at(now);
        if self.reserve + window.sum < RETRY_COST {
            return false;
        }
        *window.current() -= RETRY_COST;
        window.sum -= RETRY_COST;
        true
    }

    fn window_at(&self, now: Instant) -> std::sync::MutexGuard<'_, Window> {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        window.advance(now.saturating_duration_since(self.epoch).as_secs());
        window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn withdrawals(budget: &RetryBudget, now: Instant) -> usize {
        let mut n = 0;
        while budget.try_withdraw_at(now) {
            n += 1;
            assert!(n <= 100_000, "unbounded");
        }
        n
    }

    #[test]
    fn percent_of_requests_plus_floor() {
        let budget = RetryBudget::new(20, 10, TTL);
        let now = Instant::now();
        for _ in 0..100 {
            budget.deposit_at(now);
        }
        // 20% of 100, plus the floor: 10/s over 10 s.
        assert_eq!(withdrawals(&budget, now), 20 + 100);
        assert!(!budget.try_withdraw_at(now));
        // A deposit is a fifth of a retry: five more requests buy one more.
        for _ in 0..4 {
            budget.deposit_at(now);
        }
        assert!(!budget.try_withdraw_at(now));
        budget.deposit_at(now);
        assert!(budget.try_withdraw_at(now));
    }

    #[test]
    fn percent_zero_allows_only_the_floor() {
        let budget = RetryBudget::new(0, 10, TTL);
        let now = Instant::now();
        for _ in 0..1_000 {
            budget.deposit_at(now);
        }
        assert_eq!(withdrawals(&budget, now), 100);
    }

    #[test]
    fn no_floor() {
        let budget = RetryBudget::new(50, 0, TTL);
        let now = Instant::now();
        assert!(!budget.try_withdraw_at(now));
        budget.deposit_at(now);
        budget.deposit_at(now);
        assert_eq!(withdrawals(&budget, now), 1);
    }

    #[test]
    fn deposits_and_withdrawals_expire_after_ttl() {
        let budget = RetryBudget::new(20, 0, TTL);
        let t0 = Instant::now();
        for _ in 0..100 {
            budget.deposit_at(t0);
        }
        assert_eq!(withdrawals(&budget, t0 + Duration::from_secs(9)), 20);
        // Later deposits still count while the window holds them.
        let t1 = t0 + Duration::from_secs(5);
        for _ in 0..50 {
            budget.deposit_at(t1);
        }
        assert_eq!(withdrawals(&budget, t0 + Duration::from_secs(9)), 10);
        // At 10 s the first second leaves the window: its deposits and the 20 retries charged
        // to it go; the 10 retries charged at 9 s still offset t1's deposits.
        assert_eq!(withdrawals(&budget, t0 + TTL), 0);
        // At 15 s t1's deposits are gone too; at 19 s so are the retries of 9 s.
        assert_eq!(withdrawals(&budget, t1 + TTL), 0);
        for _ in 0..5 {
            budget.deposit_at(t0 + Duration::from_secs(19));
        }
        assert_eq!(withdrawals(&budget, t0 + Duration::from_secs(19)), 1);
        // A long gap clears everything.
        assert_eq!(withdrawals(&budget, t0 + Duration::from_secs(1_000)), 0);
    }

    #[test]
    fn floor_refills_as_the_window_moves() {
        let budget = RetryBudget::new(0, 10, TTL);
        let t0 = Instant::now();
        assert_eq!(withdrawals(&budget, t0), 100);
        assert_eq!(withdrawals(&budget, t0 + Duration::from_secs(9)), 0);
        assert_eq!(withdrawals(&budget, t0 + TTL), 100);
    }

    #[test]
    fn ttl_is_rounded_and_clamped() {
        let now = Instant::now();
        let budget = RetryBudget::new(0, 10, Duration::from_millis(1_500));
        assert_eq!(withdrawals(&budget, now), 20);
        let budget = RetryBudget::new(0, 10, Duration::ZERO);
        assert_eq!(withdrawals(&budget, now), 10);
        let budget = RetryBudget::new(0, 1, Duration::from_secs(3_600));
        assert_eq!(withdrawals(&budget, now), 60);
    }
}
