//! Distributed tracing, one span per proxied request and hop.
//!
//! A request crosses two proxies: the outbound proxy on the caller's node (span kind
//! CLIENT) and the inbound proxy on the callee's node (span kind SERVER). Each hop calls
//! [`begin`] with the request's headers and [`ActiveSpan::finish`] when the response
//! (or the failure) is known.
//!
//! **Decision: the proxy joins traces, it never starts them** (as Linkerd does). A request
//! without a valid, sampled context gets no span and its headers are left exactly as
//! they are. Sampling is decided by whoever started the trace:
//! - sampled (`traceparent` flag 01, B3 `1`/`true`/`d`, `X-B3-Flags: 1`): the hop records
//!   a span and rewrites the context for the next hop;
//! - not sampled (flag 00, B3 `0`/`false`, and `b3: 0`, which overrides every other
//!   header) or no decision (B3 without a sampling state): forwarded unchanged, nothing
//!   recorded.
//!
//! Formats read ([`context`]): W3C `traceparent` (version 00; `tracestate` is passed
//! through untouched), B3 single `b3`, and B3 multi `X-B3-*` (64- or 128-bit trace ids).
//! When several arrive, the context comes from the first valid one in that order; a
//! malformed value is ignored as if absent, never an error. Every valid format of the same
//! trace is rewritten in the form it arrived in: this hop's new span id becomes the span
//! id, the incoming span id the parent span id (where the format carries one), so the next
//! hop (and finally the backend) sees this hop's span as its parent.
//!
//! Spans go through a [`SpanSink`] ([`export`]: a bounded queue per exporter that drops,
//! and counts, rather than blocks the request) to a Zipkin v2 collector ([`zipkin`]), an
//! OTLP/HTTP one ([`otlp`]), or both; batches a collector does not take for now wait in
//! a bounded disk queue ([`queue`]) and are sent when it is back.
//!
//! Caller's contract: call [`begin`] only when tracing is configured (a sink exists).
//! Otherwise the next hop's parent would be a span that no collector ever receives.

pub(crate) mod context;
mod export;
mod finished;
mod otlp;
mod queue;
mod zipkin;

use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, Method};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use context::{SpanId, TraceId};
pub use export::{CollectorSink, ExportSettings, SpanSink};
use finished::FinishedSpan;

/// Which side of the hop the proxy is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Inbound proxy: receives the request for a local workload (Zipkin `SERVER`).
    Server,
    /// Outbound proxy: sends the caller's request on (Zipkin `CLIENT`).
    Client,
}

/// `exporter`: which exporter a span counter is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct ExporterLabels {
    exporter: &'static str,
}

/// `pimesh_spans_dropped_total`'s labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct DropLabels {
    exporter: &'static str,
    reason: &'static str,
}

/// Why spans were dropped (`reason` of `pimesh_spans_dropped_total`).
pub mod drop_reason {
    /// The in-memory queue between the data path and the exporter was full.
    pub const QUEUE_FULL: &str = "queue_full";
    /// The disk queue was full: its oldest batch made room for a newer one, or a batch
    /// larger than the whole bound was not kept.
    pub const DISK_FULL: &str = "disk_full";
    /// A batch file on disk did not read back as written.
    pub const CORRUPT: &str = "corrupt";
    /// The collector did not take the batch for now and it could not be kept on disk
    /// (`span_queue_max_bytes = 0`, or the folder cannot be made, locked or written).
    pub const NOT_KEPT: &str = "not_kept";
}

/// The span exporters' counters, all in spans except `corrupt_files`; one series per
/// exporter (`exporter="zipkin"|"otlp"`). Registered once; each exporter takes its
/// series with [`SpanCounters::exporter`].
///
/// Invariant, per exporter: every span finished with a sink is counted exactly once by
/// `exported`, `dropped` or `failed` once it has left the proxy's memory and disk; until
/// then it is in the in-memory queue or on disk (`queued`). So `exported + dropped +
/// failed + queued` = spans finished, once the in-memory queue is drained. `kept` counts
/// the spans that went through the disk queue (each also ends in one of the three); a
/// batch a previous process left on disk is counted when it is sent or dropped.
#[derive(Clone, Debug, Default)]
pub struct SpanCounters {
    exported: Family<ExporterLabels, Counter>,
    kept: Family<ExporterLabels, Counter>,
    dropped: Family<DropLabels, Counter>,
    failed: Family<ExporterLabels, Counter>,
    corrupt_files: Family<ExporterLabels, Counter>,
    queued: Family<ExporterLabels, Gauge>,
}

/// One exporter's series of [`SpanCounters`] (clones: updating them updates the registry).
#[derive(Clone, Debug, Default)]
pub struct ExporterCounters {
    /// The collector accepted them (2xx), at the first attempt or from the disk queue.
    pub exported: Counter,
    /// Written to the disk queue because the collector did not take them for now.
    pub kept: Counter,
    pub dropped_queue_full: Counter,
    pub dropped_disk_full: Counter,
    pub dropped_corrupt: Counter,
    pub dropped_not_kept: Counter,
    /// The collector refused them (a 4xx other than 429), or they could not be encoded.
    pub failed: Counter,
    /// Batch files dropped as corrupt (their spans are in `dropped_corrupt` when their
    /// name still tells how many).
    pub corrupt_files: Counter,
    /// Spans on disk now.
    pub queued: Gauge,
}

