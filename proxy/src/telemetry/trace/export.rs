//! Span export: a bounded queue from the data path to one background task that posts
//! batches to a Zipkin v2 JSON endpoint.
//!
//! Invariants:
//! - The data path never waits: [`SpanSink::submit`] is a `try_send`; when the queue is
//!   full (or the task is gone) the span is dropped and `dropped` counts it.
//! - Every span that entered the queue is counted exactly once, by `exported` (the
//!   collector answered 2xx) or `failed` (the batch was refused, answered non-2xx, timed
//!   out or could not be encoded). So `exported + dropped + failed` = spans finished with a
//!   sink, once the queue is drained. All three count spans, not batches.
//! - A failed batch is dropped, never retried; the warning about it is logged at most once
//!   per `warn_interval` (the others are counted in the next warning's `suppressed`).
//! - The task ends when every [`SpanSink`] clone is gone, after posting what it holds.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::uri::InvalidUri;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::context::{SpanId, TraceId};
use super::{Kind, SpanCounters};

/// Tuning of the exporter; [`Settings::default`] holds the production values.
#[derive(Clone, Copy, Debug)]
pub(super) struct Settings {
    /// Spans waiting for the exporter; more are dropped.
    pub queue_capacity: usize,
    /// A batch is posted as soon as it holds this many spans...
    pub batch_size: usize,
    /// ...or at this interval, whichever comes first.
    pub flush_interval: Duration,
    /// The whole exchange with the collector (connect, request, response body).
    pub timeout: Duration,
    /// At most one warning about a failing collector per interval.
    pub warn_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            queue_capacity: 1024,
            batch_size: 100,
            flush_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            warn_interval: Duration::from_secs(10),
        }
    }
}

/// A finished span on its way to the collector.
#[derive(Debug)]
pub(super) struct FinishedSpan {
    pub trace_id: TraceId,
    pub id: SpanId,
    pub parent_id: SpanId,
    pub kind: Kind,
    pub method: Method,
    pub path: String,
    pub dst_service: String,
    pub remote: Option<SocketAddr>,
    /// Start, in microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// At least 1 (Zipkin reads 0 as "unknown").
    pub duration_us: u64,
    /// The response status; 0 when there was no response.
    pub status: u16,
}

/// Why no exporter was started for a collector URL; shown as one line naming the URL.
#[derive(Debug)]
pub enum SinkError {
    /// The URL has no `http://` scheme.
    NoScheme {
        url: String,
    },
    Invalid {
        url: String,
        err: InvalidUri,
    },
    /// A scheme other than `http`.
    Scheme {
        url: String,
        scheme: String,
    },
    NoHost {
        url: String,
    },
    /// The URL carries credentials (`user:password@`).
    Credentials {
        url: String,
    },
    /// Not called on a tokio runtime.
    NoRuntime {
        url: String,
    },
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkError::NoScheme { url } => {
                write!(f, "span collector URL {url:?} must start with http://")
            }
            SinkError::Invalid { url, err } => {
                write!(f, "span collector URL {url:?} is not a valid URL: {err}")
            }
            SinkError::Scheme { url, scheme } => write!(
                f,
                "span collector URL {url:?} uses {scheme}://; only http:// is supported"
            ),
            SinkError::NoHost { url } => write!(f, "span collector URL {url:?} has no host"),
            SinkError::Credentials { url } => write!(
                f,
                "span collector URL {url:?} carries credentials, which are not supported"
            ),
            SinkError::NoRuntime { url } => {
                write!(f, "cannot export spans to {url:?}: no tokio runtime")
            }
        }
    }
}

impl std::error::Error for SinkError {}

