//! Backends in the test process: an HTTP server (HTTP/1.1 and prior-knowledge HTTP/2), a
//! TCP echo server, and a Zipkin span collector. Each runs on the test's tokio runtime
//! and stops when dropped.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
}

pub type BackendBody = BoxBody<Bytes, hyper::Error>;

/// An HTTP backend on 127.0.0.1 speaking HTTP/1.1 or prior-knowledge HTTP/2 (the
/// protocol is detected per connection by hyper-util's auto builder). `GET` answers
/// `<name>\n`; `GET /status/<code>` answers with that status; `POST /echo` streams the
/// request body back chunk by chunk as it arrives; `GET /held` answers only once
/// [`Backend::release`] was called (an app whose answers stall).
pub struct Backend {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    released: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::start_on(name, 0).await
    }

    /// [`Backend::start`] on a given port (0: any free one).
    ///
    /// # Panics
    /// When the port cannot be bound.
    pub async fn start_on(name: &str, port: u16) -> Backend {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind backend");
        let port = listener.local_addr().expect("addr").port();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let name: Arc<str> = name.into();
        let record = Arc::clone(&seen);
        let (released, release_seen) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = Arc::clone(&name);
                let record = Arc::clone(&record);
                let release_seen = release_seen.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let name = Arc::clone(&name);
                        let record = Arc::clone(&record);
                        let mut release_seen = release_seen.clone();
                        async move {
                            record.lock().expect("lock").push(Seen {
                                method: request.method().to_string(),
                                path: request.uri().path().to_owned(),
                                version: request.version(),
                                headers: request.headers().clone(),
                            });
                            if request.uri().path() == "/held" {
                                let _ = release_seen.wait_for(|released| *released).await;
                            }
                            Ok::<_, Infallible>(answer(&name, request))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend {
            port,
            seen,
            released,
            task,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    /// Answers every `GET /held`, held now or later.
    pub fn release(&self) {
        self.released.send_replace(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(name: &str, request: Request<Incoming>) -> Response<BackendBody> {
    if request.uri().path() == "/echo" {
        return Response::new(request.into_body().boxed());
    }
    if let Some(code) = request.uri().path().strip_prefix("/status/") {
        let status = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok());
        let mut response = Response::new(full(format!("{name}\n")));
        *response.status_mut() = status.unwrap_or(StatusCode::BAD_REQUEST);
        return response;
    }
    Response::new(full(format!("{name}\n")))
}

/// A whole body of `text`.
pub fn full(text: impl Into<Bytes>) -> BackendBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A TCP echo server on 127.0.0.1: its port and its task.
///
/// # Panics
/// When no port can be bound.
pub async fn tcp_echo() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (port, task)
}

/// A Zipkin v2 collector: records every JSON span POSTed to it.
pub struct Collector {
    pub url: String,
    pub spans: Arc<Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// # Panics
    /// When no port can be bound.
    pub async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("addr");
        let spans: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let record = Arc::clone(&spans);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let record = Arc::clone(&record);
                        async move {
                            let body = request.into_body().collect().await?.to_bytes();
                            if let Ok(serde_json::Value::Array(batch)) =
                                serde_json::from_slice::<serde_json::Value>(&body)
                            {
                                record.lock().expect("lock").extend(batch);
                            }
                            let mut response = Response::new(full(""));
                            *response.status_mut() = StatusCode::ACCEPTED;
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector {
            url: format!("http://{addr}/api/v2/spans"),
            spans,
            task,
        }
    }

    pub fn spans(&self) -> Vec<serde_json::Value> {
        self.spans.lock().expect("lock").clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
