//! What every part shares: listening, serving HTTP/1 until SIGTERM, and answers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

pub type Body = Full<Bytes>;

/// How long open connections get to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(5);

/// Set once, on SIGTERM or SIGINT; every loop of a part waits on it.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A flag that SIGTERM and SIGINT set.
    ///
    /// # Errors
    /// When the signal handlers cannot be installed.
    pub fn on_signals() -> Result<Shutdown, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let (tx, rx) = watch::channel(false);
        let mut term = signal(SignalKind::terminate()).map_err(|err| format!("SIGTERM: {err}"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|err| format!("SIGINT: {err}"))?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: stopping"),
                _ = int.recv() => info!("SIGINT: stopping"),
            }
            let _ = tx.send(true);
        });
        Ok(Shutdown(rx))
    }

    /// A flag that is never set, and its setter (for unit tests).
    #[cfg(test)]
    pub fn manual() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    /// Returns once the flag is set.
    pub async fn wait(&mut self) {
        if self.0.wait_for(|stop| *stop).await.is_err() {
            // The setter is gone: nobody can stop us any more, so wait forever.
            std::future::pending::<()>().await;
        }
    }

    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Sleeps `duration`; false when the flag was set first.
    pub async fn sleep(&mut self, duration: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(duration) => true,
            () = self.wait() => false,
        }
    }
}

/// Binds `addr`, naming it in the error.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|err| format!("{what}: cannot listen on {addr}: {err}"))?;
    info!("{what} listening on {addr}");
    Ok(listener)
}

/// Serves HTTP/1 (with upgrades) on `listener` with `handler` until `shutdown`, then lets
/// open connections finish their requests for up to [`DRAIN`].
pub async fn serve<H, Fut>(listener: TcpListener, handler: H, shutdown: Shutdown)
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let mut connections = tokio::task::JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            () = stop.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let handler = handler.clone();
                    let mut stop = shutdown.clone();
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let handler = handler.clone();
                            async move { Ok::<_, Infallible>(handler(request).await) }
                        });
                        let connection = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades();
                        tokio::pin!(connection);
                        let result = tokio::select! {
                            result = connection.as_mut() => result,
                            () = stop.wait() => {
                                connection.as_mut().graceful_shutdown();
                                connection.as_mut().await
                            }
                        };
                        if let Err(err) = result {
                            debug!("connection from {peer}: {err}");
                        }
                    });
                }
                Err(err) => {
                    warn!("accept: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            "{} connections still open after {DRAIN:?}; closing them",
            connections.len()
        );
        connections.abort_all();
    }
}

/// An answer with `body` of `content_type`.
pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `value` as JSON.
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(status, "application/json", body),
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the answer: {err}"),
        ),
    }
}

/// `{"error": message}` with `status`.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    respond(status, "application/json", body)
}

pub fn not_found(path: &str) -> Response<Body> {
    error(StatusCode::NOT_FOUND, &format!("no such page: {path}"))
}
