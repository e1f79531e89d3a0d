//! One exchange with a control replica over mutual TLS: fetch its trust bundle, then have
//! a signing request signed.
//!
//! Invariants: the replica is trusted as `Identity::control_connector` says — its
//! certificate chains to the anchors of the identity the proxy presents, is valid now for
//! server authentication, and carries `spiffe://<site>/svc/pimesh-control`, whatever
//! address was dialled (replicas are dialled by IP). The proxy authenticates with the identity it is given (its
//! node credential, or a leaf a replica issued). Nothing here checks what the replica
//! answered beyond "PEM certificates": the caller verifies the leaf before using it.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use rustls::CertificateError;
use tokio::net::TcpStream;

use crate::identity::Identity;

/// An exchange (connect, handshake, both requests) must finish within this time.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer read from a replica: a bundle or a chain is a few KiB.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What a replica answered.
pub struct Answer {
    /// Its trust bundle, PEM, as served (at least one certificate).
    pub bundle_pem: String,
    /// The signed chain, PEM: leaf then issuer (at least one certificate).
    pub chain_pem: String,
}

/// Why an exchange with a replica failed; shown as one line naming the replica and the
/// step.
#[derive(Debug)]
pub enum ExchangeError {
    /// The whole exchange took longer than [`EXCHANGE_TIMEOUT`].
    Timeout { replica: SocketAddr },
    Connect {
        replica: SocketAddr,
        err: std::io::Error,
    },
    /// The TLS handshake failed, or the replica's certificate was refused.
    Handshake {
        replica: SocketAddr,
        refusal: HandshakeRefusal,
    },
    Http2 {
        replica: SocketAddr,
        err: hyper::Error,
    },
    /// One of the two requests failed or was refused.
    Request {
        replica: SocketAddr,
        method: Method,
        path: &'static str,
        problem: RequestProblem,
    },
}

/// Why a TLS handshake with a replica failed, in words: rustls names only a category of a
/// refused replica certificate.
#[derive(Debug)]
pub enum HandshakeRefusal {
    /// The replica's certificate chains to none of the `anchors` this proxy trusts.
    UnknownIssuer { anchors: usize },
    /// The replica's certificate does not name `expected` (the replicas' SPIFFE ID, or why
    /// there is none for this site).
    NotTheControlPlane { expected: String },
    /// The replica's certificate is refused for another reason.
    Untrusted(CertificateError),
    /// The handshake failed before any certificate was judged.
    Failed(std::io::Error),
}

/// Why one request to a replica failed.
#[derive(Debug)]
pub enum RequestProblem {
    Build(http::Error),
    /// The connection closed before the request could be sent.
    Closed(hyper::Error),
    Send(hyper::Error),
    Read(Box<dyn std::error::Error + Send + Sync>),
    /// Not 200: the status and the replica's reason.
    Refused {
        status: StatusCode,
        reason: String,
    },
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExchangeError::Timeout { replica } => {
                write!(
                    f,
                    "replica {replica}: no answer within {EXCHANGE_TIMEOUT:?}"
                )
            }
            ExchangeError::Connect { replica, err } => {
                write!(f, "replica {replica}: cannot connect: {err}")
            }
            ExchangeError::Handshake { replica, refusal } => {
                write!(f, "replica {replica}: TLS handshake failed: {refusal}")
            }
            ExchangeError::Http2 { replica, err } => {
                write!(f, "replica {replica}: HTTP/2 handshake failed: {err}")
            }
            ExchangeError::Request {
                replica,
                method,
                path,
                problem,
            } => write!(f, "replica {replica}: {method} {path}: {problem}"),
        }
    }
}

impl std::error::Error for ExchangeError {}

impl fmt::Display for HandshakeRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeRefusal::UnknownIssuer { anchors } => write!(
                f,
                "the replica's certificate does not chain to any of the {anchors} anchor(s) this proxy trusts"
            ),
            HandshakeRefusal::NotTheControlPlane { expected } => {
                write!(f, "the replica's certificate does not name {expected}")
            }
            HandshakeRefusal::Untrusted(kind) => {
                write!(f, "the replica's certificate is not trusted: {kind:?}")
            }
            HandshakeRefusal::Failed(err) => err.fmt(f),
        }
    }
}

