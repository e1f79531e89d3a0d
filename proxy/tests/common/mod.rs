//! The test harness of the data-plane tests: a site's trust root and node identities
//! (real certificates from `pimesh-identity`), real `pimesh-proxy` processes on loopback
//! ports, and real backends (HTTP/1, HTTP/2, TCP echo) and a span collector in the test
//! process. Waits have deadlines; nothing asserts on speed.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pimesh_identity::{LeafRequest, SpiffeId, TrustRoot};
use pimesh_schema::DnsLabel;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// Generous: a loaded CI machine may be slow; a passing run never waits this long.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn label(text: &str) -> DnsLabel {
    DnsLabel::try_from(text.to_owned()).expect("a valid label")
}

/// A site trust root: anchor and issuer, made fresh for each test.
pub struct Site {
    pub name: DnsLabel,
    pub root: TrustRoot,
}

impl Site {
    pub fn new(name: &str) -> Site {
        let name = label(name);
        let root = TrustRoot::generate(&name, SystemTime::now()).expect("a trust root");
        Site { name, root }
    }

    pub fn node_id(&self, node: &str) -> SpiffeId {
        SpiffeId::node(&self.name, &label(node))
    }

    /// `(chain PEM, key PEM)` of a leaf for `node` (and `services`), valid from
    /// `now - 1 min` for `lifetime` where `now` is `at`.
    pub fn leaf(
        &self,
        node: &str,
        services: &[&str],
        at: SystemTime,
        lifetime: Duration,
    ) -> (String, String) {
        let mut ids = vec![self.node_id(node)];
        ids.extend(
            services
                .iter()
                .map(|s| SpiffeId::service(&self.name, &label(s))),
        );
        let request = LeafRequest::new(&ids).expect("a CSR");
        let permitted: BTreeSet<SpiffeId> = ids.iter().cloned().collect();
        let leaf = self
            .root
            .issuer
            .sign_leaf_for(&request.csr, &self.name, &permitted, at, lifetime)
            .expect("a signed leaf");
        (
            format!("{}{}", leaf.pem, self.root.issuer.cert_pem()),
            request.key.serialize_pem(),
        )
    }

    /// Writes `node.pem`, `node.key` and `anchor.pem` for `node` into `dir/<node>-id`.
    pub fn identity_dir(&self, dir: &Path, node: &str, services: &[&str]) -> PathBuf {
        let (chain, key) = self.leaf(
            node,
            services,
            SystemTime::now(),
            Duration::from_secs(86_400),
        );
        let out = dir.join(format!("{node}-id"));
        std::fs::create_dir_all(&out).expect("identity dir");
        std::fs::write(out.join("node.pem"), chain).expect("node.pem");
        std::fs::write(out.join("node.key"), key).expect("node.key");
        std::fs::write(out.join("anchor.pem"), self.root.anchor.cert_pem()).expect("anchor.pem");
        out
    }
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A running `pimesh-proxy` process.
pub struct Proxy {
    pub child: Child,
    pub admin: SocketAddr,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub log: PathBuf,
}

pub struct ProxyOptions<'a> {
    pub dir: &'a Path,
    pub name: &'a str,
    pub config: &'a Path,
    pub identity: Option<&'a Path>,
    pub inbound_port: u16,
    /// Where the services' local ports listen (distinct per proxy on one host).
    pub local_ip: &'a str,
}

impl Proxy {
    pub async fn start(options: ProxyOptions<'_>) -> Proxy {
        Proxy::start_with(options, &[]).await
    }

