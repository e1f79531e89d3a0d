//! Talking to the central server: publishing signed revisions, reading the fleet view and
//! the server's version. A failure names its real cause (an unknown CA, a certificate for
//! another name, a refused connection, a timeout, the server's own reason for an error
//! status), not only that the request failed.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pimesh_revision::rollout::Command;
use pimesh_revision::{path, FleetView, Mode, Revision, Rollout, SignError, SignedRevision};
use pimesh_schema::{ConfigError, DnsLabel};
use reqwest::blocking::Client;
use reqwest::StatusCode;

use crate::status::{FleetStatus, UNHEALTHY_EXIT};
use crate::{CentralArgs, OutputFormat};

/// How long one request to the central server may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why talking to the central server failed.
#[derive(Debug)]
pub enum CentralError {
    /// A file the command needs cannot be read.
    Read {
        path: PathBuf,
        source: io::Error,
    },
    /// The site's signing key cannot be read.
    SiteKey {
        path: PathBuf,
        source: io::Error,
    },
    /// `--central-ca` holds no PEM certificate, or text that is not PEM.
    CaBundle {
        path: PathBuf,
        source: pimesh_meshtls::pem::PemError,
    },
    /// `--central-ca` is not a PEM certificate.
    NotCertificate {
        path: PathBuf,
        source: reqwest::Error,
    },
    Tls(reqwest::Error),
    Unreachable {
        url: String,
        source: reqwest::Error,
    },
    /// The answer's body could not be read.
    Answer {
        url: String,
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    /// The server's answer is not a fleet view.
    NotFleetView {
        url: String,
        source: serde_json::Error,
    },
    /// The server's answer is not the document asked for (`what`).
    Unexpected {
        url: String,
        what: &'static str,
        source: serde_json::Error,
    },
    InvalidConfig(ConfigError),
    SiteNotServed(DnsLabel),
    Sign(SignError),
    /// The server refused the revision; `body` says why.
    Refused {
        revision: u64,
        site: DnsLabel,
        status: StatusCode,
        body: String,
    },
}

impl fmt::Display for CentralError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CentralError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            CentralError::SiteKey { path, source } => {
                write!(f, "cannot read the site key {}: {source}", path.display())
            }
            CentralError::CaBundle { path, source } => {
                write!(f, "{}: expected PEM certificates: {source}", path.display())
            }
            CentralError::NotCertificate { path, source } => {
                write!(
                    f,
                    "{}: expected a PEM certificate: {source}",
                    path.display()
                )
            }
            CentralError::Tls(source) => write!(f, "cannot set up TLS: {source}"),
            CentralError::Unreachable { url, source } => {
                write!(f, "cannot reach {url}: {}", cause(source))
            }
            CentralError::Answer { url, source } => {
                write!(f, "cannot read the answer of {url}: {}", cause(source))
            }
            CentralError::Status { url, status, body } => {
                write!(f, "{url} answered {status}: {}", reason(body))
            }
            CentralError::NotFleetView { url, source } => write!(
                f,
                "{url} answered something other than the fleet view: {source}"
            ),
            CentralError::Unexpected { url, what, source } => {
                write!(f, "{url} answered something other than {what}: {source}")
            }
            CentralError::InvalidConfig(err) => err.fmt(f),
            CentralError::SiteNotServed(site) => {
                write!(f, "the central server does not serve site {site}")
            }
            CentralError::Sign(err) => err.fmt(f),
            CentralError::Refused {
                revision,
                site,
                status,
                body,
            } => write!(
                f,
                "the central server refused revision {revision} of site {site} ({status}): {}",
                reason(body)
            ),
        }
    }
}

impl std::error::Error for CentralError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CentralError::Read { source, .. } | CentralError::SiteKey { source, .. } => {
                Some(source)
            }
            CentralError::NotCertificate { source, .. }
            | CentralError::Tls(source)
            | CentralError::Unreachable { source, .. }
            | CentralError::Answer { source, .. } => Some(source),
            CentralError::NotFleetView { source, .. } | CentralError::Unexpected { source, .. } => {
                Some(source)
            }
            CentralError::CaBundle { source, .. } => Some(source),
            CentralError::InvalidConfig(err) => Some(err),
            CentralError::Sign(err) => Some(err),
            CentralError::Status { .. }
            | CentralError::SiteNotServed(_)
            | CentralError::Refused { .. } => None,
        }
    }
}

