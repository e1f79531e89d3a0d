//! `pimesh-supervisor`: the daemon on every Pimesh node.
//!
//! Today it reads the seed, gives the node its name and SSH access, keeps the mesh proxy
//! and the control replicas running through systemd (`keeper`, `heal`, `systemd`), and
//! serves the node's status; it is the place where K3s bootstrap and trust provisioning
//! grow.

mod cli;
mod credential;
mod node;
mod ota;
mod paths;
mod status;
mod trust;
mod units;

use std::process::ExitCode;
use std::sync::Arc;

use pimesh_runtime::notify;
use pimesh_runtime::notify::Heartbeat;
use pimesh_schema::SupervisorConfig;
use tracing::{info, warn};

use crate::cli::Options;
use crate::status::{ConfigReport, NodeStatus, StatusHandle};
use crate::units::keeper::Keeper;

fn main() -> ExitCode {
    let options = match Options::from_args(std::env::args_os()) {
        Ok(options) => options,
        Err(err) => err.exit(),
    };
    if let Some(action) = &options.trust {
        return match trust_command(&options, action) {
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

async fn run(options: Options) -> Result<(), String> {
    let paths = &options.paths;
    info!(version = env!("CARGO_PKG_VERSION"), seed = %paths.seed.display(), "starting");
    let seed = node::seed::SeedState::load(&paths.seed);
    seed.log();
    let facts = node::facts::NodeFacts::gather(&options.paths, &seed);
    let tasks = if options.node_setup {
        node::setup::apply(&options.paths, &facts, &seed).await
    } else {
        Vec::new()
    };
    let trust_files = trust::TrustFiles::on_node(paths);
    let trust = trust_files.provision(seed.seed(), &paths.boot_trust_dir());
    let (supervisor_config, config_report) = load_supervisor_config(&options);
    let holds_issuer = trust_files.holds_issuer();
    prepare_node_credential(paths, &facts, &seed, &trust_files, holds_issuer);
    let servers: Vec<String> = seed
        .seed()
        .map(|seed| {
            seed.servers
                .iter()
                .map(|s| String::from(s.clone()))
                .collect()
        })
        .unwrap_or_default();
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
    let units = {
        let status = status.clone();
        Arc::new(units::managed_set::ManagedUnits::new(
            &supervisor_config,
            units::managed_set::Placement {
                holds_issuer,
                servers,
                site: seed.seed().map(|seed| seed.site.clone()),
                paths: paths.clone(),
            },
            active_site_config(&options).as_ref(),
            Box::new(move |report| status.update(|status| status.control = report)),
        ))
    };

    let listener = tokio::net::TcpListener::bind(options.status_addr)
        .await
        .map_err(|err| {
            format!(
                "cannot listen on {} for the status API: {err}",
                options.status_addr
            )
        })?;
    info!(addr = %options.status_addr, "status API listening");
    let server = tokio::spawn(status::api::serve(listener, Arc::clone(&status.0)));

    let heartbeat = Heartbeat::new();
    heartbeat.beat();
    let keeper = Keeper::new(
        supervisor_config.heal.clone(),
        units.subscribe(),
        status.clone(),
        Arc::clone(&heartbeat),
    );
    let keeper = tokio::spawn(keeper.run());
    let ota = ota_context(&options, &facts, &seed, &supervisor_config, &units, &status)
        .map(|context| tokio::spawn(ota::run(context)));
    let trust_check = trust_present
        .then(|| seed.seed().map(|seed| seed.site.clone()))
        .flatten()
        .map(|site| {
            let credential = credential::CredentialFiles::on_node(paths);
            let status = status.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(trust::CHECK_EVERY);
                loop {
                    every.tick().await;
                    let mut report = trust_files.check(&site, &credential);
                    status.update(|status| {
                        // How the root came to be stays what the start found.
                        report.source = status.trust.source.or(report.source);
                        status.trust = report;
                    });
                }
            })
        });

    notify::ready(&status_line);
    let watchdog = notify::spawn_watchdog_fed_by(heartbeat);

    pimesh_runtime::shutdown_signal()
        .await
        .map_err(|err| format!("cannot watch for SIGTERM: {err}"))?;
    info!("shutting down");
    notify::stopping();
    server.abort();
    keeper.abort();
    if let Some(check) = trust_check {
        check.abort();
    }
    if let Some(ota) = ota {
        ota.abort();
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    Ok(())
}

/// Runs one `pimesh-supervisor trust ...` command; returns what to print.
fn trust_command(
    options: &Options,
    action: &cli::TrustAction,
) -> Result<String, trust::TrustError> {
    use trust::lifecycle;
    let paths = &options.paths;
    let files = trust::TrustFiles::on_node(paths);
    let store = &files.store;
    store.recover()?;
    let credential = credential::CredentialFiles::on_node(paths);
    let site = || {
        let seed = node::seed::SeedState::load(&paths.seed);
        seed.seed()
            .map(|seed| seed.site.clone())
            .ok_or_else(|| trust::TrustError::UnusableSeed {
                seed: paths.seed.clone(),
                summary: seed.one_line_summary("this node"),
            })
    };
    let now = std::time::SystemTime::now();
    match action {
        cli::TrustAction::Status => serde_json::to_string_pretty(&lifecycle::status(store)?)
            .map_err(trust::TrustError::Encode),
        cli::TrustAction::RotateIssuer => {
            let n = lifecycle::rotate_issuer(store, &site()?, now)?;
            let issuer = files.issuer()?;
            let resigned = match &issuer {
                Some(issuer) => credential.renew_from(issuer, now)?,
                None => false,
            };
            Ok(format!(
                "issuer rotated (generation {n}){}",
                if resigned {
                    "; this node's credential is re-signed by it"
                } else {
                    ""
                }
            ))
        }
        cli::TrustAction::AnchorBegin => lifecycle::anchor_begin(store, &site()?, now),
        cli::TrustAction::AnchorSwitch => {
            lifecycle::anchor_switch(store, &site()?, &credential, now)
        }
        cli::TrustAction::AnchorFinish { force } => {
            lifecycle::anchor_finish(store, &credential, now, *force)
        }
        cli::TrustAction::ExportAnchorKey(file) => lifecycle::export_anchor_key(store, file),
        cli::TrustAction::ImportAnchorKey(file) => lifecycle::import_anchor_key(store, file),
    }
}

/// Before any unit starts: makes the node's key (the proxy's) and its signing request when
/// there are none, and on a node holding the site issuer signs the node's own certificate,
/// so that the proxy has a credential from its first start and can ask the replicas for
/// its leaf. On other nodes the operator signs the request (`pimeshctl node sign`), the
/// proxy takes the certificate up when it appears, and trusts the site anchor the card
/// brought (checked against the join token's pin). A failure is logged; the OTA client
/// tries again.
fn prepare_node_credential(
    paths: &paths::NodePaths,
    facts: &node::facts::NodeFacts,
    seed: &node::seed::SeedState,
    trust: &trust::TrustFiles,
    holds_issuer: bool,
) {
    let Some(seed) = seed.seed() else {
        return;
    };
    let Ok(node) = pimesh_schema::DnsLabel::try_from(facts.node_name.clone()) else {
        return; // reported where the OTA context is made
    };
    let credential = credential::CredentialFiles::on_node(paths);
    let result = credential
        .ensure_request(&seed.site, &node)
        .map_err(trust::TrustError::from)
        .and_then(|()| {
            if holds_issuer {
                trust.self_enroll(&credential, &seed.site, &node)
            } else {
                credential
                    .import_anchor(&paths.boot_trust_dir(), seed)
                    .map(drop)
                    .map_err(trust::TrustError::from)
            }
        });
    if let Err(err) = result {
        warn!(%err, "cannot prepare the node's credential");
    }
}

/// What the OTA client needs, when the seed names a central server and the node has a
/// usable name.
fn ota_context(
    options: &Options,
    facts: &node::facts::NodeFacts,
    seed: &node::seed::SeedState,
    config: &SupervisorConfig,
    units: &Arc<units::managed_set::ManagedUnits>,
    status: &StatusHandle,
) -> Option<ota::OtaContext> {
    let seed = seed.seed()?;
    let central = seed.central.clone()?;
    let node = match pimesh_schema::DnsLabel::try_from(facts.node_name.clone()) {
        Ok(node) => node,
        Err(err) => {
            warn!(node = %facts.node_name, %err, "the node name is not usable in an identity; no OTA configuration");
            return None;
        }
    };
    Some(ota::OtaContext {
        settings: config.ota.clone(),
        units: Arc::clone(units),
        site: seed.site.clone(),
        node,
        central,
        ota_dir: options.paths.ota_dir(),
        credential: credential::CredentialFiles::on_node(&options.paths),
        trust: trust::TrustFiles::on_node(&options.paths),
        active_config: options.paths.active_site_config(),
        status: status.clone(),
    })
}

/// The site configuration the node runs (`cluster.toml`), when there is a usable one.
fn active_site_config(options: &Options) -> Option<pimesh_schema::cluster::ClusterConfig> {
    let file = options.paths.active_site_config();
    if !file.exists() {
        return None;
    }
    pimesh_schema::cluster::ClusterConfig::load(&file)
        .map_err(|err| warn!(%err, "the active site configuration is not usable; the default units meanwhile"))
        .ok()
}

/// The supervisor's configuration: the file, the defaults when it is missing, and the
/// defaults (with the error reported) when it is broken. Never fails.
fn load_supervisor_config(options: &Options) -> (SupervisorConfig, ConfigReport) {
    let file = options.paths.supervisor_config.clone();
    match SupervisorConfig::load(&file) {
        Ok(config) => {
            let source = if file.exists() { "file" } else { "defaults" };
            info!(
                file = %file.display(),
                source,
                units = config.units.len(),
                "supervisor configuration from {source}: {} units",
                config.units.len()
            );
            (
                config,
                ConfigReport {
                    file,
                    source,
                    error: None,
                },
            )
        }
        Err(err) => {
            warn!(file = %file.display(), "{err}; managing the default units meanwhile");
            (
                SupervisorConfig::default(),
                ConfigReport {
                    file,
                    source: "defaults",
                    error: Some(err),
                },
            )
        }
    }
}
