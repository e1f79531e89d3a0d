//! `pimesh-control` replicas as processes, and a client of a replica's discovery stream.

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::binary::Binary;
use crate::daemon::Daemon;
use crate::http::{get_text, plain_get, read_head};
use crate::pki::Site;
use crate::ports::free_addr;

/// How to start a replica; made by [`Replica::options`].
pub struct ReplicaOptions {
    number: u16,
    addr: SocketAddr,
    args: Vec<OsString>,
    log: Option<PathBuf>,
    rust_log: String,
}

impl ReplicaOptions {
    /// Listen on `addr` (default: a free port of 127.0.0.1).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// `--trust-dir dir`.
    pub fn trust_dir(self, dir: &Path) -> Self {
        self.arg("--trust-dir").arg(dir)
    }

    /// `--config file`.
    pub fn config(self, file: &Path) -> Self {
        self.arg("--config").arg(file)
    }

    /// `--site name`.
    pub fn site(self, name: &str) -> Self {
        self.arg("--site").arg(name)
    }

    /// Any other argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// The log file (default: a file in a temporary folder of the replica's own).
    pub fn log(mut self, file: &Path) -> Self {
        self.log = Some(file.to_path_buf());
        self
    }

    /// `RUST_LOG` (default `debug`).
    pub fn rust_log(mut self, filter: &str) -> Self {
        filter.clone_into(&mut self.rust_log);
        self
    }

    /// Starts the replica without waiting for it.
    pub fn spawn(self) -> Replica {
        let mut command = Daemon::command(Binary::Control, &self.rust_log);
        command
            .arg("--replica")
            .arg(self.number.to_string())
            .arg("--listen")
            .arg(self.addr.to_string())
            .args(&self.args);
        let name = format!("pimesh-control {}", self.number);
        Replica {
            daemon: Daemon::spawn(&name, command, self.log.as_deref()),
            addr: self.addr,
            port: self.addr.port(),
        }
    }

    /// Starts the replica and waits until `/ready` answers 200.
    pub async fn start(self) -> Replica {
        let mut replica = self.spawn();
        replica.ready().await;
        replica
    }

    /// [`ReplicaOptions::start`] for tests without an async runtime.
    pub fn start_blocking(self) -> Replica {
        let mut replica = self.spawn();
        replica.wait_ready();
        replica
    }
}

/// A `pimesh-control` replica process, killed (SIGKILL) when dropped.
pub struct Replica {
    pub daemon: Daemon,
    pub addr: SocketAddr,
    pub port: u16,
}

impl Replica {
    /// Replica `number`, to be started by [`ReplicaOptions::spawn`] or `start`.
    pub fn options(number: u16) -> ReplicaOptions {
        ReplicaOptions {
            number,
            addr: free_addr(),
            args: Vec::new(),
            log: None,
            rust_log: "debug".to_owned(),
        }
    }

    /// Replica 1 on a free port with `args` added, once it answers `/live` (ready or not).
    pub fn start(args: &[&str]) -> Replica {
        let mut replica = args
            .iter()
            .fold(Replica::options(1), |options, arg| options.arg(*arg))
            .spawn();
        let port = replica.port;
        replica.wait_for("listening", || plain_get(port, "/live").is_some());
        replica
    }

    /// Replica 1 of `site` with its trust folder and, when given, a site config, both
    /// written into `dir`, once ready.
    pub fn of_site(dir: &Path, site: &Site, config: Option<&str>) -> Replica {
        let trust = dir.join("trust");
        site.write_trust(&trust);
        let config_path = dir.join("cluster.toml");
        if let Some(text) = config {
            std::fs::write(&config_path, text).expect("cluster.toml");
        }
        Replica::options(1)
            .trust_dir(&trust)
            .config(&config_path)
            .site(site.name.as_str())
            .start_blocking()
    }

    /// Waits until `/ready` answers 200 (blocking).
    pub fn wait_ready(&mut self) {
        let port = self.port;
        self.wait_for("ready", || {
            plain_get(port, "/ready").is_some_and(|(status, _)| status == 200)
        });
    }

    /// Waits until `/ready` answers 200.
    pub async fn ready(&mut self) {
        let addr = self.addr;
        self.daemon
            .wait_until("ready", || async move {
                matches!(get_text(addr, "/ready").await, Ok((200, _)))
            })
            .await;
    }

    /// Polls `done` until it holds (blocking).
    ///
    /// # Panics
    /// When the replica exits first or at the deadline, with its log.
    pub fn wait_for(&mut self, what: &str, done: impl FnMut() -> bool) {
        self.daemon.wait_until_blocking(what, done);
    }

    pub fn signal(&self, signal: Signal) {
        self.daemon.signal(signal);
    }

    /// Waits for the replica to exit (after a signal).
    pub fn wait_exit(&mut self) -> ExitStatus {
        self.daemon.wait_exit()
    }

    /// `kill -9`.
    pub fn kill(mut self) {
        self.daemon.kill();
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
    /// Opens the stream at `localhost:port` with `config`.
    pub fn open(port: u16, config: Arc<rustls::ClientConfig>) -> std::io::Result<DiscoveryStream> {
        let mut stream = crate::tls::connect(port, config, Duration::from_secs(30))?;
        stream.write_all(b"GET /v1/discovery HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
        stream.flush()?;
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader)?;
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
    ///
    /// # Panics
    /// On a read error or a line that is not JSON.
    pub fn next_document(&mut self) -> serde_json::Value {
        loop {
            let line = self.next_line().expect("a line of the discovery stream");
            if !line.is_empty() {
                return serde_json::from_str(&line).expect("a JSON document");
            }
        }
    }

    /// Reads documents until one satisfies `done`.
    ///
    /// # Panics
    /// After 30 documents or on a read timeout.
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
