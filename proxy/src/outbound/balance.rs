//! Endpoint choice: power of two choices over peak-EWMA latency, with ejection of endpoints
//! that keep failing (Finagle's / Linkerd's load balancer, plus failure accrual).
//!
//! Cost of an endpoint = its latency estimate × (requests in flight + 1). The estimate is a
//! peak EWMA with a 10 s time constant: a sample above the estimate replaces it at once, a
//! sample below moves it toward the sample by `1 - e^(-Δt/τ)` where Δt is the time since the
//! previous sample. Read at pick time, the estimate also decays toward zero by `e^(-Δt/τ)`,
//! so that an endpoint that was slow once and then left alone is tried again rather than
//! shunned forever (as Finagle's and tower's peak EWMA do). An endpoint never measured costs
//! [`DEFAULT_RTT`].
//!
//! Ejection: [`FAILURE_THRESHOLD`] consecutive failures eject an endpoint for
//! [`FIRST_EJECTION`], doubling on each re-ejection up to [`MAX_EJECTION`]. When an ejection
//! ends the endpoint is on probation: it is eligible again, but its failure count is kept, so
//! its next failure ejects it again at once (with the doubled period). One success clears
//! both the failure count and the backoff.
//!
//! Cost of a pick: two uncontended locks and a few atomics, no allocation. When some
//! endpoints are ejected it may scan all endpoints (atomics only), so it is O(n) in the worst
//! case, which is fine for the handful of endpoints a service has on a small site.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The cost of an endpoint with no latency sample yet (Linkerd's default RTT).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// The peak EWMA's decay time constant.
pub const DECAY: Duration = Duration::from_secs(10);
/// Consecutive failures that eject an endpoint.
pub const FAILURE_THRESHOLD: u32 = 5;
/// The first ejection's length; each re-ejection without a success in between doubles it.
pub const FIRST_EJECTION: Duration = Duration::from_secs(5);
/// The longest ejection.
pub const MAX_EJECTION: Duration = Duration::from_secs(60);

/// A fixed set of endpoints (rebuilt on config reload) and what is known of each.
///
/// Invariant: `endpoints` and `stats` have the same length and index.
pub struct Balancer<E> {
    endpoints: Box<[E]>,
    stats: Box<[Arc<Stats>]>,
    /// The origin of the nanosecond timestamps in [`Stats::ejected_until`].
    epoch: Instant,
}

/// One endpoint's load and health, shared with its outstanding [`Pick`]s.
struct Stats {
    /// Picks not yet recorded or dropped.
    in_flight: AtomicU32,
    /// Nanoseconds since the balancer's epoch before which the endpoint is ejected; 0 when
    /// it never was. Written only under `health`'s lock; read without it by `pick`.
    ejected_until: AtomicU64,
    health: Mutex<Health>,
}

struct Health {
    /// The latency estimate in nanoseconds as of `stamp`; `None` until the first success.
    estimate_ns: Option<f64>,
    stamp: Instant,
    /// Failures since the last success (not reset by an ejection: see the module docs).
    consecutive_failures: u32,
    /// The length of the next ejection.
    next_ejection: Duration,
}

