//! A TLS 1.3 client for tests that speak to a daemon's mTLS port byte by byte: one
//! request per connection, and the alert a refused handshake ended with.

use std::io::{BufReader, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use crate::http::{read_response, HttpResponse};
use crate::pki::Credential;

/// A TLS 1.3 client that trusts `anchor` and presents `credential`, if any.
///
/// # Panics
/// When `anchor` or `credential` is not usable.
pub fn client_config(
    anchor: &CertificateDer<'static>,
    credential: Option<&Credential>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(anchor.clone()).expect("a root certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    Arc::new(match credential {
        Some(credential) => builder
            .with_client_auth_cert(
                credential.chain.clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(credential.key.clone())),
            )
            .expect("a client certificate"),
        None => builder.with_no_client_auth(),
    })
}

/// A new TLS connection to `localhost:port` (127.0.0.1), reads timing out after `read_timeout`.
pub fn connect(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    read_timeout: Duration,
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    let connection = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(read_timeout))?;
    Ok(rustls::StreamOwned::new(connection, tcp))
}

/// One request over a new TLS connection to `localhost:port`; `head` holds extra header
/// lines (each ending in CRLF). An `Err` is what the connection failed with, the TLS
/// alert of a refused handshake included.
pub fn tls_request(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    head: &str,
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n{head}\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    tls_exchange(port, config, &raw)
}

/// Sends `raw` (a whole request, as bytes) over a new TLS connection to `localhost:port`
/// and reads one response.
pub fn tls_exchange(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    raw: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut stream = connect(port, config, Duration::from_secs(20))?;
    stream.write_all(raw)?;
    stream.flush()?;
    read_response(&mut BufReader::new(stream))
}

/// The TLS alert a refused handshake ended with, from the error of [`tls_request`].
pub fn alert(err: &std::io::Error) -> Option<rustls::AlertDescription> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}
