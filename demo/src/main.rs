//! `pimesh-demo`: a Fleetman-style app for the mesh, one subcommand per part. Every part
//! serves plain HTTP (the queue: TCP) on loopback and calls the others only through the
//! local mesh proxy; see `demo/README.md`. `page-check` drives the page in headless
//! Chromium and reports what it sees.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pimesh_demo::{
    check, gateway, mesh, net, numbers, queue, simulator, staff, tracker, webapp, GATEWAY, TRACKER,
    WEBAPP,
};
use tracing::error;

/// The span the page's live mesh numbers cover.
const MESH_WINDOW: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    name = "pimesh-demo",
    about = "A Fleetman-style demo app whose parts talk through the Pimesh mesh"
)]
struct Cli {
    #[command(subcommand)]
    part: Part,
}

#[derive(Args)]
struct MeshArg {
    /// The local mesh proxy's outbound port; every call to another part goes there.
    #[arg(long, default_value = "http://127.0.0.1:4140")]
    mesh: String,
}

#[derive(Subcommand)]
enum Part {
    /// fleetman-position-simulator: publishes vehicles' positions to the queue.
    Simulator {
        /// The mesh proxy's local port for fleetman-queue (its `local_port`).
        #[arg(long, default_value = "127.0.0.1:16161")]
        queue: String,
        /// How many vehicles.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1000))]
        vehicles: u16,
    },
    /// fleetman-queue: a TCP message queue with fan-out.
    Queue {
        #[arg(long, default_value = "127.0.0.1:61616")]
        listen: SocketAddr,
    },
    /// fleetman-position-tracker: latest positions over HTTP and a WebSocket.
    Tracker {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// The mesh proxy's local port for fleetman-queue (its `local_port`).
        #[arg(long, default_value = "127.0.0.1:16161")]
        queue: String,
    },
    /// fleetman-api-gateway: the page's API, relayed through the mesh.
    ApiGateway {
        #[arg(long, default_value = "127.0.0.1:8084")]
        listen: SocketAddr,
        #[command(flatten)]
        mesh: MeshArg,
    },
    /// fleetman-staff-service-stable: who drives each vehicle.
    Staff {
        #[arg(long, default_value = "127.0.0.1:8082")]
        listen: SocketAddr,
    },
    /// error-injector: answers every request with 500.
    Injector {
        #[arg(long, default_value = "127.0.0.1:8083")]
        listen: SocketAddr,
    },
    /// fleetman-webapp: the page, its API relay and the mesh's live numbers.
    Webapp {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[command(flatten)]
        mesh: MeshArg,
        /// The local proxy's Prometheus metrics.
        #[arg(long, default_value = "http://127.0.0.1:4191/metrics")]
        proxy_admin: String,
    },
    /// Opens the page in headless Chromium and prints one JSON line per phase it sees:
    /// loaded, moving, staff, then (with --fault-on) waiting-fault and fault.
    PageCheck {
        /// The page, e.g. `http://192.168.1.10:8080/?staff_hz=100`.
        #[arg(long)]
        url: String,
        /// Where screenshots (and Chromium's log) go.
        #[arg(long)]
        screenshots: std::path::PathBuf,
        /// Staff calls counted before the error share is reported.
        #[arg(long, default_value_t = 1000)]
        staff_calls: u64,
        /// After the staff phase, wait for this service's success rate to fall below
        /// 95 % (or its fault count to rise) on the mesh panel.
        #[arg(long)]
        fault_on: Option<String>,
        /// The deadline of each phase, in seconds.
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            error!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.part)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(part: Part) -> Result<(), String> {
    if let Part::PageCheck {
        url,
        screenshots,
        staff_calls,
        fault_on,
        timeout,
    } = part
    {
        let options = check::Options {
            url,
            screenshots,
            staff_calls,
            fault_on,
            timeout: std::time::Duration::from_secs(timeout),
        };
        return check::run(&options, |phase| println!("{phase}")).await;
    }
    let shutdown = net::Shutdown::on_signals()?;
    match part {
        Part::Simulator { queue, vehicles } => {
            simulator::run(queue, usize::from(vehicles), shutdown).await;
        }
        Part::Queue { listen } => {
            let listener = net::bind(listen, "fleetman-queue").await?;
            queue::run(listener, shutdown).await;
        }
        Part::Tracker { listen, queue } => {
            let listener = net::bind(listen, TRACKER).await?;
            let tracker = tracker::Tracker::new(shutdown.clone());
            let consumer = tokio::spawn(tracker::consume(Arc::clone(&tracker), queue));
            net::serve(
                listener,
                move |request| Arc::clone(&tracker).handle(request),
                shutdown,
            )
            .await;
            let _ = consumer.await;
        }
        Part::ApiGateway { listen, mesh } => {
            let listener = net::bind(listen, GATEWAY).await?;
            let gateway = Arc::new(gateway::Gateway {
                mesh: mesh::Mesh::new(&mesh.mesh)?,
                shutdown: shutdown.clone(),
            });
            net::serve(
                listener,
                move |request| Arc::clone(&gateway).handle(request),
                shutdown,
            )
            .await;
        }
        Part::Staff { listen } => {
            let listener = net::bind(listen, "fleetman-staff-service-stable").await?;
            net::serve(listener, staff::stable, shutdown).await;
        }
        Part::Injector { listen } => {
            let listener = net::bind(listen, "error-injector").await?;
            net::serve(listener, staff::injector, shutdown).await;
        }
        Part::Webapp {
            listen,
            mesh,
            proxy_admin,
        } => {
            let admin: http::Uri = proxy_admin
                .parse()
                .map_err(|err| format!("--proxy-admin {proxy_admin:?}: not a URL: {err}"))?;
            let listener = net::bind(listen, WEBAPP).await?;
            let numbers = Arc::new(Mutex::new(numbers::Window::new(&proxy_admin, MESH_WINDOW)));
            let scraper = tokio::spawn(webapp::scrape(
                admin,
                Arc::clone(&numbers),
                shutdown.clone(),
            ));
            let webapp = Arc::new(webapp::Webapp {
                mesh: mesh::Mesh::new(&mesh.mesh)?,
                numbers,
                shutdown: shutdown.clone(),
            });
            net::serve(
                listener,
                move |request| Arc::clone(&webapp).handle(request),
                shutdown,
            )
            .await;
            let _ = scraper.await;
        }
        Part::PageCheck { .. } => {}
    }
    tracing::info!("stopped");
    Ok(())
}
