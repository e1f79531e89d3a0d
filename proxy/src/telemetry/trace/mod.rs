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
//! Spans go to a Zipkin v2 collector through a [`SpanSink`] ([`export`]): a bounded queue
//! that drops (and counts) rather than blocks the request.
//!
//! Caller's contract: call [`begin`] only when tracing is configured (a sink exists).
//! Otherwise the next hop's parent would be a span that no collector ever receives.

mod context;
mod export;

use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, Method};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use context::{SpanId, TraceId};
use export::FinishedSpan;
pub use export::{CollectorSink, SpanSink};

/// Which side of the hop the proxy is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Inbound proxy: receives the request for a local workload (Zipkin `SERVER`).
    Server,
    /// Outbound proxy: sends the caller's request on (Zipkin `CLIENT`).
    Client,
}

/// Counters the exporter updates, all in spans (clones of the caller's registered
/// counters).
///
/// Invariant (once the queue is drained): `exported + dropped + failed` = the spans
/// finished with a sink.
#[derive(Clone, Debug, Default)]
pub struct SpanCounters {
    /// Spans the collector accepted (2xx).
    pub exported: Counter,
    /// Spans dropped because the queue was full.
    pub dropped: Counter,
    /// Spans in batches the collector refused, answered non-2xx to, or did not answer in
    /// time.
    pub failed: Counter,
}

