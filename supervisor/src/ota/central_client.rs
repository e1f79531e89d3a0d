//! The node's HTTPS client for its central server: long-polls for revisions and delivers
//! reports, authenticated both ways (the server by the seed's CA or the public roots, the
//! node by its node certificate).
//!
//! Failover: the seed may name several replicas of the central server (`url`, then
//! `fallback_urls`). The client stays with the replica that answered last; when it gives
//! no answer (connection, TLS, a broken-off answer, a 5xx status) the same request goes at
//! once to the next one, each tried at most once per request.

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
    /// Nothing newer, and the rollout of the revision the node runs on trial was stopped
    /// (`halted` or `aborted`, as the server says).
    TrialStopped(String),
    /// A document the server offers as the next revision (not yet verified).
    Offered(Vec<u8>),
    /// The document is larger than allowed: refused unread.
    TooLarge { size: usize },
}

pub struct CentralClient {
    http: reqwest::Client,
    replicas: Vec<Replica>,
    /// The replica that answered last.
    current: std::sync::atomic::AtomicUsize,
}

/// One replica's URLs for this node's site.
struct Replica {
    base: String,
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

/// The error of a client with no URL to try (a seed always has one).
fn no_central_url() -> RequestError {
    RequestError::Status {
        url: String::new(),
        status: StatusCode::SERVICE_UNAVAILABLE,
        body: "no central server URL".to_owned(),
    }
}

impl RequestError {
    /// Whether the replica gave no usable answer (worth asking another one): no
    /// connection, a broken-off answer, or a server error.
    fn is_no_answer(&self) -> bool {
        match self {
            RequestError::Unreachable { .. } | RequestError::Answer { .. } => true,
            RequestError::Status { status, .. } => status.is_server_error(),
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
        let replicas = central
            .urls()
            .map(|url| {
                let base = url.as_url().as_str().trim_end_matches('/').to_owned();
                Replica {
                    config_url: format!("{base}{}", path::config(site)),
                    reports_url: format!("{base}{}", path::reports(site)),
                    base,
                }
            })
            .collect();
        Ok(CentralClient {
            http,
            replicas,
            current: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The URL of the replica that answered last (the first before any answered).
    pub fn current_url(&self) -> &str {
        &self.replicas[self.current()].base
    }

    fn current(&self) -> usize {
        self.current
            .load(std::sync::atomic::Ordering::Relaxed)
            .min(self.replicas.len().saturating_sub(1))
    }

    /// The replicas in the order to try them: the one of the moment first.
    fn in_turn(&self) -> impl Iterator<Item = (usize, &Replica)> {
        let first = self.current();
        let count = self.replicas.len();
        (0..count).map(move |step| {
            let index = (first + step) % count;
            (index, &self.replicas[index])
        })
    }

    /// Replica `index` answered: the next requests go to it first.
    fn answered(&self, index: usize) {
        self.current
            .store(index, std::sync::atomic::Ordering::Relaxed);
    }

    /// Replica `index` gave no answer (`err`); the error kept when no replica answers.
    fn no_answer(&self, index: usize, err: RequestError) -> RequestError {
        let count = self.replicas.len();
        if count > 1 {
            tracing::info!(%err, next = %self.replicas[(index + 1) % count].base, "central replica gave no answer; trying the next");
        }
        err
    }

    /// `GET config?after=&wait=`: returns at once when the server has something newer,
    /// else after `wait`. Reads at most `max_bytes`.
    pub async fn poll(&self, query: ConfigQuery, max_bytes: usize) -> Result<Poll, RequestError> {
        let mut last = None;
        for (index, replica) in self.in_turn() {
            match self.poll_replica(replica, query, max_bytes).await {
                Err(err) if err.is_no_answer() => last = Some(self.no_answer(index, err)),
                outcome => {
                    self.answered(index);
                    return outcome;
                }
            }
        }
        Err(last.unwrap_or_else(no_central_url))
    }

    async fn poll_replica(
        &self,
        replica: &Replica,
        query: ConfigQuery,
        max_bytes: usize,
    ) -> Result<Poll, RequestError> {
        let url = format!("{}?{}", replica.config_url, query.encode());
        let unreachable = |source| RequestError::Unreachable {
            url: replica.config_url.clone(),
            source,
        };
        let mut response = self.http.get(&url).send().await.map_err(unreachable)?;
        match response.status() {
            StatusCode::NO_CONTENT => {
                let stopped = response
                    .headers()
                    .get(path::TRIAL_STOPPED_HEADER)
                    .and_then(|value| value.to_str().ok())
                    .filter(|state| matches!(*state, "halted" | "aborted"));
                return Ok(match stopped {
                    Some(state) if query.trial.is_some() => Poll::TrialStopped(state.to_owned()),
                    _ => Poll::Nothing,
                });
            }
            StatusCode::OK => {}
            status => {
                let body = response.text().await.unwrap_or_default();
                return Err(RequestError::Status {
                    url: replica.config_url.clone(),
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
                url: replica.config_url.clone(),
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
        let mut last = None;
        for (index, replica) in self.in_turn() {
            match self.report_to(replica, report).await {
                Err(err) if err.is_no_answer() => last = Some(self.no_answer(index, err)),
                outcome => {
                    self.answered(index);
                    return outcome;
                }
            }
        }
        Err(last.unwrap_or_else(no_central_url))
    }

    async fn report_to(
        &self,
        replica: &Replica,
        report: &NodeReport,
    ) -> Result<bool, RequestError> {
        let response = self
            .http
            .post(&replica.reports_url)
            .timeout(Duration::from_secs(30))
            .json(report)
            .send()
            .await
            .map_err(|source| RequestError::Unreachable {
                url: replica.reports_url.clone(),
                source,
            })?;
        let status = response.status();
        if status.is_success() {
            Ok(true)
        } else if status.is_client_error() {
            let body = response.text().await.unwrap_or_default();
            tracing::warn!(url = %replica.reports_url, %status, body = body.trim(), "report refused");
            Ok(false)
        } else {
            Err(RequestError::Status {
                url: replica.reports_url.clone(),
                status,
                body: String::new(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use pimesh_schema::Seed;
    use pimesh_test_support::central::{Central, OperatedSite, SiteOperator};
    use pimesh_test_support::ports::free_addr;

    use super::*;

    /// The seed's `[central]` naming `urls` in order, trusting `servers`' certificates.
    fn central(
        site: &OperatedSite,
        urls: &[String],
        servers: &[&Central],
    ) -> pimesh_schema::Central {
        let ca: String = servers
            .iter()
            .map(|server| String::from_utf8_lossy(&server.server_pem).into_owned())
            .collect();
        let fallbacks: Vec<String> = urls[1..].iter().map(|url| format!("{url:?}")).collect();
        let text = format!(
            "site = \"depot-7\"\nrole = \"init\"\n[central]\nurl = {:?}\nfallback_urls = [{}]\n\
             public_key = \"{}\"\nca = \"\"\"\n{ca}\"\"\"\n",
            urls[0],
            fallbacks.join(", "),
            site.key.public_key
        );
        Seed::parse(std::path::Path::new("seed.toml"), &text)
            .expect("seed")
            .central
            .expect("central")
    }

    #[test]
    fn a_replica_that_gives_no_answer_is_passed_over_for_the_next_one() {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let site = OperatedSite::new(dir.path(), "depot-7");
        let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a_dir).expect("a");
        std::fs::create_dir_all(&b_dir).expect("b");
        let mut a = Central::start(&a_dir, "", &[site.central_site()]);
        let b = Central::start(&b_dir, "", &[site.central_site()]);
        SiteOperator::new(&b, &site).publish(1, "site = \"depot-7\"\n");
        let dead = format!("https://localhost:{}", free_addr().port());
        let url = |server: &Central| format!("https://localhost:{}", server.addr.port());
        let (chain_pem, key_pem) = site.site.node_credential_pem("pi-a");
        let credential = NodeCredential { chain_pem, key_pem };
        let seed = central(&site, &[dead.clone(), url(&a), url(&b)], &[&a, &b]);
        let client = CentralClient::new(&seed, site.name(), &credential, Duration::from_secs(5))
            .expect("client");
        let poll_once = |client: &CentralClient| {
            let query = ConfigQuery {
                after: 0,
                wait: Duration::from_secs(1),
                trial: None,
            };
            runtime.block_on(client.poll(query, 1 << 20))
        };

        // Nothing listens at the first URL: a answers (nothing published there).
        let poll = poll_once(&client);
        assert!(matches!(poll, Ok(Poll::Nothing)), "a answered");
        assert_eq!(client.current_url(), url(&a));

        // a dies: the next poll goes to b, which has revision 1, and stays there.
        a.daemon.kill();
        let poll = poll_once(&client);
        assert!(matches!(poll, Ok(Poll::Offered(_))), "b offered revision 1");
        assert_eq!(client.current_url(), url(&b));
        let report: NodeReport =
            serde_json::from_str(r#"{"revision":1,"state":"applied","detail":"","about":1}"#)
                .expect("report");
        assert!(runtime
            .block_on(client.send_report(&report))
            .expect("b takes the report"));
        assert_eq!(client.current_url(), url(&b));

        // None answers: the error names the last URL tried.
        drop(b);
        let err = runtime
            .block_on(client.send_report(&report))
            .expect_err("no replica answers");
        assert!(err.to_string().contains("cannot reach"), "{err}");
    }

    #[test]
    fn a_node_on_trial_hears_at_once_that_its_revisions_rollout_was_stopped() {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let site = OperatedSite::new(dir.path(), "depot-7");
        let server = Central::start(dir.path(), "", &[site.central_site()]);
        let operator = SiteOperator::new(&server, &site);
        let url = format!("https://localhost:{}", server.addr.port());
        let (chain_pem, key_pem) = site.site.node_credential_pem("pi-a");
        let credential = NodeCredential { chain_pem, key_pem };
        let seed = central(&site, &[url], &[&server]);
        let client = CentralClient::new(&seed, site.name(), &credential, Duration::from_secs(5))
            .expect("client");
        let poll = |after, trial| {
            let query = ConfigQuery {
                after,
                wait: Duration::from_secs(1),
                trial,
            };
            runtime.block_on(client.poll(query, 1 << 20))
        };
        assert!(matches!(poll(0, None), Ok(Poll::Nothing)), "pi-a is known");
        operator.publish(
            1,
            "site = \"depot-7\"\n[rollout]\ncanary = [\"pi-a\"]\nwaves = [100]\n",
        );
        assert!(matches!(poll(0, None), Ok(Poll::Offered(_))), "the canary");
        assert!(
            matches!(poll(1, Some(1)), Ok(Poll::Nothing)),
            "the rollout runs: the trial goes on"
        );
        let (status, body) = operator.command(1, pimesh_revision::rollout::Command::Abort);
        assert_eq!(status, 200, "{body}");
        match poll(1, Some(1)) {
            Ok(Poll::TrialStopped(state)) => assert_eq!(state, "aborted"),
            _ => panic!("the node on trial is told its rollout was aborted"),
        }
        assert!(
            matches!(poll(1, None), Ok(Poll::Nothing)),
            "a node not on trial is told nothing"
        );
    }
}
