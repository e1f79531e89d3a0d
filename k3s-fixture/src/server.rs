//! `k3s server` as the fixture runs it.
//!
//! 1. Token: `--token`/`token:`/`K3S_TOKEN` (or `--token-file`); a first server without
//!    one reuses `<data-dir>/server/token` or makes a random password. A joining server
//!    (`--server`) must have one.
//! 2. Cluster CA, kept in `<data-dir>/server/tls/server-ca.{crt,key}`. The first server
//!    makes it once; a joining server without one fetches `/cacerts` from `--server`
//!    (checked against the token's CA hash, when it has one; a mismatch is fatal with
//!    K3s's message) and then the CA key from `/v1-k3s/server-bootstrap`, authenticated as
//!    `server:<password>` — K3s hands joining servers its bootstrap data (CA keys among
//!    it) the same way, so all servers share one CA, as in K3s. While `--server` cannot be
//!    reached the joining server retries; a refused token is fatal.
//! 3. `<data-dir>/server/token` (0600) in the full form `K10<CA hash>::server:<password>`.
//! 4. Serving certificate (SANs: 127.0.0.1, ::1, localhost, the kubernetes service names,
//!    node IPs, `--tls-san`, `--advertise-address`, the host name and node name) and the
//!    admin client certificate; the admin kubeconfig (`--write-kubeconfig`, mode
//!    `--write-kubeconfig-mode`, server `https://127.0.0.1:<https-listen-port>`).
//! 5. The manifests in `<data-dir>/server/manifests/` applied once (see `manifests`; the
//!    `kubernetes` Service gets `.1` of `--service-cidr`), then every 2 s in the background.
//!    HTTPS on `<bind-address>:<https-listen-port>` (see `api`); its own Node in its table;
//!    with embedded etcd (cluster-init or `--server`) the exchanges of `peers`. The node
//!    table is kept in `<data-dir>/server/db/fixture-nodes.json` (the datastore's
//!    stand-in) and read back on start, so a restarted server counts its cluster's
//!    servers for quorum before any of them answers; its copy of the Leases likewise, in
//!    `<data-dir>/server/db/fixture-leases.json` (see `sitewide`).
//! 6. `READY=1` to systemd once listening with the kubeconfig written.
//!
//! Simplifications: no Kubernetes components run; no `node-token`/`agent-token`
//! variants beyond a `node-token` symlink; no symlink from the default kubeconfig path to
//! `--write-kubeconfig`; `--datastore-endpoint` and `--disable-agent` are accepted and
//! ignored.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::net::TcpListener;

use crate::client::{base_url, fetch_cacerts, trusting};
use crate::cluster::{url_of, ClusterState};
use crate::files::{node_password, node_password_path, write_atomic};
use crate::leases::Leases;
use crate::log::{info, now_secs};
use crate::manifests::Watcher;
use crate::nodes::{node_object, uuid, NodeInfo, Role};
use crate::objects::{Cidr, Store};
use crate::pki::Ca;
use crate::settings::{Settings, DEFAULT_KUBECONFIG};
use crate::token::Token;

/// Between two attempts to reach the server a joining server joins through.
const RETRY: Duration = Duration::from_secs(2);

