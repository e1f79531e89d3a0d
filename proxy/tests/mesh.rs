//! Two real proxies (nodes `a` and `b` of one site) with real backends on 127.0.0.1:
//! every request goes client → proxy a (outbound) → mTLS HTTP/2 → proxy b (inbound) →
//! backend, and back. Statistical assertions use bounds of six standard deviations.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pimesh_test_support::backends::{tcp_echo, Backend, Collector};
use pimesh_test_support::http::sample;
use pimesh_test_support::http::{h1, send, H1};
use pimesh_test_support::proxy::{mesh, mesh_with};
use pimesh_test_support::{free_port, replace, wait_until, Site, DEADLINE};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// A prior-knowledge HTTP/2 connection to `addr`.
async fn h2(addr: std::net::SocketAddr) -> H2 {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2c handshake");
    tokio::spawn(connection);
    sender
}

/// `GET path` with `Host: host` on `sender`: (status, headers, body).
async fn get(sender: &mut H1, host: &str, path: &str) -> (u16, http::HeaderMap, String) {
    get_with(sender, host, path, &[]).await
}

async fn get_with(
    sender: &mut H1,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    send(sender, "GET", host, path, headers).await
}

fn service(name: &str, port: u16, extra: &str) -> String {
    format!("[services.{name}]\nport = {port}\nnodes = [\"b\"]\n{extra}\n")
}

#[tokio::test]
async fn http1_crosses_the_mesh_by_authority_and_by_local_port() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let local = free_port();
    let m = mesh(
        &site,
        &service("web", web.port, &format!("local_port = {local}")),
    )
    .await;

    let mut client = h1(m.a.outbound).await;
    for host in ["web", "web.depot.pimesh", "web.depot.pimesh:80"] {
        let (status, _, body) = get(&mut client, host, "/hello?x=1").await;
        assert_eq!((status, body.as_str()), (200, "web\n"), "Host: {host}");
    }
    let mut bound = h1(([127, 0, 0, 1], local).into()).await;
    let (status, _, body) = get(&mut bound, "anything", "/bound").await;
    assert_eq!((status, body.as_str()), (200, "web\n"));

    let seen = web.seen();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[0].path, "/hello");
    assert_eq!(seen[0].version, Version::HTTP_11, "HTTP/1 in, HTTP/1 out");
    assert_eq!(seen[0].headers["host"], "web");
    assert!(
        !seen[0].headers.contains_key("pimesh-dst"),
        "the mesh's own headers stay in the mesh"
    );

    // The metrics count what was sent, on both sides of the hop.
    let labels = "{direction=\"outbound\",dst_service=\"web\",namespace=\"depot\",tls=\"true\"}";
    assert_eq!(m.a.metric(&format!("request_total{labels}")).await, 4.0);
    let inbound = "{direction=\"inbound\",dst_service=\"web\",namespace=\"depot\",tls=\"true\"}";
    assert_eq!(m.b.metric(&format!("request_total{inbound}")).await, 4.0);
    let metrics = m.a.metrics().await;
    assert!(
        metrics.contains("response_total{direction=\"outbound\",dst_service=\"web\",namespace=\"depot\",tls=\"true\",status_code=\"200\",classification=\"success\"} 4"),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "response_latency_ms_count{direction=\"outbound\",dst_service=\"web\",namespace=\"depot\",tls=\"true\"}"
        ),
        4.0
    );
}

/// An HTTP/1.1 app on 127.0.0.1 that answers every `GET` with `ok`, closing each
/// connection after its answer when `close` is set (saying so in `connection: close`).
/// Returns its port and how many connections and requests it took.
async fn counting_app(
    close: bool,
) -> (
    u16,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (connections, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (accepted, answered) = (Arc::clone(&connections), Arc::clone(&requests));
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let answered = Arc::clone(&answered);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    let Ok(read) = stream.read(&mut buf).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..read]);
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        answered.fetch_add(1, Ordering::SeqCst);
                        let connection = if close { "close" } else { "keep-alive" };
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: {connection}\r\n\r\nok\n"
                        );
                        if stream.write_all(answer.as_bytes()).await.is_err() || close {
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, connections, requests, task)
}

