//! Copying bytes both ways between two streams (an opaque TCP connection and its tunnel, an
//! upgraded HTTP connection and its peer), with an idle timeout, counted as they move.
//!
//! Invariants:
//! - a stream that waits holds no buffer: bytes are read into one scratch buffer per thread
//!   and written on at once, and only what the far side does not take at once is kept, in
//!   a buffer of that direction that is freed as soon as it has been written. Idle
//!   connections (most of an edge node's tunnels and WebSockets) cost no copy buffers;
//! - memory is bounded: a direction whose bytes wait reads nothing more until they have
//!   been written, so a side that stops reading stops the other side's writes (through TCP
//!   windows and HTTP/2 flow control) instead of filling the proxy; what waits is at most
//!   [`SCRATCH_LEN`] bytes per direction;
//! - a side that closes its writing half has that close passed on (FIN, or END_STREAM on
//!   an HTTP/2 stream) while the other direction goes on, until it closes too;
//! - a connection through which no byte moved either way for the idle timeout is closed;
//! - an error in either direction ends both.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The most one read takes; also the most a direction keeps while its bytes wait.
pub const SCRATCH_LEN: usize = 16 * 1024;

thread_local! {
    /// Where each read lands before it is written on; used only within one poll.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// Which way bytes moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// From the client side to the server side.
    FromClient,
    /// From the server side to the client side.
    ToClient,
}

/// Why a copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed.
    Closed,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// Reading or writing failed on either side.
    Error,
}

/// Bytes moved each way, and why the copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub from_client: u64,
    pub to_client: u64,
    pub end: End,
}

/// Copies between `client` and `server` until both have closed, either fails, or nothing
/// moved for `idle` (when set); `moved` hears of every write as it happens.
pub async fn copy_both<C, S>(
    client: &mut C,
    server: &mut S,
    idle: Option<Duration>,
    mut moved: impl FnMut(Way, u64),
) -> Copied
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Half::default();
    let mut down = Half::default();
    let mut counts = Copied {
        from_client: 0,
        to_client: 0,
        end: End::Closed,
    };
    let mut last_moved = Instant::now();
    let mut check = idle.map(|idle| {
        let mut check = tokio::time::interval(idle / 4 + Duration::from_millis(1));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        (idle, check)
    });
    let end = poll_fn(|cx| {
        let mut progress = false;
        for (half, way) in [(&mut up, Way::FromClient), (&mut down, Way::ToClient)] {
            if half.done {
                continue;
            }
            let mut n = 0;
            let polled = match way {
                Way::FromClient => half.poll_copy(cx, &mut *client, &mut *server, &mut n),
                Way::ToClient => half.poll_copy(cx, &mut *server, &mut *client, &mut n),
            };
            if n > 0 {
                progress = true;
                moved(way, n);
                match way {
                    Way::FromClient => counts.from_client += n,
                    Way::ToClient => counts.to_client += n,
                }
            }
            match polled {
                Poll::Ready(Ok(())) => half.done = true,
                Poll::Ready(Err(_)) => return Poll::Ready(End::Error),
                Poll::Pending => {}
            }
        }
        if up.done && down.done {
            return Poll::Ready(End::Closed);
        }
        if progress {
            last_moved = Instant::now();
        }
        if let Some((idle, check)) = check.as_mut() {
            while check.poll_tick(cx).is_ready() {
                if last_moved.elapsed() >= *idle {
                    return Poll::Ready(End::IdleTimeout);
                }
            }
        }
        Poll::Pending
    })
    .await;
    counts.end = end;
    counts
}

/// One direction of a copy.
#[derive(Default)]
struct Half {
    /// Bytes read but not yet taken by the writer; empty (and unallocated) otherwise.
    waiting: Vec<u8>,
    /// How much of `waiting` has been written.
    written: usize,
    /// The reader ended; what is left is to close the writer.
    read_done: bool,
    /// Bytes were written since the writer was last flushed.
    unflushed: bool,
    /// The writer has been closed too.
    done: bool,
}