impl Stats {
    fn new(now: Instant) -> Stats {
        Stats {
            in_flight: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            health: Mutex::new(Health {
                estimate_ns: None,
                stamp: now,
                consecutive_failures: 0,
                next_ejection: FIRST_EJECTION,
            }),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn eligible(&self, now_ns: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) <= now_ns
    }

    /// The estimate decayed to `now`, times (in flight + 1).
    fn cost(&self, now: Instant) -> f64 {
        let latency = {
            let health = self.health();
            match health.estimate_ns {
                None => DEFAULT_RTT.as_nanos() as f64,
                Some(estimate) => {
                    estimate * decay_weight(now.saturating_duration_since(health.stamp))
                }
            }
        };
        // A floor so that in-flight requests still count when the estimate is ~0.
        let in_flight = f64::from(self.in_flight.load(Ordering::Relaxed));
        latency.max(1.0) * (in_flight + 1.0)
    }
}

/// `e^(-elapsed/τ)`: how much of the previous estimate survives `elapsed`.
fn decay_weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

impl<E: Clone> Balancer<E> {
    pub fn new(endpoints: Vec<E>) -> Self {
        let epoch = Instant::now();
        let stats = endpoints
            .iter()
            .map(|_| Arc::new(Stats::new(epoch)))
            .collect();
        Balancer {
            endpoints: endpoints.into_boxed_slice(),
            stats,
            epoch,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Picks an endpoint now; see [`Balancer::pick_at`].
    pub fn pick(&self) -> Option<Pick<E>> {
        self.pick_at(Instant::now())
    }

    /// Picks an endpoint as of `now`: of two distinct random endpoints among those not
    /// ejected, the one with the lower cost. With a single eligible endpoint, that one; with
    /// none (all ejected), the one whose ejection ends soonest, as a probe. `None` only when
    /// there are no endpoints. The pick counts as in flight until it is recorded or dropped.
    pub fn pick_at(&self, now: Instant) -> Option<Pick<E>> {
        self.pick_where(now, |_| true)
    }

    /// [`Balancer::pick`] among the endpoints not in `tried`: where a request goes after
    /// those refused it. `None` when every endpoint has been tried.
    pub fn pick_except(&self, tried: &[E]) -> Option<Pick<E>>
    where
        E: PartialEq,
    {
        self.pick_where(Instant::now(), |i| !tried.contains(&self.endpoints[i]))
    }

    /// The pick among the endpoints `allowed` accepts (by index).
    fn pick_where(&self, now: Instant, allowed: impl Fn(usize) -> bool) -> Option<Pick<E>> {
        let n = self.stats.len();
        let now_ns = nanos_since(self.epoch, now);
        let usable = |i: usize| allowed(i) && self.stats[i].eligible(now_ns);
        let chosen = match n {
            0 => return None,
            1 => allowed(0).then_some(0)?,
            _ => {
                // Two distinct uniform indices; if both are usable they are a uniform pair
                // of usable endpoints (rejection sampling), the common case.
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                if usable(a) && usable(b) {
                    self.cheaper(a, b, now)
                } else {
                    self.pick_among(&allowed, &usable, now)?
                }
            }
        };
        self.stats[chosen].in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Pick {
            endpoint: self.endpoints[chosen].clone(),
            stats: Arc::clone(&self.stats[chosen]),
            epoch: self.epoch,
        })
    }

    fn cheaper(&self, a: usize, b: usize, now: Instant) -> usize {
        if self.stats[b].cost(now) < self.stats[a].cost(now) {
            b
        } else {
            a
        }
    }

    /// The slow path, when some endpoints are ejected or not allowed: two distinct random
    /// usable ones, the only usable one, or, when none is usable, the allowed one whose
    /// ejection ends soonest, as a probe. `None` when none is allowed.
    fn pick_among(
        &self,
        allowed: &impl Fn(usize) -> bool,
        usable: &impl Fn(usize) -> bool,
        now: Instant,
    ) -> Option<usize> {
        let n = self.stats.len();
        let count = (0..n).filter(|&i| usable(i)).count();
        let nth_usable = |rank: usize| (0..n).filter(|&i| usable(i)).nth(rank);
        match count {
            0 => (0..n)
                .filter(|&i| allowed(i))
                .min_by_key(|&i| self.stats[i].ejected_until.load(Ordering::Relaxed)),
            1 => nth_usable(0),
            _ => {
                let a = fastrand::usize(..count);
                let b = (a + 1 + fastrand::usize(..count - 1)) % count;
                Some(self.cheaper(nth_usable(a)?, nth_usable(b)?, now))
            }
        }
    }
}

/// A chosen endpoint, counted in its in-flight requests (and so its cost) until recorded
/// with [`Pick::success`] / [`Pick::failure`] or dropped. Dropping a pick unrecorded (e.g.
/// the request was cancelled) only ends the in-flight count: neither latency nor health
/// changes.
pub struct Pick<E> {
    pub endpoint: E,
    stats: Arc<Stats>,
    epoch: Instant,
}

impl<E> Pick<E> {
    /// The endpoint answered (not 5xx) after `latency`.
    pub fn success(self, latency: Duration) {
        self.success_at(latency, Instant::now());
    }

    /// [`Pick::success`] as of `now`: feeds the latency estimate and clears the endpoint's
    /// failure count and ejection backoff.
    pub fn success_at(self, latency: Duration, now: Instant) {
        let sample = latency.as_nanos() as f64;
        let mut health = self.stats.health();
        health.estimate_ns = Some(match health.estimate_ns {
            None => sample,
            Some(estimate) if sample > estimate => sample,
            Some(estimate) => {
                let w = decay_weight(now.saturating_duration_since(health.stamp));
                estimate * w + sample * (1.0 - w)
            }
        });
        health.stamp = now;
        health.consecutive_failures = 0;
        health.next_ejection = FIRST_EJECTION;
        // in-flight ends on drop
    }

    /// The endpoint failed: connect error, or a 5xx from it.
    pub fn failure(self) {
        self.failure_at(Instant::now());
    }

