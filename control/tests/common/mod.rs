//! What the replica's tests share: a site with its trust root, node credentials, the
//! replica binary as a child process, and clients in plain HTTP and mutual TLS.

#![allow(dead_code)] // each test file uses a part

use std::collections::BTreeSet;
use std::io::{BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pimesh_identity::{LeafRequest, SpiffeId, TrustRoot};
use pimesh_schema::DnsLabel;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

pub fn label(s: &str) -> DnsLabel {
    DnsLabel::try_from(s.to_owned()).expect("label")
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub struct TestSite {
    pub name: DnsLabel,
    pub root: TrustRoot,
}

/// A client certificate chain (leaf, issuer) and its key.
pub struct Credential {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Vec<u8>,
}

impl TestSite {
    pub fn new(name: &str) -> TestSite {
        let root = TrustRoot::generate(&label(name), SystemTime::now()).expect("trust root");
        TestSite {
            name: label(name),
            root,
        }
    }

    /// Writes the trust folder a replica reads: anchor.pem, issuer.pem, issuer.key.
    pub fn write_trust(&self, dir: &Path) {
        std::fs::create_dir_all(dir).expect("trust dir");
        std::fs::write(dir.join("anchor.pem"), self.root.anchor.cert_pem()).expect("anchor");
        std::fs::write(dir.join("issuer.pem"), self.root.issuer.cert_pem()).expect("issuer");
        std::fs::write(dir.join("issuer.key"), self.root.issuer.key_pem()).expect("key");
    }

    pub fn node_id(&self, node: &str) -> SpiffeId {
        SpiffeId::node(&self.name, &label(node))
    }

    pub fn svc_id(&self, svc: &str) -> SpiffeId {
        SpiffeId::service(&self.name, &label(svc))
    }

    /// A node credential of `node`, as `pimeshctl node sign` makes them.
    pub fn node_credential(&self, node: &str) -> Credential {
        let id = self.node_id(node);
        let request = LeafRequest::new(std::slice::from_ref(&id)).expect("request");
        let leaf = self
            .root
            .issuer
            .sign_leaf(
                &request.csr,
                &self.name,
                &BTreeSet::from([id]),
                SystemTime::now(),
            )
            .expect("leaf");
        Credential {
            chain: vec![leaf.der, self.root.issuer.cert_der().clone()],
            key: request.key.serialize_der(),
        }
    }
}

/// The replica binary, killed when dropped.
pub struct Replica {
    pub child: Child,
    pub port: u16,
}

impl Replica {
    /// Starts replica 1 on a free port of 127.0.0.1 with `args` added.
    pub fn start(args: &[&str]) -> Replica {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_pimesh-control"))
            .args(["--replica", "1", "--listen", &listen])
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .env("RUST_LOG", "debug")
            .stderr(Stdio::null())
            .spawn()
            .expect("start pimesh-control");
        let mut replica = Replica { child, port };
        replica.wait_for(|| plain_get(port, "/live").is_some(), "listening");
        replica
    }

    /// Starts a replica of `site` with a trust folder and, when given, a site config, in
    /// `dir`.
    pub fn of_site(dir: &Path, site: &TestSite, config: Option<&str>) -> Replica {
        let trust = dir.join("trust");
        site.write_trust(&trust);
        let config_path = dir.join("cluster.toml");
        if let Some(text) = config {
            std::fs::write(&config_path, text).expect("cluster.toml");
        }
        let mut replica = Replica::start(&[
            "--trust-dir",
            &path(&trust),
            "--config",
            &path(&config_path),
            "--site",
            site.name.as_str(),
        ]);
        replica.wait_ready();
        replica
    }

    pub fn wait_ready(&mut self) {
        let port = self.port;
        self.wait_for(
            || plain_get(port, "/ready").is_some_and(|(status, _)| status == 200),
            "ready",
        );
    }

    pub fn wait_for(&mut self, mut done: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!("pimesh-control exited before {what}: {exit}");
            }
            assert!(
                Instant::now() < deadline,
                "pimesh-control: not {what} in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("signal");
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn path(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_owned()
}

pub fn temp_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_owned();
    (dir, path)
}

/// `GET path` in plain HTTP: the status and the body, `None` when nothing answers.
pub fn plain_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let response = read_response(&mut BufReader::new(stream)).ok()?;
    Some((
        response.status,
        String::from_utf8_lossy(&response.body).into_owned(),
    ))
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response: status line, headers, and a body of its `content-length`.
pub fn read_response(reader: &mut impl std::io::BufRead) -> std::io::Result<HttpResponse> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP status line: {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// A TLS 1.3 client that trusts `anchor` and presents `credential`, if any.
pub fn client_config(
    anchor: &CertificateDer<'static>,
    credential: Option<&Credential>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(anchor.clone()).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    Arc::new(match credential {
        Some(credential) => builder
            .with_client_auth_cert(
                credential.chain.clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(credential.key.clone())),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    })
}

/// One request over a new TLS connection to `localhost:port`; `head` holds extra header
/// lines (each ending in CRLF). An `Err` is what the connection failed with, the TLS
/// alert of a refused handshake included.
pub fn tls_request(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    head: &str,
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n{head}\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    tls_exchange(port, config, &raw)
}

/// Sends `raw` (a whole request, as bytes) over a new TLS connection to `localhost:port`
/// and reads one response.
pub fn tls_exchange(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    raw: &[u8],
) -> std::io::Result<HttpResponse> {
    let name = ServerName::try_from("localhost").expect("name");
    let connection = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    stream.write_all(raw)?;
    stream.flush()?;
    read_response(&mut BufReader::new(stream))
}

/// The TLS alert a refused handshake ended with, from the error of [`tls_request`].
pub fn alert(err: &std::io::Error) -> Option<rustls::AlertDescription> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

/// A `GET /v1/discovery` stream over HTTP/1.1 and TLS: the response head, then the body's
/// lines as they arrive (chunked transfer coding decoded here).
pub struct DiscoveryStream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
    pending: Vec<u8>,
}

impl DiscoveryStream {
    pub fn open(port: u16, config: Arc<rustls::ClientConfig>) -> std::io::Result<DiscoveryStream> {
        let name = ServerName::try_from("localhost").expect("name");
        let connection =
            rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
        let tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut stream = rustls::StreamOwned::new(connection, tcp);
        stream.write_all(b"GET /v1/discovery HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
        stream.flush()?;
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut status_line)?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not a status line: {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut reader, &mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        Ok(DiscoveryStream {
            status,
            headers,
            reader,
            pending: Vec::new(),
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The next line of the body (without its newline); keepalives are empty lines.
    pub fn next_line(&mut self) -> std::io::Result<String> {
        use std::io::{BufRead as _, Read as _};
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            let mut size = String::new();
            self.reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim(), 16)
                .map_err(|_| std::io::Error::other(format!("not a chunk size: {size:?}")))?;
            if size == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk)?;
            self.pending.extend_from_slice(&chunk[..size]);
        }
    }

    /// The next document (skipping keepalives), parsed.
    pub fn next_document(&mut self) -> serde_json::Value {
        loop {
            let line = self.next_line().expect("a line of the discovery stream");
            if !line.is_empty() {
                return serde_json::from_str(&line).expect("a JSON document");
            }
        }
    }

    /// Reads documents until one satisfies `done`; panics after 30 documents or on a
    /// read timeout.
    pub fn document_where(
        &mut self,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        for _ in 0..30 {
            let document = self.next_document();
            if done(&document) {
                return document;
            }
        }
        panic!("no such discovery document in 30");
    }
}