/// Apps on HTTP/1.1 are called over kept-alive connections: sequential requests share
/// one, an app that closes each connection after its answer gets every request on a new
/// one, and each request reaches its app once.
#[tokio::test]
async fn app_connections_are_kept_alive_until_the_app_closes_them() {
    const REQUESTS: usize = 20;
    let site = Site::new("depot");
    let (keeps, keeps_connections, keeps_requests, _keeps) = counting_app(false).await;
    let (closes, closes_connections, closes_requests, _closes) = counting_app(true).await;
    let m = mesh(
        &site,
        &format!(
            "{}{}",
            service("keeps", keeps, ""),
            service("closes", closes, "")
        ),
    )
    .await;
    let mut client = h1(m.a.outbound).await;
    for _ in 0..REQUESTS {
        for app in ["keeps", "closes"] {
            let (status, _, body) = get(&mut client, app, "/").await;
            assert_eq!((status, body.as_str()), (200, "ok\n"), "{app}");
        }
    }
    assert_eq!(keeps_requests.load(Ordering::SeqCst), REQUESTS);
    assert_eq!(
        keeps_connections.load(Ordering::SeqCst),
        1,
        "one kept-alive connection"
    );
    assert_eq!(closes_requests.load(Ordering::SeqCst), REQUESTS);
    assert_eq!(closes_connections.load(Ordering::SeqCst), REQUESTS);
}

#[tokio::test]
async fn unknown_services_and_refusing_backends_get_named_errors() {
    let site = Site::new("depot");
    let dead_port = free_port(); // nothing listens here
    let m = mesh(&site, &service("gone", dead_port, "")).await;
    let mut client = h1(m.a.outbound).await;

    let (status, headers, _) = get(&mut client, "nosuch", "/").await;
    assert_eq!(status, 503);
    let reason = headers["pimesh-proxy-error"].to_str().expect("ascii");
    assert!(
        reason.contains("unknown service") && reason.contains("nosuch"),
        "{reason}"
    );

    let (status, headers, _) = get(&mut client, "gone", "/").await;
    assert_eq!(status, 502, "Linkerd answers 502 when the app refuses");
    let reason = headers["pimesh-proxy-error"].to_str().expect("ascii");
    assert!(
        reason.contains("gone") && reason.contains("refused"),
        "{reason}"
    );
    assert_eq!(
        m.a.metric("pimesh_rejected_total{direction=\"outbound\",reason=\"unknown_service\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn http2_and_streaming_cross_the_mesh() {
    let site = Site::new("depot");
    let grpc = Backend::start("grpc").await;
    let local = free_port();
    let _mesh = mesh(
        &site,
        &service("grpc", grpc.port, &format!("local_port = {local}")),
    )
    .await;

    let stream = TcpStream::connect(("127.0.0.1", local))
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, http_body_util::combinators::BoxBody<Bytes, std::io::Error>>(TokioIo::new(
            stream,
        ))
        .await
        .expect("h2c handshake");
    tokio::spawn(connection);

    let request = Request::get("http://grpc/unary")
        .body(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.version(), Version::HTTP_2);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], b"grpc\n");
    assert_eq!(
        grpc.seen()[0].version,
        Version::HTTP_2,
        "HTTP/2 in, HTTP/2 out"
    );
    // No `host` header beside `:authority` (a conflicting pair is a malformed HTTP/2
    // request that nginx, for one, answers 400).
    assert_eq!(grpc.seen()[0].headers.get("host"), None);

    // gRPC-style bidirectional streaming: each message comes back before the next is sent.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let body = StreamBody::new(tokio_stream_from(rx));
    let request = Request::post("http://grpc/echo")
        .body(body.boxed())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let mut body = response.into_body();
    for i in 0..5 {
        let message = Bytes::from(format!("message {i}"));
        tx.send(Ok(Frame::data(message.clone())))
            .await
            .expect("send");
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("the echo arrives while the stream stays open")
            .expect("a frame")
            .expect("data");
        assert_eq!(frame.into_data().expect("data"), message);
    }
    drop(tx);
}

