//! Plain HTTP/1.1 clients for the daemons' admin and readiness endpoints, and the reading
//! of one response.

use std::io::{BufRead, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;

/// One HTTP response as read off the wire.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads a response head: the status line and the headers (names in lower case).
pub fn read_head(reader: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP status line: {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    Ok((status, headers))
}

/// Reads one response: status line, headers, and a body of its `content-length`.
pub fn read_response(reader: &mut impl BufRead) -> std::io::Result<HttpResponse> {
    let (status, headers) = read_head(reader)?;
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// `GET path` on a new connection to `addr` (`Connection: close`): the status and the
/// body, `None` when nothing answers within 5 s or the answer is cut short.
pub fn get_blocking(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let end = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let (status, headers) = read_head(&mut &response[..end + 4]).ok()?;
    let mut body = &response[end + 4..];
    if let Some(length) = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse::<usize>().ok())
    {
        body = body.get(..length)?;
    }
    Some((status, String::from_utf8_lossy(body).into_owned()))
}

/// [`get_blocking`] on `127.0.0.1:port`.
pub fn plain_get(port: u16, path: &str) -> Option<(u16, String)> {
    get_blocking(SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// `GET http://<addr><path>` over a fresh HTTP/1.1 connection: (status, body).
pub async fn get_text(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sends `GET /` with `Host: host` and `Connection: connection` on an open stream, and reads
/// the head and exactly the body its `Content-Length` announces, so that the stream can
/// carry the next request: (head with its final blank line, body). `Err` describes a
/// closed stream, a missing length or [`DEADLINE`](crate::DEADLINE) passing.
pub async fn raw_get(
    stream: &mut tokio::net::TcpStream,
    host: &str,
    connection: &str,
) -> Result<(String, String), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|err| format!("write: {err}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut head_end = None;
    let mut length = 0;
    loop {
        if head_end.is_none() {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..at + 4]).into_owned();
                length = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
                head_end = Some(at + 4);
            }
        }
        if let Some(end) = head_end.filter(|end| buf.len() >= end + length) {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let body = String::from_utf8_lossy(&buf[end..end + length]).into_owned();
            return Ok((head, body));
        }
        let n = tokio::time::timeout(crate::DEADLINE, stream.read(&mut chunk))
            .await
            .map_err(|_| "no answer in time".to_owned())?
            .map_err(|err| format!("read: {err}"))?;
        if n == 0 {
            return Err(format!(
                "connection closed after {:?}",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of the first Prometheus sample whose line starts with `line_start` (name and
/// labels, exactly as exposed) followed by a space; 0 when there is no such sample yet.
pub fn sample(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(line_start)?.strip_prefix(' ')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0.0)
}

/// A kept-alive HTTP/1.1 client connection (hyper's), for tests that send many requests.
pub type H1 = hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>;

/// Opens an HTTP/1.1 connection to `addr`; its driver runs on the test's runtime.
///
/// # Panics
/// When the connection or the handshake fails.
pub async fn h1(addr: SocketAddr) -> H1 {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    sender
}

/// Sends `method path` with `Host: host` and `headers` on `sender`, reads the whole
/// answer: (status, headers, body as text).
///
/// # Panics
/// When the connection fails or the answer cannot be read.
pub async fn send(
    sender: &mut H1,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(http_body_util::Full::new(Bytes::new()))
        .expect("request");
    sender.ready().await.expect("connection ready");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_found_by_its_name_and_labels_only() {
        let text = "# HELP x y\nx_total{a=\"1\"} 3\nx_total 7\n";
        assert_eq!(sample(text, "x_total{a=\"1\"}"), 3.0);
        assert_eq!(sample(text, "x_total"), 7.0);
        assert_eq!(sample(text, "x"), 0.0);
    }

    #[test]
    fn a_response_is_read_to_its_content_length() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nokrest";
        let response = read_response(&mut &raw[..]).expect("a response");
        assert_eq!(response.status, 200);
        assert_eq!(response.header("x-a"), Some("b"));
        assert_eq!(response.text(), "ok");
    }
}
