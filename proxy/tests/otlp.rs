//! OTLP span export through two real proxies (nodes `a` and `b`, real certificates): a
//! request goes client → proxy a (outbound, CLIENT span) → proxy b (inbound, SERVER
//! span) → backend, and both proxies post their spans to an OTLP/HTTP collector in this
//! process that decodes `ExportTraceServiceRequest` with prost. Each proxy has its own
//! `--state-dir`, so its disk queue is `<state-dir>/spans/otlp`.
//!
//! The collector is stopped, hung or started on a fixed port to test the disk queue:
//! nothing here sleeps for a fixed time; every wait is on a condition with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use pimesh_test_support::backends::{Backend, Collector as ZipkinCollector};
use pimesh_test_support::http::{h1, H1};
use pimesh_test_support::proxy::{Proxy, ProxyOptions};
use pimesh_test_support::{free_port, Site, DEADLINE};
use prost::Message as _;
use tokio::net::TcpListener;

/// One span as the collector received it, with its resource's `host.name`.
#[derive(Clone, Debug)]
struct Received {
    host: String,
    service: String,
    span: Span,
}

/// An OTLP/HTTP collector on a fixed port. `hang`: accepts and reads every request and
/// never answers. Once [`OtlpCollector::reject_one_per_batch`] is called, each answer is
/// a `partial_success` that rejects one span. Stops listening when dropped.
struct OtlpCollector {
    spans: Arc<Mutex<Vec<Received>>>,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
    hanging: Arc<AtomicBool>,
    rejecting: Arc<AtomicBool>,
}

