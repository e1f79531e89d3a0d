//! `fleetman-queue`: a tiny TCP message queue with fan-out.
//!
//! Protocol (line-delimited): a client's first line says its role, `PUB` or `SUB`. A
//! publisher then sends one message per line; a subscriber receives every line published
//! after it subscribed. Memory is bounded: lines are at most [`MAX_LINE`] bytes, the
//! fan-out keeps the last [`BACKLOG`] messages, and a subscriber that falls behind it (or
//! whose socket takes no data for [`WRITE_TIMEOUT`]) is dropped, never buffered for.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::net::Shutdown;

pub const MAX_LINE: usize = 64 * 1024;
pub const BACKLOG: usize = 1024;
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to say its role.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CLIENTS: usize = 256;

/// Reads one line of at most `max` bytes (without its newline); `Ok(None)` at the end of
/// the stream.
///
/// # Errors
/// On a read error or a line longer than `max`.
pub async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Option<()>, String> {
    buf.clear();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let read = (&mut *reader)
        .take(limit)
        .read_until(b'\n', buf)
        .await
        .map_err(|err| err.to_string())?;
    if read == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > max {
        return Err(format!("a line longer than {max} bytes"));
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(()))
}

/// Serves the queue on `listener` until shutdown.
pub async fn run(listener: TcpListener, shutdown: Shutdown) {
    let (messages, _) = broadcast::channel::<Bytes>(BACKLOG);
    let mut clients = tokio::task::JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            () = stop.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if clients.len() >= MAX_CLIENTS {
                        warn!("refusing {peer}: {MAX_CLIENTS} clients already");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let messages = messages.clone();
                    let shutdown = shutdown.clone();
                    clients.spawn(async move {
                        if let Err(err) = client(stream, peer, messages, shutdown).await {
                            warn!("queue client {peer}: {err}");
                        }
                    });
                }
                Err(err) => {
                    warn!("accept: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    }
    drop(listener);
    clients.shutdown().await;
    info!("queue stopped");
}

async fn client(
    stream: TcpStream,
    peer: SocketAddr,
    messages: broadcast::Sender<Bytes>,
    mut shutdown: Shutdown,
) -> Result<(), String> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_line(&mut reader, &mut line, 64))
        .await
        .map_err(|_| format!("said no role (PUB or SUB) within {HELLO_TIMEOUT:?}"))??;
    if hello.is_none() {
        return Ok(());
    }
    match line.as_slice() {
        b"PUB" => {
            info!("publisher {peer} connected");
            loop {
                tokio::select! {
                    read = read_line(&mut reader, &mut line, MAX_LINE) => {
                        if read?.is_none() {
                            info!("publisher {peer} left");
                            return Ok(());
                        }
                        if line.is_empty() {
                            continue;
                        }
                        let mut message = Vec::with_capacity(line.len() + 1);
                        message.extend_from_slice(&line);
                        message.push(b'\n');
                        // No subscriber is not an error: the message is simply not kept.
                        let _ = messages.send(Bytes::from(message));
                    }
                    () = shutdown.wait() => return Ok(()),
                }
            }
        }
        b"SUB" => {
            info!("subscriber {peer} connected");
            let mut receiver = messages.subscribe();
            loop {
                tokio::select! {
                    received = receiver.recv() => match received {
                        Ok(message) => {
                            tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&message))
                                .await
                                .map_err(|_| format!("took no data for {WRITE_TIMEOUT:?}: dropped as a slow consumer"))?
                                .map_err(|err| format!("write: {err}"))?;
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            return Err(format!("fell {missed} messages behind: dropped as a slow consumer"));
                        }
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    // A subscriber sends nothing; its end of stream means it left.
                    read = reader.read_u8() => {
                        if read.is_err() {
                            debug!("subscriber {peer} left");
                            return Ok(());
                        }
                    }
                    () = shutdown.wait() => return Ok(()),
                }
            }
        }
        other => Err(format!(
            "first line {:?} is not a role (PUB or SUB)",
            String::from_utf8_lossy(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn subscribers_get_what_is_published_after_they_subscribe() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = Shutdown::manual();
        let server = tokio::spawn(run(listener, shutdown));

        let mut subscribers = Vec::new();
        for _ in 0..2 {
            let mut sub = TcpStream::connect(addr).await.unwrap();
            sub.write_all(b"SUB\n").await.unwrap();
            subscribers.push(BufReader::new(sub));
        }
        let mut publisher = TcpStream::connect(addr).await.unwrap();
        publisher.write_all(b"PUB\n").await.unwrap();
        // Subscribers are registered when their hello is read: publish until one arrives.
        let mut line = Vec::new();
        for sub in &mut subscribers {
            loop {
                publisher.write_all(b"{\"n\":1}\n").await.unwrap();
                let got = tokio::time::timeout(
                    Duration::from_millis(200),
                    read_line(sub, &mut line, MAX_LINE),
                )
                .await;
                if let Ok(got) = got {
                    got.unwrap().unwrap();
                    assert_eq!(line, b"{\"n\":1}");
                    break;
                }
            }
        }
        stop.send(true).unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_line_too_long_is_an_error_not_memory() {
        let data = vec![b'x'; 100];
        let mut reader = BufReader::new(data.as_slice());
        let mut line = Vec::new();
        assert!(read_line(&mut reader, &mut line, 10).await.is_err());
        let mut reader = BufReader::new(&b"ab\r\ncd"[..]);
        assert_eq!(read_line(&mut reader, &mut line, 10).await, Ok(Some(())));
        assert_eq!(line, b"ab");
        assert_eq!(read_line(&mut reader, &mut line, 10).await, Ok(Some(())));
        assert_eq!(line, b"cd");
        assert_eq!(read_line(&mut reader, &mut line, 10).await, Ok(None));
    }
}
