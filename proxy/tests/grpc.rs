//! gRPC-shaped HTTP/2 across two real proxies (nodes `a` and `b`, as in `mesh.rs`):
//! trailers cross both hops, a `grpc-status` other than 0 (in trailers, or in the headers
//! of a trailers-only response) counts as a failure in `response_total`, and a response
//! the app resets mid-message reaches the client as an error, not a clean end.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pimesh_test_support::proxy::mesh;
use pimesh_test_support::{wait_until, Site};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

type AppBody = BoxBody<Bytes, std::io::Error>;

/// A gRPC message: uncompressed, length-prefixed.
fn message(payload: &[u8]) -> Bytes {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(payload);
    Bytes::from(framed)
}

fn frames(frames: Vec<Result<Frame<Bytes>, std::io::Error>>) -> AppBody {
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

fn trailers(status: &'static str) -> Frame<Bytes> {
    let mut map = HeaderMap::new();
    map.insert("grpc-status", HeaderValue::from_static(status));
    map.insert("grpc-message", HeaderValue::from_static("from%20the%20app"));
    Frame::trailers(map)
}

/// A prior-knowledge HTTP/2 app answering by method: `Ok` (grpc-status 0 in trailers),
/// `Unavailable` (14 in trailers), `TrailersOnly` (14 in the headers, no body), `Cut`
/// (half a message, then a reset). Records each request's `te` header.
async fn grpc_app(te_seen: Arc<Mutex<Vec<Option<String>>>>, cut: Arc<Notify>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let te_seen = Arc::clone(&te_seen);
            let cut = Arc::clone(&cut);
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let te_seen = Arc::clone(&te_seen);
                    let cut = Arc::clone(&cut);
                    async move {
                        te_seen.lock().unwrap().push(
                            request
                                .headers()
                                .get("te")
                                .map(|v| v.to_str().unwrap().to_owned()),
                        );
                        let method = request.uri().path().rsplit('/').next().unwrap().to_owned();
                        let _ = request.into_body().collect().await;
                        let body = match method.as_str() {
                            "Ok" => {
                                frames(vec![Ok(Frame::data(message(b"pong"))), Ok(trailers("0"))])
                            }
                            "Unavailable" => frames(vec![
                                Ok(Frame::data(message(b"partial"))),
                                Ok(trailers("14")),
                            ]),
                            "Cut" => {
                                // Half a message; the reset waits until the client has
                                // the response's head, so that it comes mid-body.
                                let half = message(&[1u8; 100]).slice(..40);
                                let cut = Arc::clone(&cut);
                                let reset = futures_util::stream::once(async move {
                                    cut.notified().await;
                                    Err(std::io::Error::other("the app fails mid-message"))
                                });
                                StreamBody::new(futures_util::StreamExt::chain(
                                    futures_util::stream::iter([Ok(Frame::data(half))]),
                                    reset,
                                ))
                                .boxed()
                            }
                            _ => Full::new(Bytes::new())
                                .map_err(|never| match never {})
                                .boxed(),
                        };
                        let mut response = Response::new(body);
                        response
                            .headers_mut()
                            .insert("content-type", HeaderValue::from_static("application/grpc"));
                        if method == "TrailersOnly" {
                            response
                                .headers_mut()
                                .insert("grpc-status", HeaderValue::from_static("14"));
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

type Client = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn call(client: &mut Client, method: &str) -> Result<(u16, Option<HeaderMap>), String> {
    let request = Request::post(format!("http://grpc/pimesh.Test/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(message(b"ping")))
        .unwrap();
    let response = client
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let collected = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    // A trailers-only response carries its status in its headers.
    let trailers = collected
        .trailers()
        .cloned()
        .or_else(|| headers.contains_key("grpc-status").then_some(headers));
    Ok((status, trailers))
}

#[tokio::test]
async fn grpc_trailers_cross_and_non_zero_statuses_are_failures() {
    let site = Site::new("depot");
    let te_seen = Arc::default();
    let cut = Arc::new(Notify::new());
    let app = grpc_app(Arc::clone(&te_seen), Arc::clone(&cut)).await;
    let m = mesh(
        &site,
        &format!("[services.grpc]\nport = {app}\nnodes = [\"b\"]\n"),
    )
    .await;

    let stream = TcpStream::connect(m.a.outbound).await.unwrap();
    let (mut client, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);

    let (status, trailers) = call(&mut client, "Ok").await.unwrap();
    let trailers = trailers.expect("trailers crossed both proxies");
    assert_eq!(
        (status, trailers["grpc-status"].to_str().unwrap()),
        (200, "0")
    );
    assert_eq!(trailers["grpc-message"], "from%20the%20app");

    for method in ["Unavailable", "TrailersOnly"] {
        let (status, trailers) = call(&mut client, method).await.unwrap();
        let trailers = trailers.expect("a grpc-status");
        assert_eq!(
            (status, trailers["grpc-status"].to_str().unwrap()),
            (200, "14"),
            "{method}"
        );
    }

    let request = Request::post("http://grpc/pimesh.Test/Cut")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(message(b"ping")))
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    cut.notify_one();
    let rest = response.into_body().collect().await;
    assert!(
        rest.is_err(),
        "a reset mid-message must not end cleanly: {:?}",
        rest.map(|c| c.to_bytes())
    );

    // gRPC requires `te: trailers`; the proxies keep it.
    let seen = te_seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    assert!(
        seen.iter().all(|te| te.as_deref() == Some("trailers")),
        "{seen:?}"
    );

    for (proxy, direction) in [(&m.a, "outbound"), (&m.b, "inbound")] {
        let labels = format!("direction=\"{direction}\",dst_service=\"grpc\",namespace=\"depot\",tls=\"true\",status_code=\"200\"");
        let ok = format!("response_total{{{labels},grpc_status=\"0\",classification=\"success\"}}");
        let unavailable =
            format!("response_total{{{labels},grpc_status=\"14\",classification=\"failure\"}}");
        let broken = format!("response_total{{{labels},classification=\"failure\"}}");
        let plain_success = format!("response_total{{{labels},classification=\"success\"}}");
        wait_until(
            &format!("{direction} gRPC responses classified"),
            || async {
                let metrics = proxy.metrics().await;
                let value = |line: &str| pimesh_test_support::http::sample(&metrics, line);
                value(&ok) == 1.0 && value(&unavailable) == 2.0 && value(&broken) == 1.0
            },
        )
        .await;
        assert_eq!(proxy.metric(&plain_success).await, 0.0);
    }
}
