//! HTTP upgrades across two real proxies (nodes `a` and `b`, as in `mesh.rs`): a
//! WebSocket client → proxy a (outbound) → extended CONNECT over mTLS HTTP/2 → proxy b
//! (inbound) → HTTP/1.1 upgrade to the app on b, and back; the same from an HTTP/2 client
//! using extended CONNECT (RFC 8441); refused upgrades; a peer that stops reading; the
//! idle timeout; a SIGTERM drain that waits for an open WebSocket; the spans of an upgrade.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::Signal;
use pimesh_test_support::backends::{Backend, Collector};
use pimesh_test_support::proxy::{mesh, mesh_with, Mesh};
use pimesh_test_support::{wait_until, Site, DEADLINE};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

fn service(name: &str, port: u16, extra: &str) -> String {
    format!("[services.{name}]\nport = {port}\nnodes = [\"b\"]\n{extra}\n")
}

/// A WebSocket echo server (tokio-tungstenite) on a free port: every message comes back;
/// a close is answered.
async fn echo_app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// An app that switches protocols for any request and then never reads again.
async fn deaf_app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            read_head(&mut stream).await;
            stream
                .write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\
                      Upgrade: websocket\r\nSec-WebSocket-Accept: x\r\n\r\n",
                )
                .await
                .unwrap();
            held.push(stream);
        }
    });
    port
}

/// Reads an HTTP head (up to the blank line) byte by byte; returns it.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.unwrap();
        assert_ne!(n, 0, "closed before the end of the head: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

async fn websocket(
    m: &Mesh,
    host: &str,
) -> (WebSocketStream<TcpStream>, http::Response<Option<Vec<u8>>>) {
    let stream = TcpStream::connect(m.a.outbound).await.unwrap();
    tokio_tungstenite::client_async(format!("ws://{host}/chat"), stream)
        .await
        .expect("WebSocket handshake through the mesh")
}

async fn next_message<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("a message in time")
        .expect("not closed")
        .expect("no error")
}

