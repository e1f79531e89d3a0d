//! Upgraded HTTP connections (a WebSocket after its `101`, an HTTP/2 extended CONNECT after
//! its `200`): the bytes copied both ways between the client side and the server side,
//! with the service's idle timeout, counted as they move.
//!
//! Invariants:
//! - memory is bounded: each direction owns one [`COPY_BUFFER`]-byte buffer and reads
//!   nothing more until that buffer has been written on, so a side that stops reading
//!   stops the other side's writes (through TCP windows and HTTP/2 flow control) instead
//!   of filling the proxy;
//! - a side that closes its writing half has that close passed on (FIN, or END_STREAM on
//!   an HTTP/2 stream) while the other direction goes on, until it closes too;
//! - a connection through which no byte moved either way for the idle timeout is closed;
//! - an error in either direction ends both.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::time::Instant;

use crate::transport::metrics::{UpgradeEnd, UpgradeMetrics};

/// The buffer of each direction of an upgraded connection.
pub const COPY_BUFFER: usize = 16 * 1024;

/// How long an upgraded connection may stay idle when its service sets no `idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Copies between `client` and `server` until both have closed, either fails, or nothing
/// moved for `idle`; counts the connection and its bytes in `metrics` (read: from the
/// client, written: to the client). Returns why it ended.
pub async fn pump<C, S>(
    client: C,
    server: S,
    idle: Duration,
    metrics: &UpgradeMetrics,
) -> UpgradeEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    metrics.open();
    let end = copy_both(client, server, idle, metrics).await;
    metrics.close(end);
    end
}

async fn copy_both<C, S>(
    client: C,
    server: S,
    idle: Duration,
    metrics: &UpgradeMetrics,
) -> UpgradeEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    let up = copy_one(
        client_read,
        server_write,
        metrics.read_bytes(),
        epoch,
        &last,
    );
    let down = copy_one(
        server_read,
        client_write,
        metrics.write_bytes(),
        epoch,
        &last,
    );
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let mut check = tokio::time::interval(idle / 4 + Duration::from_millis(1));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !(up_done && down_done) {
        tokio::select! {
            result = up.as_mut(), if !up_done => {
                if result.is_err() {
                    return UpgradeEnd::Error;
                }
                up_done = true;
            }
            result = down.as_mut(), if !down_done => {
                if result.is_err() {
                    return UpgradeEnd::Error;
                }
                down_done = true;
            }
            _ = check.tick() => {
                let quiet_since = Duration::from_millis(last.load(Ordering::Relaxed));
                if epoch.elapsed().saturating_sub(quiet_since) >= idle {
                    return UpgradeEnd::IdleTimeout;
                }
            }
        }
    }
    UpgradeEnd::Closed
}

/// Copies `from` to `to` through one bounded buffer until `from` ends, then closes `to`'s
/// writing half.
async fn copy_one<R, W>(
    mut from: R,
    mut to: W,
    bytes: Counter,
    epoch: Instant,
    last: &AtomicU64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // The other side may already be gone: its close is what ends the copy.
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        bytes.inc_by(n as u64);
        let ms = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        last.store(ms, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::labels::Direction;
    use crate::telemetry::requests::testing::lab;
    use crate::transport::metrics::ConnectionMetrics;

    #[tokio::test]
    async fn bytes_flow_both_ways_and_closes_pass_on() {
        let metrics = ConnectionMetrics::default().upgrades(Direction::Outbound, lab("ws"));
        let (client, mut client_far) = tokio::io::duplex(64);
        let (server, mut server_far) = tokio::io::duplex(64);
        let pumping =
            tokio::spawn(
                async move { pump(client, server, Duration::from_secs(60), &metrics).await },
            );
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
        assert_eq!(pumping.await.unwrap(), UpgradeEnd::Closed);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed() {
        let metrics = ConnectionMetrics::default().upgrades(Direction::Inbound, lab("ws"));
        let (client, _client_far) = tokio::io::duplex(64);
        let (server, _server_far) = tokio::io::duplex(64);
        let end = pump(client, server, Duration::from_millis(100), &metrics).await;
        assert_eq!(end, UpgradeEnd::IdleTimeout);
    }
}
