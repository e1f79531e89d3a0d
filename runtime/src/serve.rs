//! The accept loop behind every daemon's TCP port, and HTTP over one accepted connection.
//!
//! [`accept_loop`] accepts until its `stop` future resolves and runs each connection on a
//! task of its own; what a connection goes through (a TLS handshake, a look at its first
//! byte, then HTTP) is the caller's, given as a function of the stream and the peer.
//! [`serve_http1`] is that loop with plain HTTP/1.1 on every connection. [`http1`] (and,
//! with the cargo feature `http2`, [`http1_or_2`]) serve HTTP on one stream with the
//! header timeout.
//!
//! Invariants:
//! - with [`Limits::max_connections`] set, no more than that many connections are open at
//!   once: the loop accepts the next only when one has ended, and the clients in excess
//!   wait in the listen backlog;
//! - with [`Limits::max_per_source`] set, no source address holds more than that many of
//!   them: a connection in excess is closed as soon as it is accepted, so one host cannot
//!   fill the listener's share and hold every other client in the backlog;
//! - a failed accept (out of descriptors, mostly) never ends the loop and never spins it:
//!   the loop pauses [`ACCEPT_PAUSE`] and tries again, and warns at most once per
//!   [`ACCEPT_WARNING_INTERVAL`], with the number of failures since the last warning;
//! - once `stop` has resolved nothing more is accepted; connections already accepted run to
//!   their end on their own tasks.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::per_source::Sources;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client must send its request headers within this time.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept before the next: the connection stays in the backlog, and
/// descriptors may be free by then.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(50);
/// At most one warning about failed accepts per this long: out of descriptors, every retry
/// fails, and a warning each would flood the journal.
pub const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// What a server is called in logs, and how many connections it holds at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Names the server in logs: "status API", "admin endpoints".
    pub name: &'static str,
    /// `None`: no cap.
    pub max_connections: Option<usize>,
    /// The most connections one source address holds open; `None`: no cap.
    pub max_per_source: Option<usize>,
}

impl Limits {
    /// A server called `name`, with no connection cap.
    pub const fn named(name: &'static str) -> Limits {
        Limits {
            name,
            max_connections: None,
            max_per_source: None,
        }
    }

    /// At most `max` connections open at once.
    pub const fn with_max_connections(self, max: usize) -> Limits {
        Limits {
            max_connections: Some(max),
            ..self
        }
    }

    /// At most `max` connections open at once from one source address.
    pub const fn with_max_per_source(self, max: usize) -> Limits {
        Limits {
            max_per_source: Some(max),
            ..self
        }
    }
}

/// Accepts on one listener and copes with failed accepts (see the module invariants).
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    name: &'static str,
    errors: AcceptErrors,
}

impl Acceptor {
    pub fn new(listener: TcpListener, name: &'static str) -> Acceptor {
        Acceptor {
            listener,
            name,
            errors: AcceptErrors::default(),
        }
    }

