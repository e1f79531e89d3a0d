//! The joining node's side of the exchange with one control replica (see `pimesh_join`):
//! the bundle over an unverified connection, the join over a connection verified
//! against the pinned anchor, and on a server node the issuer over mutual TLS.
//!
//! Invariants: [`Replica::join`] takes a [`PinnedBundle`], which only [`Replica::bundle`]
//! makes and only when an anchor hashes to the token's pin, so the secret cannot reach a
//! server that was not checked; every answer is read with a size limit; every exchange
//! has a deadline, so a server that hangs mid-join costs one timeout, not the node.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use pimesh_join::{
    anchor_pin, hex, path, IssuerHandover, JoinAnswer, JoinRequest, Refusal, JOIN_SERVER_NAME,
};
use pimesh_meshtls::{Credential, SiteTrust};
use pimesh_schema::DnsLabel;

/// How long one request may take, connection and TLS included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TCP connection may take: a replica on the LAN answers at once, and an
/// address that went stale (an announcement made before DHCP) never does.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest answer read: a bundle, a certificate chain, an issuer handover.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why an exchange with a replica failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// No answer above TCP (a refused port, TLS, a stalled answer): this replica only.
    Unreachable { replica: SocketAddr, detail: String },
    /// No TCP connection at all: the address leads nowhere (the other replicas at the
    /// same address are not worth trying this round).
    NoConnection { replica: SocketAddr, detail: String },
    /// The bundle holds no anchor with the token's pin: a server of another site, or a
    /// rogue one. Nothing secret was sent.
    Rogue {
        replica: SocketAddr,
        found: Vec<String>,
    },
    /// The replica refused, saying why.
    Refused {
        replica: SocketAddr,
        refusal: Refusal,
    },
    /// The answer is not what the protocol says.
    BadAnswer { replica: SocketAddr, detail: String },
    /// The client cannot be built (a local fault).
    Setup(String),
}

impl ExchangeError {
    /// Whether another replica (or a later try) can change the outcome.
    pub fn is_final(&self) -> bool {
        matches!(self, ExchangeError::Refused { refusal, .. } if refusal.error.is_final())
    }
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExchangeError::Unreachable { replica, detail }
            | ExchangeError::NoConnection { replica, detail } => {
                write!(f, "cannot reach the replica at {replica}: {detail}")
            }
            ExchangeError::Rogue { replica, found } => {
                write!(
                f,
                "rogue server at {replica}: its bundle holds no anchor with the join token's pin \
                 (it offered {}); the token's secret was not sent",
                if found.is_empty() { "none".to_owned() } else { found.join(", ") }
            )
            }
            ExchangeError::Refused { replica, refusal } => {
                write!(f, "the replica at {replica} refused: {refusal}")
            }
            ExchangeError::BadAnswer { replica, detail } => {
                write!(
                    f,
                    "the replica at {replica} answered outside the protocol: {detail}"
                )
            }
            ExchangeError::Setup(detail) => write!(f, "cannot set up TLS: {detail}"),
        }
    }
}

impl std::error::Error for ExchangeError {}

/// The site's anchors, from a bundle in which one anchor hashes to the token's pin.
pub struct PinnedBundle {
    pub pem: String,
    pub trust: SiteTrust,
}

/// One control replica, as a joining node talks to it.
pub struct Replica {
    pub addr: SocketAddr,
}

impl Replica {
    /// A client whose every request to [`JOIN_SERVER_NAME`] goes to this replica.
    fn join_http(&self, tls: rustls::ClientConfig) -> Result<reqwest::Client, ExchangeError> {
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .resolve(JOIN_SERVER_NAME, self.addr)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .http1_only()
            .no_proxy()
            .build()
            .map_err(|err| ExchangeError::Setup(pimesh_runtime::error_chain(&err)))
    }

    fn url(&self, route: &str) -> String {
        format!("https://{JOIN_SERVER_NAME}:{}{route}", self.addr.port())
    }

    /// By address: no SNI, so the replica takes its mutual-TLS configuration.
    fn mutual_url(&self, route: &str) -> String {
        format!("https://{}{route}", self.addr)
    }

