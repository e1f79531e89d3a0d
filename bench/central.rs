//! `make bench-central`: the real `pimesh-central` binary under many long-polling nodes.
//!
//! Sets up a temporary site (trust root, one node certificate per node, a signing key, a
//! server certificate for 127.0.0.1), starts `pimesh-central` on it, then measures:
//!
//! * **A, idle long-polls**: central's RSS before and after `--nodes` mTLS connections
//!   each park one long-poll (`after=0&wait=600`, nothing published yet), as KiB per
//!   parked connection, and central's CPU time to accept them (TCP + TLS 1.3 handshake with
//!   client-certificate verification + one request).
//! * **B, fan-out**: one publish, then the time from the publish until each parked poller
//!   has its 200 with the revision (p50, p99, max over the nodes).
//! * **C, requests/s**: `--workers` kept-alive mTLS connections asking as fast as they can
//!   for `--duration`, once for an immediate 204 (`after=<latest>&wait=0`) and once for
//!   the revision (`after=0`, 200 with the bundle); requests/s and CPU µs per request of
//!   central and of this load generator, which share the machine's cores.
//!
//! usage: cargo bench -p pimesh-bench --bench central -- [--nodes N] [--certs N]
//!        [--workers N] [--duration SECS] [--handshakes N] [--phase-timeout SECS]
//!        [--bundle-kib N] [--central PATH]
//!
//! `--central PATH` runs that binary; without it pimesh-central is built (release) for the
//! run.
//!
//! `--bundle-kib N` pads the published configuration (configs/cluster.example.toml) with a
//! TOML comment to about N KiB, to see what a bigger bundle costs in B and C.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use pimesh_bench::{bench_args, percentile, Table};
use pimesh_identity::{LeafRequest, SpiffeId, TrustRoot};
use pimesh_revision::{Mode, Revision};
use pimesh_schema::DnsLabel;
use pimesh_test_support::central::SigningKey;
use pimesh_test_support::{free_addr, Binary};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;

type Error = String;
type Sender = SendRequest<Full<Bytes>>;

const SITE: &str = "bench-site";
/// How long a parked long-poll asks to wait (and `long_poll_max`): longer than phases A
/// and B together can take (each is bounded by `--phase-timeout`).
const LONG_WAIT_SECS: u64 = 900;
/// Deadline of any single connect or request outside the long-polls.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The central process, for the panic hook (a profile that aborts on panic never runs the
/// [`Central`] drop guard).
static CENTRAL_PID: AtomicU32 = AtomicU32::new(0);

/// Command-line settings.
#[derive(Debug, Clone)]
struct Args {
    nodes: usize,
    certs: usize,
    workers: usize,
    duration: Duration,
    handshakes: usize,
    phase_timeout: Duration,
    bundle_kib: usize,
    central: PathBuf,
}

/// The command line, as `cargo bench --bench central -- ...` passes it.
#[derive(clap::Parser)]
#[command(name = "bench-central", no_binary_name = true)]
struct Cli {
    /// Nodes that long-poll and report
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..))]
    nodes: u32,
    /// Distinct node certificates (0 or more than --nodes: one per node)
    #[arg(long, default_value_t = 0)]
    certs: usize,
    /// Concurrent request workers
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    workers: u32,
    /// Seconds of the request-rate phase
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    duration: u64,
    /// TLS handshakes at most at once
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    handshakes: u32,
    /// Seconds any one phase may take before the benchmark gives up
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    phase_timeout: u64,
    /// Pad each revision to this many KiB (0: no padding)
    #[arg(long, default_value_t = 0)]
    bundle_kib: usize,
    /// The pimesh-central binary (default: the workspace's build)
    #[arg(long, value_name = "PATH")]
    central: Option<PathBuf>,
}