    /// The next connection; `None` after a failed accept, once the pause is over.
    pub async fn accept(&mut self) -> Option<(TcpStream, SocketAddr)> {
        match self.listener.accept().await {
            Ok(accepted) => Some(accepted),
            Err(err) => {
                if let Some(failures) = self.errors.warning_due(Instant::now()) {
                    warn_accept_failed(self.name, &err, failures);
                }
                tokio::time::sleep(ACCEPT_PAUSE).await;
                None
            }
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Failed accepts since the last warning, and when that was.
#[derive(Debug, Default)]
struct AcceptErrors {
    last_warning: Option<Instant>,
    unreported: u64,
}

impl AcceptErrors {
    /// Counts one failure at `now`; when a warning is due, the failures it reports.
    fn warning_due(&mut self, now: Instant) -> Option<u64> {
        self.unreported += 1;
        if self
            .last_warning
            .is_some_and(|last| now.saturating_duration_since(last) < ACCEPT_WARNING_INTERVAL)
        {
            return None;
        }
        self.last_warning = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

fn warn_accept_failed(server: &str, err: &std::io::Error, failures: u64) {
    match err.raw_os_error() {
        Some(libc::EMFILE) => {
            use nix::sys::resource::{getrlimit, Resource};
            let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(soft, _)| soft);
            warn!(
                server,
                %err,
                failures,
                limit,
                "cannot accept connections: all {limit} descriptors of the open-file limit (RLIMIT_NOFILE) are in use; raise LimitNOFILE="
            );
        }
        Some(libc::ENFILE) => warn!(
            server,
            %err,
            failures,
            "cannot accept connections: the system's open-file table (fs.file-max) is full"
        ),
        _ => warn!(server, %err, failures, "accept failed"),
    }
}

/// Accepts on `listener` until `stop` resolves, and runs `connection(stream, peer)` on a
/// task of its own for each accepted connection, within `limits`.
pub async fn accept_loop<C, F>(
    listener: TcpListener,
    limits: Limits,
    stop: impl Future<Output = ()>,
    mut connection: C,
) where
    C: FnMut(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let permits = limits
        .max_connections
        .map(|max| Arc::new(Semaphore::new(max)));
    let sources = limits.max_per_source.map(Sources::new);
    let mut acceptor = Acceptor::new(listener, limits.name);
    tokio::pin!(stop);
    loop {
        let next = async {
            let permit = match &permits {
                Some(permits) => match Arc::clone(permits).acquire_owned().await {
                    Ok(permit) => Some(permit),
                    // Never closed: the semaphore lives as long as this loop.
                    Err(_) => std::future::pending().await,
                },
                None => None,
            };
            acceptor
                .accept()
                .await
                .map(|(stream, peer)| (stream, peer, permit))
        };
        let (stream, peer, permit) = tokio::select! {
            biased;
            () = &mut stop => return,
            accepted = next => match accepted {
                Some(accepted) => accepted,
                None => continue,
            },
        };
        let source_count = match &sources {
            Some(sources) => match sources.admit(peer.ip()) {
                Some(count) => Some(count),
                None => {
                    debug!(server = limits.name, %peer, "the source holds its share of connections: closed");
                    continue;
                }
            },
            None => None,
        };
        let served = connection(stream, peer);
        tokio::spawn(async move {
            served.await;
            drop((permit, source_count));
        });
    }
}

/// [`accept_loop`] with plain HTTP/1.1 on every connection: `service(peer)` answers that
/// connection's requests.
pub async fn serve_http1<M, S, B>(
    listener: TcpListener,
    limits: Limits,
    stop: impl Future<Output = ()>,
    service: M,
) where
    M: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let name = limits.name;
    accept_loop(listener, limits, stop, move |stream, peer| {
        http1(stream, service(peer), peer, name)
    })
    .await;
}

/// Serves HTTP/1.1 on `stream` until the client closes it (or sends no request headers
/// within [`HEADER_TIMEOUT`]); a connection error is logged at debug level.
pub async fn http1<I, S, B>(stream: I, service: S, peer: SocketAddr, name: &'static str)
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(err) = connection.await {
        debug!(server = name, %peer, %err, "connection ended with an error");
    }
}

/// Serves HTTP/2 or HTTP/1.1 on `stream`, whichever the client speaks (with TLS, ALPN has
/// agreed on it), with [`HEADER_TIMEOUT`] for HTTP/1.1 requests.
#[cfg(feature = "http2")]
pub async fn http1_or_2<I, S, B>(stream: I, service: S, peer: SocketAddr, name: &'static str)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let served = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(err) = served.await {
        debug!(server = name, %peer, %err, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Full;
    use hyper::body::Bytes;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::sync::{oneshot, Notify};

    const DEADLINE: Duration = Duration::from_secs(20);

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    async fn bound() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        (listener, addr)
    }

    #[test]
    fn accept_failures_are_warned_about_at_most_once_per_interval() {
        let mut errors = AcceptErrors::default();
        let start = Instant::now();
        assert_eq!(errors.warning_due(start), Some(1));
        for n in 1..200 {
            assert_eq!(errors.warning_due(start + ACCEPT_PAUSE * n), None);
        }
        let next = start + ACCEPT_WARNING_INTERVAL;
        assert_eq!(errors.warning_due(next), Some(200));
        assert_eq!(errors.warning_due(next + ACCEPT_PAUSE), None);
    }

    #[tokio::test]
    async fn http1_answers_each_connection_with_its_peer_and_stops_on_request() {
        let (listener, addr) = bound().await;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve_http1(
            listener,
            Limits::named("test"),
            async {
                let _ = stop_rx.await;
            },
            |peer: SocketAddr| {
                hyper::service::service_fn(move |request: Request<Incoming>| {
                    let body = format!("{} from {}\n", request.uri().path(), peer.ip());
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                })
            },
        ));
        let answer = get(addr, "/hello").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("/hello from 127.0.0.1\n"), "{answer}");

        stop_tx.send(()).expect("the loop is running");
        tokio::time::timeout(DEADLINE, server)
            .await
            .expect("the loop returns once stopped")
            .expect("no panic");
        // The listener was dropped with the loop: nothing answers any more.
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn the_connection_cap_serves_clients_in_excess_one_after_the_other() {
        let (listener, addr) = bound().await;
        let open = Arc::new(AtomicUsize::new(0));
        let most_open = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let server = {
            let (open, most_open) = (Arc::clone(&open), Arc::clone(&most_open));
            let release = Arc::clone(&release);
            tokio::spawn(accept_loop(
                listener,
                Limits::named("test").with_max_connections(1),
                std::future::pending(),
                move |mut stream, _peer| {
                    let (open, most_open) = (Arc::clone(&open), Arc::clone(&most_open));
                    let release = Arc::clone(&release);
                    async move {
                        let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
                        most_open.fetch_max(now_open, Ordering::SeqCst);
                        let _ = stream.write_all(b"hello\n").await;
                        release.notified().await;
                        open.fetch_sub(1, Ordering::SeqCst);
                    }
                },
            ))
        };
        // Three clients at once; each is served only after the one before it ended.
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
        }
        for client in &mut clients {
            let mut greeting = [0u8; 6];
            tokio::time::timeout(DEADLINE, client.read_exact(&mut greeting))
                .await
                .expect("served in turn")
                .expect("read");
            assert_eq!(&greeting, b"hello\n");
            release.notify_one();
        }
        assert_eq!(most_open.load(Ordering::SeqCst), 1, "never two at once");
        server.abort();
    }

    /// A connection to `addr` from the local address `from`.
    async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from((from, 0)))
            .expect("bind the source");
        socket.connect(addr).await.expect("connect")
    }

    #[tokio::test]
    async fn one_source_in_excess_of_its_share_is_closed_and_others_are_served() {
        let (listener, addr) = bound().await;
        let release = Arc::new(Notify::new());
        let server = {
            let release = Arc::clone(&release);
            tokio::spawn(accept_loop(
                listener,
                Limits::named("test")
                    .with_max_connections(10)
                    .with_max_per_source(2),
                std::future::pending(),
                move |mut stream, _peer| {
                    let release = Arc::clone(&release);
                    async move {
                        let _ = stream.write_all(b"hello\n").await;
                        release.notified().await;
                    }
                },
            ))
        };
        let greeted = |mut stream: TcpStream| async move {
            let mut greeting = [0u8; 6];
            tokio::time::timeout(DEADLINE, stream.read_exact(&mut greeting))
                .await
                .expect("an answer or a close in time")
                .is_ok()
        };
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = connect_from([127, 0, 0, 1], addr).await;
            let mut greeting = [0u8; 6];
            stream.read_exact(&mut greeting).await.expect("greeted");
            held.push(stream);
        }
        let third = connect_from([127, 0, 0, 1], addr).await;
        assert!(!greeted(third).await, "the third from one host is closed");
        let other = connect_from([127, 0, 0, 2], addr).await;
        assert!(greeted(other).await, "another host is served");
        server.abort();
    }
}