/// Why a batch of spans was not exported.
#[derive(Debug)]
enum BatchError {
    Encode(serde_json::Error),
    Build(http::Error),
    Send(hyper_util::client::legacy::Error),
    Body(hyper::Error),
    /// The collector answered a status other than 2xx.
    Status(StatusCode),
    /// No answer within the exporter's timeout.
    Timeout(Duration),
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchError::Encode(err) => write!(f, "cannot encode the spans: {err}"),
            BatchError::Build(err) => write!(f, "cannot build the request: {err}"),
            BatchError::Send(err) => f.write_str(&pimesh_runtime::error_chain(err)),
            BatchError::Body(err) => f.write_str(&pimesh_runtime::error_chain(err)),
            BatchError::Status(status) => write!(f, "the collector answered {status}"),
            BatchError::Timeout(limit) => {
                write!(f, "no answer within {} s", limit.as_secs_f64())
            }
        }
    }
}

/// The data path's handle on the exporter; cheap to clone (a queue sender and a counter).
#[derive(Clone, Debug)]
pub struct SpanSink {
    queue: mpsc::Sender<FinishedSpan>,
    dropped: Counter,
}

impl SpanSink {
    /// Starts the exporter task on the current tokio runtime, posting to `url` (a Zipkin
    /// v2 endpoint such as `http://zipkin:9411/api/v2/spans`) with `service_name` as every
    /// span's `localEndpoint.serviceName`. Err names the URL and what is wrong with it
    /// (only `http://` is accepted), or says that there is no runtime.
    pub fn spawn(
        url: &str,
        service_name: String,
        exported: Counter,
        dropped: Counter,
        failed: Counter,
    ) -> Result<SpanSink, SinkError> {
        let counters = SpanCounters {
            exported,
            dropped,
            failed,
        };
        SpanSink::spawn_with(url, service_name, counters, Settings::default())
    }

    pub(super) fn spawn_with(
        url: &str,
        service_name: String,
        counters: SpanCounters,
        settings: Settings,
    ) -> Result<SpanSink, SinkError> {
        let uri = collector_uri(url)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SinkError::NoRuntime {
            url: url.to_owned(),
        })?;
        let (queue, receiver) = mpsc::channel(settings.queue_capacity.max(1));
        let exporter = Exporter {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            uri,
            service_name,
            counters: counters.clone(),
            settings,
            last_warning: None,
            suppressed: 0,
        };
        runtime.spawn(exporter.run(receiver));
        Ok(SpanSink {
            queue,
            dropped: counters.dropped,
        })
    }

    /// Queues `span` without waiting; drops and counts it when the queue is full or the
    /// exporter is gone.
    pub(super) fn submit(&self, span: FinishedSpan) {
        if self.queue.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

/// The span sink for the configured collector URL: started when a URL is set, restarted
/// only when the URL changes; none while no URL is set or the one set is refused (logged).
#[derive(Default)]
pub struct CollectorSink {
    url: Option<String>,
    sink: Option<SpanSink>,
}

impl CollectorSink {
    /// The sink for `url`. `service_name`, asked only when a sink starts, names this proxy
    /// in its spans.
    pub fn update(
        &mut self,
        url: Option<&str>,
        service_name: impl FnOnce() -> String,
        counters: &SpanCounters,
    ) -> Option<SpanSink> {
        if self.url.as_deref() != url {
            self.url = url.map(str::to_owned);
            self.sink = url.and_then(|url| {
                SpanSink::spawn(
                    url,
                    service_name(),
                    counters.exported.clone(),
                    counters.dropped.clone(),
                    counters.failed.clone(),
                )
                .map_err(|err| warn!(error = %err, "spans will not be exported"))
                .ok()
            });
        }
        self.sink.clone()
    }
}

/// Checks the collector URL: `http://host[:port][/path]`, no credentials.
fn collector_uri(url: &str) -> Result<Uri, SinkError> {
    let url_owned = || url.to_owned();
    if !url.contains("://") {
        return Err(SinkError::NoScheme { url: url_owned() });
    }
    let uri: Uri = url.parse().map_err(|err| SinkError::Invalid {
        url: url_owned(),
        err,
    })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(SinkError::Scheme {
                url: url_owned(),
                scheme: other.to_owned(),
            })
        }
        None => return Err(SinkError::NoScheme { url: url_owned() }),
    }
    let Some(authority) = uri.authority() else {
        return Err(SinkError::NoHost { url: url_owned() });
    };
    if authority.as_str().contains('@') {
        return Err(SinkError::Credentials { url: url_owned() });
    }
    if authority.host().is_empty() {
        return Err(SinkError::NoHost { url: url_owned() });
    }
    Ok(uri)
}

