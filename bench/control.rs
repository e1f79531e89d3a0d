//! `make bench-control`: the real `pimesh-control` replicas and `pimesh-proxy` processes of
//! a temporary site on 127.0.0.1, measured from outside.
//!
//! * **A, CSR → certificate**: `--csrs` signing requests (fresh P-256 key each, made before
//!   the clock starts) sent one after another to replica 1 over one kept-alive mTLS
//!   connection, then `--handshakes` more with a new TCP + TLS 1.3 connection each (what a
//!   proxy's renewal costs); p50, p99, max of each.
//! * **B, replica memory**: RSS of replica 1 idle after start, after phase A, and its peak.
//! * **C, config change → every proxy**: `--proxies` proxies watch the three replicas; the
//!   site config is rewritten `--changes` times and the time until every proxy's `/config`
//!   runs the new version is taken (p50, p99, max).
//! * **D, failover**: each proxy's replica in use is killed with SIGKILL, and the time
//!   until every proxy that used it is watching another replica is taken (per proxy: p50,
//!   max).
//!
//! usage: cargo bench -p pimesh-bench --bench control -- [--csrs N] [--handshakes N]
//!        [--proxies N] [--changes N] [--bin-dir PATH]
//!
//! The binaries come from `--bin-dir` when given, else they are built (release) for the run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pimesh_bench::{bench_args, Table};
use pimesh_identity::LeafRequest;
use pimesh_test_support::{free_port, Binary};

type Error = String;

const SITE: &str = "bench-site";
/// The longest any one step may take before the benchmark gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    csrs: usize,
    handshakes: usize,
    proxies: usize,
    changes: usize,
    control_bin: PathBuf,
    proxy_bin: PathBuf,
}

/// The command line, as `cargo bench --bench control -- ...` passes it.
#[derive(clap::Parser)]
#[command(name = "bench-control", no_binary_name = true)]
struct Cli {
    /// Certificate requests to sign
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    csrs: u32,
    /// TLS handshakes at most at once
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    handshakes: u32,
    /// Proxies that stream discovery
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    proxies: u32,
    /// Site config changes pushed to them
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    changes: u32,
    /// Where pimesh-control and pimesh-proxy are (default: the workspace's build)
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
}

fn parse_args(argv: Vec<String>) -> Result<Args, Error> {
    use clap::Parser as _;
    let cli = Cli::try_parse_from(argv).map_err(|err| err.to_string())?;
    let binary = |binary: Binary| match &cli.bin_dir {
        Some(dir) => dir.join(binary.name()),
        None => binary.path(),
    };
    Ok(Args {
        csrs: cli.csrs as usize,
        handshakes: cli.handshakes as usize,
        proxies: cli.proxies as usize,
        changes: cli.changes as usize,
        control_bin: binary(Binary::Control),
        proxy_bin: binary(Binary::Proxy),
    })
}

