//! Keep-alive HTTP/1.1 connections from the inbound proxy to the apps on this node.
//!
//! An HTTP/1.1 connection carries one request at a time, so the pool holds, per app
//! address, the connections that are between requests; a request takes the one that
//! came back last (the warmest; the app's idle timeout closes the coldest) or dials.
//!
//! Invariants:
//! - a connection is in the pool only between requests: it comes back when its response
//!   body has been read to its end, once hyper's dispatcher waits for the next request;
//!   a response dropped before its end takes its connection with it (hyper closes a
//!   connection whose response was not read to the end);
//! - at most `max_idle` connections per app are kept; one more that comes back is closed;
//! - a request reaches the app at most once: it is sent again, on another connection,
//!   only when hyper hands it back unwritten (the app had closed the pooled connection).

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::transport::mesh_http::Body;
use crate::transport::peers::CONNECT_TIMEOUT;

/// Why a request could not be delivered to an app.
#[derive(Debug)]
pub enum AppError {
    /// Nothing accepted a connection on the app's address (refused or timed out).
    Connect(io::Error),
    /// The app broke off the exchange, or answered with what is not HTTP/1.1.
    Http(hyper::Error),
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Connect(err) => write!(f, "cannot connect: {err}"),
            AppError::Http(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for AppError {}

/// The idle connections to each app. Apps on a node are few, so a list searched in
/// order costs less than hashing the address on every request.
pub struct AppPool {
    idle: Mutex<Vec<(SocketAddr, Vec<SendRequest<Body>>)>>,
    max_idle: usize,
}

impl AppPool {
    /// A pool that keeps at most `max_idle` idle connections per app.
    pub fn new(max_idle: usize) -> Arc<AppPool> {
        Arc::new(AppPool {
            idle: Mutex::new(Vec::new()),
            max_idle,
        })
    }

    /// Sends `request` (origin-form target, `Host` set) to the app at `app` and returns
    /// its response, whose body gives the connection back when read to its end.
    pub async fn send(
        self: &Arc<Self>,
        app: SocketAddr,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, AppError> {
        while let Some(mut sender) = self.checkout(app) {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.returning(app, sender, response)),
                Err(mut err) => match err.take_message() {
                    Some(unsent) => {
                        debug!(%app, error = %err.error(), "pooled app connection closed; request sent on another");
                        request = unsent;
                    }
                    None => return Err(AppError::Http(err.into_error())),
                },
            }
        }
        let mut sender = dial(app).await?;
        match sender.send_request(request).await {
            Ok(response) => Ok(self.returning(app, sender, response)),
            Err(err) => Err(AppError::Http(err)),
        }
    }

    /// The most recently returned idle connection to `app` that is still open.
    fn checkout(&self, app: SocketAddr) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let (_, senders) = idle.iter_mut().find(|(addr, _)| *addr == app)?;
        // A connection the app closed while idle is dropped here.
        std::iter::from_fn(|| senders.pop()).find(SendRequest::is_ready)
    }

    /// Keeps `sender`, ready for its next request, unless `app` has enough idle ones.
    fn keep(&self, app: SocketAddr, sender: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        match idle.iter_mut().find(|(addr, _)| *addr == app) {
            Some((_, senders)) if senders.len() < self.max_idle => senders.push(sender),
            Some(_) => {}
            None => idle.push((app, vec![sender])),
        }
    }

    /// `response` with a body that gives `sender` back when it ends.
    fn returning(
        self: &Arc<Self>,
        app: SocketAddr,
        sender: SendRequest<Body>,
        response: Response<Incoming>,
    ) -> Response<Body> {
        let (head, body) = response.into_parts();
        let mut body = GivesBack {
            body,
            back: Some(Return {
                pool: Arc::clone(self),
                app,
                sender,
            }),
        };
        // An answer without a body (204, 304, `content-length: 0`) may never be polled.
        if body.body.is_end_stream() {
            body.give_back();
        }
        Response::from_parts(head, body.boxed())
    }
}

/// Connects to `app` and starts an HTTP/1.1 connection on it.
async fn dial(app: SocketAddr) -> Result<SendRequest<Body>, AppError> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(app)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Err(AppError::Connect(err)),
        Err(_) => {
            return Err(AppError::Connect(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {CONNECT_TIMEOUT:?}"),
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(AppError::Http)?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            debug!(%app, error = %err, "app connection ended with an error");
        }
    });
    Ok(sender)
}

/// What a response body gives back to its pool when it ends.
struct Return {
    pool: Arc<AppPool>,
    app: SocketAddr,
    sender: SendRequest<Body>,
}

/// A response body from an app; its connection goes back to the pool at its end.
struct GivesBack {
    body: Incoming,
    back: Option<Return>,
}

impl GivesBack {
    fn give_back(&mut self) {
        let Some(Return {
            pool,
            app,
            mut sender,
        }) = self.back.take()
        else {
            return;
        };
        if sender.is_ready() {
            pool.keep(app, sender);
        } else if !sender.is_closed() {
            // The dispatcher has not yet taken up the next request (the request body may
            // still be streaming): the connection goes back when it has.
            tokio::spawn(async move {
                if poll_fn(|cx| sender.poll_ready(cx)).await.is_ok() {
                    pool.keep(app, sender);
                }
            });
        }
    }
}

impl hyper::body::Body for GivesBack {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.give_back(),
            // A connection whose response failed is not reused.
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