/// Runs the server until the process is stopped.
pub async fn run(settings: Settings) -> Result<(), String> {
    let data_dir = settings.data_dir();
    let server_dir = data_dir.join("server");
    let tls_dir = server_dir.join("tls");
    let port = settings.port("https-listen-port", 6443)?;
    let bind: IpAddr = settings
        .get("bind-address")
        .filter(|b| !b.is_empty())
        .unwrap_or("0.0.0.0")
        .parse()
        .map_err(|_| "invalid bind-address: not an IP address".to_owned())?;
    let join = settings
        .get("server")
        .filter(|s| !s.is_empty())
        .map(base_url)
        .transpose()?;
    let etcd = settings.flag("cluster-init") || join.is_some();
    let node_name = settings.node_name();
    let internal_ip = settings.internal_ip()?;
    let service_cidr = Cidr::from_flag(&settings.list("service-cidr"))?;

    let token = match settings.token_text()? {
        Some(text) => Token::parse(&text)?,
        None if join.is_some() => {
            return Err("--token is required when joining a cluster with --server".to_owned())
        }
        None => match std::fs::read_to_string(server_dir.join("token")) {
            Ok(text) => Token::parse(&text)?,
            Err(_) => Token::generate()?,
        },
    };

    let ca = match (Ca::load(&tls_dir)?, &join) {
        (Some(ca), _) => ca,
        (None, Some(url)) => {
            let ca = fetch_cluster_ca(url, &token).await?;
            ca.store(&tls_dir)?;
            info(&format!("k3s fixture: got the cluster CA from {url}"));
            ca
        }
        (None, None) => {
            let (ca, _) = Ca::load_or_create(&tls_dir)?;
            info("k3s fixture: made a new cluster CA");
            ca
        }
    };
    let hash = ca.hash();
    token.check_hash(&hash)?;
    write_atomic(
        &server_dir.join("token"),
        format!("{}\n", token.full(&hash)).as_bytes(),
        0o600,
    )?;
    let node_token = server_dir.join("node-token");
    if std::fs::symlink_metadata(&node_token).is_err() {
        let _ = std::os::unix::fs::symlink("token", &node_token);
    }

    let advertise_ip: IpAddr = match settings.get("advertise-address").filter(|a| !a.is_empty()) {
        Some(a) => a
            .parse()
            .map_err(|_| format!("invalid advertise-address {a:?}"))?,
        None => internal_ip,
    };
    let advertise_port = settings.port("advertise-port", port)?;
    let mut sans: Vec<String> = [
        "127.0.0.1",
        "::1",
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    sans.push(service_cidr.nth(1).to_string());
    sans.push(internal_ip.to_string());
    sans.push(advertise_ip.to_string());
    sans.extend(settings.list("node-ip"));
    sans.extend(settings.list("node-external-ip"));
    sans.extend(settings.list("tls-san"));
    sans.push(crate::files::hostname());
    sans.push(node_name.clone());
    if !bind.is_unspecified() {
        sans.push(bind.to_string());
    }
    let serving = ca.serving(&sans)?;
    write_atomic(
        &tls_dir.join("serving-kube-apiserver.crt"),
        serving.cert_pem.as_bytes(),
        0o644,
    )?;
    write_atomic(
        &tls_dir.join("serving-kube-apiserver.key"),
        serving.key_pem.as_bytes(),
        0o600,
    )?;
    let admin = ca.client("system:admin", &["system:masters"])?;
    write_atomic(
        &tls_dir.join("client-admin.crt"),
        admin.cert_pem.as_bytes(),
        0o644,
    )?;
    write_atomic(
        &tls_dir.join("client-admin.key"),
        admin.key_pem.as_bytes(),
        0o600,
    )?;

    let listener = TcpListener::bind((bind, port))
        .await
        .map_err(|err| format!("failed to listen on {bind}:{port}: {err}"))?;
    info(&format!("k3s fixture: listening on {bind}:{port}"));

    let own_url = url_of(std::net::SocketAddr::new(advertise_ip, advertise_port));
    let db_path = server_dir.join("db/fixture-nodes.json");
    let leases_path = server_dir.join("db/fixture-leases.json");
    let leases = match std::fs::read(&leases_path) {
        Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|snapshot| Leases::restore(&snapshot))
            .unwrap_or_else(|| {
                crate::log::warn(&format!(
                    "k3s fixture: ignoring {}: not a copy of the Leases",
                    leases_path.display()
                ));
                Leases::default()
            }),
        Err(_) => Leases::default(),
    };
    let peer_client = if etcd {
        Some(trusting(&ca.cert_pem, crate::peers::TIMEOUT)?)
    } else {
        None
    };
    let state = Arc::new(ClusterState::new(
        ca.clone(),
        token.password.clone(),
        node_name.clone(),
        own_url,
        etcd,
        Store::new(service_cidr),
        peer_client.clone(),
    ));
    state.replica().store = leases;
    let own = NodeInfo {
        name: node_name.clone(),
        internal_ip,
        external_ips: settings.list("node-external-ip"),
        labels: settings.list("node-label"),
        taints: settings.list("node-taint"),
        role: Role::Server {
            etcd,
            https_port: advertise_port,
        },
        password: node_password(&node_password_path(&data_dir, settings.default_data_dir()))?,
        uid: uuid(),
    };
    if let Ok(bytes) = std::fs::read(&db_path) {
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(snapshot) => *state.table() = crate::nodes::Table::restore(&snapshot),
            Err(err) => crate::log::warn(&format!(
                "k3s fixture: ignoring {}: {err}",
                db_path.display()
            )),
        }
    }
    state
        .table()
        .register(node_object(&own), now_secs())
        .map_err(|err| format!("cannot register this server's node {node_name}: {err:?}"))?;
    let mut manifests = Watcher::new(server_dir.join("manifests"), service_cidr);
    manifests.scan(&mut state.objects());
    tokio::spawn(manifests.run(state.clone()));
    tokio::spawn(crate::api::serve(
        listener,
        crate::api::tls_config(&ca.cert_pem, &serving)?,
        state.clone(),
    ));

    let kubeconfig_path = settings
        .get("write-kubeconfig")
        .filter(|p| !p.is_empty())
        .unwrap_or(DEFAULT_KUBECONFIG)
        .to_owned();
    let host = if bind.is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        url_host(bind)
    };
    let kubeconfig = crate::kubeconfig::admin(
        &format!("https://{host}:{port}"),
        &ca.cert_pem,
        &admin.cert_pem,
        &admin.key_pem,
    );
    crate::kubeconfig::write(
        Path::new(&kubeconfig_path),
        &kubeconfig,
        settings.get("write-kubeconfig-mode"),
    )?;
    info(&format!("Wrote kubeconfig {kubeconfig_path}"));

    tokio::spawn(crate::peers::heartbeat(state.clone(), own.clone()));
    tokio::spawn(keep(state.clone(), db_path, leases_path));
    if let Some(client) = peer_client {
        tokio::spawn(crate::peers::replicate(state.clone(), client, join, own));
    }
    let datastore = if etcd {
        "embedded etcd (fixture stand-in)"
    } else {
        "sqlite (fixture stand-in)"
    };
    info(&format!(
        "k3s fixture server is up: node {node_name}, https://{host}:{port}, datastore {datastore}; \
         effective: node-name={node_name} node-ip={internal_ip} https-listen-port={port} \
         bind-address={bind} data-dir={} write-kubeconfig={kubeconfig_path} \
         write-kubeconfig-mode={} token=<redacted>",
        data_dir.display(),
        settings.get("write-kubeconfig-mode").unwrap_or("0600"),
    ));
    crate::notify::ready("k3s fixture server is up");
    std::future::pending::<()>().await;
    Ok(())
}