    /// [`Proxy::start`] with `extra` arguments after the usual ones.
    pub async fn start_with(options: ProxyOptions<'_>, extra: &[String]) -> Proxy {
        let log = options.dir.join(format!("{}.log", options.name));
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let outbound: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let inbound: SocketAddr = ([127, 0, 0, 1], options.inbound_port).into();
        let empty = options.dir.join("no-identity");
        let identity = options.identity.unwrap_or(&empty);
        let child = Command::new(env!("CARGO_BIN_EXE_pimesh-proxy"))
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
            .args(extra)
            .env("RUST_LOG", "debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .env_remove("CREDENTIALS_DIRECTORY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start pimesh-proxy");
        let mut proxy = Proxy {
            child,
            admin,
            inbound,
            outbound,
            log,
        };
        proxy.wait_ready().await;
        proxy
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("pimesh-proxy exited ({status}):\n{}", self.log_text());
            }
            if let Ok((200, _)) = get_text(self.admin, "/ready").await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pimesh-proxy not ready:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        get_text(self.admin, "/metrics").await.expect("/metrics").1
    }

    /// The value of the sample `line_start` (name and labels, exactly as exposed), or 0
    /// when there is no such sample yet.
    pub async fn metric(&self, line_start: &str) -> f64 {
        sample(&self.metrics().await, line_start)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("signal the proxy");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the first sample whose line starts with `line_start` followed by a space.
pub fn sample(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(line_start)?.strip_prefix(' ')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0.0)
}

/// `GET http://<addr><path>` over a fresh HTTP/1.1 connection: (status, body).
pub async fn get_text(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
}

pub type BackendBody = BoxBody<Bytes, hyper::Error>;

/// An HTTP backend on 127.0.0.1 speaking HTTP/1.1 or prior-knowledge HTTP/2 (the
/// protocol is detected per connection by hyper-util's auto builder). `GET` answers
/// `<name>\n`; `POST /echo` streams the request body back chunk by chunk as it arrives.
pub struct Backend {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::start_on(name, 0).await
    }

    /// [`Backend::start`] on a given port (0: any free one).
    pub async fn start_on(name: &str, port: u16) -> Backend {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind backend");
        let port = listener.local_addr().expect("addr").port();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let name: Arc<str> = name.into();
        let record = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = Arc::clone(&name);
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let name = Arc::clone(&name);
                        let record = Arc::clone(&record);
                        async move {
                            record.lock().expect("lock").push(Seen {
                                method: request.method().to_string(),
                                path: request.uri().path().to_owned(),
                                version: request.version(),
                                headers: request.headers().clone(),
                            });
                            Ok::<_, Infallible>(answer(&name, request))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend { port, seen, task }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(name: &str, request: Request<Incoming>) -> Response<BackendBody> {
    if request.uri().path() == "/echo" {
        return Response::new(request.into_body().boxed());
    }
    if let Some(code) = request.uri().path().strip_prefix("/status/") {
        let status = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok());
        let mut response = Response::new(full(format!("{name}\n")));
        *response.status_mut() = status.unwrap_or(StatusCode::BAD_REQUEST);
        return response;
    }
    Response::new(full(format!("{name}\n")))
}

pub fn full(text: impl Into<Bytes>) -> BackendBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A TCP echo server on 127.0.0.1.
pub async fn tcp_echo() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (port, task)
}

/// A Zipkin v2 collector: records every JSON span POSTed to it.
pub struct Collector {
    pub url: String,
    pub spans: Arc<Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("addr");
        let spans: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let record = Arc::clone(&spans);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let record = Arc::clone(&record);
                        async move {
                            let body = request.into_body().collect().await?.to_bytes();
                            if let Ok(serde_json::Value::Array(batch)) =
                                serde_json::from_slice::<serde_json::Value>(&body)
                            {
                                record.lock().expect("lock").extend(batch);
                            }
                            let mut response = Response::new(full(""));
                            *response.status_mut() = StatusCode::ACCEPTED;
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector {
            url: format!("http://{addr}/api/v2/spans"),
            spans,
            task,
        }
    }

    pub fn spans(&self) -> Vec<serde_json::Value> {
        self.spans.lock().expect("lock").clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `text` to `file` atomically (temp and rename), as the supervisor does.
pub fn replace(file: &Path, text: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, file).expect("rename");
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
