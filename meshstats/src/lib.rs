//! A mesh proxy's numbers read back from its admin `/metrics` (Prometheus text format):
//! successive scrapes kept over a window, and per service the rates, success and latency
//! quantiles between the window's first and last scrape. The demo's page shows them live;
//! the supervisor sends them with its node's reports.
//!
//! Read, per destination service, from the proxy's outbound series:
//! `request_total`, `response_total{classification}` (Linkerd's: 5xx or no answer is a
//! failure), `response_latency_ms` (histogram, ms), `tcp_*_bytes_total` (opaque TCP);
//! and `pimesh_split_total{service,backend}`, `pimesh_fault_injected_total{dst_service,kind}`.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

/// One sample line: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// The samples of a Prometheus text exposition; comments and lines that do not parse are
/// skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        other => other.parse().ok(),
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        let mut end = None;
        // States: reading a key, then `="`, then an escaped value up to `"`, then `,` or `}`.
        while let Some((at, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(at);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key).trim().to_owned(), value));
                }
                other => key.push(other),
            }
        }
        rest = &inner[end? + 1..];
    }
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// One service's counters at one scrape.
#[derive(Debug, Clone, Default)]
struct Counters {
    requests: f64,
    success: f64,
    failure: f64,
    latency_count: f64,
    latency_sum: f64,
    /// `(le, cumulative count)`, by `le`.
    buckets: Vec<(f64, f64)>,
    tcp_open: f64,
    tcp_close: f64,
    tcp_bytes: f64,
}

impl Counters {
    /// Opaque TCP: connections opened and no HTTP request (every route has `tcp_*` series,
    /// at zero when unused).
    fn is_tcp(&self) -> bool {
        self.tcp_open > 0.0 && self.requests == 0.0 && self.success + self.failure == 0.0
    }
}

/// What one scrape says.
#[derive(Debug, Clone)]
pub struct Scrape {
    at: Instant,
    services: BTreeMap<String, Counters>,
    splits: BTreeMap<(String, String), f64>,
    faults: BTreeMap<(String, String), f64>,
}

