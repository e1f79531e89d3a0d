//! A joining node's side of the join protocol, for tests of the replicas' join routes:
//! a TLS 1.3 client that sends the server name `join.pimesh.invalid`, presents no
//! certificate and accepts only a control replica of the site under a pinned anchor;
//! connections from a chosen loopback source address (each failure counts against its
//! source); and `join.json` files.

use std::io::{BufReader, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pimesh_identity::{verify_leaf, LeafRequest, Usage};
use pimesh_schema::DnsLabel;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::http::{read_response, HttpResponse};
use crate::pki::Site;

/// The server name a joining node sends.
pub const JOIN_SERVER_NAME: &str = "join.pimesh.invalid";

/// Accepts a server whose chain leads to `anchor` and names
/// `spiffe://<site>/svc/pimesh-control`, whatever name was dialled.
#[derive(Debug)]
struct PinnedControl {
    anchor: CertificateDer<'static>,
    site: DnsLabel,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedControl {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let now = UNIX_EPOCH + Duration::from_secs(now.as_secs());
        let anchors = [self.anchor.clone()];
        let ids = verify_leaf(
            end_entity,
            intermediates,
            &anchors,
            &self.site,
            Usage::Server,
            now,
        )
        .map_err(|err| rustls::Error::General(err.to_string()))?;
        let control = format!("spiffe://{}/svc/pimesh-control", self.site);
        if ids.iter().any(|id| id.to_string() == control) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!("not {control}")))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The joining node's client: TLS 1.3, no client certificate, the server pinned to a
/// control replica of `site` under its anchor.
///
/// # Panics
/// When TLS 1.3 is unavailable.
pub fn pinned_config(site: &Site) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedControl {
        anchor: site.root.anchor.cert_der().clone(),
        site: site.name.clone(),
        provider: Arc::clone(&provider),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Arc::new(config)
}

/// A TCP connection to `127.0.0.1:port` from `source` (any loopback address: 127.0.0.N),
/// so that tests can play several joining nodes.
pub fn connect_from(source: IpAddr, port: u16) -> std::io::Result<TcpStream> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        socket
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await?
            .into_std()
    })?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(stream)
}

/// One request on a new connection from `source` to the replica at `port`, with the
/// TLS server name `server_name` (the join name, or another) and `config`.
pub fn request_from(
    source: IpAddr,
    port: u16,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(std::io::Error::other)?;
    let connection = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(connection, connect_from(source, port)?);
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    stream.write_all(&raw)?;
    stream.flush()?;
    read_response(&mut BufReader::new(stream))
}

/// A join request's body: `node`, `token_secret`, `csr` (PEM).
pub fn join_body(node: &str, secret: &str, csr_pem: &str) -> Vec<u8> {
    serde_json::json!({ "node": node, "token_secret": secret, "csr": csr_pem })
        .to_string()
        .into_bytes()
}

/// A new key and its CSR for `spiffe://<site>/node/<node>`.
///
/// # Panics
/// When the CSR cannot be made.
pub fn node_request(site: &Site, node: &str) -> LeafRequest {
    LeafRequest::new(&[site.node_id(node)]).expect("a CSR")
}

/// A CSR for `ids` (SPIFFE URIs, as text) of the existing PKCS#8 key `key_der`.
///
/// # Panics
/// When the key or a URI is not usable.
pub fn request_for_key(key_der: &[u8], ids: &[&str]) -> String {
    let key = rcgen::KeyPair::try_from(key_der).expect("a PKCS#8 key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = ids
        .iter()
        .map(|id| rcgen::SanType::URI((*id).try_into().expect("a URI")))
        .collect();
    params
        .serialize_request(&key)
        .expect("a CSR")
        .pem()
        .expect("PEM")
}

/// POSTs a join of `node` with `secret` and `csr_pem` from `source` (pinned, join name).
///
/// # Panics
/// When the replica does not answer.
pub fn join(
    site: &Site,
    port: u16,
    source: IpAddr,
    node: &str,
    secret: &str,
    csr_pem: &str,
) -> HttpResponse {
    request_from(
        source,
        port,
        pinned_config(site),
        JOIN_SERVER_NAME,
        "POST",
        "/v1/join",
        &join_body(node, secret, csr_pem),
    )
    .expect("the replica answered the join")
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `join.json` accepting `tokens`: each a secret and, optionally, its expiry.
pub fn join_json(tokens: &[(&str, Option<SystemTime>)]) -> String {
    let tokens: Vec<serde_json::Value> = tokens
        .iter()
        .map(|(secret, expires)| {
            let mut token = serde_json::json!({ "sha256": sha256_hex(secret.as_bytes()) });
            if let Some(at) = expires {
                let seconds = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                token["expires"] = rfc3339(seconds).into();
            }
            token
        })
        .collect();
    serde_json::json!({ "tokens": tokens }).to_string()
}

/// `seconds` since 1970 as RFC 3339 UTC (civil-from-days, so no time crate is needed).
fn rfc3339(seconds: u64) -> String {
    let days = i64::try_from(seconds / 86_400).expect("a date");
    let rest = seconds % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_written_in_rfc3339() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_800_000_000), "2027-01-15T08:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