/// The sum of `name{labels...}` samples whose labels contain all of `with`.
async fn metric_sum(m: &Mesh, name: &str, with: &[&str]) -> f64 {
    let mut total = 0.0;
    for proxy in [&m.a, &m.b] {
        let text = proxy.metrics().await;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if rest.starts_with('{') && with.iter().all(|w| rest.contains(w)) {
                total += line
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
    }
    total
}

#[tokio::test]
async fn a_websocket_echoes_across_two_nodes_and_closes() {
    let site = Site::new("depot");
    let app = echo_app().await;
    let m = mesh(&site, &service("ws", app, "")).await;

    let (mut ws, response) = websocket(&m, "ws").await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(
        response.headers().contains_key("sec-websocket-accept"),
        "{response:?}"
    );
    for i in 0..20 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(next_message(&mut ws).await, Message::text(text));
    }
    let big = vec![7u8; 300 * 1024];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::binary(big));

    ws.close(None).await.unwrap();
    // The app answers the close; then the connection ends.
    let ended = tokio::time::timeout(DEADLINE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the closed WebSocket ends");
    // The app closed its connection; the client closes its own, and then both proxies
    // are done with the upgraded connection.
    drop(ws);

    let outbound = "{direction=\"outbound\",dst_service=\"ws\",namespace=\"depot\",tls=\"true\"}";
    assert_eq!(
        m.a.metric(&format!("pimesh_upgrade_open_total{outbound}"))
            .await,
        1.0
    );
    let inbound = "{direction=\"inbound\",dst_service=\"ws\",namespace=\"depot\",tls=\"true\"}";
    assert_eq!(
        m.b.metric(&format!("pimesh_upgrade_open_total{inbound}"))
            .await,
        1.0
    );
    assert!(
        m.a.metric(&format!("pimesh_upgrade_read_bytes_total{outbound}"))
            .await
            > 300.0 * 1024.0
    );
    assert!(
        m.a.metric(&format!("pimesh_upgrade_write_bytes_total{outbound}"))
            .await
            > 300.0 * 1024.0
    );
    wait_until(
        "both proxies count the upgraded connection closed",
        || async {
            metric_sum(&m, "pimesh_upgrade_close_total", &["dst_service=\"ws\""]).await == 2.0
        },
    )
    .await;
    assert_eq!(
        m.a.metric(
            "response_total{direction=\"outbound\",dst_service=\"ws\",namespace=\"depot\",tls=\"true\",status_code=\"101\",classification=\"success\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_sigterm_drain_waits_for_an_open_websocket_and_exits_once_it_closes() {
    let site = Site::new("depot");
    let app = echo_app().await;
    let mut m = mesh(&site, &service("ws", app, "")).await;
    let (mut ws, _) = websocket(&m, "ws").await;
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("before"));

    m.a.signal(Signal::SIGTERM);
    wait_until("proxy a drains", || async {
        m.a.log_text().contains("draining")
    })
    .await;
    // The upgraded connection is carried on through the drain, not cut.
    for i in 0..3 {
        let text = format!("during the drain {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(next_message(&mut ws).await, Message::text(text));
    }
    assert!(m.a.daemon.exited().is_none(), "{}", m.a.log_text());
    ws.close(None).await.unwrap();
    let _ = tokio::time::timeout(DEADLINE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    drop(ws);
    let deadline = std::time::Instant::now() + DEADLINE;
    let exit = loop {
        if let Some(status) = m.a.daemon.exited() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running after the WebSocket closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit}\n{}", m.a.log_text());
    assert!(
        m.a.log_text().contains("all connections finished"),
        "the drain ended with the WebSocket, before its deadline:\n{}",
        m.a.log_text()
    );
}

#[tokio::test]
async fn a_sampled_upgrade_leaves_a_client_and_a_server_span() {
    let site = Site::new("depot");
    let app = echo_app().await;
    let collector = Collector::start().await;
    let zipkin = format!("zipkin_url = \"{}\"", collector.url);
    let m = mesh_with(&site, &zipkin, &service("ws", app, "")).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4737";
    let mut request = "ws://ws/chat".into_client_request().unwrap();
    request.headers_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let stream = TcpStream::connect(m.a.outbound).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("WebSocket handshake through the mesh");
    ws.send(Message::text("traced")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("traced"));

    let mut spans = Vec::new();
    wait_until("both hops' spans of the upgrade at the collector", || {
        spans = collector
            .spans()
            .into_iter()
            .filter(|s| s["traceId"] == trace_id)
            .collect();
        let done = spans.len() >= 2;
        async move { done }
    })
    .await;
    let client_side = spans
        .iter()
        .find(|s| s["kind"] == "CLIENT")
        .expect("a's span");
    let server_side = spans
        .iter()
        .find(|s| s["kind"] == "SERVER")
        .expect("b's span");
    assert_eq!(server_side["parentId"], client_side["id"], "{spans:?}");
    for span in [client_side, server_side] {
        assert_eq!(span["tags"]["http.status_code"], "101", "{span}");
        assert_eq!(span["tags"]["http.method"], "GET", "{span}");
        assert_eq!(span["tags"]["http.path"], "/chat", "{span}");
    }
}

#[tokio::test]
async fn an_http2_extended_connect_carries_a_websocket() {
    let site = Site::new("depot");
    let app = echo_app().await;
    let m = mesh(&site, &service("ws", app, "")).await;

    let stream = TcpStream::connect(m.a.outbound).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri("http://ws/chat")
        .header("sec-websocket-version", "13")
        .body(Empty::new())
        .unwrap();
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{response:?}");
    let upgraded = hyper::upgrade::on(response).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    for i in 0..5 {
        let text = format!("over h2 {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(next_message(&mut ws).await, Message::text(text));
    }
    ws.close(None).await.unwrap();
    let ended = tokio::time::timeout(DEADLINE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the closed WebSocket ends");
}

#[tokio::test]
async fn a_refused_upgrade_is_an_ordinary_response() {
    let site = Site::new("depot");
    let plain = Backend::start("plain").await;
    let m = mesh(&site, &service("plain", plain.port, "")).await;

    // 426 from the app: the WebSocket client sees it, no upgrade.
    let stream = TcpStream::connect(m.a.outbound).await.unwrap();
    let refused = tokio_tungstenite::client_async("ws://plain/status/426", stream).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
        }
        other => panic!("expected the app's 426, got {other:?}"),
    }

    // 200 from an app that ignores the upgrade: a normal response with its body, and the
    // connection goes on serving requests.
    let stream = TcpStream::connect(m.a.outbound).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection.with_upgrades());
    for _ in 0..2 {
        let request = Request::get("/")
            .header("host", "plain")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!response.headers().contains_key("pimesh-upgrade-status"));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"plain\n");
    }
    let seen = plain.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].method, "GET");
    assert_eq!(seen[1].headers["upgrade"], "websocket", "{:?}", seen[1]);
    assert!(!seen[1].headers.contains_key("pimesh-dst"));

    // An HTTP/2 client's extended CONNECT refused with 426 gets 426; one the app answers
    // with 200 gets a 502, since a 2xx would mean the tunnel is open.
    let stream = TcpStream::connect(m.a.outbound).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    for (path, status) in [("/status/426", 426), ("/", 502)] {
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("http://plain{path}"))
            .header("sec-websocket-version", "13")
            .body(Empty::new())
            .unwrap();
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}: {response:?}");
    }
}

