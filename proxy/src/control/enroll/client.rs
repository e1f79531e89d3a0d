//! One exchange with a control replica over mutual TLS: fetch its trust bundle, then have
//! a signing request signed.
//!
//! Invariants: the replica is trusted as `Identity::control_connector` says — its
//! certificate chains to the anchors of the identity the proxy presents, is valid now for
//! server authentication, and carries `spiffe://<site>/svc/pimesh-control`, whatever
//! address was dialled (replicas are dialled by IP). The proxy authenticates with the identity it is given (its
//! node credential, or a leaf a replica issued). Nothing here checks what the replica
//! answered beyond "PEM certificates": the caller verifies the leaf before using it.

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

/// Connects to `replica` presenting `identity`, fetches `GET /v1/trust-bundle`, then
/// `POST /v1/identity` with `csr_pem`. Errors are one line naming the replica and the step.
pub async fn exchange(
    replica: SocketAddr,
    identity: &Identity,
    csr_pem: &str,
) -> Result<Answer, String> {
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange_inner(replica, identity, csr_pem))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "replica {replica}: no answer within {EXCHANGE_TIMEOUT:?}"
            ))
        })
}

async fn exchange_inner(
    replica: SocketAddr,
    identity: &Identity,
    csr_pem: &str,
) -> Result<Answer, String> {
    let tcp = TcpStream::connect(replica)
        .await
        .map_err(|err| format!("replica {replica}: cannot connect: {err}"))?;
    let _ = tcp.set_nodelay(true);
    // The name is not checked (see the module's invariants); an IP needs no DNS.
    let name = ServerName::IpAddress(replica.ip().into());
    let tls = identity
        .control_connector()
        .connect(name, tcp)
        .await
        .map_err(|err| {
            format!(
                "replica {replica}: TLS handshake failed: {}",
                refusal_reason(&err, identity)
            )
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|err| format!("replica {replica}: HTTP/2 handshake failed: {err}"))?;
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

/// One request; the body of a 200 answer that holds PEM certificates, or why not.
async fn request(
    sender: &mut Sender,
    replica: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> Result<String, String> {
    let what = format!("replica {replica}: {method} {path}");
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, replica.to_string())
        .header(header::CONTENT_TYPE, "application/pkcs10")
        .body(Full::new(Bytes::from(body.to_owned())))
        .map_err(|err| format!("{what}: {err}"))?;
    sender
        .ready()
        .await
        .map_err(|err| format!("{what}: connection closed: {err}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| format!("{what}: {err}"))?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|err| format!("{what}: cannot read the answer: {err}"))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status != StatusCode::OK {
        // The replica's refusals are JSON `{"error": "..."}`; show the reason alone.
        let reason = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or(text);
        return Err(format!("{what}: refused with {status}: {reason}"));
    }
    Ok(text)
}

/// Why the handshake failed, in words: rustls names only a category of a refused
/// replica certificate.
fn refusal_reason(err: &std::io::Error, identity: &Identity) -> String {
    let refused = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match refused {
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => format!(
            "the replica's certificate does not chain to any of the {} anchor(s) this proxy trusts",
            identity.anchors().len()
        ),
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)) => format!(
            "the replica's certificate does not name {}",
            pimesh_meshtls::control_id(&identity.site)
                .map_or_else(|err| err.to_string(), |id| id.to_string())
        ),
        Some(rustls::Error::InvalidCertificate(kind)) => {
            format!("the replica's certificate is not trusted: {kind:?}")
        }
        _ => err.to_string(),
    }
}
