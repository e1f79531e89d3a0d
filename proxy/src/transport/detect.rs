//! Protocol detection on a fresh client connection: HTTP/2 (prior knowledge, h2c),
//! HTTP/1.x, or anything else (opaque TCP), from the first bytes the client sends — read
//! with `peek`, so the bytes stay in the socket for whoever serves the connection.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// The HTTP/2 connection preface a prior-knowledge client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest HTTP method we wait for before deciding the bytes are not HTTP/1.
const MAX_METHOD: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// Bytes that are not HTTP.
    Opaque,
    /// Nothing arrived within the detection timeout: a server-speaks-first protocol, or an
    /// idle client.
    Silent,
    /// The client closed (or the socket failed) before sending anything.
    Closed,
}

/// Classifies `bytes`, the start of a stream; `None` while more bytes could change the
/// answer.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    if bytes.is_empty() {
        return None;
    }
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        // "PRI " is also an HTTP/1 method token; only the whole preface decides.
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    for (i, &byte) in bytes.iter().enumerate().take(MAX_METHOD + 1) {
        match byte {
            b'A'..=b'Z' | b'-' | b'_' => continue,
            b' ' if i > 0 => return Some(Detected::Http1),
            _ => return Some(Detected::Opaque),
        }
    }
    if bytes.len() > MAX_METHOD {
        return Some(Detected::Opaque);
    }
    None
}

/// Peeks at `stream` until [`classify`] decides or `timeout` passes.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Detected {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut last_len = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let len = match peeked {
            Err(_) if last_len == 0 => return Detected::Silent,
            // Some bytes but not enough to decide, and no more came: not HTTP.
            Err(_) => return Detected::Opaque,
            Ok(Err(_) | Ok(0)) => return Detected::Closed,
            Ok(Ok(len)) => len,
        };
        if let Some(found) = classify(&buf[..len]) {
            return found;
        }
        if len == last_len {
            // `peek` returns at once while bytes wait unread; give the client a moment
            // to send the rest rather than spin.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        last_len = len;
        if Instant::now() >= deadline {
            return Detected::Opaque;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_decide() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HTTP/2"), None, "a preface prefix waits");
        assert_eq!(classify(b"PRI /x HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Detected::Opaque));
        assert_eq!(classify(b"hello"), Some(Detected::Opaque));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b" GET"), Some(Detected::Opaque));
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRS"), Some(Detected::Opaque));
    }

    #[tokio::test]
    async fn a_silent_client_is_reported_after_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let found = detect(&server, Duration::from_millis(50)).await;
        assert_eq!(found, Detected::Silent);
    }
}
