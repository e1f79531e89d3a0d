//! The node's mesh traffic, as its reports to the central server carry it (so that the
//! operator's dashboard shows what each node's apps get from the mesh): the proxy's
//! `/metrics` scraped every `every`, and per service the requests, answers, failures and
//! latency quantiles between two scrapes (`pimesh_meshstats`), kept in `/status`
//! (`traffic`) where the OTA client reads it for its reports.
//!
//! A scrape that fails starts the window again: the traffic is unknown (`None`) until two
//! scrapes in a row succeed, rather than old numbers shown as current.

use std::time::Duration;

use pimesh_meshstats::{MeshView, Scrape, ServiceView, Window};
use pimesh_revision::{MeshTraffic, ServiceTraffic};
use pimesh_schema::ProbeUrl;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::debug;

use crate::status::StatusHandle;
use crate::units::probe;

/// A proxy's exposition larger than this is refused (a site of a few hundred routes with
/// their histograms is well within it).
const MAX_METRICS_BYTES: usize = 8 * 1024 * 1024;
/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Measures the traffic at `url` every `every` into `status.traffic`, for ever.
pub async fn keep_measuring(url: ProbeUrl, every: Duration, status: StatusHandle) {
    let mut window = Window::new(url.as_url().as_str(), every);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match probe::fetch_up_to(&url, SCRAPE_TIMEOUT, MAX_METRICS_BYTES).await {
            Ok((code, body)) if code.is_success() => {
                let text = String::from_utf8_lossy(&body);
                window.push(Scrape::of(&text, Instant::now().into_std()));
            }
            Ok((code, _)) => {
                debug!(%url, %code, "the proxy's metrics did not answer 2xx");
                window = Window::new(url.as_url().as_str(), every);
            }
            Err(err) => {
                debug!(%url, %err, "cannot read the proxy's metrics");
                window = Window::new(url.as_url().as_str(), every);
            }
        }
        let traffic = summary(&window.view());
        status.update(|status| status.traffic = traffic);
    }
}

/// The report's form of a window's view: the HTTP services called in the window (opaque
/// TCP ones have no requests to count), the [`MeshTraffic::MAX_SERVICES`] busiest, in
/// name order. `None` before the window's second scrape, and for a window without
/// requests: an idle node's reports stay as they are.
pub fn summary(view: &MeshView) -> Option<MeshTraffic> {
    if view.scrapes < 2 {
        return None;
    }
    let mut called: Vec<&ServiceView> = view
        .services
        .iter()
        .filter(|service| service.requests_in_window > 0.0 || service.answered_in_window > 0.0)
        .collect();
    if called.is_empty() {
        return None;
    }
    called.sort_by(|a, b| b.requests_in_window.total_cmp(&a.requests_in_window));
    called.truncate(MeshTraffic::MAX_SERVICES);
    let mut services: Vec<ServiceTraffic> = called.into_iter().map(service_traffic).collect();
    services.sort_by(|a, b| a.service.cmp(&b.service));
    Some(MeshTraffic {
        window_s: view.window_seconds.round() as u64,
        services,
    })
}

fn service_traffic(view: &ServiceView) -> ServiceTraffic {
    let count = |n: f64| n.max(0.0).round() as u64;
    let micros = |ms: Option<f64>| ms.map(|ms| (ms.max(0.0) * 1000.0).round() as u64);
    let answered = count(view.answered_in_window);
    ServiceTraffic {
        service: view.service.clone(),
        requests: count(view.requests_in_window),
        answered,
        failures: count(view.failures_in_window).min(answered),
        p50_us: micros(view.latency_ms_p50),
        p95_us: micros(view.latency_ms_p95),
        p99_us: micros(view.latency_ms_p99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proxy's exposition after `web` was called `requests` times: `failures` of
    /// them 503, the others 200, all answered within 5 ms.
    fn exposition(requests: u64, failures: u64) -> String {
        let ok = requests - failures;
        let labels = r#"direction="outbound",dst_service="web",namespace="lab",tls="true""#;
        format!(
            "request_total{{{labels}}} {requests}\n\
             response_total{{{labels},status_code=\"200\",classification=\"success\"}} {ok}\n\
             response_total{{{labels},status_code=\"503\",classification=\"failure\"}} {failures}\n\
             response_latency_ms_bucket{{le=\"1.0\",{labels}}} 0\n\
             response_latency_ms_bucket{{le=\"5.0\",{labels}}} {requests}\n\
             response_latency_ms_bucket{{le=\"+Inf\",{labels}}} {requests}\n\
             request_total{{direction=\"outbound\",dst_service=\"never\",namespace=\"lab\",tls=\"true\"}} 0\n\
             request_total{{direction=\"inbound\",dst_service=\"served\",namespace=\"lab\",tls=\"true\"}} 9\n\
             # EOF\n"
        )
    }

    #[test]
    fn a_window_of_two_scrapes_becomes_the_reports_traffic() {
        let every = Duration::from_secs(60);
        let mut window = Window::new("http://127.0.0.1:4191/metrics", every);
        let start = std::time::Instant::now();
        window.push(Scrape::of(&exposition(100, 0), start));
        assert_eq!(summary(&window.view()), None, "one scrape is no window");
        window.push(Scrape::of(&exposition(220, 6), start + every));
        let traffic = summary(&window.view()).expect("a window");
        assert_eq!(traffic.window_s, 60);
        // Only the service the node's apps called (outbound) in the window, not one
        // never called nor one this node served.
        assert_eq!(traffic.services.len(), 1, "{traffic:?}");
        let web = &traffic.services[0];
        assert_eq!(web.service, "web");
        assert_eq!((web.requests, web.answered, web.failures), (120, 120, 6));
        assert_eq!(web.requests_per_second(traffic.window_s), 2.0);
        assert_eq!(web.success_rate(), Some(0.95));
        // All 120 answers in (1, 5] ms: the median is interpolated to 3 ms.
        assert_eq!(web.p50_us, Some(3000));
        assert_eq!(web.p99_us, Some(4960));
        // A window without requests: nothing to report.
        window.push(Scrape::of(&exposition(220, 6), start + 2 * every));
        assert_eq!(summary(&window.view()), None, "an idle window");
    }

    #[test]
    fn only_the_busiest_services_are_reported_in_name_order() {
        let mut text = String::new();
        let mut later = String::new();
        for n in 0..(MeshTraffic::MAX_SERVICES + 10) {
            let labels = format!(r#"direction="outbound",dst_service="s{n:03}""#);
            text.push_str(&format!("request_total{{{labels}}} 1\n"));
            later.push_str(&format!("request_total{{{labels}}} {}\n", 1 + n));
        }
        let mut window = Window::new("p", Duration::from_secs(10));
        let start = std::time::Instant::now();
        window.push(Scrape::of(&text, start));
        window.push(Scrape::of(&later, start + Duration::from_secs(10)));
        let traffic = summary(&window.view()).expect("a window");
        assert_eq!(traffic.services.len(), MeshTraffic::MAX_SERVICES);
        assert_eq!(
            traffic.services[0].service, "s010",
            "the 10 quietest are left out"
        );
        let names: Vec<&str> = traffic
            .services
            .iter()
            .map(|s| s.service.as_str())
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
    }
}