fn main() -> std::process::ExitCode {
    let Some(argv) = bench_args() else {
        return std::process::ExitCode::SUCCESS;
    };
    let result = parse_args(argv).and_then(|args| run(&args));
    match result {
        Ok(table) => {
            table.print();
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bench-control: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// The site on disk.

/// The temporary site: trust folder, site config, node credentials.
struct Site {
    dir: PathBuf,
    site: pimesh_test_support::Site,
}

impl Site {
    fn new(dir: &Path) -> Result<Site, Error> {
        let site = pimesh_test_support::Site::new(SITE);
        site.write_trust(&dir.join("trust"));
        Ok(Site {
            dir: dir.to_path_buf(),
            site,
        })
    }

    fn trust_dir(&self) -> PathBuf {
        self.dir.join("trust")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("cluster.toml")
    }

    /// A node credential (chain PEM, key PEM), as `pimeshctl node sign` makes them.
    fn node_credential(&self, node: &str) -> Result<(String, String), Error> {
        Ok(self.site.node_credential_pem(node))
    }
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|err| format!("{}: {err}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Processes.

/// A child process, killed when dropped.
struct Daemon {
    child: Child,
    what: String,
    bin: PathBuf,
}

impl Daemon {
    fn spawn(bin: &Path, args: &[String], log: &Path, what: String) -> Result<Daemon, Error> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|err| format!("{}: {err}", log.display()))?;
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|err| format!("cannot start {} ({err})", bin.display()))?;
        Ok(Daemon {
            child,
            what,
            bin: bin.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn rss_kib(pid: u32, field: &str) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|err| format!("/proc/{pid}/status: {err}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .ok_or_else(|| format!("/proc/{pid}/status: no {field}"))
}

/// Polls `check` every 10 ms until it returns `Some`, for at most [`STEP_TIMEOUT`].
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T, Error> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {STEP_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn plain_get(url: &str) -> Option<(u16, String)> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let response = client.get(url).send().ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().ok()?))
}

// ---------------------------------------------------------------------------------------
// Phase A: CSR → certificate.

/// An mTLS client of the identity API with a node credential; `fresh` opens a new
/// connection for every request.
fn identity_client(
    site: &Site,
    node: &str,
    fresh: bool,
) -> Result<reqwest::blocking::Client, Error> {
    let (chain, key) = site.node_credential(node)?;
    let identity = reqwest::Identity::from_pem(format!("{key}{chain}").as_bytes())
        .map_err(|err| format!("client identity: {err}"))?;
    let anchor = reqwest::Certificate::from_pem(site.site.root.anchor.cert_pem().as_bytes())
        .map_err(|err| format!("anchor: {err}"))?;
    let mut builder = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(anchor)
        .identity(identity)
        .timeout(Duration::from_secs(10));
    if fresh {
        builder = builder.pool_max_idle_per_host(0);
    }
    builder.build().map_err(|err| format!("client: {err}"))
}

fn sign_many(
    client: &reqwest::blocking::Client,
    url: &str,
    requests: Vec<String>,
) -> Result<Vec<Duration>, Error> {
    let mut samples = Vec::with_capacity(requests.len());
    for csr in requests {
        let started = Instant::now();
        let response = client
            .post(url)
            .body(csr)
            .send()
            .map_err(|err| format!("POST {url}: {err}"))?;
        let status = response.status();
        let body = response
            .text()
            .map_err(|err| format!("POST {url}: {err}"))?;
        samples.push(started.elapsed());
        if !status.is_success() || !body.contains("BEGIN CERTIFICATE") {
            return Err(format!("POST {url}: {status}: {body}"));
        }
    }
    Ok(samples)
}

fn csrs(site: &Site, node: &str, count: usize) -> Result<Vec<String>, Error> {
    let id = site.site.node_id(node);
    (0..count)
        .map(|_| {
            LeafRequest::new(std::slice::from_ref(&id))
                .map(|request| request.csr_pem)
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// Replica `n` of the site on 127.0.0.1:`port`.
fn start_replica(
    site: &Site,
    dir: &Path,
    n: usize,
    port: u16,
    bin: &Path,
) -> Result<Daemon, Error> {
    Daemon::spawn(
        bin,
        &[
            "--replica".into(),
            n.to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--trust-dir".into(),
            site.trust_dir().display().to_string(),
            "--config".into(),
            site.config_path().display().to_string(),
        ],
        &dir.join(format!("replica-{n}.log")),
        format!("replica {n}"),
    )
}

fn run(args: &Args) -> Result<Table, Error> {
    let mut table = Table::new("control");
    table.setup(format!(
        "3 replicas and {} proxies of a temporary site on 127.0.0.1; {} CSRs on a kept-alive \
         connection, {} with a new connection each; {} config changes; 5 replica kills",
        args.proxies, args.csrs, args.handshakes, args.changes
    ));
    let temp = tempfile::tempdir().map_err(|err| format!("tempdir: {err}"))?;
    let site = Site::new(temp.path())?;
    write(
        &site.config_path(),
        &format!("site = \"{SITE}\"\n\n[services.web]\nport = 80\nnodes = [\"node-0\"]\n"),
    )?;
    let control_bin = &args.control_bin;
    let ports = [free_port(), free_port(), free_port()];
    let mut replicas = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        replicas.push(start_replica(
            &site,
            temp.path(),
            i + 1,
            *port,
            control_bin,
        )?);
    }
    for (port, replica) in ports.iter().zip(&replicas) {
        wait_for(&format!("{} ready", replica.what), || {
            plain_get(&format!("http://127.0.0.1:{port}/ready"))
                .filter(|(status, _)| *status == 200)
        })?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let idle_kib = rss_kib(replicas[0].pid(), "VmRSS:")?;

    let url = format!("https://localhost:{}/v1/identity", ports[0]);
    let kept = identity_client(&site, "node-0", false)?;
    let requests = csrs(&site, "node-0", args.csrs)?;
    let samples = sign_many(&kept, &url, requests)?;
    table.row_percentiles(
        "A CSR → certificate, one kept-alive mTLS connection",
        &samples,
    );
    let fresh = identity_client(&site, "node-0", true)?;
    let requests = csrs(&site, "node-0", args.handshakes)?;
    let samples = sign_many(&fresh, &url, requests)?;
    table.row_percentiles(
        "A CSR → certificate, new TCP + TLS 1.3 connection each",
        &samples,
    );

    let after_kib = rss_kib(replicas[0].pid(), "VmRSS:")?;
    let peak_kib = rss_kib(replicas[0].pid(), "VmHWM:")?;
    let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
    table.row("B replica RSS, idle", mib(idle_kib), "MiB");
    table.row("B replica RSS, after phase A", mib(after_kib), "MiB");
    table.row("B replica RSS, peak", mib(peak_kib), "MiB");

    let control: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let proxies = (0..args.proxies)
        .map(|i| BenchProxy::start(args, &site, temp.path(), i, &control.join(",")))
        .collect::<Result<Vec<_>, _>>()?;
    for proxy in &proxies {
        wait_for(&format!("{} watching a replica", proxy.name), || {
            proxy
                .control()
                .filter(|c| c.connected && c.version.is_some())
        })?;
    }
    let samples = config_changes(args, &site, &replicas, &proxies)?;
    table.row_percentiles(
        &format!(
            "C config change → every one of {} proxies runs it",
            proxies.len()
        ),
        &samples,
    );
    let samples = failovers(&site, &mut replicas, &ports, &proxies, temp.path())?;
    table.row_percentiles(
        "D replica in use killed (SIGKILL) → the proxy watches another",
        &samples,
    );
    Ok(table)
}

// ---------------------------------------------------------------------------------------
// Phases C and D: proxies watching the replicas.

struct BenchProxy {
    name: String,
    admin: u16,
    _daemon: Daemon,
}

/// What a proxy's `/config` says of its discovery watch.
struct ControlView {
    connected: bool,
    replica: Option<String>,
    version: Option<String>,
}

impl BenchProxy {
    /// Proxy `i` of node `node-i`, with a node credential and the replicas as `--control`.
    fn start(
        args: &Args,
        site: &Site,
        dir: &Path,
        i: usize,
        control: &str,
    ) -> Result<BenchProxy, Error> {
        let name = format!("node-{i}");
        let identity = dir.join(format!("{name}-identity"));
        std::fs::create_dir_all(&identity).map_err(|e| e.to_string())?;
        let (chain, key) = site.node_credential(&name)?;
        write(&identity.join("node.pem"), &chain)?;
        write(&identity.join("node.key"), &key)?;
        write(
            &identity.join("anchor.pem"),
            site.site.root.anchor.cert_pem(),
        )?;
        let admin = free_port();
        let arg = |flag: &str, value: String| [flag.to_owned(), value];
        let argv: Vec<String> = [
            arg("--admin-addr", format!("127.0.0.1:{admin}")),
            arg("--inbound-addr", format!("127.0.0.1:{}", free_port())),
            arg("--outbound-addr", format!("127.0.0.1:{}", free_port())),
            arg("--config", dir.join("no-file.toml").display().to_string()),
            arg("--identity-dir", identity.display().to_string()),
            arg(
                "--state-dir",
                dir.join(format!("{name}-state")).display().to_string(),
            ),
            arg("--control", control.to_owned()),
        ]
        .concat();
        let daemon = Daemon::spawn(
            &args.proxy_bin,
            &argv,
            &dir.join(format!("{name}.log")),
            name.clone(),
        )?;
        Ok(BenchProxy {
            name,
            admin,
            _daemon: daemon,
        })
    }

    fn control(&self) -> Option<ControlView> {
        let (status, body) = plain_get(&format!("http://127.0.0.1:{}/config", self.admin))?;
        if status != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let control = &json["control"];
        Some(ControlView {
            connected: control["connected"].as_bool().unwrap_or(false),
            replica: control["replica"].as_str().map(str::to_owned),
            version: control["version"].as_str().map(str::to_owned),
        })
    }
}

/// Rewrites the site config `--changes` times (a new service each time, written whole and
/// renamed, then SIGHUP to every replica: what the node's OTA apply does) and times each
/// until every proxy runs a document of a new version.
fn config_changes(
    args: &Args,
    site: &Site,
    replicas: &[Daemon],
    proxies: &[BenchProxy],
) -> Result<Vec<Duration>, Error> {
    let mut samples = Vec::new();
    for change in 0..args.changes {
        let before: Vec<Option<String>> = proxies
            .iter()
            .map(|p| p.control().and_then(|c| c.version))
            .collect();
        let mut text =
            format!("site = \"{SITE}\"\n\n[services.web]\nport = 80\nnodes = [\"node-0\"]\n");
        for n in 0..=change {
            text.push_str(&format!(
                "\n[services.svc-{n}]\nport = {}\nnodes = [\"node-1\"]\n",
                1000 + n
            ));
        }
        let temp = site.dir.join("cluster.toml.new");
        write(&temp, &text)?;
        let started = Instant::now();
        std::fs::rename(&temp, site.config_path()).map_err(|e| e.to_string())?;
        for replica in replicas {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(replica.pid() as i32),
                nix::sys::signal::Signal::SIGHUP,
            )
            .map_err(|err| format!("SIGHUP {}: {err}", replica.what))?;
        }
        wait_for("every proxy on the new config", || {
            let now: Vec<Option<String>> = proxies
                .iter()
                .map(|p| p.control().and_then(|c| c.version))
                .collect();
            let moved = now
                .iter()
                .zip(&before)
                .all(|(now, before)| now.is_some() && now != before);
            (moved && now.windows(2).all(|w| w[0] == w[1])).then_some(())
        })?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// Five rounds: the replica that most proxies watch is killed with SIGKILL; the time until
/// each of those proxies watches another replica is one sample; then the replica is
/// started again and given time to be back.
fn failovers(
    site: &Site,
    replicas: &mut [Daemon],
    ports: &[u16; 3],
    proxies: &[BenchProxy],
    dir: &Path,
) -> Result<Vec<Duration>, Error> {
    let mut samples = Vec::new();
    for round in 0..5 {
        let views: Vec<Option<String>> = proxies
            .iter()
            .map(|p| p.control().and_then(|c| c.replica))
            .collect();
        let index = (0..3)
            .max_by_key(|i| {
                let addr = format!("127.0.0.1:{}", ports[*i]);
                views
                    .iter()
                    .filter(|v| v.as_deref() == Some(addr.as_str()))
                    .count()
            })
            .unwrap_or(0);
        let killed = format!("127.0.0.1:{}", ports[index]);
        let watching: Vec<&BenchProxy> = proxies
            .iter()
            .zip(&views)
            .filter(|(_, v)| v.as_deref() == Some(killed.as_str()))
            .map(|(p, _)| p)
            .collect();
        let started = Instant::now();
        replicas[index].kill();
        let mut pending: Vec<&BenchProxy> = watching;
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !pending.is_empty() {
            pending.retain(|proxy| {
                let moved = proxy
                    .control()
                    .is_some_and(|c| c.connected && c.replica.is_some_and(|r| r != killed));
                if moved {
                    samples.push(started.elapsed());
                }
                !moved
            });
            if Instant::now() > deadline {
                return Err(format!(
                    "round {round}: proxies still on the killed replica after {STEP_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        replicas[index] = start_replica(site, dir, index + 1, ports[index], &replicas[index].bin)?;
        wait_for("the killed replica back", || {
            plain_get(&format!("http://127.0.0.1:{}/ready", ports[index]))
                .filter(|(status, _)| *status == 200)
        })?;
    }
    Ok(samples)
}
