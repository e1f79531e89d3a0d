//! `make bench-replicas`: two `pimesh-central` replicas on one PostgreSQL server (Debian's,
//! started in a temporary folder on a Unix socket), `--nodes` nodes (default 2000) each a
//! task holding one mTLS long-poll, half parked on each replica. Each of `--rounds`
//! rounds (default 6) publishes the next revision on one replica, the two taking turns,
//! once every node is parked again; measured per node and round: the time from the
//! publish request leaving the operator until the node's long-poll answered with the new
//! revision, reported p50/p99/max for the nodes parked on the replica that took the
//! publish and for those parked on the other one (reached through PostgreSQL's
//! `LISTEN/NOTIFY`).
//!
//! usage: cargo bench -p pimesh-bench --bench replicas -- [--nodes N] [--rounds N]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pimesh_bench::{bench_args, Table};
use pimesh_revision::path;
use pimesh_test_support::central::{Central, OperatedSite};
use pimesh_test_support::postgres::Postgres;

type Error = String;

/// Deadline of each phase.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

struct Args {
    nodes: usize,
    rounds: u64,
}

fn parse(argv: &[String]) -> Result<Args, Error> {
    let mut args = Args {
        nodes: 2000,
        rounds: 6,
    };
    let mut rounds = 6;
    pimesh_bench::whole_number_flags(
        argv,
        &mut [("--nodes", &mut args.nodes), ("--rounds", &mut rounds)],
    )?;
    args.rounds = rounds as u64;
    if args.nodes < 2 || args.rounds == 0 {
        return Err("--nodes needs at least 2 and --rounds at least 1".to_owned());
    }
    Ok(args)
}

fn main() {
    let Some(argv) = bench_args() else {
        return;
    };
    let args = match parse(&argv) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("bench-replicas: {err}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bench-replicas: no runtime: {err}");
            std::process::exit(1);
        }
    };
    let postgres = Postgres::start();
    // The blocking client runs outside the runtime.
    let version = postgres
        .client()
        .query_one("SHOW server_version", &[])
        .map(|row| row.get::<_, String>(0))
        .unwrap_or_default();
    if let Err(err) = runtime.block_on(run(&args, &postgres, &version)) {
        eprintln!("bench-replicas: {err}");
        std::process::exit(1);
    }
}

/// When each node's long-poll answered with each revision: `(revision, node, at)`.
type Answers = Arc<Mutex<Vec<(u64, usize, Instant)>>>;

async fn run(args: &Args, postgres: &Postgres, version: &str) -> Result<(), Error> {
    let mut table = Table::new("replicas");
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let site = OperatedSite::new(dir.path(), "depot-7");
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let home = dir.path().join(name);
        std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
        replicas.push(Central::start_on_postgres(
            &home,
            &postgres.connect_string(),
            "long_poll_max = \"60s\"\n",
            &[site.central_site()],
        ));
    }
    table.setup(format!(
        "2 pimesh-central replicas (release) on one PostgreSQL {} server (Unix socket, fsync \
         off), {} nodes each holding an mTLS long-poll, half on each replica; all on this machine",
        version, args.nodes
    ));
    let operators: Vec<reqwest::Client> = replicas
        .iter()
        .map(|central| client(central, None))
        .collect::<Result<_, _>>()?;

    let answers: Answers = Arc::default();
    for node in 0..args.nodes {
        let central = &replicas[node % 2];
        let identity = site.site.node_identity_pem(&format!("n{node:04}"));
        let http = client(central, Some(&identity))?;
        let config = central.url(&path::config(site.name()));
        tokio::spawn(node_loop(http, config, node, Arc::clone(&answers)));
    }

    let mut same = Vec::new();
    let mut other = Vec::new();
    for round in 0..args.rounds {
        let revision = round + 1;
        wait_parked(&operators, &replicas, args.nodes).await?;
        let by = usize::try_from(round % 2).unwrap_or(0);
        let sent = Instant::now();
        let answer = operators[by]
            .put(replicas[by].url(&path::revisions(site.name())))
            .body(site.revision(revision, "site = \"depot-7\"\n"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if answer.status() != 201 {
            return Err(format!("publish {revision}: {}", answer.status()));
        }
        let deadline = Instant::now() + PHASE_TIMEOUT;
        loop {
            let done = answers
                .lock()
                .map_err(|_| "poisoned")?
                .iter()
                .filter(|(r, _, _)| *r == revision)
                .count();
            if done >= args.nodes {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "revision {revision}: {done} of {} nodes",
                    args.nodes
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (_, node, at) in answers
            .lock()
            .map_err(|_| "poisoned")?
            .iter()
            .filter(|(r, _, _)| *r == revision)
        {
            let took = at.saturating_duration_since(sent);
            if node % 2 == by {
                same.push(took);
            } else {
                other.push(took);
            }
        }
    }
    for (label, mut times) in [
        ("parked on the replica that took the publish", same),
        ("parked on the other replica (LISTEN/NOTIFY)", other),
    ] {
        times.sort();
        let at = |q: usize| times[(times.len() * q / 100).min(times.len() - 1)];
        table.row_ms(
            format!("publish → long-poll answered, {label}, p50"),
            at(50),
        );
        table.row_ms(
            format!("publish → long-poll answered, {label}, p99"),
            at(99),
        );
        table.row_ms(
            format!("publish → long-poll answered, {label}, max"),
            times[times.len() - 1],
        );
    }
    table.note(format!(
        "{} rounds, the replicas taking turns to receive the publish",
        args.rounds
    ));
    table.print();
    Ok(())
}

fn client(central: &Central, identity: Option<&[u8]>) -> Result<reqwest::Client, Error> {
    let root = reqwest::Certificate::from_pem(&central.server_pem).map_err(|e| e.to_string())?;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .resolve("localhost", central.addr)
        .add_root_certificate(root)
        .timeout(Duration::from_secs(120));
    if let Some(pem) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(pem).map_err(|e| e.to_string())?);
    }
    builder.build().map_err(|e| e.to_string())
}

/// Waits until `nodes` long-polls are parked over both replicas (their metrics).
async fn wait_parked(
    operators: &[reqwest::Client],
    replicas: &[Central],
    nodes: usize,
) -> Result<(), Error> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        let mut parked = 0;
        for (http, central) in operators.iter().zip(replicas) {
            let text = http
                .get(central.url("/metrics"))
                .send()
                .await
                .map_err(|e| e.to_string())?
                .text()
                .await
                .map_err(|e| e.to_string())?;
            parked += text
                .lines()
                .find_map(|l| l.strip_prefix("pimesh_central_long_polls{site=\"depot-7\"} "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
        }
        if parked >= nodes {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{parked} of {nodes} long-polls parked"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One node: long-polls for ever, noting when each revision arrived.
async fn node_loop(http: reqwest::Client, config: String, node: usize, answers: Answers) {
    let mut after = 0u64;
    loop {
        let Ok(answer) = http
            .get(format!("{config}?after={after}&wait=60"))
            .send()
            .await
        else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        if answer.status() != 200 {
            continue;
        }
        let Ok(body) = answer.text().await else {
            continue;
        };
        let Some(revision) = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["revision"].as_u64())
        else {
            continue;
        };
        if let Ok(mut answers) = answers.lock() {
            answers.push((revision, node, Instant::now()));
        }
        after = revision;
    }
}
