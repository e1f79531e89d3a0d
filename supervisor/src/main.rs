//! `pimesh-supervisor`: the daemon on every Pimesh node.
//!
//! It reads the seed, gives the node its name and SSH access, provisions and keeps the
//! site's trust root and the node's credential, keeps the mesh proxy and the control
//! replicas running through systemd, applies configuration revisions from the central
//! server, and serves the node's status. This file only wires the parts together:
//!
//! - [`cli`] and [`paths`]: the command line, and every path on the node ([`paths::NodePaths`]);
//! - [`config`]: the supervisor's own configuration and the active site configuration;
//! - [`node`]: the seed, the node's facts, and the setup it makes from the seed;
//! - [`credential`]: the node's key and certificate, and the node IDs they carry;
//! - [`trust`]: the site's trust root on the node (store, lifecycle, the operator's `trust`
//!   commands);
//! - [`units`]: the managed units, the placement of the control replicas, and the keeper
//!   that heals them over systemd's D-Bus API;
//! - [`k3s`]: K3s's role, config, unit, readiness and server quorum on this node;
//! - [`ota`]: over-the-air configuration from the central server;
//! - [`status`]: the node's status, which every part writes its section of, and its API.
//!
//! Dependencies run one way, down this list: `ota`; `trust` (on `credential` and `node`);
//! `units`, `node`, `config` and `credential`; `status` and `paths`, which depend on no
//! other part.
//! Plug-in join (discovery by mDNS, the join exchange, the node's role) is `join/`,
//! beside `trust/` and `credential`, which it feeds with the site's anchor and the node's
//! certificate. K3s is `k3s/`, beside `units/`: its unit joins the managed set through the
//! placement, and its quorum holds back the keeper's disruptive heals.

mod cli;
mod config;
mod credential;
mod file_error;
mod join;
mod k3s;
mod node;
mod ota;
mod paths;
mod status;
mod trust;
mod units;

use std::fmt;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use pimesh_runtime::notify;
use pimesh_runtime::notify::Heartbeat;
use tracing::{info, warn};

use crate::cli::Options;
use crate::node::facts::NodeFacts;
use crate::node::seed::SeedState;
use crate::status::{NodeStatus, StatusHandle};
use crate::units::keeper::Keeper;
use crate::units::managed_set::ManagedSet;
use crate::units::placement::Placement;

fn main() -> ExitCode {
    let options = match Options::from_args(std::env::args_os()) {
        Ok(options) => options,
        Err(err) => err.exit(),
    };
    if let Some(action) = &options.trust {
        return match trust::command::run(action, &options.paths) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("pimesh-supervisor trust: {err}");
                ExitCode::FAILURE
            }
        };
    }
    // One thread is plenty for a supervisor and keeps its footprint small on a Pi.
    pimesh_runtime::run(pimesh_runtime::Threads::One, run(options))
}

/// Why the daemon stopped with a failure.
#[derive(Debug)]
enum DaemonError {
    /// The status API's address cannot be listened on.
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// SIGTERM cannot be watched for.
    Signals(std::io::Error),
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonError::Listen { addr, source } => {
                write!(f, "cannot listen on {addr} for the status API: {source}")
            }
            DaemonError::Signals(err) => write!(f, "cannot watch for SIGTERM: {err}"),
        }
    }
}

