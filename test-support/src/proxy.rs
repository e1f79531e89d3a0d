//! `pimesh-proxy` processes on loopback ports, and a mesh of two of them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;

use crate::binary::Binary;
use crate::daemon::Daemon;
use crate::http::{get_blocking, get_text, sample};
use crate::pki::Site;
use crate::ports::{free_addr, free_port};

/// Where and how a proxy runs.
pub struct ProxyOptions<'a> {
    /// The log (`<name>.log`) and, without `identity`, an empty identity folder go here.
    pub dir: &'a Path,
    pub name: &'a str,
    /// The site config file (it need not exist).
    pub config: &'a Path,
    pub identity: Option<&'a Path>,
    pub inbound_port: u16,
    /// Where the services' local ports listen (distinct per proxy on one host).
    pub local_ip: &'a str,
}

/// A running `pimesh-proxy`; admin and outbound ports are free ones.
pub struct Proxy {
    pub daemon: Daemon,
    pub admin: SocketAddr,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub log: PathBuf,
}

impl Proxy {
    /// Starts a proxy and waits until `/ready` answers 200.
    pub async fn start(options: ProxyOptions<'_>) -> Proxy {
        Proxy::start_with(options, &[]).await
    }

    /// [`Proxy::start`] with `extra` arguments (e.g. `--control`, `--state-dir`).
    pub async fn start_with(options: ProxyOptions<'_>, extra: &[String]) -> Proxy {
        let mut proxy = Proxy::spawn(&options, extra, |_| {});
        proxy.wait_ready().await;
        proxy
    }

    /// Starts a proxy without waiting for it; `adjust` may change the command first.
    pub fn spawn(
        options: &ProxyOptions<'_>,
        extra: &[String],
        adjust: impl FnOnce(&mut Command),
    ) -> Proxy {
        let log = options.dir.join(format!("{}.log", options.name));
        let admin = free_addr();
        let outbound = free_addr();
        let inbound = SocketAddr::from(([127, 0, 0, 1], options.inbound_port));
        let empty = options.dir.join("no-identity");
        let identity = options.identity.unwrap_or(&empty);
        let mut command = Daemon::command(Binary::Proxy, "debug");
        command
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--outbound-addr")
            .arg(outbound.to_string())
            .arg("--inbound-addr")
            .arg(inbound.to_string())
            .arg("--local-ip")
            .arg(options.local_ip)
            .arg("--config")
            .arg(options.config)
            .arg("--identity-dir")
            .arg(identity)
            .args(extra);
        adjust(&mut command);
        Proxy {
            daemon: Daemon::spawn(options.name, command, Some(&log)),
            admin,
            inbound,
            outbound,
            log,
        }
    }

    /// Waits until `/ready` answers 200.
    ///
    /// # Panics
    /// When the proxy exits first or at the deadline, with its log.
    pub async fn wait_ready(&mut self) {
        let admin = self.admin;
        self.daemon
            .wait_until("ready", || async move {
                matches!(get_text(admin, "/ready").await, Ok((200, _)))
            })
            .await;
    }

    /// `/config` as JSON.
    ///
    /// # Panics
    /// When `/config` does not answer JSON.
    pub async fn config(&self) -> serde_json::Value {
        let (_, body) = get_text(self.admin, "/config").await.expect("/config");
        serde_json::from_str(&body).expect("/config is JSON")
    }

    /// `GET path` on the admin port, from a test without an async runtime.
    ///
    /// # Panics
    /// When nothing answers, with the log.
    pub fn get_blocking(&self, path: &str) -> (u16, String) {
        get_blocking(self.admin, path)
            .unwrap_or_else(|| panic!("GET {path} failed; log:\n{}", self.log_text()))
    }

    /// [`Proxy::config`] for tests without an async runtime.
    ///
    /// # Panics
    /// When `/config` does not answer 200 and JSON.
    pub fn config_blocking(&self) -> serde_json::Value {
        let (code, body) = self.get_blocking("/config");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|err| panic!("/config: {err}: {body}"))
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }

    /// # Panics
    /// When `/metrics` does not answer.
    pub async fn metrics(&self) -> String {
        get_text(self.admin, "/metrics").await.expect("/metrics").1
    }

    /// The value of the sample `line_start` (name and labels, exactly as exposed), or 0
    /// when there is no such sample yet.
    pub async fn metric(&self, line_start: &str) -> f64 {
        sample(&self.metrics().await, line_start)
    }

    pub fn signal(&self, signal: Signal) {
        self.daemon.signal(signal);
    }
}

/// Two proxies of one site, nodes `a` and `b`, sharing one `cluster.toml`; backends run
/// in the test process and are placed on node `b`.
pub struct Mesh {
    _dir: tempfile::TempDir,
    pub config: PathBuf,
    pub a: Proxy,
    pub b: Proxy,
}

/// Starts proxies a and b; `services` is the config after the `[nodes]` tables.
pub async fn mesh(site: &Site, services: &str) -> Mesh {
    mesh_with(site, "", services).await
}

/// [`mesh`] with `proxy_settings` added to the `[proxy]` table.
///
/// # Panics
/// When the files cannot be written or a proxy does not become ready.
pub async fn mesh_with(site: &Site, proxy_settings: &str, services: &str) -> Mesh {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a_port, b_port) = (free_port(), free_port());
    // The connection limit is set low so that many test proxies fit the open-file limit.
    let text = format!(
        "site = \"{}\"\n[proxy]\nmax_connections = 1000\n{proxy_settings}\n\
         [nodes.a]\naddress = \"127.0.0.1:{a_port}\"\n\
         [nodes.b]\naddress = \"127.0.0.1:{b_port}\"\n{services}",
        site.name
    );
    let config = dir.path().join("cluster.toml");
    std::fs::write(&config, text).expect("config");
    let a_id = site.identity_dir(dir.path(), "a", &[]);
    let b_id = site.identity_dir(dir.path(), "b", &[]);
    let b = Proxy::start(ProxyOptions {
        dir: dir.path(),
        name: "b",
        config: &config,
        identity: Some(&b_id),
        inbound_port: b_port,
        local_ip: "127.0.0.2",
    })
    .await;
    let a = Proxy::start(ProxyOptions {
        dir: dir.path(),
        name: "a",
        config: &config,
        identity: Some(&a_id),
        inbound_port: a_port,
        local_ip: "127.0.0.1",
    })
    .await;
    Mesh {
        _dir: dir,
        config,
        a,
        b,
    }
}