impl fmt::Display for RequestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestProblem::Build(err) => err.fmt(f),
            RequestProblem::Closed(err) => write!(f, "connection closed: {err}"),
            RequestProblem::Send(err) => err.fmt(f),
            RequestProblem::Read(err) => write!(f, "cannot read the answer: {err}"),
            RequestProblem::Refused { status, reason } => {
                write!(f, "refused with {status}: {reason}")
            }
        }
    }
}

/// Connects to `replica` presenting `identity`, fetches `GET /v1/trust-bundle`, then
/// `POST /v1/identity` with `csr_pem`. Errors are one line naming the replica and the step.
pub async fn exchange(
    replica: SocketAddr,
    identity: &Identity,
    csr_pem: &str,
) -> Result<Answer, ExchangeError> {
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange_inner(replica, identity, csr_pem))
        .await
        .unwrap_or(Err(ExchangeError::Timeout { replica }))
}

async fn exchange_inner(
    replica: SocketAddr,
    identity: &Identity,
    csr_pem: &str,
) -> Result<Answer, ExchangeError> {
    let tcp = TcpStream::connect(replica)
        .await
        .map_err(|err| ExchangeError::Connect { replica, err })?;
    let _ = tcp.set_nodelay(true);
    // The name is not checked (see the module's invariants); an IP needs no DNS.
    let name = ServerName::IpAddress(replica.ip().into());
    let tls = identity
        .control_connector()
        .connect(name, tcp)
        .await
        .map_err(|err| ExchangeError::Handshake {
            replica,
            refusal: refusal(err, identity),
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|err| ExchangeError::Http2 { replica, err })?;
    let connection = tokio::spawn(connection);
    let result = async {
        let bundle_pem = request(&mut sender, replica, Method::GET, "/v1/trust-bundle", "").await?;
        let chain_pem =
            request(&mut sender, replica, Method::POST, "/v1/identity", csr_pem).await?;
        Ok(Answer {
            bundle_pem,
            chain_pem,
        })
    }
    .await;
    connection.abort();
    result
}

type Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// One request; the body of a 200 answer, or why not.
async fn request(
    sender: &mut Sender,
    replica: SocketAddr,
    method: Method,
    path: &'static str,
    body: &str,
) -> Result<String, ExchangeError> {
    let failed = |method: Method, problem| ExchangeError::Request {
        replica,
        method,
        path,
        problem,
    };
    let request = Request::builder()
        .method(method.clone())
        .uri(path)
        .header(header::HOST, replica.to_string())
        .header(header::CONTENT_TYPE, "application/pkcs10")
        .body(Full::new(Bytes::from(body.to_owned())))
        .map_err(|err| failed(method.clone(), RequestProblem::Build(err)))?;
    sender
        .ready()
        .await
        .map_err(|err| failed(method.clone(), RequestProblem::Closed(err)))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| failed(method.clone(), RequestProblem::Send(err)))?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|err| failed(method.clone(), RequestProblem::Read(err)))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status != StatusCode::OK {
        // The replica's refusals are JSON `{"error": "..."}`; show the reason alone.
        let reason = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or(text);
        return Err(failed(method, RequestProblem::Refused { status, reason }));
    }
    Ok(text)
}

/// Why the handshake failed, in words.
fn refusal(err: std::io::Error, identity: &Identity) -> HandshakeRefusal {
    let refused = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match refused {
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            HandshakeRefusal::UnknownIssuer {
                anchors: identity.anchors().len(),
            }
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)) => {
            HandshakeRefusal::NotTheControlPlane {
                expected: pimesh_meshtls::control_id(&identity.site)
                    .map_or_else(|err| err.to_string(), |id| id.to_string()),
            }
        }
        Some(rustls::Error::InvalidCertificate(kind)) => HandshakeRefusal::Untrusted(kind.clone()),
        _ => HandshakeRefusal::Failed(err),
    }
}