    /// A TCP connection to the replica, closed at once. It tells an address that leads
    /// nowhere (no connection within [`CONNECT_TIMEOUT`], no route:
    /// [`ExchangeError::NoConnection`], whose other replicas are skipped this round) from
    /// a port that refuses or a server that stalls above TCP (`Unreachable`: this replica
    /// only, since the node's other replicas may answer).
    async fn probe(&self) -> Result<(), ExchangeError> {
        let connect = tokio::net::TcpStream::connect(self.addr);
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err(ExchangeError::Unreachable {
                    replica: self.addr,
                    detail: err.to_string(),
                })
            }
            Ok(Err(err)) => Err(ExchangeError::NoConnection {
                replica: self.addr,
                detail: err.to_string(),
            }),
            Err(_) => Err(ExchangeError::NoConnection {
                replica: self.addr,
                detail: format!("no TCP connection within {} s", CONNECT_TIMEOUT.as_secs()),
            }),
        }
    }

    /// Fetches the replica's bundle and keeps it only when an anchor of it hashes to `pin`.
    pub async fn bundle(
        &self,
        site: &DnsLabel,
        pin: &[u8; 32],
    ) -> Result<PinnedBundle, ExchangeError> {
        self.probe().await?;
        let tls = pimesh_meshtls::join_bundle_client()
            .map_err(|err| ExchangeError::Setup(err.to_string()))?;
        let http = self.join_http(tls)?;
        let body = self.read(http.get(self.url(path::BUNDLE))).await?;
        let pem = String::from_utf8(body).map_err(|_| self.bad("the bundle is not text"))?;
        let anchors = pimesh_meshtls::pem::certificates(pem.as_bytes())
            .map_err(|err| self.bad(&format!("the bundle is not PEM certificates: {err}")))?;
        if !anchors.iter().any(|anchor| &anchor_pin(anchor) == pin) {
            return Err(ExchangeError::Rogue {
                replica: self.addr,
                found: anchors.iter().map(|a| hex(&anchor_pin(a))).collect(),
            });
        }
        let trust = SiteTrust::new(site.clone(), anchors)
            .map_err(|err| self.bad(&format!("the pinned bundle is not usable: {err}")))?;
        Ok(PinnedBundle { pem, trust })
    }

    /// Posts `request` on a connection that must reach a control replica under `bundle`.
    pub async fn join(
        &self,
        bundle: &PinnedBundle,
        request: &JoinRequest,
    ) -> Result<JoinAnswer, ExchangeError> {
        let tls = pimesh_meshtls::join_client(&bundle.trust)
            .map_err(|err| ExchangeError::Setup(err.to_string()))?;
        let http = self.join_http(tls)?;
        let body = self
            .read(http.post(self.url(path::JOIN)).json(request))
            .await?;
        serde_json::from_slice(&body).map_err(|err| self.bad(&format!("not a join answer: {err}")))
    }

    /// Fetches the site issuer over mutual TLS with the node's new `credential`.
    pub async fn issuer(
        &self,
        credential: &Credential,
        trust: &SiteTrust,
    ) -> Result<IssuerHandover, ExchangeError> {
        let http = self.mutual_tls(credential, trust)?;
        let body = self.read(http.get(self.mutual_url(path::ISSUER))).await?;
        serde_json::from_slice(&body)
            .map_err(|err| self.bad(&format!("not an issuer handover: {err}")))
    }

    /// Asks for the node certificate to be re-signed by the current issuer, presenting
    /// `credential` and sending `request` (PEM, a CSR of the credential's key): the new
    /// chain (PEM), or `None` when the one presented is current.
    pub async fn renew(
        &self,
        credential: &Credential,
        trust: &SiteTrust,
        request: &[u8],
    ) -> Result<Option<String>, ExchangeError> {
        let http = self.mutual_tls(credential, trust)?;
        let body = self
            .read(
                http.post(self.mutual_url(path::RENEW))
                    .body(request.to_vec()),
            )
            .await?;
        if body.is_empty() {
            return Ok(None);
        }
        String::from_utf8(body)
            .map(Some)
            .map_err(|_| self.bad("a certificate chain that is not text"))
    }

    /// The replica's anchors (PEM), presenting `credential`.
    pub async fn trust_bundle(
        &self,
        credential: &Credential,
        trust: &SiteTrust,
    ) -> Result<String, ExchangeError> {
        let http = self.mutual_tls(credential, trust)?;
        let body = self
            .read(http.get(self.mutual_url(path::TRUST_BUNDLE)))
            .await?;
        String::from_utf8(body).map_err(|_| self.bad("a trust bundle that is not text"))
    }

    /// An HTTP/1 client presenting `credential` and checking the replica under `trust`.
    fn mutual_tls(
        &self,
        credential: &Credential,
        trust: &SiteTrust,
    ) -> Result<reqwest::Client, ExchangeError> {
        let mut tls = pimesh_meshtls::control_client(credential, trust)
            .map_err(|err| ExchangeError::Setup(err.to_string()))?;
        tls.alpn_protocols = vec![pimesh_meshtls::ALPN_HTTP1.to_vec()];
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .http1_only()
            .no_proxy()
            .build()
            .map_err(|err| ExchangeError::Setup(pimesh_runtime::error_chain(&err)))
    }

    /// Sends `request`; the body of a 200, or the refusal the replica stated.
    async fn read(&self, request: reqwest::RequestBuilder) -> Result<Vec<u8>, ExchangeError> {
        // The TCP connection itself was checked by `probe`: whatever fails here (TLS, a
        // stalled answer) is this replica's alone.
        let unreachable = |err: reqwest::Error| ExchangeError::Unreachable {
            replica: self.addr,
            detail: pimesh_runtime::error_chain(&err),
        };
        let mut response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(self.bad(&format!("an answer over {MAX_ANSWER_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        if status.is_success() {
            return Ok(body);
        }
        match serde_json::from_slice::<Refusal>(&body) {
            Ok(refusal) => Err(ExchangeError::Refused {
                replica: self.addr,
                refusal,
            }),
            Err(_) => Err(self.bad(&format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ))),
        }
    }

    fn bad(&self, detail: &str) -> ExchangeError {
        ExchangeError::BadAnswer {
            replica: self.addr,
            detail: detail.to_owned(),
        }
    }
}
