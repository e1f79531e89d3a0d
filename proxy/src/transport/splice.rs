//! Copying an opaque TCP stream both ways, with the service's idle timeout and byte
//! counts for the `tcp_*_bytes_total` metrics.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Copies between `client` and `server` until both sides have closed, either fails, or
/// nothing moved for `idle` (when set). Returns (bytes read from the client, bytes written
/// to the client).
pub async fn splice<A, B>(client: &mut A, server: &mut B, idle: Option<Duration>) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last_activity = Arc::new(AtomicU64::new(0));
    let mut client = Active {
        inner: client,
        epoch,
        last: Arc::clone(&last_activity),
    };
    let copy = tokio::io::copy_bidirectional(&mut client, server);
    let Some(idle) = idle else {
        return copy.await.unwrap_or((0, 0));
    };
    tokio::pin!(copy);
    let mut check = tokio::time::interval(idle / 4 + Duration::from_millis(1));
    loop {
        tokio::select! {
            result = copy.as_mut() => return result.unwrap_or((0, 0)),
            _ = check.tick() => {
                let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
                if epoch.elapsed().saturating_sub(last) >= idle {
                    return (0, 0);
                }
            }
        }
    }
}

/// Records when bytes last moved through `inner`, in ms since `epoch`.
struct Active<'a, S> {
    inner: &'a mut S,
    epoch: Instant,
    last: Arc<AtomicU64>,
}

impl<S> Active<'_, S> {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Active<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() != before {
            self.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Active<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