/// A `Stream` over an mpsc receiver (what tokio-stream's ReceiverStream does).
fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn opaque_tcp_rides_a_tunnel() {
    let site = Site::new("depot");
    let (echo, _task) = tcp_echo().await;
    let local = free_port();
    let m = mesh(
        &site,
        &service(
            "queue",
            echo,
            &format!("protocol = \"tcp\"\nlocal_port = {local}"),
        ),
    )
    .await;
    let mut stream = TcpStream::connect(("127.0.0.1", local))
        .await
        .expect("connect");
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (mut read, mut write) = stream.split();
    let writer = async {
        write.write_all(&payload).await.expect("write");
        write.shutdown().await.expect("shutdown");
    };
    let mut echoed = Vec::new();
    let reader = read.read_to_end(&mut echoed);
    let (_, read_result) = tokio::time::timeout(DEADLINE, async { tokio::join!(writer, reader) })
        .await
        .expect("the echo finishes");
    read_result.expect("read");
    assert_eq!(echoed, payload);
    drop(stream);

    // Counted when the tunnel closes.
    let deadline = Instant::now() + DEADLINE;
    let labels = "{direction=\"outbound\",dst_service=\"queue\",namespace=\"depot\",tls=\"true\"}";
    while m.a.metric(&format!("tcp_close_total{labels}")).await < 1.0 {
        assert!(Instant::now() < deadline, "{}", m.a.metrics().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(m.a.metric(&format!("tcp_open_total{labels}")).await, 1.0);
    assert_eq!(
        m.a.metric(&format!("tcp_read_bytes_total{labels}")).await,
        100_000.0
    );
    assert_eq!(
        m.a.metric(&format!("tcp_write_bytes_total{labels}")).await,
        100_000.0
    );
}

#[tokio::test]
async fn the_split_sends_ten_percent_to_the_canary() {
    let site = Site::new("depot");
    let stable = Backend::start("stable").await;
    let canary = Backend::start("canary").await;
    let services = format!(
        "{}{}[services.staff]\nsplit = [{{ service = \"stable\", weight = 90 }}, {{ service = \"canary\", weight = 10 }}]\n",
        service("stable", stable.port, ""),
        service("canary", canary.port, ""),
    );
    let m = mesh(&site, &services).await;
    let mut client = h1(m.a.outbound).await;
    let n = 1000;
    let mut to_canary = 0;
    for _ in 0..n {
        let (status, _, body) = get(&mut client, "staff", "/").await;
        assert_eq!(status, 200);
        if body == "canary\n" {
            to_canary += 1;
        }
    }
    // Binomial(1000, 0.1): mean 100, standard deviation 9.5.
    assert!(
        (43..=157).contains(&to_canary),
        "{to_canary} of {n} went to the canary"
    );
    assert_eq!(canary.seen().len(), to_canary);
    assert_eq!(
        m.a.metric("pimesh_split_total{service=\"staff\",backend=\"canary\"}")
            .await,
        f64::from(u32::try_from(to_canary).expect("small"))
    );
}

#[tokio::test]
async fn faults_abort_and_delay_their_share_of_requests() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let m = mesh(
        &site,
        &service(
            "web",
            web.port,
            "fault = { abort = { status = 503, percent = 30.0 }, delay = { duration = \"20ms\", percent = 10.0 } }",
        ),
    )
    .await;
    let mut client = h1(m.a.outbound).await;
    let n = 1000;
    let (mut aborted, mut slow) = (0u32, 0u32);
    for _ in 0..n {
        let started = Instant::now();
        let (status, headers, _) = get(&mut client, "web", "/").await;
        if started.elapsed() >= Duration::from_millis(20) {
            slow += 1;
        }
        match status {
            200 => {}
            503 => {
                assert_eq!(headers["pimesh-fault"], "abort");
                aborted += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    // Binomial(1000, 0.3): mean 300, sd 14.5; Binomial(1000, 0.1): mean 100, sd 9.5.
    assert!((213..=387).contains(&aborted), "{aborted} aborted");
    let delayed =
        m.a.metric("pimesh_fault_injected_total{dst_service=\"web\",kind=\"delay\"}")
            .await;
    assert!((43.0..=157.0).contains(&delayed), "{delayed} delayed");
    assert!(
        f64::from(slow) >= delayed,
        "every delayed request took the delay"
    );
    assert_eq!(
        m.a.metric("pimesh_fault_injected_total{dst_service=\"web\",kind=\"abort\"}")
            .await,
        f64::from(aborted)
    );
    assert_eq!(
        web.seen().len(),
        usize::try_from(n - aborted).expect("small"),
        "aborted requests never reach the app"
    );
}

/// Every limit and duration at each end of its bounds (`pimesh_schema::cluster::limits`):
/// a config that validates is one the proxies can run, and requests get their answer.
#[tokio::test]
async fn every_limit_at_the_ends_of_its_bounds_still_serves() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let highest = (
        "max_header_bytes = 1048576\nheader_timeout = \"10m\"\ndefault_timeout = \"1day\"",
        "timeout = \"1day\"\nidle_timeout = \"1day\"\n\
         fault = { delay = { duration = \"1h\", percent = 0.0 } }",
    );
    let lowest = (
        "max_header_bytes = 1024\nheader_timeout = \"100ms\"\ndefault_timeout = \"1ms\"",
        "timeout = \"1ms\"\nidle_timeout = \"1s\"\n\
         fault = { delay = { duration = \"0s\", percent = 100.0 } }",
    );
    for (proxy_settings, service_settings) in [highest, lowest] {
        let mut m = mesh_with(
            &site,
            proxy_settings,
            &service("web", web.port, service_settings),
        )
        .await;
        let mut client = h1(m.a.outbound).await;
        for _ in 0..20 {
            let (status, _, body) = get(&mut client, "web", "/").await;
            // A 1 ms deadline may pass before the answer: a timeout is an answer too.
            assert!(
                status == 200 || (status == 504 && service_settings.contains("1ms")),
                "{proxy_settings} / {service_settings}: {status} {body}"
            );
        }
        m.a.wait_ready().await;
        m.b.wait_ready().await;
    }
}

#[tokio::test]
async fn trace_context_reaches_the_backend_and_spans_the_collector() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let collector = Collector::start().await;
    let zipkin = format!("zipkin_url = \"{}\"", collector.url);
    let m = mesh_with(&site, &zipkin, &service("web", web.port, "")).await;
    let mut client = h1(m.a.outbound).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{client_span}-01");
    let (status, _, _) = get_with(
        &mut client,
        "web",
        "/traced",
        &[("traceparent", &traceparent)],
    )
    .await;
    assert_eq!(status, 200);
    let seen = web.seen();
    let arrived = seen[0].headers["traceparent"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let parts: Vec<&str> = arrived.split('-').collect();
    assert_eq!(parts.len(), 4, "{arrived}");
    assert_eq!(parts[1], trace_id, "same trace");
    assert_ne!(parts[2], client_span, "the proxies add their spans");

    // B3 multi-header arrives as B3 multi-header.
    let (status, _, _) = get_with(
        &mut client,
        "web",
        "/b3",
        &[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let seen = web.seen();
    assert_eq!(seen[1].headers["x-b3-traceid"], "463ac35c9f6413ad");
    assert_ne!(seen[1].headers["x-b3-spanid"], "a2fb4a1d1a96d312");

    // Both hops export a span; the chain of parents is client → a → b → backend.
    let deadline = Instant::now() + DEADLINE;
    let spans = loop {
        let spans: Vec<_> = collector
            .spans()
            .into_iter()
            .filter(|s| s["traceId"] == trace_id)
            .collect();
        if spans.len() >= 2 {
            break spans;
        }
        assert!(Instant::now() < deadline, "spans did not arrive: {spans:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let client_side = spans
        .iter()
        .find(|s| s["kind"] == "CLIENT")
        .expect("proxy a's span");
    let server_side = spans
        .iter()
        .find(|s| s["kind"] == "SERVER")
        .expect("proxy b's span");
    assert_eq!(client_side["parentId"], client_span);
    assert_eq!(server_side["parentId"], client_side["id"]);
    assert_eq!(
        server_side["id"], parts[2],
        "the backend's parent is b's span"
    );
    assert_eq!(client_side["tags"]["http.status_code"], "200");
}

#[tokio::test]
async fn a_reload_keeps_open_connections_and_adds_routes() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let api = Backend::start("api").await;
    let (echo, _task) = tcp_echo().await;
    let tcp_port = free_port();
    let before = format!(
        "{}{}",
        service("web", web.port, ""),
        service(
            "queue",
            echo,
            &format!("protocol = \"tcp\"\nlocal_port = {tcp_port}")
        )
    );
    let m = mesh(&site, &before).await;
    let mut client = h1(m.a.outbound).await;
    assert_eq!(get(&mut client, "web", "/").await.0, 200);
    assert_eq!(get(&mut client, "api", "/").await.0, 503);
    let mut tunnel = TcpStream::connect(("127.0.0.1", tcp_port))
        .await
        .expect("connect");
    tunnel.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    tunnel.read_exact(&mut buf).await.expect("echo");

    let text = std::fs::read_to_string(&m.config).expect("config");
    replace(
        &m.config,
        &format!("{text}{}", service("api", api.port, "")),
    );
    m.a.signal(nix::sys::signal::Signal::SIGHUP);
    m.b.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + DEADLINE;
    while get(&mut client, "api", "/").await.0 != 200 {
        assert!(Instant::now() < deadline, "the new route never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The same client connection and the same tunnel carry on.
    assert_eq!(get(&mut client, "web", "/").await.2, "web\n");
    tunnel.write_all(b"pong").await.expect("write");
    tunnel
        .read_exact(&mut buf)
        .await
        .expect("echo after reload");
    assert_eq!(&buf, b"pong");
    assert!(
        m.a.metric("pimesh_config_reloads_total{result=\"ok\"}")
            .await
            >= 1.0,
        "{}",
        m.a.metrics().await
    );
}

#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish_then_exits() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let mut m = mesh(
        &site,
        &service(
            "web",
            web.port,
            "fault = { delay = { duration = \"1s\", percent = 100.0 } }",
        ),
    )
    .await;
    let mut client = h1(m.a.outbound).await;
    let in_flight = tokio::spawn(async move { get(&mut client, "web", "/slow").await });
    // The request is inside proxy a (held by the delay) when the drain starts.
    let deadline = Instant::now() + DEADLINE;
    while m
        .a
        .metric("pimesh_fault_injected_total{dst_service=\"web\",kind=\"delay\"}")
        .await
        < 1.0
    {
        assert!(Instant::now() < deadline, "the request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    m.a.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, _, body) = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .expect("the request finishes")
        .expect("the client task");
    assert_eq!((status, body.as_str()), (200, "web\n"));
    let exit = loop {
        if let Some(status) = m.a.daemon.exited() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after the drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit}\n{}", m.a.log_text());
    assert!(m.a.log_text().contains("all connections finished"));
}

#[tokio::test]
async fn an_unreachable_node_is_retried_elsewhere_and_a_slow_one_times_out() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let dead = free_port(); // node c's proxy: nothing listens there
    let services = format!(
        "[nodes.c]\naddress = \"127.0.0.1:{dead}\"\n\
         [services.web]\nport = {}\nnodes = [\"b\", \"c\"]\n\
         [services.slow]\nport = {}\nnodes = [\"b\"]\ntimeout = \"200ms\"\n\
         fault = {{ delay = {{ duration = \"5s\", percent = 100.0 }} }}\n",
        web.port, web.port
    );
    let m = mesh(&site, &services).await;
    // Sixty requests at once, on their own connections: with every endpoint unmeasured
    // and then b loaded, the balancer sends many of them to c first.
    let outbound = m.a.outbound;
    let wave: Vec<_> = (0..60)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = h1(outbound).await;
                get(&mut client, "web", "/").await
            })
        })
        .collect();
    for request in wave {
        let (status, headers, body) = request.await.expect("request task");
        assert_eq!((status, body.as_str()), (200, "web\n"), "{headers:?}");
    }
    let retried =
        m.a.metric("pimesh_retry_total{direction=\"outbound\",dst_service=\"web\",namespace=\"depot\",tls=\"true\"}")
            .await;
    assert!(
        retried >= 1.0,
        "node c was tried, and each such request went to b"
    );

    let mut client = h1(m.a.outbound).await;
    let (status, headers, _) = get(&mut client, "slow", "/").await;
    assert_eq!(status, 504);
    let reason = headers["pimesh-proxy-error"].to_str().expect("ascii");
    assert!(
        reason.contains("timeout") && reason.contains("slow"),
        "{reason}"
    );
}

/// A service whose app stalls, called by many clients at once, takes only its share of
/// the streams between two nodes: past its limit of requests in flight it is refused at
/// once, the pool adds connections to the peer, and another service between the same two
/// nodes is answered all along. A service without a timeout has the site's default.
#[tokio::test]
async fn a_stalled_service_cannot_take_the_streams_between_two_nodes() {
    /// Client connections, and streams on each: under the 200 streams the outbound side
    /// allows a client connection, and past the peer's 1000 per connection in all.
    const CLIENTS: usize = 6;
    const STREAMS_EACH: usize = 190;
    /// The proxy's requests in flight per service.
    const LIMIT: usize = 1024;
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let stuck = Backend::start("stuck").await;
    let services = service("web", web.port, "timeout = \"1day\"")
        + &service("stuck", stuck.port, "timeout = \"1day\"")
        + &service("stuck-default", stuck.port, "");
    let m = mesh_with(&site, "default_timeout = \"300ms\"", &services).await;

    let mut held = Vec::new();
    for _ in 0..CLIENTS {
        let sender = h2(m.a.outbound).await;
        for _ in 0..STREAMS_EACH {
            let mut sender = sender.clone();
            held.push(tokio::spawn(async move {
                let request = Request::get("http://stuck/held")
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let response = sender.send_request(request).await.expect("response");
                let status = response.status().as_u16();
                let reason = response
                    .headers()
                    .get("pimesh-proxy-error")
                    .map(|v| v.to_str().expect("ascii").to_owned());
                let _ = response.into_body().collect().await;
                (status, reason)
            }));
        }
    }
    let refused = CLIENTS * STREAMS_EACH - LIMIT;
    let overflow = "pimesh_rejected_total{direction=\"outbound\",reason=\"service_overflow\"}";
    wait_until(
        "the requests past the service's limit are refused",
        || async { m.a.metric(overflow).await == refused as f64 },
    )
    .await;

    let mut client = h1(m.a.outbound).await;
    let (status, _, body) = tokio::time::timeout(DEADLINE, get(&mut client, "web", "/"))
        .await
        .expect("another service is answered while the stalled one's requests are open");
    assert_eq!((status, body.as_str()), (200, "web\n"));
    let peer_connections =
        m.b.metric("pimesh_open_connections{direction=\"inbound\"}")
            .await;
    assert!(
        peer_connections >= 2.0,
        "node a opened more connections to node b: {peer_connections}"
    );

    let (status, headers, _) = get(&mut client, "stuck-default", "/held").await;
    let reason = headers["pimesh-proxy-error"].to_str().expect("ascii");
    assert_eq!(status, 504, "{reason}");
    assert!(
        reason.contains("300ms"),
        "the site's default_timeout: {reason}"
    );

    stuck.release();
    let (mut answered, mut overflowed) = (0, 0);
    for request in held {
        match request.await.expect("request task") {
            (200, None) => answered += 1,
            (503, Some(reason)) if reason.contains("stuck") && reason.contains("in flight") => {
                overflowed += 1;
            }
            other => panic!("a request to the stalled service ended as {other:?}"),
        }
    }
    assert_eq!((answered, overflowed), (LIMIT, refused));
    // Every held request gave its place back.
    let (status, _, body) = get(&mut client, "stuck", "/held").await;
    assert_eq!((status, body.as_str()), (200, "stuck\n"));
}