/// The reason the collector gives for the span it rejects.
const REJECTION: &str = "span too old for this collector";

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OtlpCollector {
    async fn start(port: u16, hang: bool) -> OtlpCollector {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // A collector just dropped lets go of the port once its task is cancelled.
        let deadline = Instant::now() + DEADLINE;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(err) => assert!(Instant::now() < deadline, "bind {addr}: {err}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let hanging = Arc::new(AtomicBool::new(false));
        let rejecting = Arc::new(AtomicBool::new(false));
        let (record, seen, hung) = (
            Arc::clone(&spans),
            Arc::clone(&requests),
            Arc::clone(&hanging),
        );
        let reject = Arc::clone(&rejecting);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (record, seen, hung, reject) = (
                    Arc::clone(&record),
                    Arc::clone(&seen),
                    Arc::clone(&hung),
                    Arc::clone(&reject),
                );
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let (record, seen, hung) =
                            (Arc::clone(&record), Arc::clone(&seen), Arc::clone(&hung));
                        let reject = reject.load(Ordering::SeqCst);
                        async move {
                            let content_type = request
                                .headers()
                                .get(http::header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned();
                            seen.lock().unwrap().push(content_type);
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            if hang {
                                hung.store(true, Ordering::SeqCst);
                                std::future::pending::<()>().await;
                            }
                            let decoded = ExportTraceServiceRequest::decode(body).unwrap();
                            let mut record = record.lock().unwrap();
                            for resource in decoded.resource_spans {
                                let attrs = resource.resource.unwrap_or_default().attributes;
                                let host = string(&attrs, "host.name").unwrap_or_default();
                                let service = string(&attrs, "service.name").unwrap_or_default();
                                for scope in resource.scope_spans {
                                    for span in scope.spans {
                                        record.push(Received {
                                            host: host.clone(),
                                            service: service.clone(),
                                            span,
                                        });
                                    }
                                }
                            }
                            let answer = if reject {
                                ExportTraceServiceResponse {
                                    partial_success: Some(ExportTracePartialSuccess {
                                        rejected_spans: 1,
                                        error_message: REJECTION.to_owned(),
                                    }),
                                }
                                .encode_to_vec()
                            } else {
                                Vec::new()
                            };
                            let mut response = Response::new(Full::new(Bytes::from(answer)));
                            *response.status_mut() = StatusCode::OK;
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        OtlpCollector {
            spans,
            requests,
            task,
            hanging,
            rejecting,
        }
    }

    fn reject_one_per_batch(&self) {
        self.rejecting.store(true, Ordering::SeqCst);
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }
}

fn string(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(text) => Some(text.clone()),
            _ => None,
        }
    })
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::IntValue(value) => Some(*value),
            _ => None,
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Two proxies of one site with their own state directories; the backend `web` runs on
/// node b.
struct Mesh {
    dir: tempfile::TempDir,
    a: Proxy,
    b: Proxy,
}

impl Mesh {
    async fn start(site: &Site, proxy_settings: &str, web_port: u16) -> Mesh {
        let dir = tempfile::tempdir().expect("temp dir");
        let (a_port, b_port) = (free_port(), free_port());
        let text = format!(
            "site = \"{}\"\n[proxy]\nmax_connections = 1000\n{proxy_settings}\n\
             [nodes.a]\naddress = \"127.0.0.1:{a_port}\"\n\
             [nodes.b]\naddress = \"127.0.0.1:{b_port}\"\n\
             [services.web]\nport = {web_port}\nnodes = [\"b\"]\n",
            site.name
        );
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, text).expect("config");
        let start = |name: &str, port: u16, local_ip: &str| {
            let identity = site.identity_dir(dir.path(), name, &[]);
            let state = dir.path().join(format!("state-{name}"));
            std::fs::create_dir_all(&state).unwrap();
            let state_arg = vec!["--state-dir".to_owned(), state.display().to_string()];
            let options = ProxyOptions {
                dir: dir.path(),
                name,
                config: &config,
                identity: Some(&identity),
                inbound_port: port,
                local_ip,
            };
            Proxy::spawn(&options, &state_arg, |_| {})
        };
        let mut b = start("b", b_port, "127.0.0.2");
        let mut a = start("a", a_port, "127.0.0.1");
        b.wait_ready().await;
        a.wait_ready().await;
        Mesh { dir, a, b }
    }

    /// A proxy's OTLP disk queue folder.
    fn queue(&self, node: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("state-{node}"))
            .join("spans")
            .join("otlp")
    }

    /// Sum of a metric over both proxies.
    async fn total(&self, line_start: &str) -> f64 {
        self.a.metric(line_start).await + self.b.metric(line_start).await
    }

    /// Waits until `total(line_start)` reaches `value` (and checks it did not pass it).
    async fn wait_total(&self, line_start: &str, value: f64) {
        let deadline = Instant::now() + DEADLINE * 2;
        loop {
            let now = self.total(line_start).await;
            if now >= value {
                assert_eq!(now, value, "{line_start}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{line_start} at {now}, wanted {value}\nlog a:\n{}\nlog b:\n{}",
                self.a.log_text(),
                self.b.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

const KEPT: &str = "pimesh_spans_kept_total{exporter=\"otlp\"}";
const FAILED: &str = "pimesh_span_export_failures_total{exporter=\"otlp\"}";
const EXPORTED: &str = "pimesh_spans_exported_total{exporter=\"otlp\"}";
const QUEUED: &str = "pimesh_span_queue_spans{exporter=\"otlp\"}";
const DISK_FULL: &str = "pimesh_spans_dropped_total{exporter=\"otlp\",reason=\"disk_full\"}";
const CORRUPT: &str = "pimesh_spans_dropped_total{exporter=\"otlp\",reason=\"corrupt\"}";
const CORRUPT_FILES: &str = "pimesh_span_queue_corrupt_files_total{exporter=\"otlp\"}";

/// A sampled `GET path` to `web` through proxy a, with a fresh trace; returns the trace
/// id (32 hex digits).
async fn traced_get(client: &mut H1, path: &str) -> String {
    let trace: u128 = fastrand::u128(1..);
    let trace = format!("{trace:032x}");
    let parent = format!("{:016x}", fastrand::u64(1..));
    let request = Request::get(path)
        .header("host", "web")
        .header("traceparent", format!("00-{trace}-{parent}-01"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    client.ready().await.expect("ready");
    let response = client.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.expect("body");
    trace
}

fn batch_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
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

/// Waits until the collector holds `count` spans; returns them.
async fn wait_spans(collector: &OtlpCollector, count: usize, mesh: &Mesh) -> Vec<Received> {
    let deadline = Instant::now() + DEADLINE * 2;
    loop {
        let spans = collector.spans();
        if spans.len() >= count {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {count} spans arrived\nlog a:\n{}\nlog b:\n{}",
            spans.len(),
            mesh.a.log_text(),
            mesh.b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Span ids, checking there is no duplicate.
fn unique_ids(spans: &[Received]) -> BTreeSet<String> {
    let ids: BTreeSet<String> = spans.iter().map(|r| hex(&r.span.span_id)).collect();
    assert_eq!(ids.len(), spans.len(), "duplicate spans");
    ids
}

#[tokio::test]
async fn spans_of_two_hops_arrive_at_the_otlp_collector_linked_and_described() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let port = free_port();
    let otlp = OtlpCollector::start(port, false).await;
    let zipkin = ZipkinCollector::start().await;
    let settings = format!(
        "otlp_url = \"http://127.0.0.1:{port}/v1/traces\"\nzipkin_url = \"{}\"",
        zipkin.url
    );
    let mesh = Mesh::start(&site, &settings, web.port).await;
    let mut client = h1(mesh.a.outbound).await;

    let parent = "00f067aa0ba902b7";
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let request = Request::get("/traced?x=1")
        .header("host", "web")
        .header("traceparent", format!("00-{trace}-{parent}-01"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    let arrived = web.seen()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let backend_parent = arrived.split('-').nth(2).unwrap().to_owned();

    let spans = wait_spans(&otlp, 2, &mesh).await;
    assert_eq!(spans.len(), 2, "{spans:?}");
    for received in &spans {
        assert_eq!(hex(&received.span.trace_id), trace);
        assert_eq!(received.service, "pimesh-proxy");
    }
    let client_side = spans
        .iter()
        .find(|r| r.span.kind == SpanKind::Client as i32)
        .expect("a CLIENT span");
    let server_side = spans
        .iter()
        .find(|r| r.span.kind == SpanKind::Server as i32)
        .expect("a SERVER span");
    assert_eq!(client_side.host, "a");
    assert_eq!(server_side.host, "b");
    assert_eq!(hex(&client_side.span.parent_span_id), parent);
    assert_eq!(
        server_side.span.parent_span_id, client_side.span.span_id,
        "b's span is a child of a's"
    );
    assert_eq!(hex(&server_side.span.span_id), backend_parent);
    for received in [client_side, server_side] {
        let attrs = &received.span.attributes;
        assert_eq!(string(attrs, "http.request.method").as_deref(), Some("GET"));
        assert_eq!(string(attrs, "url.path").as_deref(), Some("/traced"));
        assert_eq!(int(attrs, "http.response.status_code"), Some(200));
        assert_eq!(string(attrs, "pimesh.dst_service").as_deref(), Some("web"));
        assert!(received.span.end_time_unix_nano >= received.span.start_time_unix_nano);
        assert!(received.span.start_time_unix_nano > 1_600_000_000_000_000_000);
    }
    assert!(otlp
        .requests
        .lock()
        .unwrap()
        .iter()
        .all(|content_type| content_type == "application/x-protobuf"));

    // The Zipkin collector got the same spans.
    let deadline = Instant::now() + DEADLINE;
    while zipkin.spans().len() < 2 {
        assert!(Instant::now() < deadline, "zipkin: {:?}", zipkin.spans());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let zipkin_ids: BTreeSet<String> = zipkin
        .spans()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(zipkin_ids, unique_ids(&spans));
    mesh.wait_total(EXPORTED, 2.0).await;
    assert_eq!(mesh.total(KEPT).await, 0.0);
}

#[tokio::test]
async fn spans_a_collector_rejects_in_a_partial_success_are_counted_failed_not_exported() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let port = free_port();
    let otlp = OtlpCollector::start(port, false).await;
    otlp.reject_one_per_batch();
    let settings = format!("otlp_url = \"http://127.0.0.1:{port}/v1/traces\"");
    let mesh = Mesh::start(&site, &settings, web.port).await;
    let mut client = h1(mesh.a.outbound).await;
    for i in 0..4 {
        traced_get(&mut client, &format!("/rejected/{i}")).await;
    }
    // Each proxy's spans reach the collector in one or more batches; each batch loses
    // one span to the collector's verdict, and no span is counted twice or resent.
    let deadline = Instant::now() + DEADLINE * 2;
    loop {
        let settled = mesh.total(EXPORTED).await + mesh.total(FAILED).await;
        if settled >= 8.0 {
            assert_eq!(settled, 8.0);
            break;
        }
        assert!(Instant::now() < deadline, "{settled} of 8 spans settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let batches = otlp.requests.lock().unwrap().len() as f64;
    assert_eq!(
        mesh.total(FAILED).await,
        batches,
        "one span rejected per batch"
    );
    assert_eq!(
        otlp.spans().len(),
        8,
        "the collector received every span once"
    );
    assert_eq!(mesh.total(KEPT).await, 0.0, "a rejection is not retried");
    let logs = format!("{}{}", mesh.a.log_text(), mesh.b.log_text());
    assert!(
        logs.contains(REJECTION),
        "the collector's reason is logged:\n{logs}"
    );
}

#[tokio::test]
async fn spans_kept_on_disk_during_an_outage_all_arrive_once_when_the_collector_returns() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let port = free_port();
    let settings = format!("otlp_url = \"http://127.0.0.1:{port}/v1/traces\"");
    let mesh = Mesh::start(&site, &settings, web.port).await;
    let mut client = h1(mesh.a.outbound).await;

    // Nothing listens on the collector's port.
    let mut traces = BTreeSet::new();
    for i in 0..5 {
        traces.insert(traced_get(&mut client, &format!("/outage/{i}")).await);
    }
    mesh.wait_total(KEPT, 10.0).await;
    assert!(!batch_files(&mesh.queue("a")).is_empty());
    assert!(!batch_files(&mesh.queue("b")).is_empty());
    assert_eq!(mesh.total(QUEUED).await, 10.0);
    assert_eq!(mesh.total(EXPORTED).await, 0.0);

    let collector = OtlpCollector::start(port, false).await;
    let spans = wait_spans(&collector, 10, &mesh).await;
    mesh.wait_total(EXPORTED, 10.0).await;
    mesh.wait_total(QUEUED, 0.0).await;
    // Nothing is left to send: the collector got each span exactly once.
    let spans_now = collector.spans();
    assert_eq!(spans_now.len(), 10, "{spans:?}");
    assert_eq!(unique_ids(&spans_now).len(), 10);
    let arrived: BTreeSet<String> = spans_now.iter().map(|r| hex(&r.span.trace_id)).collect();
    assert_eq!(arrived, traces);
    assert!(batch_files(&mesh.queue("a")).is_empty());
    assert!(batch_files(&mesh.queue("b")).is_empty());
}

#[tokio::test]
async fn a_collector_that_never_answers_times_out_and_the_spans_are_kept_then_delivered() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let port = free_port();
    let hanging = OtlpCollector::start(port, true).await;
    let settings = format!("otlp_url = \"http://127.0.0.1:{port}/v1/traces\"");
    let mesh = Mesh::start(&site, &settings, web.port).await;
    let mut client = h1(mesh.a.outbound).await;

    let trace = traced_get(&mut client, "/hang").await;
    // Each proxy's request hangs until its timeout; then the batch is kept.
    mesh.wait_total(KEPT, 2.0).await;
    assert!(hanging.hanging.load(Ordering::SeqCst));
    assert!(hanging.spans().is_empty());
    drop(hanging);

    let collector = OtlpCollector::start(port, false).await;
    let spans = wait_spans(&collector, 2, &mesh).await;
    mesh.wait_total(EXPORTED, 2.0).await;
    assert_eq!(collector.spans().len(), 2, "{spans:?}");
    assert!(spans.iter().all(|r| hex(&r.span.trace_id) == trace));
}

#[tokio::test]
async fn a_full_disk_queue_drops_its_oldest_batches_and_never_exceeds_its_bound() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let port = free_port();
    // Room for two or three one-span batches.
    let max_bytes = 1_000;
    let settings = format!(
        "otlp_url = \"http://127.0.0.1:{port}/v1/traces\"\nspan_queue_max_bytes = {max_bytes}"
    );
    let mesh = Mesh::start(&site, &settings, web.port).await;
    let mut client = h1(mesh.a.outbound).await;

    let requests = 8;
    let mut traces = Vec::new();
    for i in 0..requests {
        traces.push(traced_get(&mut client, &format!("/full/{i}")).await);
        // One batch per request: wait until both proxies kept it.
        mesh.wait_total(KEPT, 2.0 * f64::from(i + 1)).await;
        for node in ["a", "b"] {
            let bytes = dir_bytes(&mesh.queue(node));
            assert!(bytes <= max_bytes, "{node}: {bytes} bytes on disk");
        }
    }
    let dropped = mesh.total(DISK_FULL).await;
    let queued = mesh.total(QUEUED).await;
    assert!(dropped > 0.0, "nothing dropped");
    assert_eq!(dropped + queued, 2.0 * f64::from(requests));

    // The newest batches survive and arrive.
    let collector = OtlpCollector::start(port, false).await;
    mesh.wait_total(EXPORTED, queued).await;
    let spans = collector.spans();
    assert_eq!(spans.len() as f64, queued);
    unique_ids(&spans);
    let newest = traces.last().unwrap();
    assert!(spans.iter().any(|r| &hex(&r.span.trace_id) == newest));
    let oldest = &traces[0];
    assert!(spans.iter().all(|r| &hex(&r.span.trace_id) != oldest));
}

#[tokio::test]
async fn a_corrupt_file_in_the_queue_is_dropped_and_counted_and_the_rest_sent() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let port = free_port();
    let settings = format!("otlp_url = \"http://127.0.0.1:{port}/v1/traces\"");
    let mesh = Mesh::start(&site, &settings, web.port).await;
    let mut client = h1(mesh.a.outbound).await;

    let mut traces = Vec::new();
    for i in 0..3 {
        traces.push(traced_get(&mut client, &format!("/corrupt/{i}")).await);
        mesh.wait_total(KEPT, 2.0 * f64::from(i + 1)).await;
    }
    // Proxy a retries the oldest file in place: spoil the newest, which waits its turn.
    let files = batch_files(&mesh.queue("a"));
    assert_eq!(files.len(), 3, "{files:?}");
    let spoiled = files.last().unwrap();
    let mut contents = std::fs::read(spoiled).unwrap();
    let last = contents.len() - 1;
    contents[last] ^= 0xff;
    std::fs::write(spoiled, contents).unwrap();

    let collector = OtlpCollector::start(port, false).await;
    mesh.wait_total(EXPORTED, 5.0).await;
    mesh.wait_total(CORRUPT, 1.0).await;
    assert_eq!(mesh.a.metric(CORRUPT_FILES).await, 1.0);
    mesh.wait_total(QUEUED, 0.0).await;
    let spans = collector.spans();
    assert_eq!(spans.len(), 5);
    unique_ids(&spans);
    // b's three spans and a's first two traces arrived; a's last did not.
    let from_a: Vec<String> = spans
        .iter()
        .filter(|r| r.host == "a")
        .map(|r| hex(&r.span.trace_id))
        .collect();
    assert_eq!(from_a.len(), 2);
    assert!(!from_a.contains(&traces[2]));
    assert!(mesh.a.log_text().contains("corrupt"), "the drop is logged");
}

/// Span delivery after a collector outage, for measuring rather than CI:
/// `PIMESH_OUTAGE_SECS` (default 600: ten minutes) without a collector while requests
/// flow at `PIMESH_OUTAGE_RPS` (default 5) per second, then the collector returns; prints
/// spans generated, delivered and dropped. Run with
/// `cargo test -p pimesh-proxy --test otlp -- --ignored --nocapture span_delivery`.
#[tokio::test]
#[ignore = "a measurement: ten minutes by default"]
async fn span_delivery_after_a_collector_outage() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let outage = Duration::from_secs(env("PIMESH_OUTAGE_SECS", 600));
    let rate = env("PIMESH_OUTAGE_RPS", 5).max(1);
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let port = free_port();
    let settings = format!("otlp_url = \"http://127.0.0.1:{port}/v1/traces\"");
    let mesh = Mesh::start(&site, &settings, web.port).await;
    let mut client = h1(mesh.a.outbound).await;

    let started = Instant::now();
    let mut requests = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / u32::try_from(rate).unwrap());
    while started.elapsed() < outage {
        tick.tick().await;
        traced_get(&mut client, "/outage").await;
        requests += 1;
    }
    let generated = 2 * requests;
    let returned = Instant::now();
    let collector = OtlpCollector::start(port, false).await;
    // Wait until every span is accounted for: delivered, dropped or refused.
    let dropped_all = "pimesh_spans_dropped_total{exporter=\"otlp\",reason=";
    let accounted = |text: &str| -> f64 {
        text.lines()
            .filter(|line| {
                line.starts_with(EXPORTED)
                    || line.starts_with(dropped_all)
                    || line.starts_with("pimesh_span_export_failures_total{exporter=\"otlp\"}")
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let total = accounted(&mesh.a.metrics().await) + accounted(&mesh.b.metrics().await);
        if total >= generated as f64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain = returned.elapsed();
    let delivered = collector.spans().len();
    let mut dropped = BTreeMap::new();
    for proxy in [&mesh.a, &mesh.b] {
        for line in proxy.metrics().await.lines() {
            if let Some(rest) = line.strip_prefix(dropped_all) {
                let (reason, value) = rest.split_once("} ").unwrap();
                *dropped
                    .entry(reason.trim_matches('"').to_owned())
                    .or_insert(0.0) += value.parse::<f64>().unwrap();
            }
        }
    }
    println!(
        "outage {} s at {rate} req/s: spans generated {generated}, delivered {delivered} \
         ({:.1} %), dropped {dropped:?}, kept on disk {}, drained {:.1} s after the collector returned",
        outage.as_secs(),
        100.0 * delivered as f64 / generated as f64,
        mesh.total(KEPT).await,
        drain.as_secs_f64()
    );
}