/// Writes the node table to `nodes` and this server's copy of the Leases to `leases`
/// whenever they changed (checked every 2 s): the stand-in for the datastore, so that a
/// restarted server knows its cluster's nodes and servers (and so its quorum) before any
/// other server answers, and starts from the Leases it had.
async fn keep(state: Arc<ClusterState>, nodes: PathBuf, leases: PathBuf) {
    let mut kept_nodes = None;
    let mut kept_leases = None;
    let mut every = tokio::time::interval(crate::peers::EXCHANGE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let (version, snapshot) = {
            let table = state.table();
            (table.version(), table.snapshot())
        };
        if kept_nodes != Some(version) {
            match write_atomic(&nodes, snapshot.to_string().as_bytes(), 0o600) {
                Ok(()) => kept_nodes = Some(version),
                Err(err) => crate::log::warn(&format!("k3s fixture: {err}")),
            }
        }
        let (version, snapshot) = {
            let replica = state.replica();
            (replica.store.version(), replica.store.snapshot())
        };
        if kept_leases != Some(version) {
            match write_atomic(&leases, snapshot.to_string().as_bytes(), 0o600) {
                Ok(()) => kept_leases = Some(version),
                Err(err) => crate::log::warn(&format!("k3s fixture: {err}")),
            }
        }
    }
}

/// An IP address as a URL host (IPv6 in brackets).
fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Whether a failure is worth another attempt.
enum Failure {
    Retry(String),
    Fatal(String),
}

/// The cluster CA, from the server at `url`.
async fn fetch_cluster_ca(url: &str, token: &Token) -> Result<Ca, String> {
    loop {
        match try_fetch_cluster_ca(url, token).await {
            Ok(ca) => return Ok(ca),
            Err(Failure::Fatal(err)) => return Err(err),
            Err(Failure::Retry(err)) => {
                crate::log::error(&format!(
                    "k3s fixture: cannot get the cluster CA from {url}: {err}; retrying"
                ));
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

async fn try_fetch_cluster_ca(url: &str, token: &Token) -> Result<Ca, Failure> {
    let cacerts = fetch_cacerts(url, crate::peers::TIMEOUT)
        .await
        .map_err(Failure::Retry)?;
    token
        .check_hash(&crate::token::sha256_hex(cacerts.as_bytes()))
        .map_err(Failure::Fatal)?;
    let client = trusting(&cacerts, crate::peers::TIMEOUT).map_err(Failure::Fatal)?;
    let bootstrap_url = format!("{url}/v1-k3s/server-bootstrap");
    let response = client
        .get(&bootstrap_url)
        .basic_auth("server", Some(&token.password))
        .send()
        .await
        .map_err(|e| Failure::Retry(format!("GET {bootstrap_url}: {e}")))?;
    let code = response.status();
    if code == reqwest::StatusCode::UNAUTHORIZED || code == reqwest::StatusCode::FORBIDDEN {
        return Err(Failure::Fatal(format!(
            "failed to get bootstrap data from {url}: {code} (the token is not this cluster's server token)"
        )));
    }
    if !code.is_success() {
        return Err(Failure::Retry(format!("GET {bootstrap_url}: {code}")));
    }
    let data = crate::client::json_value(response)
        .await
        .map_err(|e| Failure::Retry(format!("GET {bootstrap_url}: {e}")))?;
    let field = |name: &str| -> Result<String, Failure> {
        let content = data[name]["Content"]
            .as_str()
            .ok_or_else(|| Failure::Fatal(format!("bootstrap data without {name}")))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(content)
            .map_err(|e| Failure::Fatal(format!("bootstrap data {name}: {e}")))?;
        String::from_utf8(bytes).map_err(|e| Failure::Fatal(format!("bootstrap data {name}: {e}")))
    };
    let ca = Ca::from_pem(field("ServerCA")?, field("ServerCAKey")?).map_err(Failure::Fatal)?;
    if ca.cert_pem != cacerts {
        return Err(Failure::Fatal(format!(
            "the bootstrap data of {url} has another CA than its /cacerts"
        )));
    }
    Ok(ca)
}