    /// [`Pick::failure`] as of `now`: counts the failure and ejects the endpoint when it makes
    /// [`FAILURE_THRESHOLD`] in a row. A failure while already ejected (a request picked
    /// before the ejection) counts but does not extend the ejection.
    pub fn failure_at(self, now: Instant) {
        let now_ns = nanos_since(self.epoch, now);
        let mut health = self.stats.health();
        health.consecutive_failures = health.consecutive_failures.saturating_add(1);
        if health.consecutive_failures >= FAILURE_THRESHOLD && self.stats.eligible(now_ns) {
            let length = health.next_ejection;
            let until = now_ns.saturating_add(u64::try_from(length.as_nanos()).unwrap_or(u64::MAX));
            // Never 0, which means "not ejected".
            self.stats
                .ejected_until
                .store(until.max(1), Ordering::Relaxed);
            health.next_ejection = (length * 2).min(MAX_EJECTION);
        }
    }
}

impl<E> Drop for Pick<E> {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(balancer: &Balancer<usize>, picks: usize, now: Instant) -> Vec<usize> {
        let mut counts = vec![0; balancer.len()];
        for _ in 0..picks {
            let pick = balancer.pick_at(now).expect("an endpoint");
            counts[pick.endpoint] += 1;
        }
        counts
    }

    #[test]
    fn a_redial_never_returns_to_an_endpoint_already_tried() {
        let balancer = Balancer::new(vec![10usize, 11, 12]);
        for _ in 0..1000 {
            let pick = balancer.pick_except(&[10, 12]).expect("11 is left");
            assert_eq!(pick.endpoint, 11);
        }
        assert!(balancer.pick_except(&[10, 11, 12]).is_none());
        let single = Balancer::new(vec![7usize]);
        assert!(single.pick_except(&[7]).is_none());
        assert_eq!(single.pick_except(&[]).map(|p| p.endpoint), Some(7));
    }

    #[test]
    fn no_endpoints() {
        let balancer: Balancer<usize> = Balancer::new(vec![]);
        assert_eq!(balancer.len(), 0);
        assert!(balancer.pick().is_none());
    }

    #[test]
    fn single_endpoint_even_when_ejected() {
        let balancer = Balancer::new(vec![7]);
        let t0 = Instant::now();
        for _ in 0..FAILURE_THRESHOLD {
            balancer.pick_at(t0).expect("pick").failure_at(t0);
        }
        assert!(!balancer.stats[0].eligible(nanos_since(balancer.epoch, t0)));
        assert_eq!(balancer.pick_at(t0).expect("probe").endpoint, 7);
    }

    #[test]
    fn slow_endpoint_gets_far_fewer_picks() {
        fastrand::seed(7);
        let balancer = Balancer::new(vec![0, 1, 2]);
        let mut now = Instant::now();
        let mut counts = [0usize; 3];
        for _ in 0..10_000 {
            now += Duration::from_millis(1);
            let pick = balancer.pick_at(now).expect("pick");
            let latency = if pick.endpoint == 2 {
                Duration::from_millis(200)
            } else {
                Duration::from_millis(5)
            };
            counts[pick.endpoint] += 1;
            pick.success_at(latency, now);
        }
        // The slow one is still probed once its estimate decays, but rarely.
        assert!(counts[2] < 500, "{counts:?}");
        assert!(counts[0] > 3_000 && counts[1] > 3_000, "{counts:?}");
    }

    /// A pick of endpoint `i`, made as `pick_at` makes one, whatever the costs.
    fn pick_of(balancer: &Balancer<usize>, i: usize) -> Pick<usize> {
        balancer.stats[i].in_flight.fetch_add(1, Ordering::Relaxed);
        Pick {
            endpoint: i,
            stats: Arc::clone(&balancer.stats[i]),
            epoch: balancer.epoch,
        }
    }