impl SpanCounters {
    /// New counters, registered in `registry` as `pimesh_spans_exported_total`,
    /// `pimesh_spans_kept_total`, `pimesh_spans_dropped_total` (also by `reason`, see
    /// [`drop_reason`]), `pimesh_span_export_failures_total`,
    /// `pimesh_span_queue_corrupt_files_total` and the gauge `pimesh_span_queue_spans`.
    pub fn register(registry: &mut Registry) -> SpanCounters {
        let counters = SpanCounters::default();
        // Counter names are registered without `_total`: the encoder appends it.
        registry.register(
            "pimesh_spans_exported",
            "Trace spans the collector accepted",
            counters.exported.clone(),
        );
        registry.register(
            "pimesh_spans_kept",
            "Trace spans written to the disk queue while the collector did not take them",
            counters.kept.clone(),
        );
        registry.register(
            "pimesh_spans_dropped",
            "Trace spans dropped: a queue (memory or disk) was full, a queued batch was corrupt, or a batch could not be kept",
            counters.dropped.clone(),
        );
        registry.register(
            "pimesh_span_export_failures",
            "Trace spans the collector refused (4xx other than 429, or rejected in an OTLP \
             partial_success) or that could not be encoded",
            counters.failed.clone(),
        );
        registry.register(
            "pimesh_span_queue_corrupt_files",
            "Batch files of the span disk queue dropped because they did not read back as written",
            counters.corrupt_files.clone(),
        );
        registry.register(
            "pimesh_span_queue_spans",
            "Trace spans in the disk queue",
            counters.queued.clone(),
        );
        counters
    }

    /// The series of `exporter` (`"zipkin"` or `"otlp"`).
    pub fn exporter(&self, exporter: &'static str) -> ExporterCounters {
        let labels = ExporterLabels { exporter };
        let dropped = |reason| {
            self.dropped
                .get_or_create(&DropLabels { exporter, reason })
                .clone()
        };
        ExporterCounters {
            exported: self.exported.get_or_create(&labels).clone(),
            kept: self.kept.get_or_create(&labels).clone(),
            dropped_queue_full: dropped(drop_reason::QUEUE_FULL),
            dropped_disk_full: dropped(drop_reason::DISK_FULL),
            dropped_corrupt: dropped(drop_reason::CORRUPT),
            dropped_not_kept: dropped(drop_reason::NOT_KEPT),
            failed: self.failed.get_or_create(&labels).clone(),
            corrupt_files: self.corrupt_files.get_or_create(&labels).clone(),
            queued: self.queued.get_or_create(&labels).clone(),
        }
    }
}

impl ExporterCounters {
    /// Every span dropped, whatever the reason.
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full.get()
            + self.dropped_disk_full.get()
            + self.dropped_corrupt.get()
            + self.dropped_not_kept.get()
    }
}

/// One hop's span in progress. Holds no borrowed data and is `Send`.
///
/// Invariant: `id != parent_id`, neither is zero, and the request's headers already
/// name `id` as the span the next hop is a child of.
#[derive(Debug)]
pub struct ActiveSpan {
    trace_id: TraceId,
    id: SpanId,
    parent_id: SpanId,
    kind: Kind,
    method: Method,
    path: String,
    dst_service: String,
    remote: Option<SocketAddr>,
    timestamp_us: u64,
    started: Instant,
}

/// Extracts the trace context from `headers`. When it is valid and sampled, rewrites the
/// headers for the next hop (new span id, parent = the incoming span id) and returns the
/// span to finish; otherwise leaves the headers untouched and returns `None`.
///
/// Cheap when there is nothing to do: without a `traceparent`, `b3` or `X-B3-TraceId`
/// header it returns after three lookups, without allocating. `path` is recorded without
/// its query string.
pub fn begin(
    headers: &mut HeaderMap,
    kind: Kind,
    method: &Method,
    path: &str,
    dst_service: &str,
) -> Option<ActiveSpan> {
    let incoming = context::extract(headers)?;
    if !incoming.is_sampled() {
        return None;
    }
    let parent_id = incoming.context.span_id;
    let id = SpanId::random_except(parent_id);
    incoming.inject(headers, id);
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    Some(ActiveSpan {
        trace_id: incoming.context.trace_id,
        id,
        parent_id,
        kind,
        method: method.clone(),
        path: path.to_string(),
        dst_service: dst_service.to_string(),
        remote: None,
        timestamp_us: now_us(),
        started: Instant::now(),
    })
}

impl ActiveSpan {
    /// The peer of this hop: the caller for a SERVER span, the endpoint sent to for a
    /// CLIENT span. Recorded as the span's `remoteEndpoint`.
    pub fn set_remote(&mut self, addr: SocketAddr) {
        self.remote = Some(addr);
    }

