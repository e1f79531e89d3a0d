//! The node's HTTPS client for its central server: long-polls for revisions and delivers
//! reports, authenticated both ways (the server by the seed's CA or the public roots, the
//! node by its node certificate).

use std::time::Duration;

use pimesh_schema::{Central, DnsLabel};
use reqwest::StatusCode;

use super::outbox::Report;

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

/// The node's TLS client credential: the certificate chain and the private key, in PEM.
pub struct NodeCredential {
    pub chain_pem: String,
    pub key_pem: String,
}

impl CentralClient {
    pub fn new(
        central: &Central,
        site: &DnsLabel,
        credential: &NodeCredential,
        long_poll_wait: Duration,
    ) -> Result<CentralClient, String> {
        let identity = reqwest::Identity::from_pem(
            format!("{}\n{}", credential.key_pem, credential.chain_pem).as_bytes(),
        )
        .map_err(|err| format!("the node credential is not usable for TLS: {err}"))?;
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
            for der in pimesh_meshtls::pem::certificates(ca.as_str().as_bytes())
                .map_err(|err| format!("seed central.ca: {err}"))?
            {
                let cert = reqwest::Certificate::from_der(&der)
                    .map_err(|err| format!("seed central.ca: {err}"))?;
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|err| format!("cannot set up TLS for the central server: {err}"))?;
        let base = central
            .url
            .as_url()
            .as_str()
            .trim_end_matches('/')
            .to_owned();
        Ok(CentralClient {
            http,
            config_url: format!("{base}/v1/sites/{site}/config"),
            reports_url: format!("{base}/v1/sites/{site}/reports"),
        })
    }

    /// `GET config?after=&wait=`: returns at once when the server has something newer,
    /// else after `wait`. Reads at most `max_bytes`.
    pub async fn poll(&self, after: u64, wait: Duration, max_bytes: usize) -> Result<Poll, String> {
        let url = format!("{}?after={after}&wait={}", self.config_url, wait.as_secs());
        let mut response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|err| format!("cannot reach {}: {}", self.config_url, chain(&err)))?;
        match response.status() {
            StatusCode::NO_CONTENT => return Ok(Poll::Nothing),
            StatusCode::OK => {}
            status => {
                let body = response.text().await.unwrap_or_default();
                return Err(format!(
                    "{} answered {status}: {}",
                    self.config_url,
                    body.trim()
                ));
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
            .map_err(|err| format!("reading the answer of {}: {}", self.config_url, chain(&err)))?
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
    pub async fn send_report(&self, report: &Report) -> Result<bool, String> {
        let response = self
            .http
            .post(&self.reports_url)
            .timeout(Duration::from_secs(30))
            .json(report)
            .send()
            .await
            .map_err(|err| format!("cannot reach {}: {}", self.reports_url, chain(&err)))?;
        let status = response.status();
        if status.is_success() {
            Ok(true)
        } else if status.is_client_error() {
            let body = response.text().await.unwrap_or_default();
            tracing::warn!(url = %self.reports_url, %status, body = body.trim(), "report refused");
            Ok(false)
        } else {
            Err(format!("{} answered {status}", self.reports_url))
        }
    }
}

/// An error with its causes, which is where reqwest puts the useful part (TLS, refused).
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