impl Args {
    fn parse(argv: Vec<String>) -> Result<Args, Error> {
        use clap::Parser as _;
        let cli = Cli::try_parse_from(argv).map_err(|err| err.to_string())?;
        let nodes = cli.nodes as usize;
        Ok(Args {
            nodes,
            certs: if cli.certs == 0 || cli.certs > nodes {
                nodes
            } else {
                cli.certs
            },
            workers: cli.workers as usize,
            duration: Duration::from_secs(cli.duration),
            handshakes: cli.handshakes as usize,
            phase_timeout: Duration::from_secs(cli.phase_timeout),
            bundle_kib: cli.bundle_kib,
            central: cli.central.unwrap_or_else(|| Binary::Central.path()),
        })
    }
}

fn main() -> std::process::ExitCode {
    let Some(argv) = bench_args() else {
        return std::process::ExitCode::SUCCESS;
    };
    install_panic_hook();
    let result = Args::parse(argv).and_then(|args| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|err| format!("runtime: {err}"))?
            .block_on(run(args))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench-central: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Kills central on panic before the default hook (and the abort) runs.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_central();
        default(info);
    }));
}

fn kill_central() {
    let pid = CENTRAL_PID.load(Ordering::SeqCst);
    if pid != 0 {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

async fn run(args: Args) -> Result<(), Error> {
    let nofile = raise_nofile(args.nodes + args.workers + 256)?;
    let dir = tempfile::tempdir().map_err(|err| format!("tempdir: {err}"))?;
    let started = Instant::now();
    let site = BenchSite::new(dir.path(), args.certs, args.bundle_kib)?;
    eprintln!(
        "made {} node certificates in {:.1} s",
        args.certs,
        started.elapsed().as_secs_f64()
    );
    let central = Central::start(dir.path(), &args.central, &site).await?;
    let result = phases(&args, &site, &central).await;
    let result = result.map(|report| report.print(&args, nofile));
    if result.is_err() {
        central.print_log_tail();
    }
    result
}

/// The measurements, printed as one table at the end.
struct Report {
    a: PhaseA,
    b: PhaseB,
    c: Vec<PhaseC>,
    peak_rss_kib: u64,
}

async fn phases(args: &Args, site: &BenchSite, central: &Central) -> Result<Report, Error> {
    let a_run = phase_a(args, site, central).await?;
    let b = phase_b(args, site, central, a_run.pollers).await?;
    let mut c = Vec::new();
    for variant in [Variant::Empty, Variant::Bundle] {
        c.push(phase_c(args, site, central, variant).await?);
    }
    Ok(Report {
        a: a_run.figures,
        b,
        c,
        peak_rss_kib: peak_rss_kib(central.pid())?,
    })
}

// ---------------------------------------------------------------------------------------
// Setup: file descriptors, the site, the central process.

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (central inherits it);
/// fails when even that is below `needed`. Returns the new limit.
fn raise_nofile(needed: usize) -> Result<u64, Error> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|err| format!("getrlimit: {err}"))?;
    if (hard as usize) < needed {
        return Err(format!(
            "RLIMIT_NOFILE hard limit {hard} < {needed} needed; raise it (ulimit -Hn) or use fewer --nodes"
        ));
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|err| format!("setrlimit: {err}"))?;
    Ok(hard)
}

fn label(s: &str) -> Result<DnsLabel, Error> {
    DnsLabel::try_from(s.to_owned()).map_err(|err| format!("{s}: {err}"))
}

/// The temporary site: its anchor file, its signing key and one TLS client configuration
/// per node certificate.
struct BenchSite {
    anchor_path: PathBuf,
    signing_pkcs8: Vec<u8>,
    public_key: String,
    bundle_kib: usize,
    nodes: Vec<Arc<ClientConfig>>,
    server_cert_pem: String,
    server_key_pem: String,
    server_roots: Arc<RootCertStore>,
}