    /// Ends the span (duration measured from [`begin`] on a monotonic clock, at least
    /// 1 µs) and hands it to `sink` without blocking. `status` is the response status, 0
    /// when there was no response (tagged `error`, as are statuses ≥ 500). With no sink
    /// the span is discarded.
    pub fn finish(self, status: u16, sink: Option<&SpanSink>) {
        let Some(sink) = sink else {
            return;
        };
        let duration_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        sink.submit(FinishedSpan {
            trace_id: self.trace_id,
            id: self.id,
            parent_id: self.parent_id,
            kind: self.kind,
            method: self.method,
            path: self.path,
            dst_service: self.dst_service,
            remote: self.remote,
            timestamp_us: self.timestamp_us,
            duration_us: duration_us.max(1),
            status,
        });
    }
}

/// Microseconds since the Unix epoch; 0 if the clock is before it.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::convert::Infallible;
    use std::path::Path;
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderValue, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    use prost::Message as _;
    use serde_json::Value;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::export::{spawn_for_test, Format, QueueSpec, Settings};
    use super::*;
    use crate::telemetry::metrics::testing::{assert_sample, samples};
    use pimesh_runtime::backoff::Backoff;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";
    /// How long a test waits for what must happen.
    const DEADLINE: Duration = Duration::from_secs(20);

    fn header_map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    /// A collector stand-in: answers every request with its current status (0: accepts
    /// the connection and the request, and never answers) and hands over each request's
    /// Content-Type and body. Stops listening when dropped.
    struct TestCollector {
        addr: SocketAddr,
        rx: mpsc::UnboundedReceiver<(String, Bytes)>,
        status: Arc<AtomicU16>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestCollector {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl TestCollector {
        async fn start(status: u16) -> TestCollector {
            TestCollector::start_on("127.0.0.1:0".parse().unwrap(), status).await
        }

        async fn start_on(addr: SocketAddr, status: u16) -> TestCollector {
            // A collector just dropped lets go of the port once its task is cancelled.
            let deadline = Instant::now() + DEADLINE;
            let listener = loop {
                match TcpListener::bind(addr).await {
                    Ok(listener) => break listener,
                    Err(err) => assert!(Instant::now() < deadline, "bind {addr}: {err}"),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let addr = listener.local_addr().unwrap();
            let (tx, rx) = mpsc::unbounded_channel();
            let status = Arc::new(AtomicU16::new(status));
            let answer = Arc::clone(&status);
            let task = tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let tx = tx.clone();
                    let answer = Arc::clone(&answer);
                    tokio::spawn(async move {
                        let service =
                            hyper::service::service_fn(move |request: Request<Incoming>| {
                                let tx = tx.clone();
                                let answer = Arc::clone(&answer);
                                async move {
                                    let content_type = request
                                        .headers()
                                        .get(http::header::CONTENT_TYPE)
                                        .and_then(|value| value.to_str().ok())
                                        .unwrap_or_default()
                                        .to_string();
                                    let body =
                                        request.into_body().collect().await.unwrap().to_bytes();
                                    let status = answer.load(Ordering::SeqCst);
                                    if status == 0 {
                                        std::future::pending::<()>().await;
                                    }
                                    let _ = tx.send((content_type, body));
                                    let mut response = Response::new(Full::new(Bytes::new()));
                                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                                    Ok::<_, Infallible>(response)
                                }
                            });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            TestCollector {
                addr,
                rx,
                status,
                task,
            }
        }

        /// Receives POSTs until `count` spans arrived; returns the Zipkin spans as JSON.
        async fn zipkin_spans(&mut self, count: usize) -> Vec<Value> {
            let mut spans = Vec::new();
            while spans.len() < count {
                let (content_type, body) = self.next().await;
                assert_eq!(content_type, "application/json");
                let Value::Array(batch) = serde_json::from_slice(&body).unwrap() else {
                    panic!("not a JSON array: {body:?}");
                };
                spans.extend(batch);
            }
            assert_eq!(spans.len(), count);
            spans
        }

        /// Receives POSTs until `count` spans arrived; returns the OTLP spans.
        async fn otlp_spans(&mut self, count: usize) -> Vec<otlp_proto::Span> {
            let mut spans = Vec::new();
            while spans.len() < count {
                let (content_type, body) = self.next().await;
                assert_eq!(content_type, "application/x-protobuf");
                let request = ExportTraceServiceRequest::decode(body).unwrap();
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        spans.extend(scope.spans);
                    }
                }
            }
            assert_eq!(spans.len(), count, "more spans than expected");
            spans
        }

        async fn next(&mut self) -> (String, Bytes) {
            tokio::time::timeout(DEADLINE, self.rx.recv())
                .await
                .expect("collector got nothing in time")
                .unwrap()
        }
    }

    mod otlp_proto {
        pub use opentelemetry_proto::tonic::trace::v1::Span;
    }

    /// A port on which nothing listens (until a test starts a collector there).
    async fn closed_port() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// Waits until `done` holds, checking every 10 ms, failing after [`DEADLINE`].
    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done() {
            assert!(Instant::now() < deadline, "gave up waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_for(counter: &Counter, value: u64) {
        wait_until(&format!("counter at {value}"), || counter.get() >= value).await;
        assert_eq!(counter.get(), value);
    }

    fn sampled_headers() -> HeaderMap {
        header_map(&[(context::TRACEPARENT, &format!("00-{TRACE}-{SPAN}-01"))])
    }

    /// Finishes `count` sampled SERVER spans with `sink`; returns their ids.
    fn finish_spans(sink: &SpanSink, count: usize) -> Vec<String> {
        (0..count)
            .map(|_| {
                let mut map = sampled_headers();
                let span = begin(&mut map, Kind::Server, &Method::GET, "/", "web").unwrap();
                let id = span.id.to_string();
                span.finish(200, Some(sink));
                id
            })
            .collect()
    }

    /// Fast settings for outage tests: flush every 10 ms, retry from 20 ms to 200 ms.
    fn fast() -> Settings {
        Settings {
            flush_interval: Duration::from_millis(10),
            timeout: Duration::from_millis(500),
            retry: Backoff::new(Duration::from_millis(20), Duration::from_millis(200)),
            ..Settings::default()
        }
    }

    fn queue_in(dir: &Path, max_bytes: u64) -> Option<QueueSpec> {
        Some(QueueSpec {
            dir: dir.to_owned(),
            max_bytes,
        })
    }

    /// The batch files in `dir`.
    fn batch_files(dir: &Path) -> Vec<std::path::PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut files: Vec<_> = entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|ext| ext == "spans"))
            .collect();
        files.sort();
        files
    }

    fn dir_bytes(dir: &Path) -> u64 {
        batch_files(dir)
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    fn span_id_hex(span: &otlp_proto::Span) -> String {
        span.span_id.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn counters_are_registered_by_name_and_exporter() {
        let mut registry = Registry::default();
        let spans = SpanCounters::register(&mut registry);
        let otlp = spans.exporter("otlp");
        let zipkin = spans.exporter("zipkin");
        otlp.exported.inc_by(5);
        otlp.kept.inc_by(4);
        otlp.dropped_disk_full.inc();
        otlp.queued.set(3);
        zipkin.dropped_queue_full.inc_by(2);
        zipkin.failed.inc_by(2);
        zipkin.corrupt_files.inc();
        let s = samples(&registry);
        assert_sample(&s, "pimesh_spans_exported_total{exporter=\"otlp\"} 5");
        assert_sample(&s, "pimesh_spans_kept_total{exporter=\"otlp\"} 4");
        assert_sample(
            &s,
            "pimesh_spans_dropped_total{exporter=\"otlp\",reason=\"disk_full\"} 1",
        );
        assert_sample(
            &s,
            "pimesh_spans_dropped_total{exporter=\"zipkin\",reason=\"queue_full\"} 2",
        );
        assert_sample(
            &s,
            "pimesh_span_export_failures_total{exporter=\"zipkin\"} 2",
        );
        assert_sample(
            &s,
            "pimesh_span_queue_corrupt_files_total{exporter=\"zipkin\"} 1",
        );
        assert_sample(&s, "pimesh_span_queue_spans{exporter=\"otlp\"} 3");
        // The same series again, not a new one.
        spans.exporter("otlp").exported.inc();
        assert_eq!(otlp.exported.get(), 6);
    }

    #[tokio::test]
    async fn exports_spans_to_a_zipkin_collector() {
        let mut collector = TestCollector::start(202).await;
        let counters = ExporterCounters::default();
        let (sink, _task) = spawn_for_test(
            Format::Zipkin,
            &format!("http://{}/api/v2/spans", collector.addr),
            counters.clone(),
            Settings::default(),
            None,
        )
        .unwrap();

        let mut map = sampled_headers();
        let mut server = begin(&mut map, Kind::Server, &Method::GET, "/hello", "web").unwrap();
        server.set_remote("10.0.0.7:40000".parse().unwrap());
        let server_id = server.id.to_string();

        let mut map = header_map(&[(context::B3, &format!("{}-{SPAN}-1", &TRACE[16..]))]);
        let mut client = begin(&mut map, Kind::Client, &Method::POST, "/submit", "api").unwrap();
        client.set_remote("[fd00::2]:4143".parse().unwrap());
        let client_id = client.id.to_string();

        let mut map = header_map(&[
            (context::X_B3_TRACE_ID, TRACE),
            (context::X_B3_SPAN_ID, SPAN),
            (context::X_B3_SAMPLED, "1"),
        ]);
        let unanswered = begin(&mut map, Kind::Client, &Method::GET, "/slow", "api").unwrap();
        let unanswered_id = unanswered.id.to_string();

        server.finish(200, Some(&sink));
        client.finish(503, Some(&sink));
        unanswered.finish(0, Some(&sink));

        let spans = collector.zipkin_spans(3).await;
        let find = |id: &str| {
            spans
                .iter()
                .find(|span| span["id"] == id)
                .unwrap_or_else(|| panic!("span {id} missing from {spans:?}"))
                .clone()
        };

        let server = find(&server_id);
        assert_eq!(server["traceId"], TRACE);
        assert_eq!(server["parentId"], SPAN);
        assert_eq!(server["kind"], "SERVER");
        assert_eq!(server["name"], "GET");
        assert_eq!(
            server["localEndpoint"]["serviceName"],
            "pimesh-proxy.node-a"
        );
        assert_eq!(
            server["remoteEndpoint"],
            serde_json::json!({"ipv4": "10.0.0.7", "port": 40000})
        );
        assert_eq!(
            server["tags"],
            serde_json::json!({
                "http.method": "GET",
                "http.path": "/hello",
                "http.status_code": "200",
                "pimesh.dst_service": "web",
            })
        );
        assert!(server["timestamp"].as_u64().unwrap() > 1_600_000_000_000_000);
        assert!(server["duration"].as_u64().unwrap() >= 1);

        let client = find(&client_id);
        assert_eq!(client["traceId"], &TRACE[16..]);
        assert_eq!(client["parentId"], SPAN);
        assert_eq!(client["kind"], "CLIENT");
        assert_eq!(
            client["remoteEndpoint"],
            serde_json::json!({"ipv6": "fd00::2", "port": 4143})
        );
        assert_eq!(client["tags"]["http.status_code"], "503");
        assert_eq!(client["tags"]["error"], "503");
        assert_eq!(client["tags"]["http.method"], "POST");
        assert_eq!(client["tags"]["pimesh.dst_service"], "api");

        let unanswered = find(&unanswered_id);
        assert_eq!(unanswered["traceId"], TRACE);
        assert_eq!(unanswered["parentId"], SPAN);
        assert_eq!(unanswered["tags"]["error"], "no response");
        assert!(unanswered["tags"].get("http.status_code").is_none());
        assert!(unanswered.get("remoteEndpoint").is_none());

        wait_for(&counters.exported, 3).await;
        assert_eq!(counters.dropped(), 0);
        assert_eq!(counters.failed.get(), 0);
        assert_eq!(counters.kept.get(), 0);
    }

    #[tokio::test]
    async fn exports_spans_to_an_otlp_collector_as_protobuf() {
        let mut collector = TestCollector::start(200).await;
        let counters = ExporterCounters::default();
        let (sink, _task) = spawn_for_test(
            Format::Otlp,
            &format!("http://{}/v1/traces", collector.addr),
            counters.clone(),
            Settings::default(),
            None,
        )
        .unwrap();
        let mut map = sampled_headers();
        let mut client = begin(&mut map, Kind::Client, &Method::PUT, "/x?y=1", "api").unwrap();
        client.set_remote("127.0.0.1:4143".parse().unwrap());
        let mut server = begin(&mut map, Kind::Server, &Method::PUT, "/x", "api").unwrap();
        server.set_remote("127.0.0.1:50000".parse().unwrap());
        let (client_id, server_id) = (client.id, server.id);
        server.finish(201, Some(&sink));
        client.finish(201, Some(&sink));

        let spans = collector.otlp_spans(2).await;
        let trace: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&TRACE[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let server = spans
            .iter()
            .find(|s| s.span_id == server_id.to_bytes())
            .unwrap();
        let client = spans
            .iter()
            .find(|s| s.span_id == client_id.to_bytes())
            .unwrap();
        assert_eq!(server.trace_id, trace);
        assert_eq!(client.trace_id, trace);
        assert_eq!(server.parent_span_id, client_id.to_bytes());
        assert_eq!(
            client.parent_span_id,
            SpanId::parse_for_test(SPAN).to_bytes()
        );
        assert_eq!(server.kind, SpanKind::Server as i32);
        assert_eq!(client.kind, SpanKind::Client as i32);
        assert!(client.start_time_unix_nano > 1_600_000_000_000_000_000);
        assert!(client.end_time_unix_nano > client.start_time_unix_nano);
        wait_for(&counters.exported, 2).await;
    }

    #[tokio::test]
    async fn a_full_batch_is_sent_without_waiting_for_the_interval() {
        let mut collector = TestCollector::start(200).await;
        let counters = ExporterCounters::default();
        let settings = Settings {
            flush_interval: Duration::from_secs(3600),
            ..Settings::default()
        };
        let (sink, _task) = spawn_for_test(
            Format::Zipkin,
            &format!("http://{}/", collector.addr),
            counters.clone(),
            settings,
            None,
        )
        .unwrap();
        // Let the interval's immediate first tick pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
        finish_spans(&sink, settings.batch_size);
        let spans = collector.zipkin_spans(settings.batch_size).await;
        assert!(spans.iter().all(|span| span["traceId"] == TRACE));
        wait_for(&counters.exported, settings.batch_size as u64).await;
    }

    #[tokio::test]
    async fn a_refused_batch_is_counted_failed_and_never_retried() {
        let dir = tempfile::tempdir().unwrap();
        let mut collector = TestCollector::start(400).await;
        let counters = ExporterCounters::default();
        let (sink, _task) = spawn_for_test(
            Format::Otlp,
            &format!("http://{}/", collector.addr),
            counters.clone(),
            fast(),
            queue_in(dir.path(), 1 << 20),
        )
        .unwrap();
        finish_spans(&sink, 3);
        collector.otlp_spans(3).await;
        wait_for(&counters.failed, 3).await;
        // The next batch is the collector's next request: the refused one was not sent
        // again, nor kept.
        collector.status.store(200, Ordering::SeqCst);
        let ids = finish_spans(&sink, 1);
        let spans = collector.otlp_spans(1).await;
        assert_eq!(span_id_hex(&spans[0]), ids[0]);
        wait_for(&counters.exported, 1).await;
        assert_eq!(counters.kept.get(), 0);
        assert!(batch_files(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn without_a_disk_queue_an_unreachable_collector_drops_the_batch() {
        let addr = closed_port().await;
        let counters = ExporterCounters::default();
        let (sink, _task) = spawn_for_test(
            Format::Zipkin,
            &format!("http://{addr}/api/v2/spans"),
            counters.clone(),
            Settings::default(),
            None,
        )
        .unwrap();
        let capacity = Settings::default().queue_capacity as u64;
        let extra = 76;
        // On this single-threaded runtime the exporter cannot run before the loop yields,
        // so exactly `capacity` spans fit in the queue.
        let started = Instant::now();
        finish_spans(&sink, (capacity + extra) as usize);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "finish blocked: {:?}",
            started.elapsed()
        );
        assert_eq!(counters.dropped_queue_full.get(), extra);
        // The queued spans cannot be delivered nor kept.
        wait_for(&counters.dropped_not_kept, capacity).await;
        assert_eq!(counters.exported.get(), 0);
        assert_eq!(counters.kept.get(), 0);
    }

    #[tokio::test]
    async fn dropping_the_last_sink_flushes_the_queue() {
        let mut collector = TestCollector::start(200).await;
        let counters = ExporterCounters::default();
        let settings = Settings {
            flush_interval: Duration::from_secs(3600),
            ..Settings::default()
        };
        let (sink, task) = spawn_for_test(
            Format::Zipkin,
            &format!("http://{}/", collector.addr),
            counters.clone(),
            settings,
            None,
        )
        .unwrap();
        finish_spans(&sink, 1);
        drop(sink);
        collector.zipkin_spans(1).await;
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
        assert_eq!(counters.exported.get(), 1);
    }

    #[tokio::test]
    async fn an_outage_keeps_batches_on_disk_and_sends_them_all_once_when_the_collector_returns() {
        let dir = tempfile::tempdir().unwrap();
        let addr = closed_port().await;
        let counters = ExporterCounters::default();
        let (sink, _task) = spawn_for_test(
            Format::Otlp,
            &format!("http://{addr}/v1/traces"),
            counters.clone(),
            fast(),
            queue_in(dir.path(), 1 << 20),
        )
        .unwrap();
        // Several batches while nothing listens.
        let mut sent = BTreeSet::new();
        for _ in 0..5 {
            sent.extend(finish_spans(&sink, 7));
            let before = counters.kept.get();
            wait_until("a batch kept", || counters.kept.get() > before).await;
        }
        wait_for(&counters.kept, 35).await;
        assert!(!batch_files(dir.path()).is_empty());
        assert_eq!(counters.queued.get(), 35);
        assert_eq!(counters.exported.get(), 0);

        let mut collector = TestCollector::start_on(addr, 200).await;
        let spans = collector.otlp_spans(35).await;
        let received: Vec<String> = spans.iter().map(span_id_hex).collect();
        let unique: BTreeSet<String> = received.iter().cloned().collect();
        assert_eq!(unique.len(), received.len(), "duplicates: {received:?}");
        assert_eq!(unique, sent);
        wait_for(&counters.exported, 35).await;
        wait_until("the queue emptied", || counters.queued.get() == 0).await;
        assert!(batch_files(dir.path()).is_empty());
        assert_eq!(counters.dropped(), 0);
        // Back to normal: a new span goes out at once, and is not kept.
        finish_spans(&sink, 1);
        collector.otlp_spans(1).await;
        wait_for(&counters.exported, 36).await;
        assert_eq!(counters.kept.get(), 35);
    }

    #[tokio::test]
    async fn a_collector_that_never_answers_times_out_and_the_batch_is_kept_then_sent() {
        let dir = tempfile::tempdir().unwrap();
        let hanging = TestCollector::start(0).await;
        let addr = hanging.addr;
        let counters = ExporterCounters::default();
        let settings = Settings {
            timeout: Duration::from_millis(200),
            ..fast()
        };
        let (sink, _task) = spawn_for_test(
            Format::Otlp,
            &format!("http://{addr}/v1/traces"),
            counters.clone(),
            settings,
            queue_in(dir.path(), 1 << 20),
        )
        .unwrap();
        let sent: BTreeSet<String> = finish_spans(&sink, 4).into_iter().collect();
        wait_for(&counters.kept, 4).await;
        assert_eq!(batch_files(dir.path()).len(), 1);
        drop(hanging);

        let mut collector = TestCollector::start_on(addr, 200).await;
        let spans = collector.otlp_spans(4).await;
        let received: BTreeSet<String> = spans.iter().map(span_id_hex).collect();
        assert_eq!(received, sent);
        wait_for(&counters.exported, 4).await;
    }

    #[tokio::test]
    async fn a_5xx_or_429_keeps_the_batch_for_a_retry() {
        let dir = tempfile::tempdir().unwrap();
        let mut collector = TestCollector::start(503).await;
        let counters = ExporterCounters::default();
        let (sink, _task) = spawn_for_test(
            Format::Zipkin,
            &format!("http://{}/", collector.addr),
            counters.clone(),
            fast(),
            queue_in(dir.path(), 1 << 20),
        )
        .unwrap();
        let ids = finish_spans(&sink, 2);
        collector.zipkin_spans(2).await;
        wait_for(&counters.kept, 2).await;
        collector.status.store(429, Ordering::SeqCst);
        // Retried (and refused for now) at least once more.
        collector.zipkin_spans(2).await;
        collector.status.store(200, Ordering::SeqCst);
        wait_for(&counters.exported, 2).await;
        let mut last = collector.zipkin_spans(2).await;
        // Drain what the retries sent before the 200.
        while let Ok(more) = collector.rx.try_recv() {
            last = serde_json::from_slice(&more.1).unwrap();
        }
        let last: BTreeSet<String> = last
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(last, ids.into_iter().collect());
        assert_eq!(counters.failed.get(), 0);
        assert_eq!(counters.queued.get(), 0);
    }

    #[tokio::test]
    async fn a_full_disk_queue_drops_the_oldest_and_stays_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let addr = closed_port().await;
        let counters = ExporterCounters::default();
        // One span per batch; room for about three batches.
        let settings = Settings {
            batch_size: 1,
            ..fast()
        };
        let one_batch = {
            let mut map = sampled_headers();
            let span = begin(&mut map, Kind::Server, &Method::GET, "/", "web").unwrap();
            let finished = FinishedSpan {
                trace_id: span.trace_id,
                id: span.id,
                parent_id: span.parent_id,
                kind: span.kind,
                method: span.method.clone(),
                path: span.path.clone(),
                dst_service: span.dst_service.clone(),
                remote: None,
                timestamp_us: span.timestamp_us,
                duration_us: 1,
                status: 200,
            };
            otlp::encode(&[finished], "node-a").len() as u64 + 64
        };
        let max = one_batch * 3 + one_batch / 2;
        let (sink, _task) = spawn_for_test(
            Format::Otlp,
            &format!("http://{addr}/v1/traces"),
            counters.clone(),
            settings,
            queue_in(dir.path(), max),
        )
        .unwrap();
        let mut ids = Vec::new();
        for i in 1..=10u64 {
            ids.extend(finish_spans(&sink, 1));
            wait_until("a batch kept", || counters.kept.get() == i).await;
            assert!(
                dir_bytes(dir.path()) <= max,
                "{} > {max}",
                dir_bytes(dir.path())
            );
        }
        let on_disk = batch_files(dir.path()).len() as u64;
        assert!((2..=3).contains(&on_disk), "{on_disk}");
        assert_eq!(counters.dropped_disk_full.get(), 10 - on_disk);
        assert_eq!(counters.queued.get(), i64::try_from(on_disk).unwrap());

        // The newest survive and are delivered, oldest first.
        let mut collector = TestCollector::start_on(addr, 200).await;
        let spans = collector.otlp_spans(on_disk as usize).await;
        let received: Vec<String> = spans.iter().map(span_id_hex).collect();
        assert_eq!(received, ids[ids.len() - on_disk as usize..]);
        wait_for(&counters.exported, on_disk).await;
        assert_eq!(
            counters.exported.get() + counters.dropped(),
            10,
            "every span counted once"
        );
    }

    #[tokio::test]
    async fn a_corrupt_batch_file_is_dropped_and_counted_and_the_rest_sent() {
        let dir = tempfile::tempdir().unwrap();
        let addr = closed_port().await;
        let counters = ExporterCounters::default();
        let settings = Settings {
            batch_size: 2,
            ..fast()
        };
        let (sink, task) = spawn_for_test(
            Format::Otlp,
            &format!("http://{addr}/v1/traces"),
            counters.clone(),
            settings,
            queue_in(dir.path(), 1 << 20),
        )
        .unwrap();
        let mut batches = Vec::new();
        for i in 1..=3u64 {
            batches.push(finish_spans(&sink, 2));
            wait_until("a batch kept", || counters.kept.get() == 2 * i).await;
        }
        // Stop the exporter, spoil the middle file, start another on the same folder (as
        // a restarted proxy would).
        drop(sink);
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
        let files = batch_files(dir.path());
        assert_eq!(files.len(), 3, "{files:?}");
        std::fs::write(&files[1], b"PIMESH-SPANS1\n\x02\0\0\0garbage").unwrap();

        let mut collector = TestCollector::start_on(addr, 200).await;
        let restarted = ExporterCounters::default();
        let (_sink, _task) = spawn_for_test(
            Format::Otlp,
            &format!("http://{addr}/v1/traces"),
            restarted.clone(),
            settings,
            queue_in(dir.path(), 1 << 20),
        )
        .unwrap();
        let spans = collector.otlp_spans(4).await;
        let received: Vec<String> = spans.iter().map(span_id_hex).collect();
        let expected: Vec<String> = [batches[0].clone(), batches[2].clone()].concat();
        assert_eq!(received, expected);
        wait_for(&restarted.exported, 4).await;
        assert_eq!(restarted.dropped_corrupt.get(), 2);
        assert_eq!(restarted.corrupt_files.get(), 1);
        assert!(batch_files(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn a_collector_sink_feeds_both_exporters_and_follows_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut zipkin = TestCollector::start(202).await;
        let mut otlp = TestCollector::start(200).await;
        let counters = SpanCounters::default();
        let mut sinks = CollectorSink::default();
        let mut settings = ExportSettings {
            zipkin_url: Some(format!("http://{}/api/v2/spans", zipkin.addr)),
            otlp_url: Some(format!("http://{}/v1/traces", otlp.addr)),
            queue_dir: dir.path().to_owned(),
            queue_max_bytes: 1 << 20,
        };
        let sink = sinks
            .update(&settings, || "pi-a".into(), &counters)
            .unwrap();
        let ids = finish_spans(&sink, 1);
        assert_eq!(zipkin.zipkin_spans(1).await[0]["id"], ids[0]);
        assert_eq!(span_id_hex(&otlp.otlp_spans(1).await[0]), ids[0]);

        // Without the Zipkin URL, the same handle (held by an older route table) feeds
        // the OTLP exporter alone (restarted: the disk bound is now its alone).
        settings.zipkin_url = None;
        let newer = sinks.update(&settings, || "pi-a".into(), &counters);
        assert!(newer.is_some());
        let ids = finish_spans(&sink, 1);
        assert_eq!(span_id_hex(&otlp.otlp_spans(1).await[0]), ids[0]);
        wait_for(&counters.exporter("otlp").exported, 2).await;
        assert_eq!(counters.exporter("zipkin").exported.get(), 1);
        assert_eq!(counters.exporter("zipkin").dropped(), 0);

        settings.otlp_url = None;
        assert!(sinks
            .update(&settings, || unreachable!(), &counters)
            .is_none());
        finish_spans(&sink, 1);
    }

    #[test]
    fn no_context_no_span_headers_untouched() {
        let mut map = header_map(&[("host", "web"), ("x-b3-sampled", "1")]);
        let before = map.clone();
        assert!(begin(&mut map, Kind::Server, &Method::GET, "/", "web").is_none());
        assert_eq!(map, before);
    }

    #[test]
    fn not_sampled_is_passed_through() {
        for pairs in [
            vec![(context::TRACEPARENT, format!("00-{TRACE}-{SPAN}-00"))],
            vec![(context::B3, format!("{TRACE}-{SPAN}-0"))],
            vec![(context::B3, format!("{TRACE}-{SPAN}"))],
            vec![(context::B3, "0".to_string())],
            vec![
                (context::X_B3_TRACE_ID, TRACE.to_string()),
                (context::X_B3_SPAN_ID, SPAN.to_string()),
                (context::X_B3_SAMPLED, "0".to_string()),
            ],
        ] {
            let pairs: Vec<_> = pairs
                .iter()
                .map(|(name, value)| (*name, value.as_str()))
                .collect();
            let mut map = header_map(&pairs);
            let before = map.clone();
            assert!(begin(&mut map, Kind::Client, &Method::GET, "/", "web").is_none());
            assert_eq!(map, before, "{pairs:?}");
        }
    }

    #[test]
    fn invalid_context_is_ignored() {
        let mut map = header_map(&[
            (context::TRACEPARENT, "00-nonsense"),
            (context::B3, "x-y-z"),
        ]);
        let before = map.clone();
        assert!(begin(&mut map, Kind::Server, &Method::GET, "/", "web").is_none());
        assert_eq!(map, before);
    }

    #[test]
    fn sampled_context_makes_a_child_span() {
        let mut map = sampled_headers();
        let span = begin(&mut map, Kind::Server, &Method::GET, "/a?b=c", "web").unwrap();
        assert_eq!(span.trace_id.to_string(), TRACE);
        assert_eq!(span.parent_id.to_string(), SPAN);
        assert_ne!(span.id, span.parent_id);
        assert_eq!(span.path, "/a");
        let expected = format!("00-{TRACE}-{}-01", span.id);
        assert_eq!(map.get(context::TRACEPARENT).unwrap(), expected.as_str());
    }

    #[test]
    fn two_hops_chain_parents() {
        // Outbound hop, then inbound hop: the inbound span's parent is the outbound span.
        let mut map = header_map(&[(context::B3, &format!("{TRACE}-{SPAN}-1"))]);
        let client = begin(&mut map, Kind::Client, &Method::GET, "/", "web").unwrap();
        let server = begin(&mut map, Kind::Server, &Method::GET, "/", "web").unwrap();
        assert_eq!(client.parent_id.to_string(), SPAN);
        assert_eq!(server.parent_id, client.id);
        assert_eq!(server.trace_id, client.trace_id);
        let expected = format!("{TRACE}-{}-1-{}", server.id, client.id);
        assert_eq!(map.get(context::B3).unwrap(), expected.as_str());
    }

    #[test]
    fn active_span_is_send() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<ActiveSpan>();
        assert_send::<SpanSink>();
    }

    #[test]
    fn finish_without_sink_discards() {
        let mut map = sampled_headers();
        begin(&mut map, Kind::Server, &Method::GET, "/", "web")
            .unwrap()
            .finish(200, None);
    }
}