    #[test]
    fn in_flight_raises_cost() {
        fastrand::seed(3);
        let balancer = Balancer::new(vec![0, 1]);
        let now = Instant::now();
        pick_of(&balancer, 0).success_at(Duration::from_millis(5), now);
        pick_of(&balancer, 1).success_at(Duration::from_millis(10), now);
        // With two endpoints both are always the candidates: the faster one wins.
        assert_eq!(counts(&balancer, 100, now), vec![100, 0]);
        let first = balancer.pick_at(now).expect("pick");
        assert_eq!(first.endpoint, 0);
        // One request in flight on 0: 5 ms × 2 = 10 ms, a tie with 1.
        assert_eq!(balancer.stats[0].cost(now), 10e6);
        assert_eq!(balancer.stats[1].cost(now), 10e6);
        // Two in flight: 15 ms > 10 ms, 1 wins.
        let second = pick_of(&balancer, 0);
        assert_eq!(counts(&balancer, 100, now), vec![0, 100]);
        // Dropping picks (recorded or not) ends their in-flight count.
        drop(second);
        first.failure_at(now);
        assert_eq!(balancer.stats[0].in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(balancer.stats[1].in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(counts(&balancer, 100, now), vec![100, 0]);
    }

    #[test]
    fn failing_endpoint_is_ejected_then_probed_back() {
        fastrand::seed(11);
        let balancer = Balancer::new(vec![0, 1, 2]);
        let t0 = Instant::now();
        let fail = |now: Instant| loop {
            let pick = balancer.pick_at(now).expect("pick");
            if pick.endpoint == 0 {
                pick.failure_at(now);
                return;
            }
        };
        for _ in 0..FAILURE_THRESHOLD - 1 {
            fail(t0);
        }
        assert!(counts(&balancer, 300, t0)[0] > 0, "not yet ejected");
        fail(t0);
        assert_eq!(counts(&balancer, 1_000, t0)[0], 0, "ejected");
        let t = t0 + FIRST_EJECTION - Duration::from_millis(1);
        assert_eq!(counts(&balancer, 1_000, t)[0], 0, "still ejected");

        // Back after 5 s, on probation: one more failure ejects it for 10 s.
        let t1 = t0 + FIRST_EJECTION;
        assert!(counts(&balancer, 300, t1)[0] > 0, "probed back");
        fail(t1);
        let t = t1 + Duration::from_secs(10) - Duration::from_millis(1);
        assert_eq!(counts(&balancer, 1_000, t)[0], 0, "re-ejected, doubled");

        // Then 20 s, 40 s, 60 s, 60 s.
        let mut t = t1 + Duration::from_secs(10);
        for length in [20, 40, 60, 60] {
            fail(t);
            let before_end = t + Duration::from_secs(length) - Duration::from_millis(1);
            assert_eq!(counts(&balancer, 500, before_end)[0], 0, "{length}s");
            t += Duration::from_secs(length);
        }

        // A success clears it: five more failures are needed, and the backoff is 5 s again.
        let pick = loop {
            let pick = balancer.pick_at(t).expect("pick");
            if pick.endpoint == 0 {
                break pick;
            }
        };
        pick.success_at(Duration::from_millis(1), t);
        for _ in 0..FAILURE_THRESHOLD - 1 {
            fail(t);
        }
        assert!(counts(&balancer, 300, t)[0] > 0, "failure count was reset");
        fail(t);
        assert_eq!(counts(&balancer, 500, t)[0], 0);
        assert!(
            counts(&balancer, 300, t + FIRST_EJECTION)[0] > 0,
            "backoff was reset"
        );
    }

    #[test]
    fn all_ejected_probes_the_soonest() {
        let balancer = Balancer::new(vec![0, 1, 2]);
        let t0 = Instant::now();
        for (endpoint, at) in [(1, 0u64), (0, 1), (2, 2)] {
            let now = t0 + Duration::from_secs(at);
            let mut failures = 0;
            while failures < FAILURE_THRESHOLD {
                let pick = balancer.pick_at(now).expect("pick");
                if pick.endpoint == endpoint {
                    pick.failure_at(now);
                    failures += 1;
                }
            }
        }
        // All ejected at t0+2 s; endpoint 1's ejection (from t0) ends first.
        let now = t0 + Duration::from_secs(2);
        assert_eq!(counts(&balancer, 50, now), vec![0, 50, 0]);
        // At t0+5 s endpoint 1 is back and the only eligible one.
        let now = t0 + FIRST_EJECTION;
        assert_eq!(counts(&balancer, 50, now), vec![0, 50, 0]);
    }

    #[test]
    fn peak_ewma() {
        let balancer = Balancer::new(vec![0]);
        let t0 = Instant::now();
        let stats = Arc::clone(&balancer.stats[0]);
        assert_eq!(stats.cost(t0), DEFAULT_RTT.as_nanos() as f64);
        let record = |latency_ms: u64, at: Instant| {
            balancer
                .pick_at(at)
                .expect("pick")
                .success_at(Duration::from_millis(latency_ms), at);
        };
        record(10, t0);
        assert_eq!(stats.cost(t0), 10e6);
        // A peak replaces the estimate at once.
        record(100, t0);
        assert_eq!(stats.cost(t0), 100e6);
        // Below: moves toward the sample by 1 - e^(-Δt/τ).
        let t1 = t0 + DECAY;
        record(10, t1);
        let w = (-1.0f64).exp();
        let expected = 100e6 * w + 10e6 * (1.0 - w);
        assert!(
            (stats.cost(t1) - expected).abs() < 1.0,
            "{}",
            stats.cost(t1)
        );
        // Idle, it decays toward zero.
        let idle = stats.cost(t1 + DECAY);
        assert!((idle - expected * w).abs() < 1.0, "{idle}");
    }
}