async fn run(options: Options) -> Result<(), DaemonError> {
    let paths = &options.paths;
    info!(version = env!("CARGO_PKG_VERSION"), seed = %paths.seed.display(), "starting");
    let seed = SeedState::load(&paths.seed);
    seed.log();
    let facts = NodeFacts::gather(paths, &seed);
    let tasks = if options.node_setup {
        node::setup::apply(paths, &facts, &seed).await
    } else {
        Vec::new()
    };
    let trust_files = trust::TrustFiles::on_node(paths);
    let trust = trust_files.provision(seed.seed(), &paths.boot_trust_dir());
    let (supervisor_config, config_report) =
        config::load_supervisor_config(&paths.supervisor_config);
    prepare_node_credential(paths, &facts, &seed, &trust_files);
    let mut status_line = seed.one_line_summary(&facts.node_name);
    if let Some(err) = &config_report.error {
        status_line.push_str(&format!(
            "; supervisor config error (using defaults): {err}"
        ));
    }
    let status = StatusHandle::new(NodeStatus::new(
        facts.info(),
        seed.report(),
        facts.k3s.clone(),
        facts.image.clone(),
        tasks,
        config_report,
    ));
    let trust_present = trust.present;
    status.update(|status| status.trust = trust);
    let node_label = pimesh_schema::DnsLabel::try_from(facts.node_name.clone()).ok();
    let credential_files = credential::CredentialFiles::on_node(paths);
    let plan = join::plan::Plan::of(
        seed.seed(),
        &paths.join_record(),
        &credential_files,
        paths.boot_trust_dir().join("anchor.pem").exists(),
    );
    status.update(|status| status.join = plan.report());
    let k3s_readiness = k3s::readiness::Readiness::default();
    let k3s_upkeep = k3s::upkeep::Upkeep::default();
    let datastore = k3s::datastore::Datastore::new(
        paths,
        seed.seed().map(|seed| seed.k3s.datastore),
        options.node_setup,
    );
    let units = {
        let status = status.clone();
        let mdns_interfaces: Option<Vec<String>> = seed
            .seed()
            .and_then(|seed| seed.mdns_interfaces.as_ref())
            .map(|names| names.iter().map(|name| name.as_str().to_owned()).collect());
        let mut placement = Placement {
            holds_issuer: trust_files.holds_issuer(),
            servers: seed
                .seed()
                .map(|seed| seed.servers.iter().cloned().map(String::from).collect())
                .unwrap_or_default(),
            site: seed.seed().map(|seed| seed.site.clone()),
            node: node_label.clone(),
            waiting_to_join: false,
            role: None,
            joined_replicas: Vec::new(),
            announced_replicas: Vec::new(),
            join_warmup: false,
            paths: paths.clone(),
            k3s: k3s::K3sPlace {
                installed: facts.k3s.present,
                first_server: false,
                via: None,
                servers: Vec::new(),
                node_ip: k3s::node_ip(mdns_interfaces.as_deref()),
                interfaces: mdns_interfaces,
                trust_token: trust_files.k3s_token_file(),
                probe_url: pimesh_schema::ProbeUrl::try_from(format!(
                    "http://{}/k3s/ready",
                    options.status_addr
                ))
                .ok(),
                readiness: k3s_readiness.clone(),
                upkeep: k3s_upkeep.clone(),
                datastore: datastore.gate(),
            },
        };
        plan.place(&mut placement);
        Arc::new(ManagedSet::new(
            &supervisor_config,
            placement,
            config::active_site_config(&paths.active_site_config()).as_ref(),
            Box::new(move |report, k3s| {
                status.update(|status| {
                    status.control = report;
                    status.k3s.placement = k3s;
                });
            }),
        ))
    };
    let site_role = join::SiteRole::new(
        paths,
        seed.seed(),
        node_label.clone(),
        options.node_setup,
        Arc::clone(&units),
        status.clone(),
        supervisor_config.ota.proxy_config_url.clone(),
    );
    if matches!(plan, join::plan::Plan::Init) || trust_files.holds_issuer() {
        site_role.serve_as_server();
    }
    let join_task = match (seed.seed(), &node_label) {
        (Some(seed), Some(node)) if plan.needs_join() => seed.join_token.clone().map(|token| {
            tokio::spawn(join::run(join::JoinContext {
                site: seed.site.clone(),
                node: node.clone(),
                token,
                seed_servers: seed.servers.iter().cloned().map(String::from).collect(),
                mdns: options.node_setup,
                mdns_interfaces: seed.mdns_interfaces.clone(),
                credential: credential::CredentialFiles::on_node(paths),
                trust: trust::TrustFiles::on_node(paths),
                record_file: paths.join_record(),
                k3s_token_file: paths.k3s_token(),
                clock: join::clock::Clock::new(
                    facts
                        .image
                        .as_ref()
                        .and_then(|image| image.get("built_at"))
                        .and_then(|built| built.as_str()),
                    paths.clock_file(),
                ),
                started: std::time::Instant::now(),
                status: status.clone(),
                on_joined: site_role.on_joined(),
                on_manual: site_role.on_manual(),
                proxy_config_url: supervisor_config.ota.proxy_config_url.clone(),
            }))
        }),
        _ => None,
    };

    let listener = tokio::net::TcpListener::bind(options.status_addr)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: options.status_addr,
            source,
        })?;
    info!(addr = %options.status_addr, "status API listening");
    let server = tokio::spawn(status::api::serve(
        listener,
        Arc::clone(&status.0),
        Arc::new(k3s_readiness.clone()),
    ));
    let quorum = k3s::quorum::Quorum::new(
        k3s_readiness,
        Arc::clone(&units),
        paths.k3s_admin_kubeconfig(),
        facts.node_name.clone(),
    );
    let quorum_task = tokio::spawn(quorum.clone().run(status.clone()));
    // Off a node (`--no-node-setup`) the host's firewall is left alone.
    let iptables = options.node_setup.then(k3s::redirect::Iptables::default);
    let upkeep_task = tokio::spawn(k3s_upkeep.run(iptables, status.clone()));
    // K3s's data folder is settled first (a USB or NVMe disk is mounted on it), then K3s
    // is placed again.
    let datastore_task = {
        let units = Arc::clone(&units);
        tokio::spawn(datastore.run(
            status.clone(),
            Box::new(move || {
                units.replace_placement(|_| {});
            }),
        ))
    };

    let heartbeat = Heartbeat::new();
    heartbeat.beat();
    let guard: Arc<dyn units::heal::DisruptionGuard> = Arc::new(quorum);
    let keeper = Keeper::new(
        supervisor_config.heal.clone(),
        units.subscribe(),
        status.clone(),
        Arc::clone(&heartbeat),
        Arc::clone(&guard),
    );
    let keeper = tokio::spawn(keeper.run());
    let ota = seed
        .seed()
        .and_then(|seed| {
            ota::OtaContext::for_node(
                paths,
                seed,
                &facts.node_name,
                supervisor_config.ota.clone(),
                Arc::clone(&units),
                status.clone(),
                Arc::clone(&guard),
            )
        })
        .map(|context| tokio::spawn(ota::run(context)));
    // Only a node that reports to a central server measures its mesh traffic.
    let traffic_task = match (&ota, supervisor_config.ota.traffic_every) {
        (Some(_), Some(every)) => Some(tokio::spawn(ota::traffic::keep_measuring(
            supervisor_config.ota.proxy_metrics_url.clone(),
            every,
            status.clone(),
        ))),
        _ => None,
    };
    let trust_check = trust_present
        .then(|| seed.seed().map(|seed| seed.site.clone()))
        .flatten()
        .map(|site| {
            let credential = credential::CredentialFiles::on_node(paths);
            tokio::spawn(trust_files.keep_checking(site, credential, status.clone()))
        });

    notify::ready(&status_line);
    let watchdog = notify::spawn_watchdog_fed_by(vec![("unit keeper", heartbeat)]);

    pimesh_runtime::shutdown_signal()
        .await
        .map_err(DaemonError::Signals)?;
    info!("shutting down");
    notify::stopping();
    server.abort();
    quorum_task.abort();
    upkeep_task.abort();
    datastore_task.abort();
    keeper.abort();
    if let Some(check) = trust_check {
        check.abort();
    }
    if let Some(ota) = ota {
        ota.abort();
    }
    if let Some(traffic) = traffic_task {
        traffic.abort();
    }
    if let Some(join_task) = join_task {
        join_task.abort();
    }
    drop(site_role);
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    Ok(())
}

/// Before any unit starts, the node's credential as far as the node can make it alone
/// ([`trust::TrustFiles::prepare_node_credential`]). A failure is logged; the OTA client
/// tries again.
fn prepare_node_credential(
    paths: &paths::NodePaths,
    facts: &NodeFacts,
    seed: &SeedState,
    trust: &trust::TrustFiles,
) {
    let Some(seed) = seed.seed() else {
        return;
    };
    let Ok(node) = pimesh_schema::DnsLabel::try_from(facts.node_name.clone()) else {
        return; // reported where the OTA context is made
    };
    let credential = credential::CredentialFiles::on_node(paths);
    if let Err(err) =
        trust.prepare_node_credential(&credential, seed, &node, &paths.boot_trust_dir())
    {
        warn!(%err, "cannot prepare the node's credential");
    }
}
