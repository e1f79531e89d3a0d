//! `k3s agent` as the fixture runs it.
//!
//! 1. `--server https://HOST:PORT` and a token are required (fatal otherwise, as in K3s).
//! 2. `GET /cacerts` without verification, checked against the token's CA hash when it has
//!    one (a mismatch is fatal), kept as `<data-dir>/agent/server-ca.crt`.
//! 3. A kubelet client certificate from `GET /v1-k3s/client-kubelet.crt` (basic auth
//!    `node:<password>`, headers `K3s-Node-Name`/`K3s-Node-Password`, as in K3s), kept as
//!    `<data-dir>/agent/client-kubelet.{crt,key}`.
//! 4. `<data-dir>/agent/kubelet.kubeconfig`: server `https://127.0.0.1:<lb-server-port>`,
//!    and those three files as paths, as K3s writes it.
//! 5. The client load balancer on `127.0.0.1:<lb-server-port>` (see `lb`), its server
//!    list kept in `<data-dir>/agent/etc/k3s-agent-load-balancer.json`.
//! 6. Every 5 s, registers its Node (no role labels) with a server (`node:<password>`),
//!    failing over between the servers `/v1-k3s/apiservers` lists. `READY=1` after the first
//!    registration.
//!
//! The node password is random, kept in `/etc/rancher/node/password` with the default
//! data folder, else in `<data-dir>/node-password`.

use std::time::Duration;

use tokio::net::TcpListener;

use crate::client::{base_url, fetch_cacerts, trusting};
use crate::files::{node_password, node_password_path, write_atomic};
use crate::lb::Upstreams;
use crate::log::{error, info};
use crate::nodes::{node_object, uuid, NodeInfo, Role, HEARTBEAT_EVERY};
use crate::settings::Settings;
use crate::token::Token;

/// Between attempts while no server answers.
const RETRY: Duration = Duration::from_secs(2);
/// Each request's timeout.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the agent until the process is stopped.
pub async fn run(settings: Settings) -> Result<(), String> {
    let server = settings
        .get("server")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| "--server is required".to_owned())?;
    let base = base_url(server)?;
    let token = Token::parse(
        &settings
            .token_text()?
            .ok_or_else(|| "--token is required".to_owned())?,
    )?;
    let data_dir = settings.data_dir();
    let agent_dir = data_dir.join("agent");
    let lb_port = settings.port("lb-server-port", 6444)?;
    let node_name = settings.node_name();
    let password = node_password(&node_password_path(&data_dir, settings.default_data_dir()))?;
    let internal_ip = settings.internal_ip()?;

    let upstreams = Upstreams::new(&base, agent_dir.join("etc/k3s-agent-load-balancer.json"));
    let ca_pem = from_any_server(&upstreams, "the server CA", |server| async move {
        fetch_cacerts(&format!("https://{server}"), TIMEOUT).await
    })
    .await;
    token.check_hash(&crate::token::sha256_hex(ca_pem.as_bytes()))?;
    let ca_path = agent_dir.join("server-ca.crt");
    write_atomic(&ca_path, ca_pem.as_bytes(), 0o644)?;
    let client = trusting(&ca_pem, TIMEOUT)?;

    let pem = from_any_server(&upstreams, "the kubelet certificate", |server| {
        let (client, token, node_name, password) = (&client, &token, &node_name, &password);
        async move { kubelet_certificate(client, &server, token, node_name, password).await }
    })
    .await;
    let key_at = pem
        .find("-----BEGIN PRIVATE KEY-----")
        .ok_or_else(|| "the kubelet certificate came without its key".to_owned())?;
    let cert_path = agent_dir.join("client-kubelet.crt");
    let key_path = agent_dir.join("client-kubelet.key");
    write_atomic(&cert_path, &pem.as_bytes()[..key_at], 0o644)?;
    write_atomic(&key_path, &pem.as_bytes()[key_at..], 0o600)?;
    let kubeconfig_path = agent_dir.join("kubelet.kubeconfig");
    let kubeconfig = crate::kubeconfig::kubelet(
        &format!("https://127.0.0.1:{lb_port}"),
        &ca_path,
        &cert_path,
        &key_path,
    );
    write_atomic(&kubeconfig_path, kubeconfig.as_bytes(), 0o600)?;
    info(&format!("k3s fixture: wrote {}", kubeconfig_path.display()));

    let listener = TcpListener::bind(("127.0.0.1", lb_port))
        .await
        .map_err(|err| format!("failed to listen on 127.0.0.1:{lb_port}: {err}"))?;
    info(&format!(
        "k3s fixture: client load balancer on 127.0.0.1:{lb_port}"
    ));
    tokio::spawn(crate::lb::serve(listener, upstreams.clone()));

    let node = NodeInfo {
        name: node_name.clone(),
        internal_ip,
        external_ips: settings.list("node-external-ip"),
        labels: settings.list("node-label"),
        taints: settings.list("node-taint"),
        role: Role::Agent,
        password,
        uid: uuid(),
    };
    let mut every = tokio::time::interval(HEARTBEAT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ready = false;
    let mut last_error: Option<String> = None;
    loop {
        every.tick().await;
        match register(&client, &upstreams, &token, &node).await {
            Ok(server) => {
                last_error = None;
                if !ready {
                    ready = true;
                    info(&format!(
                        "k3s fixture agent is up: node {node_name} registered with {server}; \
                         effective: node-name={node_name} node-ip={} lb-server-port={lb_port} \
                         data-dir={} token=<redacted>",
                        node.internal_ip,
                        data_dir.display()
                    ));
                    crate::notify::ready("k3s fixture agent is up");
                }
            }
            Err(err) => {
                if last_error.as_ref() != Some(&err) {
                    error(&format!(
                        "k3s fixture: cannot register node {node_name}: {err}"
                    ));
                }
                last_error = Some(err);
            }
        }
    }
}