struct Exporter {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    service_name: String,
    counters: SpanCounters,
    settings: Settings,
    last_warning: Option<Instant>,
    /// Failed batches not warned about since the last warning.
    suppressed: u64,
}

impl Exporter {
    async fn run(mut self, mut queue: mpsc::Receiver<FinishedSpan>) {
        let batch_size = self.settings.batch_size.max(1);
        let mut batch = Vec::with_capacity(batch_size);
        let mut tick = tokio::time::interval(self.settings.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = batch_size - batch.len();
            tokio::select! {
                received = queue.recv_many(&mut batch, room) => {
                    if received == 0 {
                        // Every sink is gone (recv_many only returns 0 when closed).
                        if !batch.is_empty() {
                            self.flush(&mut batch).await;
                        }
                        debug!(collector = %self.uri, "span exporter stopped");
                        return;
                    }
                    if batch.len() >= batch_size {
                        self.flush(&mut batch).await;
                    }
                }
                _ = tick.tick() => {
                    if !batch.is_empty() {
                        self.flush(&mut batch).await;
                    }
                }
            }
        }
    }

    /// Posts `batch` and empties it; counts its spans as exported or failed.
    async fn flush(&mut self, batch: &mut Vec<FinishedSpan>) {
        let spans = batch.len() as u64;
        let encoded = encode(batch, &self.service_name);
        batch.clear();
        let result = match encoded {
            Ok(body) => self.post(body).await,
            Err(err) => Err(BatchError::Encode(err)),
        };
        match result {
            Ok(()) => {
                self.counters.exported.inc_by(spans);
            }
            Err(reason) => {
                self.counters.failed.inc_by(spans);
                self.warn(&reason, spans);
            }
        }
    }

    async fn post(&self, body: Vec<u8>) -> Result<(), BatchError> {
        let request = Request::post(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(BatchError::Build)?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(BatchError::Send)?;
            let status = response.status();
            // Read the answer to its end so that the connection can be reused.
            let mut body = response.into_body();
            while let Some(frame) = body.frame().await {
                frame.map_err(BatchError::Body)?;
            }
            if status.is_success() {
                Ok(())
            } else {
                Err(BatchError::Status(status))
            }
        };
        match tokio::time::timeout(self.settings.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(BatchError::Timeout(self.settings.timeout)),
        }
    }