impl Scrape {
    pub fn of(text: &str, at: Instant) -> Scrape {
        let mut scrape = Scrape {
            at,
            services: BTreeMap::new(),
            splits: BTreeMap::new(),
            faults: BTreeMap::new(),
        };
        for sample in parse(text) {
            match sample.name.as_str() {
                "pimesh_split_total" => {
                    if let (Some(service), Some(backend)) =
                        (sample.label("service"), sample.label("backend"))
                    {
                        *scrape
                            .splits
                            .entry((service.to_owned(), backend.to_owned()))
                            .or_default() += sample.value;
                    }
                    continue;
                }
                "pimesh_fault_injected_total" => {
                    if let (Some(service), Some(kind)) =
                        (sample.label("dst_service"), sample.label("kind"))
                    {
                        *scrape
                            .faults
                            .entry((service.to_owned(), kind.to_owned()))
                            .or_default() += sample.value;
                    }
                    continue;
                }
                _ => {}
            }
            if sample.label("direction") != Some("outbound") {
                continue;
            }
            let Some(service) = sample.label("dst_service") else {
                continue;
            };
            let counters = scrape.services.entry(service.to_owned()).or_default();
            match sample.name.as_str() {
                "request_total" => counters.requests += sample.value,
                "response_total" => {
                    if sample.label("classification") == Some("success") {
                        counters.success += sample.value;
                    } else {
                        counters.failure += sample.value;
                    }
                }
                "response_latency_ms_count" => counters.latency_count += sample.value,
                "response_latency_ms_sum" => counters.latency_sum += sample.value,
                "response_latency_ms_bucket" => {
                    if let Some(le) = sample.label("le").and_then(parse_value) {
                        counters.buckets.push((le, sample.value));
                    }
                }
                "tcp_read_bytes_total" | "tcp_write_bytes_total" => {
                    counters.tcp_bytes += sample.value;
                }
                "tcp_open_total" => counters.tcp_open += sample.value,
                "tcp_close_total" => counters.tcp_close += sample.value,
                _ => {}
            }
        }
        for counters in scrape.services.values_mut() {
            counters.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        scrape
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ServiceView {
    pub service: String,
    pub requests_per_second: f64,
    /// Successes among the answers in the window; `None` without answers.
    pub success_rate: Option<f64>,
    pub latency_ms_mean: Option<f64>,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p95: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    pub requests_total: f64,
    pub requests_in_window: f64,
    /// Answers (or failures to answer) in the window, successes and failures.
    pub answered_in_window: f64,
    pub failures_in_window: f64,
    /// Connections open now, for an opaque TCP service.
    pub tcp_connections_open: Option<f64>,
    /// Bytes both ways per second, for an opaque TCP service (the proxy counts a
    /// connection's bytes when it closes).
    pub tcp_bytes_per_second: Option<f64>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct SplitView {
    pub service: String,
    pub backend: String,
    pub total: f64,
    pub in_window: f64,
    /// This backend's share of the service's split decisions in the window.
    pub share: Option<f64>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct FaultView {
    pub service: String,
    pub kind: String,
    pub total: f64,
    pub in_window: f64,
}

/// What `GET /mesh` answers.
#[derive(Debug, Serialize)]
pub struct MeshView {
    pub proxy: String,
    /// The span the rates cover (0 before the second scrape).
    pub window_seconds: f64,
    pub scrapes: usize,
    /// The last scrape's failure, naming the proxy.
    pub error: Option<String>,
    pub services: Vec<ServiceView>,
    pub splits: Vec<SplitView>,
    pub faults: Vec<FaultView>,
}

/// The scrapes of the last `span`.
///
/// Invariant: the first scrape kept is the newest one at least `span` older than the
/// last (or the oldest there is), so the view covers at least `span` once it can.
pub struct Window {
    proxy: String,
    span: Duration,
    scrapes: VecDeque<Scrape>,
    error: Option<String>,
}

/// Counters only grow; a drop means the proxy restarted, and then the new value is the
/// increase.
fn increase(new: f64, old: f64) -> f64 {
    if new >= old {
        new - old
    } else {
        new
    }
}

/// The `q` quantile of the observations between two cumulative histograms, interpolated
/// linearly within its bucket (as Prometheus' `histogram_quantile`).
fn quantile(q: f64, new: &[(f64, f64)], old: &[(f64, f64)]) -> Option<f64> {
    let counts: Vec<(f64, f64)> = new
        .iter()
        .map(|&(le, count)| {
            let before = old
                .iter()
                .find(|(old_le, _)| *old_le == le)
                .map_or(0.0, |(_, c)| *c);
            (le, increase(count, before))
        })
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, cumulative) in &counts {
        if cumulative >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let inside = cumulative - lower.1;
            let fraction = if inside > 0.0 {
                (rank - lower.1) / inside
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * fraction);
        }
        lower = (le, cumulative);
    }
    Some(lower.0)
}

impl Window {
    pub fn new(proxy: &str, span: Duration) -> Window {
        Window {
            proxy: proxy.to_owned(),
            span,
            scrapes: VecDeque::new(),
            error: None,
        }
    }

    pub fn push(&mut self, scrape: Scrape) {
        self.error = None;
        self.scrapes.push_back(scrape);
        // Keep the newest scrape at least `span` older than the latest, and none older.
        while self.scrapes.len() > 2
            && self
                .scrapes
                .back()
                .zip(self.scrapes.get(1))
                .is_some_and(|(latest, second)| latest.at.duration_since(second.at) >= self.span)
        {
            self.scrapes.pop_front();
        }
    }

    pub fn failed(&mut self, error: String) {
        self.error = Some(error);
    }

    pub fn view(&self) -> MeshView {
        let mut view = MeshView {
            proxy: self.proxy.clone(),
            window_seconds: 0.0,
            scrapes: self.scrapes.len(),
            error: self.error.clone(),
            services: Vec::new(),
            splits: Vec::new(),
            faults: Vec::new(),
        };
        let (Some(old), Some(new)) = (self.scrapes.front(), self.scrapes.back()) else {
            return view;
        };
        let seconds = new.at.duration_since(old.at).as_secs_f64();
        view.window_seconds = (seconds * 100.0).round() / 100.0;
        let per_second = |d: f64| if seconds > 0.0 { d / seconds } else { 0.0 };
        let empty = Counters::default();
        for (service, now) in &new.services {
            let then = old.services.get(service).unwrap_or(&empty);
            let success = increase(now.success, then.success);
            let failure = increase(now.failure, then.failure);
            let answered = success + failure;
            let count = increase(now.latency_count, then.latency_count);
            let sum = increase(now.latency_sum, then.latency_sum);
            view.services.push(ServiceView {
                service: service.clone(),
                requests_per_second: per_second(increase(now.requests, then.requests)),
                success_rate: (answered > 0.0).then(|| success / answered),
                latency_ms_mean: (count > 0.0).then(|| sum / count),
                latency_ms_p50: quantile(0.5, &now.buckets, &then.buckets),
                latency_ms_p95: quantile(0.95, &now.buckets, &then.buckets),
                latency_ms_p99: quantile(0.99, &now.buckets, &then.buckets),
                requests_total: now.requests,
                requests_in_window: increase(now.requests, then.requests),
                answered_in_window: answered,
                failures_in_window: failure,
                tcp_connections_open: now
                    .is_tcp()
                    .then_some((now.tcp_open - now.tcp_close).max(0.0)),
                tcp_bytes_per_second: now
                    .is_tcp()
                    .then(|| per_second(increase(now.tcp_bytes, then.tcp_bytes))),
            });
        }
        let mut split_window: BTreeMap<&str, f64> = BTreeMap::new();
        for ((service, backend), total) in &new.splits {
            let before = old
                .splits
                .get(&(service.clone(), backend.clone()))
                .copied()
                .unwrap_or(0.0);
            let in_window = increase(*total, before);
            *split_window.entry(service).or_default() += in_window;
            view.splits.push(SplitView {
                service: service.clone(),
                backend: backend.clone(),
                total: *total,
                in_window,
                share: None,
            });
        }
        for split in &mut view.splits {
            let all = split_window
                .get(split.service.as_str())
                .copied()
                .unwrap_or(0.0);
            split.share = (all > 0.0).then(|| split.in_window / all);
        }
        for ((service, kind), total) in &new.faults {
            let before = old
                .faults
                .get(&(service.clone(), kind.clone()))
                .copied()
                .unwrap_or(0.0);
            view.faults.push(FaultView {
                service: service.clone(),
                kind: kind.clone(),
                total: *total,
                in_window: increase(*total, before),
            });
        }
        view
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const BEFORE: &str = r#"# HELP request HTTP requests received, by route
# TYPE request counter
request_total{direction="outbound",dst_service="staff"} 100
request_total{direction="inbound",dst_service="staff"} 7
response_total{direction="outbound",dst_service="staff",status_code="200",classification="success"} 90
response_total{direction="outbound",dst_service="staff",status_code="500",classification="failure"} 10
response_latency_ms_sum{direction="outbound",dst_service="staff"} 400.0
response_latency_ms_count{direction="outbound",dst_service="staff"} 100
response_latency_ms_bucket{le="1.0",direction="outbound",dst_service="staff"} 0
response_latency_ms_bucket{le="5.0",direction="outbound",dst_service="staff"} 100
response_latency_ms_bucket{le="10.0",direction="outbound",dst_service="staff"} 100
response_latency_ms_bucket{le="+Inf",direction="outbound",dst_service="staff"} 100
pimesh_split_total{service="staff",backend="stable"} 90
pimesh_split_total{service="staff",backend="error-injector"} 10
tcp_read_bytes_total{direction="outbound",dst_service="queue"} 1000
tcp_open_total{direction="outbound",dst_service="queue"} 1
tcp_open_total{direction="outbound",dst_service="staff"} 0
"#;

    const AFTER: &str = r#"request_total{direction="outbound",dst_service="staff"} 300
response_total{direction="outbound",dst_service="staff",status_code="200",classification="success"} 250
response_total{direction="outbound",dst_service="staff",status_code="500",classification="failure"} 30
response_total{direction="outbound",dst_service="staff",classification="failure"} 20
response_latency_ms_sum{direction="outbound",dst_service="staff"} 1400.0
response_latency_ms_count{direction="outbound",dst_service="staff"} 300
response_latency_ms_bucket{le="1.0",direction="outbound",dst_service="staff"} 0
response_latency_ms_bucket{le="5.0",direction="outbound",dst_service="staff"} 200
response_latency_ms_bucket{le="10.0",direction="outbound",dst_service="staff"} 300
response_latency_ms_bucket{le="+Inf",direction="outbound",dst_service="staff"} 300
pimesh_split_total{service="staff",backend="stable"} 270
pimesh_split_total{service="staff",backend="error-injector"} 30
pimesh_fault_injected_total{dst_service="web",kind="abort"} 3
tcp_read_bytes_total{direction="outbound",dst_service="queue"} 3000
tcp_write_bytes_total{direction="outbound",dst_service="queue"} 1000
tcp_open_total{direction="outbound",dst_service="queue"} 3
tcp_close_total{direction="outbound",dst_service="queue"} 1
tcp_open_total{direction="outbound",dst_service="staff"} 0
"#;

    #[test]
    fn parses_names_labels_escapes_and_values() {
        let samples =
            parse("# c\nx_total{a=\"q\\\"u\\\\o\\nte\",b=\"2\"} 3 1700000000\nup 1\nbad{ 2\n");
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].name, "x_total");
        assert_eq!(samples[0].label("a"), Some("q\"u\\o\nte"));
        assert_eq!(samples[0].label("b"), Some("2"));
        assert_eq!(samples[0].value, 3.0);
        assert_eq!(
            samples[1],
            Sample {
                name: "up".into(),
                labels: vec![],
                value: 1.0
            }
        );
    }

    #[test]
    fn rates_success_latency_and_splits_over_the_window() {
        let start = Instant::now();
        let mut window = Window::new("http://proxy/metrics", Duration::from_secs(10));
        assert!(window.view().services.is_empty());
        window.push(Scrape::of(BEFORE, start));
        window.push(Scrape::of(AFTER, start + Duration::from_secs(10)));
        let view = window.view();
        assert_eq!(view.window_seconds, 10.0);
        let staff = view.services.iter().find(|s| s.service == "staff").unwrap();
        assert_eq!(staff.requests_per_second, 20.0);
        assert_eq!(
            (
                staff.requests_in_window,
                staff.answered_in_window,
                staff.failures_in_window
            ),
            (200.0, 200.0, 40.0)
        );
        // 160 successes, 20 + 20 failures (one without an answer).
        assert_eq!(staff.success_rate, Some(0.8));
        assert_eq!(staff.latency_ms_mean, Some(5.0));
        // 100 new in (1, 5], 100 in (5, 10]: the median is at 5.
        assert_eq!(staff.latency_ms_p50, Some(5.0));
        assert_eq!(staff.latency_ms_p95, Some(9.5));
        assert_eq!(staff.latency_ms_p99, Some(9.9));
        assert_eq!(staff.tcp_bytes_per_second, None);
        let queue = view.services.iter().find(|s| s.service == "queue").unwrap();
        assert_eq!(queue.tcp_bytes_per_second, Some(300.0));
        assert_eq!(queue.tcp_connections_open, Some(2.0));
        assert_eq!(queue.success_rate, None);
        let canary = view
            .splits
            .iter()
            .find(|s| s.backend == "error-injector")
            .unwrap();
        assert_eq!((canary.total, canary.in_window), (30.0, 20.0));
        assert_eq!(canary.share, Some(0.1));
        assert_eq!(
            view.faults,
            vec![FaultView {
                service: "web".into(),
                kind: "abort".into(),
                total: 3.0,
                in_window: 3.0
            }]
        );
    }

    #[test]
    fn keeps_only_the_last_window_of_scrapes() {
        let start = Instant::now();
        let mut window = Window::new("p", Duration::from_secs(10));
        for second in 0..30 {
            window.push(Scrape::of(BEFORE, start + Duration::from_secs(second)));
        }
        let view = window.view();
        assert!(
            (10.0..=11.0).contains(&view.window_seconds),
            "{}",
            view.window_seconds
        );
        assert!(view.scrapes <= 12);
    }
}
