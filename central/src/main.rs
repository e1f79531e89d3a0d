//! `pimesh-central`: the central server. Stores each site's signed configuration
//! revisions, serves the newest to the site's nodes by long-poll over mutual TLS, and
//! records what each node applied.

mod api;
mod config;
mod sites;
mod storage;
mod tls;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use pimesh_daemon::notify;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::CentralConfig;
use crate::sites::{Registry, Site};
use crate::storage::FileStorage;

const USAGE: &str =
    "usage: pimesh-central [--config PATH]   (default /etc/pimesh-central/central.toml)";
/// A client must complete its TLS handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let mut config_path = PathBuf::from("/etc/pimesh-central/central.toml");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--config", Some(path)) => config_path = path.into(),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let config = match CentralConfig::load(&config_path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("pimesh-central: {err}");
            return ExitCode::from(2);
        }
    };
    pimesh_daemon::run(pimesh_daemon::Threads::PerCore, run(config))
}

async fn run(config: CentralConfig) -> Result<(), String> {
    let storage = Arc::new(FileStorage::new(&config.state_dir).map_err(|err| {
        format!(
            "{}: cannot use as state folder: {err}",
            config.state_dir.display()
        )
    })?);
    let mut sites = BTreeMap::new();
    for entry in &config.sites {
        let site = Site::load(entry, storage.as_ref())?;
        info!(site = %site.name, latest = ?site.latest_revision(), "site loaded");
        sites.insert(site.name.clone(), site);
    }
    let anchors: Vec<_> = sites.values().map(|site| site.anchor.clone()).collect();
    let acceptor = TlsAcceptor::from(tls::server_config(
        &config.tls_cert,
        &config.tls_key,
        &anchors,
    )?);
    let registry = Arc::new(Registry {
        sites,
        storage,
        long_poll_max: config.long_poll_max.0,
    });
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", config.listen))?;
    info!(addr = %config.listen, "central server listening");
    notify::ready(&format!(
        "serving {} site(s) on {}",
        registry.sites.len(),
        config.listen
    ));
    let watchdog = notify::spawn_watchdog();
    tokio::select! {
        () = serve(listener, acceptor, registry) => {}
        signal = pimesh_daemon::shutdown_signal() => {
            signal.map_err(|err| format!("cannot watch for SIGTERM: {err}"))?;
            info!("shutting down");
            notify::stopping();
        }
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    Ok(())
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, registry: Arc<Registry>) {
    loop {
        let (tcp, peer_addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => {
                    debug!(%peer_addr, %err, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer_addr, "TLS handshake timed out");
                    return;
                }
            };
            let chain: api::PeerChain = Arc::new(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default(),
            );
            let service = hyper::service::service_fn(move |request| {
                let chain = Arc::clone(&chain);
                let registry = Arc::clone(&registry);
                async move { Ok::<_, Infallible>(api::route(request, chain, registry).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(err) = connection.await {
                debug!(%peer_addr, %err, "connection ended with an error");
            }
        });
    }
}