impl BenchSite {
    fn new(dir: &Path, certs: usize, bundle_kib: usize) -> Result<BenchSite, Error> {
        let name = label(SITE)?;
        let root = TrustRoot::generate(&name, SystemTime::now()).map_err(|e| e.to_string())?;
        let anchor_path = dir.join("anchor.pem");
        std::fs::write(&anchor_path, root.anchor.cert_pem()).map_err(|e| e.to_string())?;
        let SigningKey {
            pkcs8: signing_pkcs8,
            public_key,
        } = SigningKey::generate();
        let server = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
            .map_err(|err| format!("server cert: {err}"))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(server.cert.der().clone())
            .map_err(|err| format!("server root: {err}"))?;
        let server_roots = Arc::new(roots);
        let nodes = (0..certs)
            .map(|i| node_config(&root, &name, &format!("pi-{i}"), &server_roots))
            .collect::<Result<_, _>>()?;
        Ok(BenchSite {
            anchor_path,
            signing_pkcs8,
            public_key,
            bundle_kib,
            nodes,
            server_cert_pem: server.cert.pem(),
            server_key_pem: server.signing_key.serialize_pem(),
            server_roots,
        })
    }

    /// The TLS configuration of poller/worker `i` (certificates shared round-robin when
    /// `--certs` < `--nodes`).
    fn node(&self, i: usize) -> Arc<ClientConfig> {
        Arc::clone(&self.nodes[i % self.nodes.len()])
    }

    /// The operator's TLS configuration: no client certificate.
    fn operator(&self) -> Result<Arc<ClientConfig>, Error> {
        Ok(Arc::new(
            client_builder(&self.server_roots)?.with_no_client_auth(),
        ))
    }

    /// Revision `number` of the example site configuration (padded to `--bundle-kib`),
    /// signed.
    fn revision(&self, number: u64) -> Result<Vec<u8>, Error> {
        let mut config =
            include_str!("../configs/cluster.example.toml").replace("fleet-depot-7", SITE);
        let line = format!("# {}\n", "x".repeat(61));
        while config.len() < self.bundle_kib * 1024 {
            config.push_str(&line);
        }
        let signed = Revision {
            site: label(SITE)?,
            revision: number,
            mode: Mode::Apply,
            config,
        }
        .sign(&self.signing_pkcs8)
        .map_err(|err| err.to_string())?;
        Ok(signed.to_json())
    }
}

fn client_builder(
    roots: &Arc<RootCertStore>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, Error> {
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| format!("TLS 1.3: {err}"))?
            .with_root_certificates(Arc::clone(roots)),
    )
}

/// A certificate for `spiffe://<site>/node/<node>` (leaf + issuer) and its TLS
/// configuration.
fn node_config(
    root: &TrustRoot,
    site: &DnsLabel,
    node: &str,
    roots: &Arc<RootCertStore>,
) -> Result<Arc<ClientConfig>, Error> {
    let id = SpiffeId::node(site, &label(node)?);
    let request = LeafRequest::new(std::slice::from_ref(&id)).map_err(|e| e.to_string())?;
    let leaf = root
        .issuer
        .sign_leaf(&request.csr, site, &BTreeSet::from([id]), SystemTime::now())
        .map_err(|e| e.to_string())?;
    let chain = vec![leaf.der, root.issuer.cert_der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(request.key.serialize_der()));
    let config = client_builder(roots)?
        .with_client_auth_cert(chain, key)
        .map_err(|err| format!("client cert: {err}"))?;
    Ok(Arc::new(config))
}

/// The running `pimesh-central`; killed when dropped.
struct Central {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Central {
    async fn start(dir: &Path, binary: &Path, site: &BenchSite) -> Result<Central, Error> {
        let addr = free_addr();
        let config = write_config(dir, addr, site)?;
        let log = dir.join("central.log");
        let log_file = std::fs::File::create(&log).map_err(|err| format!("log: {err}"))?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|err| format!("{}: cannot start: {err}", binary.display()))?;
        CENTRAL_PID.store(child.id(), Ordering::SeqCst);
        let mut central = Central { child, addr, log };
        central.wait_listening().await?;
        Ok(central)
    }

