//! A kubeconfig (the file K3s writes for its admin on a server, `/etc/rancher/k3s/k3s.yaml`,
//! and for its kubelet on every node, `<data-dir>/agent/kubelet.kubeconfig`) read as an
//! HTTPS client of the Kubernetes API: the cluster's server URL and CA, the user's client
//! certificate and key, each given inline (`*-data`, base64) or as a file path, as
//! kubeconfigs allow.
//!
//! Invariant: the client trusts only the kubeconfig's CA (no system roots) and presents
//! only its client certificate; a request never waits longer than the timeout it is given.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;

/// The longest kubeconfig read.
const MAX_BYTES: u64 = 256 * 1024;

/// The parts of a kubeconfig a client needs.
#[derive(Debug, Deserialize)]
struct File {
    #[serde(default, rename = "current-context")]
    current_context: Option<String>,
    #[serde(default)]
    contexts: Vec<Named<Context>>,
    #[serde(default)]
    clusters: Vec<Named<Cluster>>,
    #[serde(default)]
    users: Vec<Named<User>>,
}

#[derive(Debug, Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "context", alias = "cluster", alias = "user")]
    value: T,
}

#[derive(Debug, Deserialize)]
struct Context {
    cluster: String,
    user: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    server: String,
    certificate_authority_data: Option<String>,
    certificate_authority: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct User {
    client_certificate_data: Option<String>,
    client_certificate: Option<PathBuf>,
    client_key_data: Option<String>,
    client_key: Option<PathBuf>,
}

/// Why a kubeconfig cannot be used; names the file and the field.
#[derive(Debug)]
pub enum KubeconfigError {
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    TooLarge {
        path: PathBuf,
    },
    Invalid {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    Missing {
        path: PathBuf,
        what: String,
    },
    Client {
        path: PathBuf,
        source: reqwest::Error,
    },
}

impl fmt::Display for KubeconfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KubeconfigError::Unreadable { path, source } => {
                write!(f, "cannot read the kubeconfig {}: {source}", path.display())
            }
            KubeconfigError::TooLarge { path } => {
                write!(f, "{}: larger than {MAX_BYTES} bytes", path.display())
            }
            KubeconfigError::Invalid { path, source } => {
                write!(f, "{}: not a kubeconfig: {source}", path.display())
            }
            KubeconfigError::Missing { path, what } => {
                write!(f, "{}: {what}", path.display())
            }
            KubeconfigError::Client { path, source } => write!(
                f,
                "{}: cannot make an HTTPS client of its CA and client certificate: {source}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for KubeconfigError {}

/// An HTTPS client of one Kubernetes API server, as a kubeconfig describes it.
#[derive(Debug, Clone)]
pub struct KubeClient {
    /// `https://host:port`, without a trailing slash.
    pub server: String,
    client: reqwest::Client,
    /// The CA and identity, to make clients of the cluster's other servers.
    ca_pem: Vec<u8>,
    identity_pem: Vec<u8>,
}

impl KubeClient {
    /// Reads the kubeconfig at `path` (its current context, else its first one).
    pub fn load(path: &Path, timeout: Duration) -> Result<KubeClient, KubeconfigError> {
        let missing = |what: &str| KubeconfigError::Missing {
            path: path.to_path_buf(),
            what: what.to_owned(),
        };
        match std::fs::metadata(path) {
            Ok(meta) if meta.len() > MAX_BYTES => {
                return Err(KubeconfigError::TooLarge {
                    path: path.to_path_buf(),
                })
            }
            Ok(_) => {}
            Err(source) => {
                return Err(KubeconfigError::Unreadable {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let text = std::fs::read_to_string(path).map_err(|source| KubeconfigError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        let file: File =
            serde_yaml_ng::from_str(&text).map_err(|source| KubeconfigError::Invalid {
                path: path.to_path_buf(),
                source,
            })?;
        let context = match &file.current_context {
            Some(name) => file
                .contexts
                .iter()
                .find(|c| &c.name == name)
                .ok_or_else(|| missing(&format!("no context named {name:?} (current-context)")))?,
            None => file
                .contexts
                .first()
                .ok_or_else(|| missing("no contexts"))?,
        };
        let cluster = file
            .clusters
            .iter()
            .find(|c| c.name == context.value.cluster)
            .map(|c| &c.value)
            .ok_or_else(|| missing(&format!("no cluster {:?}", context.value.cluster)))?;
        let user = file
            .users
            .iter()
            .find(|u| u.name == context.value.user)
            .map(|u| &u.value)
            .ok_or_else(|| missing(&format!("no user {:?}", context.value.user)))?;
        let base = path.parent().unwrap_or(Path::new("/"));
        let ca_pem = inline_or_file(
            path,
            base,
            cluster.certificate_authority_data.as_deref(),
            cluster.certificate_authority.as_deref(),
            "certificate-authority",
        )?;
        let mut identity_pem = inline_or_file(
            path,
            base,
            user.client_certificate_data.as_deref(),
            user.client_certificate.as_deref(),
            "client-certificate",
        )?;
        identity_pem.push(b'\n');
        identity_pem.extend(inline_or_file(
            path,
            base,
            user.client_key_data.as_deref(),
            user.client_key.as_deref(),
            "client-key",
        )?);
        let server = cluster.server.trim_end_matches('/').to_owned();
        let client =
            client(&ca_pem, &identity_pem, timeout).map_err(|source| KubeconfigError::Client {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(KubeClient {
            server,
            client,
            ca_pem,
            identity_pem,
        })
    }

    /// The same credentials against another server of the cluster (`https://host:port`).
    pub fn for_server(
        &self,
        server: String,
        timeout: Duration,
    ) -> Result<KubeClient, reqwest::Error> {
        Ok(KubeClient {
            client: client(&self.ca_pem, &self.identity_pem, timeout)?,
            server,
            ca_pem: self.ca_pem.clone(),
            identity_pem: self.identity_pem.clone(),
        })
    }

    /// `GET <server><path>`: the status and up to `max` bytes of the body as text.
    pub async fn get(&self, path: &str, max: usize) -> Result<(u16, String), reqwest::Error> {
        let response = self
            .client
            .get(format!("{}{path}", self.server))
            .send()
            .await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        let end = bytes.len().min(max);
        Ok((status, String::from_utf8_lossy(&bytes[..end]).into_owned()))
    }
}

impl KubeClient {
    /// `GET <server><path>` answered `200` with JSON of type `T` (at most `max` bytes).
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        max: usize,
    ) -> Result<T, ApiError> {
        let (status, bytes) = self
            .send_json(reqwest::Method::GET, path, None, max)
            .await?;
        let url = format!("GET {}{path}", self.server);
        if status != 200 {
            let end = bytes.len().min(300);
            return Err(ApiError::Status {
                url,
                status,
                body: String::from_utf8_lossy(&bytes[..end]).into_owned(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| ApiError::Decode { url, source })
    }

    /// `<method> <server><path>`, with `body` as JSON when given: the status, whatever it
    /// is, and the body (at most `max` bytes, else [`ApiError::TooLarge`]).
    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        max: usize,
    ) -> Result<(u16, Vec<u8>), ApiError> {
        let url = format!("{}{path}", self.server);
        let request = format!("{method} {url}");
        let mut builder = self
            .client
            .request(method, &url)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(body) = body {
            builder = builder
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let response = builder.send().await.map_err(|source| ApiError::Transport {
            url: request.clone(),
            source,
        })?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ApiError::Transport {
                url: request.clone(),
                source,
            })?;
        if bytes.len() > max {
            return Err(ApiError::TooLarge { url: request, max });
        }
        Ok((status, bytes.to_vec()))
    }
}

/// Why a request to the API failed; `url` names the request, method and URL
/// (`GET https://…`).
#[derive(Debug)]
pub enum ApiError {
    Transport {
        url: String,
        source: reqwest::Error,
    },
    Status {
        url: String,
        status: u16,
        body: String,
    },
    TooLarge {
        url: String,
        max: usize,
    },
    Decode {
        url: String,
        source: serde_json::Error,
    },
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Transport { url, source } => write!(f, "{url}: {source}"),
            ApiError::Status { url, status, body } => {
                write!(f, "{url}: answered {status}: {}", body.trim())
            }
            ApiError::TooLarge { url, max } => {
                write!(f, "{url}: the answer is larger than {max} bytes")
            }
            ApiError::Decode { url, source } => {
                write!(f, "{url}: not the expected object: {source}")
            }
        }
    }
}

impl std::error::Error for ApiError {}

fn client(
    ca_pem: &[u8],
    identity_pem: &[u8],
    timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem)?)
        .identity(reqwest::Identity::from_pem(identity_pem)?)
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_max_idle_per_host(1)
        .build()
}

/// The bytes of `data` (base64) or of the file `file` (relative to `base`).
fn inline_or_file(
    kubeconfig: &Path,
    base: &Path,
    data: Option<&str>,
    file: Option<&Path>,
    field: &str,
) -> Result<Vec<u8>, KubeconfigError> {
    if let Some(data) = data {
        let compact: String = data.split_whitespace().collect();
        return base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|err| KubeconfigError::Missing {
                path: kubeconfig.to_path_buf(),
                what: format!("{field}-data is not base64: {err}"),
            });
    }
    if let Some(file) = file {
        let file = base.join(file);
        return std::fs::read(&file).map_err(|source| KubeconfigError::Missing {
            path: kubeconfig.to_path_buf(),
            what: format!("{field} {}: {source}", file.display()),
        });
    }
    Err(KubeconfigError::Missing {
        path: kubeconfig.to_path_buf(),
        what: format!("neither {field}-data nor {field}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubeconfig_without_credentials_is_named_with_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k3s.yaml");
        std::fs::write(
            &path,
            "apiVersion: v1\nclusters:\n- cluster:\n    server: https://127.0.0.1:6443\n  name: default\n\
             contexts:\n- context:\n    cluster: default\n    user: default\n  name: default\n\
             current-context: default\nkind: Config\nusers:\n- name: default\n  user: {}\n",
        )
        .expect("write");
        let err = KubeClient::load(&path, Duration::from_secs(1)).expect_err("no CA");
        assert!(
            err.to_string()
                .contains("neither certificate-authority-data nor certificate-authority"),
            "{err}"
        );
        std::fs::write(&path, "clusters: [").expect("write");
        let err = KubeClient::load(&path, Duration::from_secs(1)).expect_err("not YAML");
        assert!(err.to_string().contains("not a kubeconfig"), "{err}");
    }
}