/// The PEM of a kubelet client certificate and its key, from `server` (`host:port`).
async fn kubelet_certificate(
    client: &reqwest::Client,
    server: &str,
    token: &Token,
    node_name: &str,
    password: &str,
) -> Result<String, String> {
    let url = format!("https://{server}/v1-k3s/client-kubelet.crt");
    let response = client
        .get(&url)
        .basic_auth("node", Some(&token.password))
        .header("K3s-Node-Name", node_name)
        .header("K3s-Node-Password", password)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let code = response.status();
    let body = response
        .text()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if code.is_success() {
        Ok(body)
    } else {
        Err(format!("GET {url}: {code}: {}", body.trim()))
    }
}

/// Registers `node` with the first server of `upstreams` that takes it, and learns the
/// live servers from it; the server's `host:port`.
async fn register(
    client: &reqwest::Client,
    upstreams: &Upstreams,
    token: &Token,
    node: &NodeInfo,
) -> Result<String, String> {
    let body = node_object(node).to_string();
    let mut errors = Vec::new();
    for server in upstreams.snapshot() {
        let url = format!("https://{server}/api/v1/nodes");
        let response = client
            .post(&url)
            .basic_auth("node", Some(&token.password))
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match response {
            Ok(response) if response.status().is_success() => {
                let others = live_servers(client, &server, token)
                    .await
                    .unwrap_or_default();
                upstreams.update(&server, &others);
                return Ok(server);
            }
            Ok(response) => {
                let code = response.status();
                let text = response.text().await.unwrap_or_default();
                errors.push(format!("{server}: {code}: {}", text.trim()));
            }
            Err(err) => errors.push(format!("{server}: {err}")),
        }
    }
    Err(errors.join("; "))
}

/// `GET /v1-k3s/apiservers` of `server`.
async fn live_servers(
    client: &reqwest::Client,
    server: &str,
    token: &Token,
) -> Result<Vec<String>, String> {
    let response = client
        .get(format!("https://{server}/v1-k3s/apiservers"))
        .basic_auth("node", Some(&token.password))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let value = crate::client::json_value(response).await?;
    Ok(value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect())
}

/// The first answer of `ask` from the known servers, in order; round after round, every
/// [`RETRY`], until one answers (logging what each said, naming `what`).
async fn from_any_server<T, F, Fut>(upstreams: &Upstreams, what: &str, mut ask: F) -> T
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    loop {
        let mut errors = Vec::new();
        for server in upstreams.snapshot() {
            match ask(server).await {
                Ok(answer) => return answer,
                Err(err) => errors.push(err),
            }
        }
        error(&format!(
            "k3s fixture: waiting for {what}: {}",
            errors.join("; ")
        ));
        tokio::time::sleep(RETRY).await;
    }
}
