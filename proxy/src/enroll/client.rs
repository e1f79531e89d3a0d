//! One exchange with a control replica over mutual TLS: fetch its trust bundle, then have
//! a signing request signed.
//!
//! Invariants: the replica is trusted only when its certificate chains to the anchors of
//! the identity the proxy presents, is valid now for server authentication, and carries
//! `spiffe://<site>/svc/pimesh-control` — the host name or address dialled is not checked
//! (replicas are dialled by IP). The proxy authenticates with the identity it is given (its
//! node credential, or a leaf a replica issued). Nothing here checks what the replica
//! answered beyond "PEM certificates": the caller verifies the leaf before using it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use pimesh_identity::{verify_leaf, Usage, VerifyError};
use pimesh_schema::{DnsLabel, SpiffeId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, Error, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::tls::Identity;

/// The service name every control replica of a site serves under (reserved: never
/// requested for a node).
pub const CONTROL_SERVICE: &str = "pimesh-control";

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

/// `spiffe://<site>/svc/pimesh-control`.
pub fn control_id(site: &DnsLabel) -> Result<SpiffeId, String> {
    let name = DnsLabel::try_from(CONTROL_SERVICE.to_owned()).map_err(|err| err.to_string())?;
    Ok(SpiffeId::service(site, &name))
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
    let refusal = Refusal::default();
    let config =
        client_config(identity, &refusal).map_err(|err| format!("replica {replica}: {err}"))?;
    let tcp = TcpStream::connect(replica)
        .await
        .map_err(|err| format!("replica {replica}: cannot connect: {err}"))?;
    let _ = tcp.set_nodelay(true);
    // The name is not checked (see the module's invariants); an IP needs no DNS.
    let name = ServerName::IpAddress(replica.ip().into());
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|err| match refusal.take() {
            Some(why) => format!("replica {replica}: TLS handshake failed: {why}"),
            None => format!("replica {replica}: TLS handshake failed: {err}"),
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|err| format!("replica {replica}: HTTP handshake failed: {err}"))?;
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

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

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

/// Why the verifier refused a replica's certificate, in words, for the error the caller
/// sees (rustls's own error names only a category).
#[derive(Debug, Clone, Default)]
struct Refusal(Arc<Mutex<Option<String>>>);

impl Refusal {
    fn set(&self, why: String) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(why);
    }

    fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// TLS 1.3, HTTP/1.1, presenting `identity`, trusting replicas as the module says;
/// the verifier writes why it refused a replica into `refusal`.
fn client_config(identity: &Identity, refusal: &Refusal) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(ControlVerifier {
        site: identity.site.clone(),
        expected: control_id(&identity.site)?,
        anchors: identity.anchors().to_vec(),
        algorithms: provider.signature_verification_algorithms,
        refusal: refusal.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|err| format!("TLS 1.3 unavailable: {err}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain().to_vec(), identity.key().clone_key())
        .map_err(|err| format!("cannot present the identity: {err}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts a replica's certificate: a chain to `anchors`, valid now for server
/// authentication, naming `expected` (`spiffe://<site>/svc/pimesh-control`).
#[derive(Debug)]
struct ControlVerifier {
    site: DnsLabel,
    expected: SpiffeId,
    anchors: Vec<CertificateDer<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
    refusal: Refusal,
}

impl ControlVerifier {
    /// The replica's certificate chain checked at `now`: `Err` says why it is not a control
    /// replica of the site under the anchors.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<(), (CertificateError, String)> {
        let ids = verify_leaf(
            end_entity,
            intermediates,
            &self.anchors,
            &self.site,
            Usage::Server,
            now,
        )
        .map_err(|err| {
            let kind = match &err {
                VerifyError::UnknownIssuer(_) => CertificateError::UnknownIssuer,
                VerifyError::Expired(_) => CertificateError::Expired,
                VerifyError::NotValidYet(_) => CertificateError::NotValidYet,
                VerifyError::Chain(_) | VerifyError::NoIdentity => CertificateError::BadEncoding,
            };
            let why = match &err {
                VerifyError::UnknownIssuer(_) => format!(
                    "the replica's certificate does not chain to any of the {} anchor(s) this proxy trusts ({err})",
                    self.anchors.len()
                ),
                _ => format!("the replica's certificate is not trusted: {err}"),
            };
            (kind, why)
        })?;
        if !ids.contains(&self.expected) {
            let names: Vec<String> = ids.iter().map(ToString::to_string).collect();
            let why = format!(
                "the replica's certificate names {names:?}, not {}",
                self.expected
            );
            return Err((CertificateError::ApplicationVerificationFailure, why));
        }
        Ok(())
    }
}

impl ServerCertVerifier for ControlVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        self.check(end_entity, intermediates, now)
            .map_err(|(kind, why)| {
                self.refusal.set(why);
                Error::InvalidCertificate(kind)
            })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pimesh_identity::{LeafRequest, TrustRoot};
    use std::collections::BTreeSet;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    fn verifier(site: &DnsLabel, root: &TrustRoot) -> ControlVerifier {
        let provider = rustls::crypto::ring::default_provider();
        ControlVerifier {
            site: site.clone(),
            expected: control_id(site).expect("control id"),
            anchors: vec![root.anchor.cert_der().clone()],
            algorithms: provider.signature_verification_algorithms,
            refusal: Refusal::default(),
        }
    }

    #[test]
    fn only_a_control_replica_of_the_site_under_the_anchors_is_trusted() {
        let site = label("depot");
        let now = SystemTime::now();
        let root = TrustRoot::generate(&site, now).expect("root");
        let v = verifier(&site, &root);
        let issuer = [root.issuer.cert_der().clone()];

        let control = control_id(&site).expect("id");
        let (leaf, _) = root
            .issuer
            .issue_server_leaf(&control, &[], &[], now)
            .expect("serving leaf");
        assert!(v.check(&leaf.der, &issuer, now).is_ok());

        // A node's leaf is valid for serving, but it is not a replica.
        let node = SpiffeId::node(&site, &label("pi-a"));
        let request = LeafRequest::new(std::slice::from_ref(&node)).expect("csr");
        let permitted = BTreeSet::from([node]);
        let leaf = root
            .issuer
            .sign_leaf(&request.csr, &site, &permitted, now)
            .expect("leaf");
        let (kind, why) = v.check(&leaf.der, &issuer, now).expect_err("a node");
        assert_eq!(kind, CertificateError::ApplicationVerificationFailure);
        assert!(why.contains("svc/pimesh-control"), "{why}");

        // A replica under another anchor (another site's, or a dropped one).
        let other = TrustRoot::generate(&site, now).expect("root");
        let (leaf, _) = other
            .issuer
            .issue_server_leaf(&control, &[], &[], now)
            .expect("serving leaf");
        let other_issuer = [other.issuer.cert_der().clone()];
        let (kind, why) = v
            .check(&leaf.der, &other_issuer, now)
            .expect_err("stranger");
        assert_eq!(kind, CertificateError::UnknownIssuer);
        assert!(why.contains("does not chain"), "{why}");
    }
}
