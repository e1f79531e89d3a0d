//! The health endpoints every Pimesh daemon serves on its admin port: `/live` (the process
//! answers) and `/ready` (it can do its job). Probed by the supervisor and by humans.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::serve;

/// Whether the daemon can do its job; `/ready` answers 503 until it is set.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn new() -> Arc<Readiness> {
        Arc::new(Readiness::default())
    }

    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Serves `/live` and `/ready` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, readiness: Arc<Readiness>) {
    let limits = serve::Limits::named("health endpoints");
    serve::serve_http1(listener, limits, std::future::pending(), move |_peer| {
        let readiness = Arc::clone(&readiness);
        hyper::service::service_fn(move |request| {
            let ready = readiness.is_ready();
            async move { Ok::<_, Infallible>(route(&request, ready)) }
        })
    })
    .await;
}

fn route(request: &Request<Incoming>, ready: bool) -> Response<Full<Bytes>> {
    let (code, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/live") => (StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") if ready => (StatusCode::OK, "ready\n"),
        (&Method::GET, "/ready") => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        (_, "/live" | "/ready") => (StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed\n"),
        _ => (StatusCode::NOT_FOUND, "not found; try /live or /ready\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = code;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn ready_answers_503_until_set_and_live_always_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let readiness = Readiness::new();
        let server = tokio::spawn(serve(listener, Arc::clone(&readiness)));
        assert!(get(addr, "/live").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 503"));
        readiness.set(true);
        assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nowhere").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