impl SpanCounters {
    /// New counters, registered in `registry` as `pimesh_spans_exported_total`,
    /// `pimesh_spans_dropped_total` and `pimesh_span_export_failures_total`.
    pub fn register(registry: &mut Registry) -> SpanCounters {
        let counters = SpanCounters::default();
        // Counter names are registered without `_total`: the encoder appends it.
        registry.register(
            "pimesh_spans_exported",
            "Trace spans exported",
            counters.exported.clone(),
        );
        registry.register(
            "pimesh_spans_dropped",
            "Trace spans dropped because the export queue was full",
            counters.dropped.clone(),
        );
        registry.register(
            "pimesh_span_export_failures",
            "Failed span export attempts",
            counters.failed.clone(),
        );
        counters
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
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderValue, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use serde_json::Value;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::export::Settings;
    use super::*;
    use crate::telemetry::metrics::testing::{assert_sample, samples};

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn header_map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn counters() -> SpanCounters {
        SpanCounters::default()
    }

    /// A Zipkin stand-in on 127.0.0.1:0: answers every request with `status` and hands
    /// over each request's Content-Type and body.
    async fn collector(
        status: StatusCode,
    ) -> (SocketAddr, mpsc::UnboundedReceiver<(String, Bytes)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let content_type = request
                                .headers()
                                .get(http::header::CONTENT_TYPE)
                                .and_then(|value| value.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            let _ = tx.send((content_type, body));
                            let mut response = Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = status;
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, rx)
    }

    /// Waits (up to 10 s) until `counter` reaches `value`.
    async fn wait_for(counter: &Counter, value: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while counter.get() < value {
            assert!(
                Instant::now() < deadline,
                "counter stuck at {}, wanted {value}",
                counter.get()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(counter.get(), value);
    }

    /// Receives POSTs until `count` spans arrived; returns the spans as JSON.
    async fn receive_spans(
        rx: &mut mpsc::UnboundedReceiver<(String, Bytes)>,
        count: usize,
    ) -> Vec<Value> {
        let mut spans = Vec::new();
        while spans.len() < count {
            let (content_type, body) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("collector got nothing within 5 s")
                .unwrap();
            assert_eq!(content_type, "application/json");
            let Value::Array(batch) = serde_json::from_slice(&body).unwrap() else {
                panic!("not a JSON array: {body:?}");
            };
            spans.extend(batch);
        }
        assert_eq!(spans.len(), count);
        spans
    }

    fn sampled_headers() -> HeaderMap {
        header_map(&[(context::TRACEPARENT, &format!("00-{TRACE}-{SPAN}-01"))])
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
    fn counters_are_registered_by_name() {
        let mut registry = Registry::default();
        let spans = SpanCounters::register(&mut registry);
        spans.exported.inc_by(5);
        spans.dropped.inc();
        spans.failed.inc_by(2);
        let s = samples(&registry);
        assert_sample(&s, "pimesh_spans_exported_total 5");
        assert_sample(&s, "pimesh_spans_dropped_total 1");
        assert_sample(&s, "pimesh_span_export_failures_total 2");
    }

    #[test]
    fn active_span_is_send() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<ActiveSpan>();
        assert_send::<SpanSink>();
    }

    #[tokio::test]
    async fn exports_spans_to_a_zipkin_collector() {
        let (addr, mut rx) = collector(StatusCode::ACCEPTED).await;
        let counters = counters();
        let sink = SpanSink::spawn(
            &format!("http://{addr}/api/v2/spans"),
            "pimesh-proxy.node-a".into(),
            counters.exported.clone(),
            counters.dropped.clone(),
            counters.failed.clone(),
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

        let spans = receive_spans(&mut rx, 3).await;
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
        assert_eq!(counters.dropped.get(), 0);
        assert_eq!(counters.failed.get(), 0);
    }

    #[tokio::test]
    async fn a_full_batch_is_sent_without_waiting_for_the_interval() {
        let (addr, mut rx) = collector(StatusCode::OK).await;
        let counters = counters();
        let settings = Settings {
            flush_interval: Duration::from_secs(3600),
            ..Settings::default()
        };
        let sink = SpanSink::spawn_with(
            &format!("http://{addr}/"),
            "svc".into(),
            counters.clone(),
            settings,
        )
        .unwrap();
        // Let the interval's immediate first tick pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..settings.batch_size {
            let mut map = sampled_headers();
            begin(&mut map, Kind::Server, &Method::GET, "/", "web")
                .unwrap()
                .finish(200, Some(&sink));
        }
        let spans = receive_spans(&mut rx, settings.batch_size).await;
        assert!(spans.iter().all(|span| span["traceId"] == TRACE));
        wait_for(&counters.exported, settings.batch_size as u64).await;
    }

    #[tokio::test]
    async fn collector_errors_count_failures() {
        let (addr, mut rx) = collector(StatusCode::INTERNAL_SERVER_ERROR).await;
        let counters = counters();
        let settings = Settings {
            flush_interval: Duration::from_millis(20),
            ..Settings::default()
        };
        let sink = SpanSink::spawn_with(
            &format!("http://{addr}/"),
            "svc".into(),
            counters.clone(),
            settings,
        )
        .unwrap();
        for _ in 0..3 {
            let mut map = sampled_headers();
            begin(&mut map, Kind::Server, &Method::GET, "/", "web")
                .unwrap()
                .finish(200, Some(&sink));
        }
        receive_spans(&mut rx, 3).await;
        wait_for(&counters.failed, 3).await;
        assert_eq!(counters.exported.get(), 0);
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts_without_blocking() {
        // A port nobody listens on: every export is refused.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let counters = counters();
        let sink = SpanSink::spawn(
            &format!("http://{addr}/api/v2/spans"),
            "svc".into(),
            counters.exported.clone(),
            counters.dropped.clone(),
            counters.failed.clone(),
        )
        .unwrap();
        let capacity = Settings::default().queue_capacity as u64;
        let extra = 76;
        // On this single-threaded runtime the exporter cannot run before the loop yields,
        // so exactly `capacity` spans fit in the queue.
        let started = Instant::now();
        for _ in 0..capacity + extra {
            let mut map = sampled_headers();
            begin(&mut map, Kind::Client, &Method::GET, "/", "web")
                .unwrap()
                .finish(200, Some(&sink));
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "finish blocked: {:?}",
            started.elapsed()
        );
        assert_eq!(counters.dropped.get(), extra);
        // The queued spans are refused by the (absent) collector and counted as failed.
        wait_for(&counters.failed, capacity).await;
        assert_eq!(counters.exported.get(), 0);
    }

    #[tokio::test]
    async fn dropping_the_last_sink_flushes_the_queue() {
        // Dropping the last sink flushes what is queued and ends the task.
        let (addr, mut rx) = collector(StatusCode::OK).await;
        let counters = counters();
        let settings = Settings {
            flush_interval: Duration::from_secs(3600),
            ..Settings::default()
        };
        let sink = SpanSink::spawn_with(
            &format!("http://{addr}/"),
            "svc".into(),
            counters.clone(),
            settings,
        )
        .unwrap();
        let mut map = sampled_headers();
        begin(&mut map, Kind::Server, &Method::GET, "/", "web")
            .unwrap()
            .finish(204, Some(&sink));
        drop(sink);
        receive_spans(&mut rx, 1).await;
        wait_for(&counters.exported, 1).await;
    }

    #[test]
    fn finish_without_sink_discards() {
        let mut map = sampled_headers();
        begin(&mut map, Kind::Server, &Method::GET, "/", "web")
            .unwrap()
            .finish(200, None);
    }
}