    async fn wait_listening(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.addr).await.is_err() {
            if let Ok(Some(exit)) = self.child.try_wait() {
                return Err(format!("pimesh-central exited: {exit}"));
            }
            if Instant::now() > deadline {
                return Err("pimesh-central did not listen within 10 s".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn print_log_tail(&self) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("--- last lines of pimesh-central's log ---");
        for line in &lines[lines.len().saturating_sub(20)..] {
            eprintln!("{line}");
        }
    }
}

impl Drop for Central {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        CENTRAL_PID.store(0, Ordering::SeqCst);
    }
}

fn write_config(dir: &Path, addr: SocketAddr, site: &BenchSite) -> Result<PathBuf, Error> {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|err| format!("{name}: {err}"))?;
        Ok::<_, Error>(path)
    };
    let cert = write("server.pem", &site.server_cert_pem)?;
    let key = write("server.key", &site.server_key_pem)?;
    let config = format!(
        "listen = \"{addr}\"\nstate_dir = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
         long_poll_max = \"{LONG_WAIT_SECS}s\"\n\
         [[sites]]\nname = \"{SITE}\"\nanchor = \"{}\"\npublic_key = \"{}\"\n",
        dir.join("state").display(),
        cert.display(),
        key.display(),
        site.anchor_path.display(),
        site.public_key
    );
    write("central.toml", &config)
}

// ---------------------------------------------------------------------------------------
// Process figures from /proc.

/// Resident set size of `pid` in KiB (VmRSS).
fn rss_kib(pid: u32) -> Result<u64, Error> {
    status_field(pid, "VmRSS:")
}

/// Peak resident set size of `pid` in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> Result<u64, Error> {
    status_field(pid, "VmHWM:")
}

fn status_field(pid: u32, field: &str) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|err| format!("/proc/{pid}/status: {err}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .ok_or_else(|| format!("/proc/{pid}/status: no {field}"))
}

