//! Readiness probes: `GET <ready_url>` over HTTP/1.1; ready means a 2xx answer within the
//! timeout. Polled on purpose: readiness is not something systemd can tell us.

use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use pimesh_schema::ProbeUrl;
use tokio::net::TcpStream;

/// Whether `url` answers 2xx within `timeout`. Every failure (refused, timeout, bad
/// answer) is "not ready"; the reason is returned for the logs.
pub async fn is_ready(url: &ProbeUrl, timeout: Duration) -> Result<(), String> {
    let (status, body) = fetch(url, timeout).await?;
    if status.is_success() {
        Ok(())
    } else {
        let body = String::from_utf8_lossy(&body);
        let reason = body.trim();
        if reason.is_empty() {
            Err(format!("GET {url}: {status}"))
        } else {
            Err(format!("GET {url}: {status}: {reason}"))
        }
    }
}

/// At most this much of an answer's body is read.
const MAX_BODY: usize = 64 * 1024;

/// `GET url`: the status and (up to 64 KiB of) the body, within `timeout`.
pub async fn fetch(url: &ProbeUrl, timeout: Duration) -> Result<(StatusCode, Bytes), String> {
    match tokio::time::timeout(timeout, get(url)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

async fn get(url: &ProbeUrl) -> Result<(StatusCode, Bytes), String> {
    let authority = url.authority();
    let stream = TcpStream::connect(&authority)
        .await
        .map_err(|err| format!("cannot connect to {authority}: {err}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| format!("HTTP handshake with {authority}: {err}"))?;
    let driver = tokio::spawn(connection);
    let request = Request::get(url.path_and_query())
        .header(hyper::header::HOST, &authority)
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|err| format!("cannot build the request: {err}"))?;
    let answer = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| format!("GET {url}: {err}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|err| format!("GET {url}: reading the body: {err}"))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn url(addr: std::net::SocketAddr) -> ProbeUrl {
        ProbeUrl::try_from(format!("http://{addr}/ready")).expect("url")
    }

    async fn answer_once(listener: tokio::net::TcpListener, response: &'static str) {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let mut buffer = [0u8; 1024];
        let _ = stream.read(&mut buffer).await;
        let _ = stream.write_all(response.as_bytes()).await;
    }

    #[tokio::test]
    async fn a_2xx_answer_is_ready_anything_else_is_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(answer_once(
            listener,
            "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n",
        ));
        assert_eq!(is_ready(&url(addr), Duration::from_secs(2)).await, Ok(()));
        server.await.expect("server");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(answer_once(
            listener,
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
        ));
        let err = is_ready(&url(addr), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(err.contains("503"), "{err}");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn silence_and_refusal_are_not_ready() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accepted by the kernel, never answered: a hung process.
        let err = is_ready(&url(addr), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.contains("no answer"), "{err}");
        drop(listener);
        let err = is_ready(&url(addr), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
    }
}
