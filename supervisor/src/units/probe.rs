//! Readiness probes: `GET <ready_url>` over HTTP/1.1; ready means a 2xx answer within the
//! timeout. Polled on purpose: readiness is not something systemd can tell us.

use std::fmt;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use pimesh_schema::ProbeUrl;
use tokio::net::TcpStream;

/// Why a probe did not get a 2xx answer: the unit is not ready, and this says why.
#[derive(Debug)]
pub enum ProbeError {
    /// Nothing answered within the timeout (a hung process, or a full backlog).
    Timeout { after: Duration },
    /// The connection was refused or failed.
    Connect {
        authority: String,
        source: std::io::Error,
    },
    /// The HTTP/1.1 handshake failed.
    Handshake {
        authority: String,
        source: hyper::Error,
    },
    /// The request could not be made from the URL.
    Request(hyper::http::Error),
    /// The request could not be sent, or no answer came back.
    Send { url: String, source: hyper::Error },
    /// The answer's body broke off or was too long.
    Body {
        url: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The answer was not 2xx; `body` is what the unit said (trimmed, maybe empty).
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Timeout { after } => {
                write!(f, "no answer within {} ms", after.as_millis())
            }
            ProbeError::Connect { authority, source } => {
                write!(f, "cannot connect to {authority}: {source}")
            }
            ProbeError::Handshake { authority, source } => {
                write!(f, "HTTP handshake with {authority}: {source}")
            }
            ProbeError::Request(err) => write!(f, "cannot build the request: {err}"),
            ProbeError::Send { url, source } => write!(f, "GET {url}: {source}"),
            ProbeError::Body { url, source } => write!(f, "GET {url}: reading the body: {source}"),
            ProbeError::Status { url, status, body } if body.is_empty() => {
                write!(f, "GET {url}: {status}")
            }
            ProbeError::Status { url, status, body } => write!(f, "GET {url}: {status}: {body}"),
        }
    }
}

impl std::error::Error for ProbeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProbeError::Connect { source, .. } => Some(source),
            ProbeError::Handshake { source, .. } | ProbeError::Send { source, .. } => Some(source),
            ProbeError::Request(err) => Some(err),
            ProbeError::Body { source, .. } => Some(source.as_ref()),
            ProbeError::Timeout { .. } | ProbeError::Status { .. } => None,
        }
    }
}

/// Whether `url` answers 2xx within `timeout`. Every failure (refused, timeout, bad
/// answer) is "not ready"; the error says why, for the logs.
pub async fn is_ready(url: &ProbeUrl, timeout: Duration) -> Result<(), ProbeError> {
    let (status, body) = fetch(url, timeout).await?;
    if status.is_success() {
        Ok(())
    } else {
        Err(ProbeError::Status {
            url: url.to_string(),
            status,
            body: String::from_utf8_lossy(&body).trim().to_owned(),
        })
    }
}

/// At most this much of an answer's body is read.
const MAX_BODY: usize = 64 * 1024;

/// `GET url`: the status and (up to 64 KiB of) the body, within `timeout`.
pub async fn fetch(url: &ProbeUrl, timeout: Duration) -> Result<(StatusCode, Bytes), ProbeError> {
    fetch_up_to(url, timeout, MAX_BODY).await
}

/// Why a JSON endpoint (the proxy's `/config`) gave no JSON document.
#[derive(Debug)]
pub enum JsonProbeError {
    /// It did not answer; the probe says why.
    Unreachable(ProbeError),
    /// It answered with an error status.
    Status { url: String, status: StatusCode },
    /// It answered something other than JSON.
    NotJson {
        url: String,
        source: serde_json::Error,
    },
}

impl fmt::Display for JsonProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonProbeError::Unreachable(reason) => reason.fmt(f),
            JsonProbeError::Status { url, status } => write!(f, "GET {url}: {status}"),
            JsonProbeError::NotJson { url, source } => write!(f, "GET {url}: not JSON: {source}"),
        }
    }
}

impl std::error::Error for JsonProbeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            JsonProbeError::Unreachable(reason) => Some(reason),
            JsonProbeError::NotJson { source, .. } => Some(source),
            JsonProbeError::Status { .. } => None,
        }
    }
}

/// `GET url` within `timeout`: the body of a 2xx answer as JSON.
pub async fn fetch_json(
    url: &ProbeUrl,
    timeout: Duration,
) -> Result<serde_json::Value, JsonProbeError> {
    let (status, body) = fetch(url, timeout)
        .await
        .map_err(JsonProbeError::Unreachable)?;
    if !status.is_success() {
        return Err(JsonProbeError::Status {
            url: url.to_string(),
            status,
        });
    }
    serde_json::from_slice(&body).map_err(|source| JsonProbeError::NotJson {
        url: url.to_string(),
        source,
    })
}

/// `GET url`: the status and the body, within `timeout`; a body longer than `max_body`
/// bytes is an error.
pub async fn fetch_up_to(
    url: &ProbeUrl,
    timeout: Duration,
    max_body: usize,
) -> Result<(StatusCode, Bytes), ProbeError> {
    match tokio::time::timeout(timeout, get(url, max_body)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout { after: timeout }),
    }
}

async fn get(url: &ProbeUrl, max_body: usize) -> Result<(StatusCode, Bytes), ProbeError> {
    let authority = url.authority();
    let stream = match TcpStream::connect(&authority).await {
        Ok(stream) => stream,
        Err(source) => return Err(ProbeError::Connect { authority, source }),
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(handshake) => handshake,
            Err(source) => return Err(ProbeError::Handshake { authority, source }),
        };
    let driver = tokio::spawn(connection);
    let request = Request::get(url.path_and_query())
        .header(hyper::header::HOST, &authority)
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(ProbeError::Request)?;
    let answer = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| ProbeError::Send {
                url: url.to_string(),
                source,
            })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(|source| ProbeError::Body {
                url: url.to_string(),
                source,
            })?
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
        let ready = is_ready(&url(addr), Duration::from_secs(2)).await;
        assert!(ready.is_ok(), "{ready:?}");
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
            .unwrap_err()
            .to_string();
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
            .unwrap_err()
            .to_string();
        assert!(err.contains("no answer"), "{err}");
        drop(listener);
        let err = is_ready(&url(addr), Duration::from_millis(200))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot connect"), "{err}");
    }
}
