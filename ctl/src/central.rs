//! Talking to the central server: publishing signed revisions and reading the fleet view.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pimesh_revision::{path, FleetView, Mode, Revision, SignError};
use pimesh_schema::{ConfigError, DnsLabel};
use reqwest::blocking::Client;
use reqwest::StatusCode;

use crate::CentralArgs;

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
            CentralError::Unreachable { url, source } => write!(f, "cannot reach {url}: {source}"),
            CentralError::Answer { url, source } => {
                write!(f, "cannot read the answer of {url}: {source}")
            }
            CentralError::Status { url, status, body } => {
                write!(f, "{url} answered {status}: {body}")
            }
            CentralError::NotFleetView { url, source } => write!(
                f,
                "{url} answered something other than the fleet view: {source}"
            ),
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
                "the central server refused revision {revision} of site {site} ({status}): {body}"
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
            CentralError::NotFleetView { source, .. } => Some(source),
            CentralError::CaBundle { source, .. } => Some(source),
            CentralError::InvalidConfig(err) => Some(err),
            CentralError::Sign(err) => Some(err),
            CentralError::Status { .. }
            | CentralError::SiteNotServed(_)
            | CentralError::Refused { .. } => None,
        }
    }
}

fn client(args: &CentralArgs) -> Result<Client, CentralError> {
    let mut builder = Client::builder()
        .use_rustls_tls()
        .timeout(Duration::from_secs(30));
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

fn fleet(client: &Client, args: &CentralArgs) -> Result<FleetView, CentralError> {
    let url = url(args, path::FLEET);
    let response = client
        .get(&url)
        .send()
        .map_err(|source| CentralError::Unreachable {
            url: url.clone(),
            source,
        })?;
    let status = response.status();
    let body = response.text().map_err(|source| CentralError::Answer {
        url: url.clone(),
        source,
    })?;
    if !status.is_success() {
        return Err(CentralError::Status { url, status, body });
    }
    serde_json::from_str(&body).map_err(|source| CentralError::NotFleetView { url, source })
}

pub fn publish(
    file: &Path,
    site_dir: &Path,
    args: &CentralArgs,
    revision: Option<u64>,
    try_mode: bool,
) -> Result<(), CentralError> {
    // The signed text is cluster.toml with the routes/ folder's files compiled in.
    let site =
        pimesh_schema::routes::site_folder::compile(file).map_err(CentralError::InvalidConfig)?;
    let (config, text) = (site.config, site.text);
    let key_path = site_dir.join("signing.pk8");
    let key = std::fs::read(&key_path).map_err(|source| CentralError::SiteKey {
        path: key_path,
        source,
    })?;
    let client = client(args)?;
    let number = match revision {
        Some(number) => number,
        None => {
            let fleet = fleet(&client, args)?;
            let latest = fleet
                .site(&config.site)
                .ok_or_else(|| CentralError::SiteNotServed(config.site.clone()))?
                .latest_revision
                .unwrap_or(0);
            latest + 1
        }
    };
    let signed = Revision {
        site: config.site.clone(),
        revision: number,
        mode: if try_mode { Mode::Try } else { Mode::Apply },
        config: text,
    }
    .sign(&key)
    .map_err(CentralError::Sign)?;
    let url = url(args, &path::revisions(&config.site));
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
            revision: number,
            site: config.site,
            status,
            body,
        });
    }
    println!("published revision {number} of site {}", config.site);
    Ok(())
}

pub fn status(args: &CentralArgs) -> Result<(), CentralError> {
    let fleet = fleet(&client(args)?, args)?;
    for site in &fleet.sites {
        let latest = site
            .latest_revision
            .map_or("none".to_owned(), |n| n.to_string());
        println!("site {}: newest revision {latest}", site.site);
        for node in &site.nodes {
            println!("{}", node_line(node));
        }
    }
    Ok(())
}

/// One node of `pimeshctl status`: its name, revision, K3s and last outcome.
fn node_line(node: &pimesh_revision::NodeView) -> String {
    let report = &node.recorded.report;
    let revision = report.revision.map_or("-".to_owned(), |n| n.to_string());
    let k3s = report
        .k3s
        .as_ref()
        .map_or_else(|| "k3s -".to_owned(), ToString::to_string);
    let detail = if report.detail.is_empty() {
        String::new()
    } else {
        format!(": {}", report.detail)
    };
    format!(
        "  {:<20} revision {revision:<6} {k3s:<18} {}{detail}",
        node.node.as_str(),
        report.state.as_str(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_line_shows_its_k3s_beside_its_revision() {
        let node: pimesh_revision::NodeView = serde_json::from_str(
            r#"{"node":"pi-b","revision":4,"state":"applied","detail":"","received_at":1,
                "k3s":{"role":"server","ready":true}}"#,
        )
        .expect("a node view");
        let line = node_line(&node);
        assert!(
            line.contains("pi-b") && line.contains("revision 4"),
            "{line}"
        );
        assert!(
            line.contains("k3s server ready") && line.ends_with("applied"),
            "{line}"
        );
        let without: pimesh_revision::NodeView = serde_json::from_str(
            r#"{"node":"pi-c","revision":null,"state":"rolled-back","detail":"revision 5: unhealthy"}"#,
        )
        .expect("a node view");
        let line = node_line(&without);
        assert!(
            line.contains("k3s -") && line.ends_with("rolled-back: revision 5: unhealthy"),
            "{line}"
        );
    }
}