/// CPU time (user + system) `pid` has used so far; `None` is this process.
fn cpu_time(pid: Option<u32>) -> Result<Duration, Error> {
    let path = pid.map_or("/proc/self/stat".to_owned(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(&path).map_err(|err| format!("{path}: {err}"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let (utime, stime) = ticks(11)
        .zip(ticks(12))
        .ok_or_else(|| format!("{path}: no utime/stime"))?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Ok(Duration::from_micros((utime + stime) * 1_000_000 / hz))
}

/// How many file descriptors `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// CPU time of central and of this process between two points.
#[derive(Clone, Copy)]
struct CpuMark {
    central: Duration,
    client: Duration,
}

impl CpuMark {
    fn now(central: &Central) -> Result<CpuMark, Error> {
        Ok(CpuMark {
            central: cpu_time(Some(central.pid()))?,
            client: cpu_time(None)?,
        })
    }

    /// (central, client) CPU time since `self`.
    fn since(&self, central: &Central) -> Result<(Duration, Duration), Error> {
        let now = CpuMark::now(central)?;
        Ok((now.central - self.central, now.client - self.client))
    }
}

// ---------------------------------------------------------------------------------------
// HTTP over mTLS.

/// Opens a TCP + TLS 1.3 + HTTP/1.1 connection to central with `tls` (a node certificate
/// or none).
async fn connect(addr: SocketAddr, tls: Arc<ClientConfig>) -> Result<Sender, Error> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::IpAddress(addr.ip().into());
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|err| format!("TLS handshake: {err}"))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| format!("HTTP handshake: {err}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn connect_with_deadline(addr: SocketAddr, tls: Arc<ClientConfig>) -> Result<Sender, Error> {
    tokio::time::timeout(IO_TIMEOUT, connect(addr, tls))
        .await
        .map_err(|_| format!("no connection within {IO_TIMEOUT:?}"))?
}

/// Sends one request and reads the whole answer: status and body.
async fn exchange(
    sender: &mut Sender,
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, Bytes), Error> {
    sender
        .ready()
        .await
        .map_err(|err| format!("connection: {err}"))?;
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(Bytes::from(body)))
        .map_err(|err| format!("request: {err}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| format!("{path}: {err}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|err| format!("{path}: body: {err}"))?
        .to_bytes();
    Ok((status, body))
}

fn config_path(after: u64, wait: u64) -> String {
    format!("/v1/sites/{SITE}/config?after={after}&wait={wait}")
}

fn revision_of(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body).ok()?["revision"].as_u64()
}

// ---------------------------------------------------------------------------------------
// Phase A: parked long-polls.

/// Phase A's figures.
struct PhaseA {
    rss_idle_kib: u64,
    rss_parked_kib: u64,
    central_fds: usize,
    central_cpu: Duration,
    client_cpu: Duration,
    wall: Duration,
}

/// What phase A leaves running: the parked pollers, for phase B.
struct PhaseARun {
    figures: PhaseA,
    pollers: Vec<tokio::task::JoinHandle<Result<Instant, Error>>>,
}

/// How the pollers are doing, shared with them.
#[derive(Default)]
struct Progress {
    /// Pollers whose request is handed to their connection.
    sent: AtomicUsize,
    /// Pollers that have an answer (or failed).
    finished: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

impl Progress {
    fn fail(&self, err: Error) -> Error {
        self.first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert_with(|| err.clone());
        err
    }

    fn error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Opens `--nodes` connections (at most `--handshakes` handshakes at a time), each
/// parking `GET config?after=0&wait=900`, waits until central is idle again, and measures
/// its RSS and the CPU time it spent.
async fn phase_a(args: &Args, site: &BenchSite, central: &Central) -> Result<PhaseARun, Error> {
    settle(central, Duration::from_secs(10)).await?;
    let rss_idle_kib = rss_kib(central.pid())?;
    let cpu = CpuMark::now(central)?;
    let started = Instant::now();
    let progress = Arc::new(Progress::default());
    let handshakes = Arc::new(Semaphore::new(args.handshakes));
    let pollers = (0..args.nodes)
        .map(|i| {
            let tls = site.node(i);
            let (progress, handshakes) = (Arc::clone(&progress), Arc::clone(&handshakes));
            tokio::spawn(poll(central.addr, tls, handshakes, progress))
        })
        .collect();
    wait_all_sent(args, &progress, started).await?;
    settle(central, args.phase_timeout).await?;
    if progress.finished.load(Ordering::SeqCst) > 0 {
        let err = progress
            .error()
            .unwrap_or_else(|| "answered early".to_owned());
        return Err(format!("a long-poll ended before the publish: {err}"));
    }
    let wall = started.elapsed();
    let (central_cpu, client_cpu) = cpu.since(central)?;
    let figures = PhaseA {
        rss_idle_kib,
        rss_parked_kib: rss_kib(central.pid())?,
        central_fds: open_fds(central.pid()),
        central_cpu,
        client_cpu,
        wall,
    };
    Ok(PhaseARun { figures, pollers })
}

/// One node: connects (holding a handshake permit), parks a long-poll for anything newer
/// than revision 0, and returns when the 200 with revision 1 arrived.
async fn poll(
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    handshakes: Arc<Semaphore>,
    progress: Arc<Progress>,
) -> Result<Instant, Error> {
    let result = async {
        let mut sender = {
            let _permit = handshakes.acquire().await.map_err(|e| e.to_string())?;
            connect_with_deadline(addr, tls).await?
        };
        sender
            .ready()
            .await
            .map_err(|err| format!("connection: {err}"))?;
        progress.sent.fetch_add(1, Ordering::SeqCst);
        let path = config_path(0, LONG_WAIT_SECS);
        let (status, body) = exchange(&mut sender, addr, Method::GET, &path, Vec::new()).await?;
        let done = Instant::now();
        match (status, revision_of(&body)) {
            (StatusCode::OK, Some(1)) => Ok(done),
            _ => Err(format!("long-poll answered {status}, not revision 1")),
        }
    }
    .await;
    progress.finished.fetch_add(1, Ordering::SeqCst);
    result.map_err(|err| progress.fail(err))
}

/// Waits until every poller has handed its request to its connection; fails on the
/// first poller error or after `--phase-timeout`.
async fn wait_all_sent(args: &Args, progress: &Progress, started: Instant) -> Result<(), Error> {
    while progress.sent.load(Ordering::SeqCst) < args.nodes {
        if let Some(err) = progress.error() {
            let sent = progress.sent.load(Ordering::SeqCst);
            return Err(format!("phase A: after {sent} parked connections: {err}"));
        }
        if started.elapsed() > args.phase_timeout {
            let sent = progress.sent.load(Ordering::SeqCst);
            return Err(format!(
                "phase A: only {sent} of {} connections within {:?}",
                args.nodes, args.phase_timeout
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Waits until central uses (almost) no CPU: at most 10 ms in a 500 ms window — every
/// request read and parked, nothing left to do.
async fn settle(central: &Central, limit: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + limit;
    let window = Duration::from_millis(500);
    let mut before = cpu_time(Some(central.pid()))?;
    loop {
        tokio::time::sleep(window).await;
        let now = cpu_time(Some(central.pid()))?;
        if now - before <= Duration::from_millis(10) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("central still busy after {limit:?}"));
        }
        before = now;
    }
}

// ---------------------------------------------------------------------------------------
// Phase B: fan-out.

/// Phase B's figures.
struct PhaseB {
    publish_answered: Duration,
    /// From the publish to each node's 200, sorted.
    latencies: Vec<Duration>,
    central_cpu: Duration,
    rss_after_kib: u64,
}

/// Publishes revision 1 and waits for every parked poller's 200.
async fn phase_b(
    args: &Args,
    site: &BenchSite,
    central: &Central,
    pollers: Vec<tokio::task::JoinHandle<Result<Instant, Error>>>,
) -> Result<PhaseB, Error> {
    let mut operator = connect_with_deadline(central.addr, site.operator()?).await?;
    let revision = site.revision(1)?;
    let cpu = CpuMark::now(central)?;
    let published = Instant::now();
    let path = format!("/v1/sites/{SITE}/revisions");
    let put = exchange(&mut operator, central.addr, Method::PUT, &path, revision);
    let (status, body) = tokio::time::timeout(IO_TIMEOUT, put)
        .await
        .map_err(|_| "phase B: publish not answered")??;
    let publish_answered = published.elapsed();
    if status != StatusCode::CREATED {
        let body = String::from_utf8_lossy(&body);
        return Err(format!("phase B: publish answered {status}: {body}"));
    }
    let latencies = collect_answers(args, pollers, published).await?;
    let (central_cpu, _) = cpu.since(central)?;
    Ok(PhaseB {
        publish_answered,
        latencies,
        central_cpu,
        rss_after_kib: rss_kib(central.pid())?,
    })
}

/// Each poller's time from `published` to its answer, sorted; fails on any poller
/// error or after `--phase-timeout`.
async fn collect_answers(
    args: &Args,
    pollers: Vec<tokio::task::JoinHandle<Result<Instant, Error>>>,
    published: Instant,
) -> Result<Vec<Duration>, Error> {
    let all = futures_join_all(pollers);
    let results = tokio::time::timeout(args.phase_timeout, all)
        .await
        .map_err(|_| {
            format!(
                "phase B: not every poller answered within {:?}",
                args.phase_timeout
            )
        })?;
    let mut latencies = Vec::with_capacity(results.len());
    for result in results {
        let done = result.map_err(|err| format!("poller: {err}"))??;
        latencies.push(done.saturating_duration_since(published));
    }
    latencies.sort();
    Ok(latencies)
}

/// Awaits every task in order (they all run concurrently already).
async fn futures_join_all<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<Result<T, Error>> {
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.map_err(|err| err.to_string()));
    }
    results
}

// ---------------------------------------------------------------------------------------
// Phase C: requests/s on kept-alive connections.

#[derive(Clone, Copy)]
enum Variant {
    /// `after=<latest>&wait=0`: an immediate 204.
    Empty,
    /// `after=0`: a 200 with the revision.
    Bundle,
}

impl Variant {
    fn path(self) -> String {
        match self {
            Variant::Empty => config_path(1, 0),
            Variant::Bundle => config_path(0, 0),
        }
    }

    fn expected(self) -> StatusCode {
        match self {
            Variant::Empty => StatusCode::NO_CONTENT,
            Variant::Bundle => StatusCode::OK,
        }
    }
}

/// Phase C's figures for one variant.
struct PhaseC {
    variant: Variant,
    requests: u64,
    elapsed: Duration,
    central_cpu: Duration,
    client_cpu: Duration,
    body_bytes: usize,
}

/// `--workers` connections, then `--duration` of back-to-back requests on each.
async fn phase_c(
    args: &Args,
    site: &BenchSite,
    central: &Central,
    variant: Variant,
) -> Result<PhaseC, Error> {
    let senders = connect_workers(args, site, central).await?;
    settle(central, args.phase_timeout).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let cpu = CpuMark::now(central)?;
    let started = Instant::now();
    let workers: Vec<_> = senders
        .into_iter()
        .map(|sender| tokio::spawn(work(sender, central.addr, variant, Arc::clone(&stop))))
        .collect();
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::SeqCst);
    let elapsed = started.elapsed();
    let (central_cpu, client_cpu) = cpu.since(central)?;
    let finished = tokio::time::timeout(IO_TIMEOUT, futures_join_all(workers))
        .await
        .map_err(|_| "phase C: workers did not stop")?;
    let (mut requests, mut body_bytes) = (0, 0);
    for result in finished {
        let (count, bytes) = result??;
        requests += count;
        body_bytes = body_bytes.max(bytes);
    }
    Ok(PhaseC {
        variant,
        requests,
        elapsed,
        central_cpu,
        client_cpu,
        body_bytes,
    })
}

async fn connect_workers(
    args: &Args,
    site: &BenchSite,
    central: &Central,
) -> Result<Vec<Sender>, Error> {
    let handshakes = Arc::new(Semaphore::new(args.handshakes));
    let tasks: Vec<_> = (0..args.workers)
        .map(|i| {
            let (tls, handshakes) = (site.node(i), Arc::clone(&handshakes));
            let addr = central.addr;
            tokio::spawn(async move {
                let _permit = handshakes.acquire().await.map_err(|e| e.to_string())?;
                connect_with_deadline(addr, tls).await
            })
        })
        .collect();
    let connected = tokio::time::timeout(args.phase_timeout, futures_join_all(tasks))
        .await
        .map_err(|_| "phase C: workers not connected in time")?;
    connected
        .into_iter()
        .map(|r| r.and_then(|s| s.map_err(|err| format!("phase C: {err}"))))
        .collect()
}

/// One worker: requests until `stop`; returns the requests answered before `stop` and
/// the body size.
async fn work(
    mut sender: Sender,
    addr: SocketAddr,
    variant: Variant,
    stop: Arc<AtomicBool>,
) -> Result<(u64, usize), Error> {
    let path = variant.path();
    let (mut count, mut bytes) = (0, 0);
    while !stop.load(Ordering::SeqCst) {
        let request = exchange(&mut sender, addr, Method::GET, &path, Vec::new());
        let (status, body) = tokio::time::timeout(IO_TIMEOUT, request)
            .await
            .map_err(|_| format!("phase C: {path} not answered"))??;
        if status != variant.expected() {
            return Err(format!("phase C: {path} answered {status}"));
        }
        bytes = body.len();
        if !stop.load(Ordering::SeqCst) {
            count += 1;
        }
    }
    Ok((count, bytes))
}

// ---------------------------------------------------------------------------------------
// The table.

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn per(d: Duration, n: u64) -> f64 {
    d.as_secs_f64() * 1e6 / n.max(1) as f64
}

impl Report {
    fn print(&self, args: &Args, nofile: u64) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let certs = if args.certs == args.nodes {
            format!("{} distinct node certificates", args.certs)
        } else {
            format!("{} node certificates shared round-robin", args.certs)
        };
        let mut table = Table::new("central");
        table.setup(format!(
            "pimesh-central under {} long-polling nodes ({certs}, one connection each)",
            args.nodes
        ));
        table.setup(format!(
            "client and server share {cores} cores; RLIMIT_NOFILE {nofile} (central inherits it)"
        ));
        table.setup(format!(
            "A: idle long-polls (mTLS, TLS 1.3, GET config?after=0&wait={LONG_WAIT_SECS}), \
             {} handshakes at a time",
            args.handshakes
        ));
        table.setup(format!(
            "B: fan-out: one publish (PUT) wakes {} parked long-polls",
            args.nodes
        ));
        table.setup(format!(
            "C: {} kept-alive mTLS workers, {} s per request kind, back-to-back GET config",
            args.workers,
            args.duration.as_secs()
        ));
        self.rows_a(args, &mut table);
        self.rows_b(args, &mut table);
        self.rows_c(&mut table);
        table.print();
    }

    fn rows_a(&self, args: &Args, table: &mut Table) {
        let a = &self.a;
        let n = args.nodes as u64;
        let per_conn = (a.rss_parked_kib as f64 - a.rss_idle_kib as f64) / n as f64;
        table.row("A central RSS idle", mib(a.rss_idle_kib), "MiB");
        table.row(
            format!("A central RSS with {n} parked"),
            mib(a.rss_parked_kib),
            "MiB",
        );
        table.row(
            "A RSS per parked long-poll connection",
            format!("{per_conn:.1}"),
            "KiB",
        );
        table.row("A central open fds", a.central_fds, "count");
        table.row("A central CPU to accept all", ms(a.central_cpu), "ms");
        table.row(
            "A central CPU per connection (handshake + cert check + request)",
            format!("{:.0}", per(a.central_cpu, n)),
            "µs",
        );
        table.row("A load generator CPU", ms(a.client_cpu), "ms");
        table.row(
            "A load generator CPU per connection",
            format!("{:.0}", per(a.client_cpu, n)),
            "µs",
        );
        table.row(
            "A wall time to park all",
            format!("{:.1}", a.wall.as_secs_f64()),
            "s",
        );
    }

    fn rows_b(&self, args: &Args, table: &mut Table) {
        let b = &self.b;
        table.row("B PUT answered after", ms(b.publish_answered), "ms");
        for (name, p) in [("p50", 0.50), ("p99", 0.99), ("max", 1.0)] {
            table.row(
                format!("B publish → 200 at node, {name}"),
                ms(percentile(&b.latencies, p)),
                "ms",
            );
        }
        table.row("B central CPU for the fan-out", ms(b.central_cpu), "ms");
        table.row(
            "B central CPU for the fan-out per node",
            format!("{:.0}", per(b.central_cpu, args.nodes as u64)),
            "µs",
        );
        table.row("B central RSS after", mib(b.rss_after_kib), "MiB");
    }

    fn rows_c(&self, table: &mut Table) {
        for c in &self.c {
            let name = match c.variant {
                Variant::Empty => "C after=1&wait=0 → 204".to_owned(),
                Variant::Bundle => format!("C after=0 → 200 ({} B)", c.body_bytes),
            };
            table.row(
                format!("{name}: requests/s"),
                format!("{:.0}", c.requests as f64 / c.elapsed.as_secs_f64()),
                "req/s",
            );
            table.row(
                format!("{name}: central CPU per request"),
                format!("{:.1}", per(c.central_cpu, c.requests)),
                "µs",
            );
            table.row(
                format!("{name}: client CPU per request"),
                format!("{:.1}", per(c.client_cpu, c.requests)),
                "µs",
            );
        }
        table.row("central peak RSS (VmHWM)", mib(self.peak_rss_kib), "MiB");
    }
}
