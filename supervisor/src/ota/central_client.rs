//! The node's HTTPS client for its central server: long-polls for revisions and delivers
//! reports, authenticated both ways (the server by the seed's CA or the public roots, the
//! node by its node certificate).

use std::fmt;
use std::time::Duration;

use pimesh_revision::path::{self, ConfigQuery};
use pimesh_revision::NodeReport;
use pimesh_schema::{Central, DnsLabel};
use reqwest::StatusCode;

use crate::credential::NodeCredential;

/// What one long-poll brought.
pub enum Poll {
    /// Nothing newer within the wait.
    Nothing,
    /// A document the server offers as the next revision (not yet verified).
    Offered(Vec<u8>),
    /// The document is larger than allowed: refused unread.
    TooLarge { size: usize },
}

pub struct CentralClient {
    http: reqwest::Client,
    config_url: String,
    reports_url: String,
}

/// Why the client could not be set up.
#[derive(Debug)]
pub enum SetupError {
    /// The node's key and certificate chain do not make a TLS identity.
    Credential(reqwest::Error),
    /// The seed's `central.ca` is not a PEM certificate bundle.
    CentralCa(reqwest::Error),
    Tls(reqwest::Error),
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetupError::Credential(err) => {
                write!(f, "the node credential is not usable for TLS: {err}")
            }
            SetupError::CentralCa(err) => write!(f, "seed central.ca: {err}"),
            SetupError::Tls(err) => {
                write!(f, "cannot set up TLS for the central server: {err}")
            }
        }
    }
}

impl std::error::Error for SetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SetupError::Credential(err) | SetupError::CentralCa(err) | SetupError::Tls(err) => {
                Some(err)
            }
        }
    }
}

/// Why an exchange with the central server failed; worth trying again later.
#[derive(Debug)]
pub enum RequestError {
    /// No answer: the connection, TLS or the request failed.
    Unreachable { url: String, source: reqwest::Error },
    /// The answer broke off.
    Answer { url: String, source: reqwest::Error },
    /// The server answered with a status this client does not take; `body` is what it
    /// said (empty: nothing, or not read).
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Unreachable { url, source } => {
                write!(
                    f,
                    "cannot reach {url}: {}",
                    pimesh_runtime::error_chain(source)
                )
            }
            RequestError::Answer { url, source } => {
                write!(
                    f,
                    "reading the answer of {url}: {}",
                    pimesh_runtime::error_chain(source)
                )
            }
            RequestError::Status { url, status, body } if body.is_empty() => {
                write!(f, "{url} answered {status}")
            }
            RequestError::Status { url, status, body } => {
                write!(f, "{url} answered {status}: {body}")
            }
        }
    }
}

impl std::error::Error for RequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RequestError::Unreachable { source, .. } | RequestError::Answer { source, .. } => {
                Some(source)
            }
            RequestError::Status { .. } => None,
        }
    }
}

impl CentralClient {
    pub fn new(
        central: &Central,
        site: &DnsLabel,
        credential: &NodeCredential,
        long_poll_wait: Duration,
    ) -> Result<CentralClient, SetupError> {
        let identity = reqwest::Identity::from_pem(
            format!("{}\n{}", credential.key_pem, credential.chain_pem).as_bytes(),
        )
        .map_err(SetupError::Credential)?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(true)
            .identity(identity)
            .connect_timeout(Duration::from_secs(10))
            // The server holds a long-poll up to `wait`; give it slack before giving up.
            .timeout(long_poll_wait + Duration::from_secs(30))
            .pool_idle_timeout(long_poll_wait + Duration::from_secs(30))
            .user_agent(concat!("pimesh-supervisor/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &central.ca {
            for cert in reqwest::Certificate::from_pem_bundle(ca.as_str().as_bytes())
                .map_err(SetupError::CentralCa)?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(SetupError::Tls)?;
        let base = central
            .url
            .as_url()
            .as_str()
            .trim_end_matches('/')
            .to_owned();
        Ok(CentralClient {
            http,
            config_url: format!("{base}{}", path::config(site)),
            reports_url: format!("{base}{}", path::reports(site)),
        })
    }

    /// `GET config?after=&wait=`: returns at once when the server has something newer,
    /// else after `wait`. Reads at most `max_bytes`.
    pub async fn poll(
        &self,
        after: u64,
        wait: Duration,
        max_bytes: usize,
    ) -> Result<Poll, RequestError> {
        let query = ConfigQuery { after, wait };
        let url = format!("{}?{}", self.config_url, query.encode());
        let unreachable = |source| RequestError::Unreachable {
            url: self.config_url.clone(),
            source,
        };
        let mut response = self.http.get(&url).send().await.map_err(unreachable)?;
        match response.status() {
            StatusCode::NO_CONTENT => return Ok(Poll::Nothing),
            StatusCode::OK => {}
            status => {
                let body = response.text().await.unwrap_or_default();
                return Err(RequestError::Status {
                    url: self.config_url.clone(),
                    status,
                    body: body.trim().to_owned(),
                });
            }
        }
        if let Some(length) = response.content_length() {
            if length > max_bytes as u64 {
                return Ok(Poll::TooLarge {
                    size: usize::try_from(length).unwrap_or(usize::MAX),
                });
            }
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|source| RequestError::Answer {
                url: self.config_url.clone(),
                source,
            })?
        {
            body.extend_from_slice(&chunk);
            if body.len() > max_bytes {
                return Ok(Poll::TooLarge { size: body.len() });
            }
        }
        Ok(Poll::Offered(body))
    }

    /// Delivers one report. `Ok(true)`: taken; `Ok(false)`: refused for good (4xx, the
    /// report is dropped); `Err`: try again later.
    pub async fn send_report(&self, report: &NodeReport) -> Result<bool, RequestError> {
        let response = self
            .http
            .post(&self.reports_url)
            .timeout(Duration::from_secs(30))
            .json(report)
            .send()
            .await
            .map_err(|source| RequestError::Unreachable {
                url: self.reports_url.clone(),
                source,
            })?;
        let status = response.status();
        if status.is_success() {
            Ok(true)
        } else if status.is_client_error() {
            let body = response.text().await.unwrap_or_default();
            tracing::warn!(url = %self.reports_url, %status, body = body.trim(), "report refused");
            Ok(false)
        } else {
            Err(RequestError::Status {
                url: self.reports_url.clone(),
                status,
                body: String::new(),
            })
        }
    }
}