/// The real cause of a failed request, as an operator would look for it.
fn cause(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        return format!(
            "timed out: no answer within {} s",
            REQUEST_TIMEOUT.as_secs()
        );
    }
    // reqwest carries rustls' and the socket's errors inside boxed layers that do not
    // downcast back to their types: the chain's text is what names them.
    let text = error_chain(err);
    let causes = [
        (
            &["UnknownIssuer"][..],
            "unknown CA: the server's certificate is not signed by a CA this command trusts \
             (give the central server's CA with --central-ca)",
        ),
        (
            &["NotValidForName", "not valid for name"][..],
            "name mismatch: the server's certificate is not for the host named in --central",
        ),
        (
            &["Expired", "certificate expired"][..],
            "the server's certificate has expired (or this machine's clock is wrong)",
        ),
        (
            &["Connection refused", "ConnectionRefused"][..],
            "connection refused: nothing listens at that address and port",
        ),
    ];
    causes
        .iter()
        .find(|(words, _)| words.iter().any(|word| text.contains(word)))
        .map_or(text.clone(), |(_, named)| (*named).to_owned())
}

/// `err` and its sources, each once, joined by ": ".
fn error_chain(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut next = std::error::Error::source(err);
    while let Some(error) = next {
        let part = error.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = error.source();
    }
    text
}

/// The server's reason in an error answer: the `error` of its JSON body, else the body.
fn reason(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned())
}

fn client(args: &CentralArgs) -> Result<Client, CentralError> {
    let mut builder = Client::builder().use_rustls_tls().timeout(REQUEST_TIMEOUT);
    if let Some(ca) = &args.central_ca {
        let pem = std::fs::read(ca).map_err(|source| CentralError::Read {
            path: ca.clone(),
            source,
        })?;
        let certificates =
            pimesh_meshtls::pem::certificates(&pem).map_err(|source| CentralError::CaBundle {
                path: ca.clone(),
                source,
            })?;
        for der in certificates {
            let cert = reqwest::Certificate::from_der(&der).map_err(|source| {
                CentralError::NotCertificate {
                    path: ca.clone(),
                    source,
                }
            })?;
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(CentralError::Tls)
}

/// `<central><path>`.
fn url(args: &CentralArgs, path: &str) -> String {
    format!("{}{path}", args.central.trim_end_matches('/'))
}

/// `GET url`: the body of a 2xx answer, and the server's clock (its `Date` header).
fn get(
    client: &Client,
    url: String,
) -> Result<(String, Option<std::time::SystemTime>), CentralError> {
    send(client.get(&url), url)
}

/// Sends `request` to `url`: the body of a 2xx answer and the server's clock (its `Date`
/// header); any other answer is [`CentralError::Status`] with the server's reason.
fn send(
    request: reqwest::blocking::RequestBuilder,
    url: String,
) -> Result<(String, Option<std::time::SystemTime>), CentralError> {
    let response = request.send().map_err(|source| CentralError::Unreachable {
        url: url.clone(),
        source,
    })?;
    let status = response.status();
    let date = response
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| httpdate::parse_http_date(text).ok());
    let body = response.text().map_err(|source| CentralError::Answer {
        url: url.clone(),
        source,
    })?;
    if !status.is_success() {
        return Err(CentralError::Status { url, status, body });
    }
    Ok((body, date))
}

/// The central server's version, from `GET /v1/version`.
pub fn server_version(args: &CentralArgs) -> Result<String, CentralError> {
    Ok(server_version_and_clock(args)?.0)
}

/// The central server's version and its clock when it answered.
pub fn server_version_and_clock(
    args: &CentralArgs,
) -> Result<(String, Option<std::time::SystemTime>), CentralError> {
    let url = url(args, path::VERSION);
    let (body, date) = get(&client(args)?, url.clone())?;
    let answer: serde_json::Value =
        serde_json::from_str(&body).map_err(|source| CentralError::NotFleetView {
            url: url.clone(),
            source,
        })?;
    let version = answer
        .get("version")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    Ok((version, date))
}

/// How to publish.
pub struct Publish {
    /// The revision number (default: one above the newest the server holds).
    pub revision: Option<u64>,
    /// Nodes revert it unless it is confirmed in time.
    pub try_mode: bool,
    /// Validate and sign, print what would go, upload nothing.
    pub dry_run: bool,
}

pub fn publish(
    file: &Path,
    site_dir: &Path,
    args: &CentralArgs,
    how: Publish,
) -> Result<(), crate::Failure> {
    let Publish {
        revision,
        try_mode,
        dry_run,
    } = how;
    // The signed text is cluster.toml with the routes/ folder's files compiled in.
    let site =
        pimesh_schema::routes::site_folder::compile(file).map_err(CentralError::InvalidConfig)?;
    let (config, text) = (site.config, site.text);
    let operator = Operator::open(args, site_dir)?;
    if operator.key.is_empty() {
        return Err(format!(
            "publishing needs the site key, which signs revisions: {} has none",
            site_dir.join("signing.pk8").display()
        )
        .into());
    }
    if config.site != operator.site {
        return Err(format!(
            "{} is for site {}, the site folder {} for site {}",
            file.display(),
            config.site,
            site_dir.display(),
            operator.site
        )
        .into());
    }
    let number = match revision {
        Some(number) => number,
        None => operator.latest_revision()?.unwrap_or(0) + 1,
    };
    let unsigned = Revision {
        site: config.site.clone(),
        revision: number,
        mode: if try_mode { Mode::Try } else { Mode::Apply },
        config: text,
    };
    if dry_run {
        let json = unsigned
            .sign(&operator.key)
            .map_err(CentralError::Sign)?
            .to_json();
        let digest = ring::digest::digest(&ring::digest::SHA256, &json);
        let sha256: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        println!(
            "would publish revision {number} of site {} ({}, {} bytes signed, sha256 {sha256}); \
             nothing uploaded (--dry-run)",
            config.site,
            if try_mode { "try" } else { "apply" },
            json.len()
        );
        return Ok(());
    }
    operator.publish(unsigned)?;
    println!("published revision {number} of site {}", config.site);
    Ok(())
}

/// Uploads `signed`; the server's refusal, with its reason, is an error.
fn put_revision(
    client: &Client,
    args: &CentralArgs,
    signed: &SignedRevision,
) -> Result<(), CentralError> {
    let url = url(args, &path::revisions(&signed.site));
    let response = client
        .put(&url)
        .header("content-type", "application/json")
        .body(signed.to_json())
        .send()
        .map_err(|source| CentralError::Unreachable { url, source })?;
    let status = response.status();
    let body = response.text().unwrap_or_default();
    if !status.is_success() {
        return Err(CentralError::Refused {
            revision: signed.revision,
            site: signed.site.clone(),
            status,
            body,
        });
    }
    Ok(())
}

/// The site's operator at the central server: requests signed with the site key of a
/// site folder, or with a person's own key (`pimesh_revision::operator`).
pub struct Operator<'a> {
    client: Client,
    args: &'a CentralArgs,
    pub site: DnsLabel,
    /// The site's signing key, PKCS#8: it signs revisions.
    key: Vec<u8>,
    /// The person who signs the requests instead of the site key: their name and key
    /// (PKCS#8), from `PIMESH_OPERATOR` and `PIMESH_OPERATOR_KEY`.
    person: Option<(String, Vec<u8>)>,
}

