//! Calls to other parts, always through the local mesh proxy's outbound port: an HTTP
//! request to the proxy with a `Host` header naming the service, never to the part itself.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::WebSocketStream;

use crate::trace::TraceContext;

/// The longest a call through the mesh may take, head and body.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a WebSocket handshake through the mesh may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read from another part.
const MAX_BODY: usize = 1 << 20;

/// An answer from another part.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

/// The local proxy's outbound port, as a client.
#[derive(Clone, Debug)]
pub struct Mesh {
    client: Client<HttpConnector, Full<Bytes>>,
    /// `host:port` of the proxy's outbound listener.
    authority: String,
}

impl Mesh {
    /// `url` is the outbound port as `http://127.0.0.1:4140`.
    ///
    /// # Errors
    /// When `url` is not an `http://host:port` URL.
    pub fn new(url: &str) -> Result<Mesh, String> {
        let uri: Uri = url
            .parse()
            .map_err(|err| format!("--mesh {url:?}: not a URL: {err}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "--mesh {url:?}: the proxy's outbound port speaks plain http://"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("--mesh {url:?}: no host"))?
            .to_string();
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Mesh { client, authority })
    }

    /// `GET path` of `service` through the mesh, with the served request's trace context.
    ///
    /// # Errors
    /// When the proxy cannot be reached or the answer does not arrive in time; the
    /// message names the service and the proxy. An answer of any status is `Ok`.
    pub async fn get(
        &self,
        service: &str,
        path: &str,
        trace: &TraceContext,
    ) -> Result<Answer, String> {
        let peer = || format!("{service} (through the mesh proxy at {})", self.authority);
        let uri: Uri = format!("http://{}{path}", self.authority)
            .parse()
            .map_err(|err| format!("{}: bad path {path:?}: {err}", peer()))?;
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = uri;
        let host = HeaderValue::from_str(service).map_err(|err| format!("{}: {err}", peer()))?;
        request.headers_mut().insert(HOST, host);
        trace.apply(request.headers_mut());
        let call = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|err| format!("{}: {}", peer(), describe(&err)))?;
            let status = response.status();
            let content_type = response.headers().get(CONTENT_TYPE).cloned();
            let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|err| format!("{}: reading the answer: {err}", peer()))?
                .to_bytes();
            Ok(Answer {
                status,
                content_type,
                body,
            })
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| format!("{}: no answer within {CALL_TIMEOUT:?}", peer()))?
    }

    /// Opens a WebSocket to `path` of `service` through the mesh (an HTTP/1.1 Upgrade on
    /// the proxy's outbound port, `Host` naming the service).
    ///
    /// # Errors
    /// When the proxy cannot be reached or the handshake is not answered with 101 (a mesh
    /// that does not carry upgrades answers with the service's plain answer).
    pub async fn websocket(
        &self,
        service: &str,
        path: &str,
        trace: &TraceContext,
    ) -> Result<WebSocketStream<TcpStream>, String> {
        let peer = || {
            format!(
                "{service} (WebSocket through the mesh proxy at {})",
                self.authority
            )
        };
        let handshake = async {
            let stream = TcpStream::connect(&self.authority)
                .await
                .map_err(|err| format!("{}: {err}", peer()))?;
            let _ = stream.set_nodelay(true);
            let mut request = format!("ws://{}{path}", self.authority)
                .into_client_request()
                .map_err(|err| format!("{}: {err}", peer()))?;
            let host =
                HeaderValue::from_str(service).map_err(|err| format!("{}: {err}", peer()))?;
            request.headers_mut().insert(HOST, host);
            trace.apply(request.headers_mut());
            let (socket, _) = tokio_tungstenite::client_async(request, stream)
                .await
                .map_err(|err| match err {
                    tokio_tungstenite::tungstenite::Error::Http(response) => format!(
                        "{}: answered {} instead of 101 Switching Protocols",
                        peer(),
                        response.status()
                    ),
                    other => format!("{}: {other}", peer()),
                })?;
            Ok(socket)
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| format!("{}: no handshake within {HANDSHAKE_TIMEOUT:?}", peer()))?
    }
}

/// A client error with its causes (hyper's own message is often just "client error").
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Relays `GET path` of `service` through the mesh and answers with what it answered
/// (status, content type and body as they are), or 502 naming the service when nothing
/// answered.
pub async fn forward(
    mesh: &Mesh,
    service: &str,
    path: &str,
    trace: &TraceContext,
) -> http::Response<crate::net::Body> {
    match mesh.get(service, path, trace).await {
        Ok(answer) => {
            let mut response = http::Response::new(Full::new(answer.body));
            *response.status_mut() = answer.status;
            let content_type = answer
                .content_type
                .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
            response.headers_mut().insert(CONTENT_TYPE, content_type);
            response.headers_mut().insert(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            );
            response
        }
        Err(err) => {
            tracing::warn!("{err}");
            crate::net::error(StatusCode::BAD_GATEWAY, &err)
        }
    }
}