    fn warn(&mut self, reason: &BatchError, spans: u64) {
        let now = Instant::now();
        let due = self
            .last_warning
            .is_none_or(|last| now.duration_since(last) >= self.settings.warn_interval);
        if due {
            // `suppressed`: failed batches since the last warning that were not logged.
            warn!(
                collector = %self.uri,
                %reason,
                spans,
                suppressed = self.suppressed,
                "cannot export spans; dropped the batch"
            );
            self.last_warning = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}

/// The batch as a Zipkin v2 JSON array.
fn encode(batch: &[FinishedSpan], service_name: &str) -> Result<Vec<u8>, serde_json::Error> {
    let spans: Vec<ZipkinSpan<'_>> = batch
        .iter()
        .map(|span| ZipkinSpan::new(span, service_name))
        .collect();
    serde_json::to_vec(&spans)
}

/// One span in Zipkin's v2 model (<https://zipkin.io/zipkin-api/#/default/post_spans>).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ZipkinSpan<'a> {
    trace_id: String,
    id: String,
    parent_id: String,
    name: &'a str,
    kind: &'static str,
    timestamp: u64,
    duration: u64,
    local_endpoint: Endpoint<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_endpoint: Option<Endpoint<'a>>,
    tags: BTreeMap<&'static str, String>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct Endpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    service_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv4: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv6: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

impl<'a> ZipkinSpan<'a> {
    fn new(span: &'a FinishedSpan, service_name: &'a str) -> ZipkinSpan<'a> {
        let mut tags = BTreeMap::new();
        tags.insert("http.method", span.method.as_str().to_string());
        tags.insert("http.path", span.path.clone());
        tags.insert("pimesh.dst_service", span.dst_service.clone());
        if span.status != 0 {
            tags.insert("http.status_code", span.status.to_string());
        }
        if span.status == 0 {
            tags.insert("error", "no response".to_string());
        } else if span.status >= 500 {
            tags.insert("error", span.status.to_string());
        }
        ZipkinSpan {
            trace_id: span.trace_id.to_string(),
            id: span.id.to_string(),
            parent_id: span.parent_id.to_string(),
            // The method alone: paths carry ids, and span names are indexed by the
            // collector, so they must stay few. The path is in `http.path`.
            name: span.method.as_str(),
            kind: match span.kind {
                Kind::Server => "SERVER",
                Kind::Client => "CLIENT",
            },
            timestamp: span.timestamp_us,
            duration: span.duration_us.max(1),
            local_endpoint: Endpoint {
                service_name: Some(service_name),
                ..Endpoint::default()
            },
            remote_endpoint: span.remote.map(remote_endpoint),
            tags,
        }
    }
}

fn remote_endpoint<'a>(addr: SocketAddr) -> Endpoint<'a> {
    let (ipv4, ipv6) = match addr.ip().to_canonical() {
        std::net::IpAddr::V4(ip) => (Some(ip.to_string()), None),
        std::net::IpAddr::V6(ip) => (None, Some(ip.to_string())),
    };
    Endpoint {
        service_name: None,
        ipv4,
        ipv6,
        port: Some(addr.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_url_checks() {
        assert!(collector_uri("http://zipkin:9411/api/v2/spans").is_ok());
        assert!(collector_uri("http://127.0.0.1:9411").is_ok());
        for (url, what) in [
            ("https://zipkin:9411/api/v2/spans", "only http://"),
            ("zipkin:9411/api/v2/spans", "http://"),
            ("/api/v2/spans", "http://"),
            ("http://user:pw@zipkin/api/v2/spans", "credentials"),
            ("http://bad host/", "not a valid URL"),
            ("", "http://"),
            ("http://", "not a valid URL"),
            ("http://:9411/", "no host"),
        ] {
            let err = collector_uri(url).unwrap_err().to_string();
            assert!(err.contains(what), "{url}: {err}");
            assert!(err.contains(&format!("{url:?}")), "{url}: {err}");
        }
    }

    #[test]
    fn remote_endpoint_uses_the_address_family() {
        let v4 = serde_json::to_value(remote_endpoint("10.0.0.1:80".parse().unwrap())).unwrap();
        assert_eq!(v4, serde_json::json!({"ipv4": "10.0.0.1", "port": 80}));
        let mapped =
            serde_json::to_value(remote_endpoint("[::ffff:10.0.0.1]:80".parse().unwrap())).unwrap();
        assert_eq!(mapped, serde_json::json!({"ipv4": "10.0.0.1", "port": 80}));
        let v6 = serde_json::to_value(remote_endpoint("[fd00::1]:443".parse().unwrap())).unwrap();
        assert_eq!(v6, serde_json::json!({"ipv6": "fd00::1", "port": 443}));
    }

    #[tokio::test]
    async fn spawn_outside_http_is_an_error() {
        let counter = Counter::default;
        let err = SpanSink::spawn(
            "https://zipkin/api/v2/spans",
            "svc".into(),
            counter(),
            counter(),
            counter(),
        )
        .unwrap_err();
        assert!(matches!(err, SinkError::Scheme { .. }), "{err}");
        assert!(err.to_string().contains("only http://"), "{err}");
    }

    #[test]
    fn spawn_without_runtime_is_an_error() {
        let counter = Counter::default;
        let err = SpanSink::spawn(
            "http://zipkin/api/v2/spans",
            "svc".into(),
            counter(),
            counter(),
            counter(),
        )
        .unwrap_err();
        assert!(matches!(err, SinkError::NoRuntime { .. }), "{err}");
        assert!(err.to_string().contains("no tokio runtime"), "{err}");
    }
}
