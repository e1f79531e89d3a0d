//! `k3s-fixture`: a TEST FIXTURE standing in for the `k3s` binary (v1.34.3+k3s1) where
//! K3s cannot be downloaded. It is installed as `/usr/local/bin/k3s` in Pimesh's test
//! nodes and run by `k3s.service` (`k3s server`) and `k3s-agent.service` (`k3s agent`),
//! `Type=notify`. It is not K3s and runs no Kubernetes component: it reproduces what
//! Pimesh's supervisor relies on — the command line and its flags, the config file and
//! drop-ins, the token, the CA, the kubeconfigs, `/readyz`, the Node objects of the
//! cluster's nodes, a quorum stand-in for embedded etcd, the auto-deploying manifests
//! (for Namespaces, Services and EndpointSlices), `coordination.k8s.io/v1` Leases shared by
//! all servers, readiness notification, and stopping on SIGTERM — and says so in its
//! version and its log.
//!
//! What it simplifies (each module's documentation says more):
//! - no Kubernetes components, containers, CNI or kubectl; the API is `/readyz`, Nodes,
//!   Namespaces, Services, EndpointSlices (read only), Leases and a few K3s supervisor
//!   paths (`api`);
//! - Leases (kube-apiserver's optimistic concurrency: 409 on a stale resourceVersion or an
//!   existing name) live in one store per cluster that stands in for etcd: the live server
//!   with the smallest node name is its leader, the others forward Lease requests to it,
//!   and it answers a write once a majority of the servers stored it; without quorum,
//!   writes answer 503 and reads come from the server's own copy. It is not a consensus
//!   protocol; `sitewide` says where it falls short (`leases`, `sitewide`);
//! - `<data-dir>/server/manifests/` is applied as K3s's deploy controller applies it, but
//!   only Namespaces, Services and EndpointSlices are stored (other kinds are logged and
//!   ignored), in memory and per server (not replicated), re-scanned every 2 s rather than
//!   15 s, an invalid document skipped rather than failing its file; defaulting is a part
//!   of kube-apiserver's, Services are ClusterIP only (`manifests`, `objects`);
//! - the "etcd" of several servers is a node table each server keeps on disk, replicated
//!   by pulling the other servers' Node lists every 2 s, newest heartbeat winning; quorum
//!   is "more than half of the servers answered `/ping` in the last 10 s" (`cluster`,
//!   `peers`);
//! - one CA signs serving and client certificates; a joining server gets it (with its
//!   key) from the server it joins, so all servers share it, as in K3s (`pki`, `server`);
//! - the agent's load balancer passes TCP through to a server; kubelets register with
//!   HTTP basic auth `node:<password>` and a JSON body, every 5 s (`agent`, `lb`);
//! - a node not heard from for 40 s shows `Ready` = `Unknown` (`NodeStatusUnknown`), as
//!   Kubernetes' node lifecycle controller shows it (`nodes`);
//! - flags other than those the modules name are accepted and ignored; the config file's
//!   YAML is read as YAML 1.2 (unquoted `0644` is the string "0644", not octal 420).
//!
//! Modules, one concern each:
//! - [`flags`], [`cli`], [`config`], [`settings`]: command line, config file, effective flags;
//! - [`token`], [`pki`], [`kubeconfig`], [`files`]: credentials and the files K3s writes;
//! - [`nodes`], [`cluster`], [`api`], [`peers`]: the server's node table, quorum, HTTPS
//!   API and replication between servers;
//! - [`manifests`], [`objects`]: the auto-deploying manifests and the objects they make;
//! - [`leases`], [`sitewide`]: Leases, and how the servers share them;
//! - [`server`], [`agent`], [`lb`]: the two subcommands and the agent's load balancer;
//! - [`log`], [`notify`], [`client`]: K3s-like log lines, systemd notification, HTTPS clients.

mod agent;
mod answers;
mod api;
mod cli;
mod client;
mod cluster;
mod config;
mod files;
mod flags;
mod kubeconfig;
mod lb;
mod leases;
mod log;
mod manifests;
mod nodes;
mod notify;
mod objects;
mod peers;
mod pki;
mod server;
mod settings;
mod sitewide;
mod token;

use std::process::ExitCode;

use flags::Subcommand;
use settings::Settings;

/// What `--version` prints.
const VERSION_LINE: &str = "k3s version v1.34.3+k3s1 (pimesh fixture, not K3s)";

const USAGE: &str = "k3s-fixture: a test fixture standing in for k3s v1.34.3+k3s1 (not K3s)

Usage: k3s server [flags]   run a fixture K3s server
       k3s agent  [flags]   run a fixture K3s agent
       k3s --version

Flags are K3s's own (see tests/k3s/fixture/flags-v1.34.3+k3s1.txt); most are accepted and
ignored. The config file is /etc/rancher/k3s/config.yaml (--config, K3S_CONFIG_FILE).
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("-v" | "--version" | "-version") => {
            println!("{VERSION_LINE}");
            ExitCode::SUCCESS
        }
        Some("server") => run(Subcommand::Server, &args[1..]),
        Some("agent") => run(Subcommand::Agent, &args[1..]),
        Some(other) => fatal(&format!(
            "Error: the k3s fixture runs only `server` and `agent`, not {other:?}"
        )),
    }
}

/// Logs `msg` at level fatal and exits 1, as K3s's `logrus.Fatal`.
fn fatal(msg: &str) -> ExitCode {
    log::log(log::Level::Fatal, msg);
    ExitCode::FAILURE
}

fn run(command: Subcommand, args: &[String]) -> ExitCode {
    let config_path = config::path(args, std::env::var("K3S_CONFIG_FILE").ok());
    let (merged, files) = match config::load(&config_path) {
        Ok(loaded) => loaded,
        Err(err) => return fatal(&err),
    };
    let (config_flags, warnings) = match config::to_flags(command, merged) {
        Ok(converted) => converted,
        Err(err) => return fatal(&format!("Error: {err}")),
    };
    for warning in warnings {
        log::warn(&warning);
    }
    let parsed = match cli::parse(command, args) {
        Ok(parsed) => parsed,
        Err(err) => return fatal(&format!("Error: {err}")),
    };
    if parsed.help {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if !parsed.positional.is_empty() {
        log::warn(&format!(
            "k3s fixture: ignoring arguments {:?}",
            parsed.positional
        ));
    }
    let settings = Settings::resolve(command, config_flags, parsed.values, |var| {
        std::env::var(var).ok()
    });
    log::info(&format!(
        "Starting k3s fixture {}",
        &VERSION_LINE["k3s version ".len()..]
    ));
    for file in &files {
        log::info(&format!("k3s fixture: read config file {}", file.display()));
    }
    log::info(&format!(
        "k3s fixture {} settings: {}",
        command.as_str(),
        settings.describe()
    ));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fatal(&format!("Error: cannot start the runtime: {err}")),
    };
    let result = runtime.block_on(async move {
        tokio::select! {
            result = async {
                match command {
                    Subcommand::Server => server::run(settings).await,
                    Subcommand::Agent => agent::run(settings).await,
                }
            } => result,
            signal = stopped() => {
                log::info(&format!("k3s fixture: received {signal}, shutting down"));
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => {
            // Exit now: tasks still serving connections are not waited for.
            std::process::exit(0);
        }
        Err(err) => fatal(&format!("Error: {err}")),
    }
}

/// Waits for SIGTERM or SIGINT; its name.
async fn stopped() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
