//! Upgraded HTTP connections (a WebSocket after its `101`, an HTTP/2 extended CONNECT after
//! its `200`): the bytes copied both ways between the client side and the server side by
//! [`copy_both`] (which states the invariants: no buffer while idle, bounded memory, closes
//! passed on, the idle timeout), counted as they move.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::transport::metrics::{UpgradeEnd, UpgradeMetrics};
use crate::transport::splice::{copy_both, Way};

/// How long an upgraded connection may stay idle when its service sets no `idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Copies between `client` and `server` until both have closed, either fails, or nothing
/// moved for `idle`; counts the connection and its bytes in `metrics` (read: from the
/// client, written: to the client). Returns why it ended.
pub async fn pump<C, S>(
    mut client: C,
    mut server: S,
    idle: Duration,
    metrics: &UpgradeMetrics,
) -> UpgradeEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    metrics.open();
    let (read, written) = (metrics.read_bytes(), metrics.write_bytes());
    let copied = copy_both(&mut client, &mut server, Some(idle), |way, n| match way {
        Way::FromClient => {
            read.inc_by(n);
        }
        Way::ToClient => {
            written.inc_by(n);
        }
    })
    .await;
    metrics.close(copied.end);
    copied.end
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::labels::Direction;
    use crate::telemetry::requests::testing::lab;
    use crate::transport::metrics::ConnectionMetrics;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn bytes_are_counted_as_they_move_and_the_end_is_told() {
        let metrics = ConnectionMetrics::default().upgrades(Direction::Outbound, lab("ws"));
        let counted = metrics.clone();
        let (client, mut client_far) = tokio::io::duplex(64);
        let (server, mut server_far) = tokio::io::duplex(64);
        let pumping =
            tokio::spawn(
                async move { pump(client, server, Duration::from_secs(60), &metrics).await },
            );
        client_far.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        server_far.read_exact(&mut got).await.unwrap();
        server_far.write_all(b"world!").await.unwrap();
        let mut got = [0u8; 6];
        client_far.read_exact(&mut got).await.unwrap();
        // Counted while the connection is still open.
        assert_eq!(counted.read_bytes().get(), 5);
        assert_eq!(counted.write_bytes().get(), 6);
        drop(client_far);
        drop(server_far);
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