/// The environment variables that name the person signing operator requests.
pub const OPERATOR_ENV: &str = "PIMESH_OPERATOR";
pub const OPERATOR_KEY_ENV: &str = "PIMESH_OPERATOR_KEY";

impl<'a> Operator<'a> {
    /// The operator of the site of `site_dir` (its `site-name`, and `signing.pk8` unless a
    /// person signs: `PIMESH_OPERATOR` and `PIMESH_OPERATOR_KEY`, when a site folder may
    /// hold its `site-name` alone).
    pub fn open(args: &'a CentralArgs, site_dir: &Path) -> Result<Operator<'a>, crate::Failure> {
        let site = crate::site::name_of(site_dir)?;
        let person = match (
            std::env::var(OPERATOR_ENV).ok().filter(|v| !v.is_empty()),
            std::env::var_os(OPERATOR_KEY_ENV).filter(|v| !v.is_empty()),
        ) {
            (Some(name), Some(path)) => {
                let path = PathBuf::from(path);
                let key = std::fs::read(&path)
                    .map_err(|source| CentralError::SiteKey { path, source })?;
                Some((name, key))
            }
            (None, None) => None,
            _ => {
                return Err(format!(
                    "{OPERATOR_ENV} and {OPERATOR_KEY_ENV} go together: a person's name and \
                     the key (PKCS#8) `pimeshctl operator keygen` made for them"
                )
                .into())
            }
        };
        let key_path = site_dir.join("signing.pk8");
        let key = match std::fs::read(&key_path) {
            Ok(key) => key,
            // A person needs the site key only to publish (see `publish`).
            Err(_) if person.is_some() => Vec::new(),
            Err(source) => {
                return Err(CentralError::SiteKey {
                    path: key_path,
                    source,
                }
                .into())
            }
        };
        Ok(Operator {
            client: client(args)?,
            args,
            site,
            key,
            person,
        })
    }

    /// `method path` signed now, its 2xx answer's body read as `what`.
    fn request<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        what: &'static str,
    ) -> Result<T, CentralError> {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let (op, key) = match &self.person {
            Some((name, key)) => (Some(name.as_str()), key.as_slice()),
            None => (None, self.key.as_slice()),
        };
        let authorization = pimesh_revision::operator::authorization_as(
            key,
            op,
            &self.site,
            method.as_str(),
            path,
            at_ms,
            b"",
        )
        .map_err(CentralError::Sign)?;
        let url = url(self.args, path);
        let request = self
            .client
            .request(method, &url)
            .header(reqwest::header::AUTHORIZATION, authorization);
        let (body, _) = send(request, url.clone())?;
        serde_json::from_str(&body).map_err(|source| CentralError::Unexpected { url, what, source })
    }