#[tokio::test]
async fn a_peer_that_stops_reading_holds_the_writer_back() {
    let site = Site::new("depot");
    let app = deaf_app().await;
    let m = mesh(&site, &service("sink", app, "")).await;

    let mut client = TcpStream::connect(m.a.outbound).await.unwrap();
    client
        .write_all(
            b"GET /flood HTTP/1.1\r\nHost: sink\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    // Without back-pressure the proxies would take all of this; with it, the writer
    // stalls once the socket buffers, the HTTP/2 stream window and the proxies' copy
    // buffers are full (tens of MiB at most).
    const TRY: u64 = 1024 * 1024 * 1024;
    const BOUND: u64 = 96 * 1024 * 1024;
    let written = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&written);
    let flood = async move {
        let chunk = vec![0x55u8; 64 * 1024];
        while counter.load(Ordering::Relaxed) < TRY {
            client.write_all(&chunk).await.unwrap();
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(10), flood).await;
    let total = written.load(Ordering::Relaxed);
    assert!(
        finished.is_err() && total < BOUND,
        "the writer wrote {total} bytes (finished: {})",
        finished.is_ok()
    );
    for proxy in [&m.a, &m.b] {
        let rss = rss_kib(proxy.daemon.pid());
        assert!(rss < 128 * 1024, "proxy RSS {rss} KiB");
    }
    eprintln!("written before the writer stalled: {total} bytes");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn an_idle_upgraded_connection_is_closed() {
    let site = Site::new("depot");
    let app = echo_app().await;
    let m = mesh(&site, &service("ws", app, "idle_timeout = \"1s\"")).await;

    let (mut ws, _) = websocket(&m, "ws").await;
    ws.send(Message::text("once")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("once"));
    // Nothing more is sent: the proxies close the connection.
    let ended = tokio::time::timeout(DEADLINE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the idle connection was not closed");
    wait_until("an idle_timeout close is counted", || async {
        metric_sum(
            &m,
            "pimesh_upgrade_close_total",
            &["dst_service=\"ws\"", "reason=\"idle_timeout\""],
        )
        .await
            >= 1.0
    })
    .await;
}