impl Half {
    /// Moves bytes from `from` to `to` until one of them has to wait (Pending), the reader
    /// ended and the writer is closed (Ready(Ok)), or either fails. Adds what it wrote to
    /// `moved`.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        moved: &mut u64,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            while self.written < self.waiting.len() {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.waiting[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                *moved += n as u64;
                self.unflushed = true;
            }
            if !self.waiting.is_empty() {
                self.waiting = Vec::new();
                self.written = 0;
            }
            if self.read_done {
                ready!(Pin::new(&mut *to).poll_flush(cx))?;
                // The far side may already be gone: its own close ends the other half.
                let _ = ready!(Pin::new(&mut *to).poll_shutdown(cx));
                return Poll::Ready(Ok(()));
            }
            match with_scratch(|scratch| self.read_and_write(cx, from, to, scratch, moved)) {
                Poll::Pending => {
                    if self.unflushed {
                        ready!(Pin::new(&mut *to).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    /// Reads once into `scratch` and writes what it can at once; keeps the rest in
    /// `waiting`. Returns how many bytes were read (0: the reader ended).
    fn read_and_write<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        scratch: &mut [u8],
        moved: &mut u64,
    ) -> Poll<io::Result<usize>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let read = {
            let mut buf = ReadBuf::new(scratch);
            ready!(Pin::new(&mut *from).poll_read(cx, &mut buf))?;
            buf.filled().len()
        };
        let mut written = 0;
        while written < read {
            match Pin::new(&mut *to).poll_write(cx, &scratch[written..read]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => break,
            }
        }
        if written > 0 {
            *moved += written as u64;
            self.unflushed = true;
        }
        if written < read {
            self.waiting.extend_from_slice(&scratch[written..read]);
        }
        Poll::Ready(Ok(read))
    }
}

/// Runs `f` on this thread's scratch buffer (a fresh one if it is in use, which no caller
/// does: a copy borrows it only within one poll).
fn with_scratch<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut vec![0u8; SCRATCH_LEN]),
    })
}

/// Copies between `client` and `server` as [`copy_both`] does; returns (bytes read from
/// the client, bytes written to the client).
pub async fn splice<A, B>(client: &mut A, server: &mut B, idle: Option<Duration>) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let copied = copy_both(client, server, idle, |_, _| {}).await;
    (copied.from_client, copied.to_client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn bytes_flow_both_ways_and_closes_pass_on() {
        let (mut client, mut client_far) = tokio::io::duplex(64);
        let (mut server, mut server_far) = tokio::io::duplex(64);
        let copying =
            tokio::spawn(async move { copy_both(&mut client, &mut server, None, |_, _| {}).await });
        client_far.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        server_far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        server_far.write_all(b"world").await.unwrap();
        client_far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"world");
        // The client closes its half; the server still answers, then closes too.
        client_far.shutdown().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(server_far.read_to_end(&mut rest).await.unwrap(), 0);
        server_far.write_all(b"bye").await.unwrap();
        drop(server_far);
        client_far.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"bye");
        let copied = copying.await.unwrap();
        assert_eq!(
            copied,
            Copied {
                from_client: 5,
                to_client: 8,
                end: End::Closed
            }
        );
    }

    #[tokio::test]
    async fn a_side_that_stops_reading_holds_back_the_other_within_bounds() {
        // The server side takes 64 bytes and then nothing: the client's megabyte stays
        // mostly in the client's own pipe, and the copy keeps at most SCRATCH_LEN.
        let (mut client, mut client_far) = tokio::io::duplex(1024);
        let (mut server, server_far) = tokio::io::duplex(64);
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sent_by_writer = std::sync::Arc::clone(&sent);
        let writer = tokio::spawn(async move {
            let chunk = [7u8; 1024];
            for _ in 0..1024 {
                if client_far.write_all(&chunk).await.is_err() {
                    break;
                }
                sent_by_writer.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
            }
        });
        let copying = tokio::spawn(async move {
            copy_both(
                &mut client,
                &mut server,
                Some(Duration::from_millis(300)),
                |_, _| {},
            )
            .await
        });
        let copied = copying.await.unwrap();
        assert_eq!(copied.end, End::IdleTimeout);
        assert_eq!(copied.from_client, 64, "the server side took 64 bytes");
        let accepted = sent.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            accepted <= 64 + SCRATCH_LEN + 2 * 1024,
            "the copy took {accepted} bytes from a client whose peer stopped reading"
        );
        writer.abort();
        drop(server_far);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let (mut client, _client_far) = tokio::io::duplex(64);
        let (mut server, _server_far) = tokio::io::duplex(64);
        let copied = copy_both(
            &mut client,
            &mut server,
            Some(Duration::from_millis(100)),
            |_, _| {},
        )
        .await;
        assert_eq!(copied.end, End::IdleTimeout);
    }
}