    /// The site's rollouts, newest first (at most `limit`).
    pub fn rollouts(&self, limit: usize) -> Result<Vec<Rollout>, CentralError> {
        let path = format!("{}?limit={limit}", path::rollouts(&self.site));
        self.request(reqwest::Method::GET, &path, "a list of rollouts")
    }

    /// Stored revision `number` of the site.
    pub fn revision(&self, number: u64) -> Result<SignedRevision, CentralError> {
        let path = path::revision(&self.site, number);
        self.request(reqwest::Method::GET, &path, "a signed revision")
    }

    /// Pauses, resumes or aborts the rollout of `revision`; the rollout as it is after.
    pub fn command(&self, revision: u64, command: Command) -> Result<Rollout, CentralError> {
        let path = path::rollout_command(&self.site, revision, command);
        self.request(reqwest::Method::POST, &path, "a rollout")
    }

    /// A dashboard session for the site, valid `ttl`: the URL that opens the dashboard
    /// with it, and when it expires (seconds since the epoch).
    pub fn dashboard(&self, ttl: Duration) -> Result<(String, u64), CentralError> {
        #[derive(serde::Deserialize)]
        struct Session {
            token: String,
            expires_at: u64,
        }
        let path = format!(
            "{}?ttl={}",
            path::site(&self.site, path::SiteResource::Sessions),
            ttl.as_secs()
        );
        let session: Session = self.request(reqwest::Method::POST, &path, "a session")?;
        let page = url(self.args, "/dashboard");
        Ok((
            format!("{page}#site={}&token={}", self.site, session.token),
            session.expires_at,
        ))
    }

    /// Signs `revision` with the site key and publishes it.
    pub fn publish(&self, revision: Revision) -> Result<SignedRevision, CentralError> {
        let signed = revision.sign(&self.key).map_err(CentralError::Sign)?;
        put_revision(&self.client, self.args, &signed)?;
        Ok(signed)
    }

    /// The fleet view as the server shows it to this site's operator: this site alone.
    pub fn fleet(&self) -> Result<FleetView, CentralError> {
        self.request(reqwest::Method::GET, path::FLEET, "the fleet view")
    }

    /// The site's newest revision number at the server (`None`: none published).
    pub fn latest_revision(&self) -> Result<Option<u64>, CentralError> {
        let fleet = self.fleet()?;
        Ok(fleet
            .site(&self.site)
            .ok_or_else(|| CentralError::SiteNotServed(self.site.clone()))?
            .latest_revision)
    }
}

/// `pimeshctl status`: the site's fleet view judged ([`FleetStatus`]) and printed as
/// `output` says; the exit code is [`UNHEALTHY_EXIT`] when the site is not healthy.
pub fn status(
    args: &CentralArgs,
    site_dir: &Path,
    output: OutputFormat,
) -> Result<u8, crate::Failure> {
    let fleet = Operator::open(args, site_dir)?.fleet()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let status = FleetStatus::of(&fleet, now);
    print!("{}", output.render(&status, FleetStatus::table)?);
    Ok(if status.healthy { 0 } else { UNHEALTHY_EXIT })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_of_an_error_answer_is_its_json_error() {
        assert_eq!(
            reason(r#"{"error":"revision 1 is not newer than 2"}"#),
            "revision 1 is not newer than 2"
        );
        assert_eq!(reason("plain text\n"), "plain text");
    }
}
