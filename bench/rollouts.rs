//! `make bench-rollouts`: staged rollouts at fleet scale through the real `pimesh-central`.
//!
//! `--sites` sites of `--nodes` nodes each (default 50 × 100 = 5000), every node a task
//! that keeps one mTLS long-poll parked, takes what it is offered and reports it applied
//! (with the revision it is about) at once, as a node whose apply takes no time. Measures:
//!
//! * **A, staged rollout**: every site publishes a revision whose plan is waves of 1 %,
//!   10 % and 100 %; the time from the publishes until each site's rollout is complete
//!   (p50 and max over the sites), read with signed operator requests.
//! * **B, halt**: every site publishes a revision with the same waves and `max_failed =
//!   0`, and the node of its 1 % wave rolls it back: the time from that report leaving the
//!   node until the site's rollout reads `halted` (p50, max), and how many nodes beyond the
//!   first wave were offered the revision (the halt works if none were).
//! * **C, fleet release**: every site publishes a revision of one release whose sites go in
//!   fleet waves of 1 %, 10 % and 100 % of the sites (each site's nodes in waves of 1 %,
//!   10 %, 100 % as in A): the time from the publishes until the last site of each fleet
//!   wave is complete.
//! * **D, fleet halt**: the next release, and the 1 % wave's node of the first site rolls
//!   it back: the time from that report until every other site's rollout reads `halted`,
//!   and how many nodes were offered the revision (one if the halt held the fleet).
//!
//! usage: cargo bench -p pimesh-bench --bench rollouts -- [--sites N] [--nodes N]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pimesh_bench::{bench_args, Table};
use pimesh_revision::{path, Rollout, RolloutState};
use pimesh_schema::DnsLabel;
use pimesh_test_support::central::{Central, CentralSite, SigningKey};
use pimesh_test_support::Site;

type Error = String;

/// Deadline of each phase.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the operator's side reads the rollouts.
const WATCH_EVERY: Duration = Duration::from_millis(50);
const WAVES: &str = "waves = [1, 10, 100]\n";

struct Args {
    sites: usize,
    nodes: usize,
}

fn parse(argv: &[String]) -> Result<Args, Error> {
    let mut args = Args {
        sites: 50,
        nodes: 100,
    };
    pimesh_bench::whole_number_flags(
        argv,
        &mut [("--sites", &mut args.sites), ("--nodes", &mut args.nodes)],
    )?;
    Ok(args)
}

struct BenchSite {
    site: Site,
    key: SigningKey,
    anchor: std::path::PathBuf,
    /// Site label and name, for signing.
    name: DnsLabel,
}

/// What the nodes do with what they are offered.
#[derive(Default)]
struct Behaviour {
    /// `(site, node, revision)` rolled back instead of applied, with when its report left.
    fail: std::sync::Mutex<BTreeMap<(String, String, u64), Option<Instant>>>,
    /// Offers of each revision taken, over all sites.
    offers: std::sync::Mutex<BTreeMap<u64, usize>>,
    /// Nodes whose first revision was applied.
    ready: AtomicUsize,
}

fn main() {
    let Some(argv) = bench_args() else {
        return;
    };
    let args = match parse(&argv) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("bench-rollouts: {err}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bench-rollouts: no runtime: {err}");
            std::process::exit(1);
        }
    };
    if let Err(err) = runtime.block_on(run(&args)) {
        eprintln!("bench-rollouts: {err}");
        std::process::exit(1);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn run(args: &Args) -> Result<(), Error> {
    let mut table = Table::new("rollouts");
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let sites: Vec<BenchSite> = (0..args.sites)
        .map(|i| {
            let name = format!("site-{i:02}");
            let site = Site::new(&name);
            let anchor = dir.path().join(format!("{name}.pem"));
            std::fs::write(&anchor, site.root.anchor.cert_pem()).map_err(|e| e.to_string())?;
            Ok(BenchSite {
                name: site.name.clone(),
                site,
                key: SigningKey::generate(),
                anchor,
            })
        })
        .collect::<Result<_, Error>>()?;
    let central_sites: Vec<CentralSite<'_>> = sites
        .iter()
        .map(|s| CentralSite {
            name: s.name.as_str(),
            anchor: &s.anchor,
            public_key: &s.key.public_key,
        })
        .collect();
    let central = Central::start(dir.path(), "long_poll_max = \"60s\"\n", &central_sites);
    let root = reqwest::Certificate::from_pem(&central.server_pem).map_err(|e| e.to_string())?;
    let operator = reqwest::Client::builder()
        .use_rustls_tls()
        .resolve("localhost", central.addr)
        .add_root_certificate(root.clone())
        .build()
        .map_err(|e| e.to_string())?;
    table.setup(format!(
        "{} sites × {} nodes, each node a task holding an mTLS long-poll (applies at once); \
         pimesh-central (release) and this load share the machine",
        args.sites, args.nodes
    ));

    for site in &sites {
        publish(&operator, &central, site, 1, "").await?;
    }
    let behaviour = Arc::new(Behaviour::default());
    let started = Instant::now();
    for site in &sites {
        for n in 0..args.nodes {
            let node = format!("n{n:03}");
            let identity = reqwest::Identity::from_pem(&site.site.node_identity_pem(&node))
                .map_err(|e| e.to_string())?;
            let client = reqwest::Client::builder()
                .use_rustls_tls()
                .resolve("localhost", central.addr)
                .add_root_certificate(root.clone())
                .identity(identity)
                .timeout(Duration::from_secs(120))
                .build()
                .map_err(|e| e.to_string())?;
            let config = central.url(&path::config(&site.name));
            let reports = central.url(&path::reports(&site.name));
            let site_name = site.name.to_string();
            let behaviour = Arc::clone(&behaviour);
            tokio::spawn(node_loop(
                client, config, reports, site_name, node, behaviour,
            ));
        }
    }
    let total = args.sites * args.nodes;
    wait("every node on revision 1", || {
        behaviour.ready.load(Ordering::SeqCst) >= total
    })
    .await?;
    table.setup(format!(
        "{total} nodes connected and on revision 1 in {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    // A: a staged rollout on every site at once.
    let published = Instant::now();
    for site in &sites {
        publish(&operator, &central, site, 2, &format!("[rollout]\n{WAVES}")).await?;
    }
    let completed = watch(&operator, &central, &sites, 2, RolloutState::Complete).await?;
    let mut times: Vec<Duration> = completed
        .iter()
        .map(|at| at.duration_since(published))
        .collect();
    times.sort();
    table.row_ms(
        "A: publish → rollout complete (waves 1 %, 10 %, 100 %), p50 over sites",
        times[times.len() / 2],
    );
    table.row_ms(
        "A: publish → rollout complete, slowest site",
        times[times.len() - 1],
    );

    // B: the first wave's node rolls the next revision back.
    {
        let mut fail = behaviour.fail.lock().map_err(|_| "poisoned".to_owned())?;
        for site in &sites {
            fail.insert((site.name.to_string(), "n000".to_owned(), 3), None);
        }
    }
    for site in &sites {
        let plan = format!("[rollout]\n{WAVES}max_failed = 0\n");
        publish(&operator, &central, site, 3, &plan).await?;
    }
    let halted = watch(&operator, &central, &sites, 3, RolloutState::Halted).await?;
    let sent: Vec<Instant> = {
        let fail = behaviour.fail.lock().map_err(|_| "poisoned".to_owned())?;
        sites
            .iter()
            .map(|s| {
                fail.get(&(s.name.to_string(), "n000".to_owned(), 3))
                    .copied()
                    .flatten()
            })
            .collect::<Option<Vec<_>>>()
            .ok_or("a failing node never reported")?
    };
    let mut halts: Vec<Duration> = halted
        .iter()
        .zip(&sent)
        .map(|(halted, sent)| halted.saturating_duration_since(*sent))
        .collect();
    halts.sort();
    table.row_ms(
        "B: bad report → rollout halted, p50 over sites",
        halts[halts.len() / 2],
    );
    table.row_ms(
        "B: bad report → rollout halted, slowest site",
        halts[halts.len() - 1],
    );
    // Nodes that could still be taking it right as it halted are the first wave's only.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let offers3 = behaviour
        .offers
        .lock()
        .map_err(|_| "poisoned".to_owned())?
        .get(&3)
        .copied()
        .unwrap_or(0);
    table.row(
        "B: nodes offered the halted revision (first waves only: one per site)",
        offers3,
        "nodes",
    );
    fleet_release(&mut table, &operator, &central, &sites, &behaviour).await?;
    table.note(format!(
        "A reads each site's rollouts every {} ms (signed GET), so its times are that coarse",
        WATCH_EVERY.as_millis()
    ));
    table.print();
    Ok(())
}

/// C and D: releases across the fleet (revisions 4 and 5 of every site).
async fn fleet_release(
    table: &mut Table,
    operator: &reqwest::Client,
    central: &Central,
    sites: &[BenchSite],
    behaviour: &Behaviour,
) -> Result<(), Error> {
    let plan = |release: &str| {
        format!("[rollout]\n{WAVES}max_failed = 0\nrelease = \"{release}\"\nfleet_waves = [1, 10, 100]\n")
    };
    // Sites in name order: the first 1 % (at least one site), then up to 10 %, then all.
    let first = sites.len().div_ceil(100);
    let tenth = (sites.len() * 10).div_ceil(100);
    let published = Instant::now();
    for site in sites {
        publish(operator, central, site, 4, &plan("bench-c")).await?;
    }
    let completed = watch(operator, central, sites, 4, RolloutState::Complete).await?;
    let latest = |range: std::ops::Range<usize>| {
        completed[range]
            .iter()
            .map(|at| at.duration_since(published))
            .max()
            .unwrap_or_default()
    };
    let waves = [
        ("1 %", 0..first),
        ("10 %", first..tenth),
        ("100 %", tenth..sites.len()),
    ];
    for (name, range) in waves {
        if range.is_empty() {
            continue; // a share of too few sites to hold one more
        }
        let count = range.len();
        table.row_ms(
            format!("C: publish → fleet wave {name} complete (its {count} site(s))"),
            latest(range),
        );
    }

    let canary = &sites[0];
    behaviour
        .fail
        .lock()
        .map_err(|_| "poisoned".to_owned())?
        .insert((canary.name.to_string(), "n000".to_owned(), 5), None);
    for site in sites {
        publish(operator, central, site, 5, &plan("bench-d")).await?;
    }
    let halted = watch(operator, central, sites, 5, RolloutState::Halted).await?;
    let sent = behaviour
        .fail
        .lock()
        .map_err(|_| "poisoned".to_owned())?
        .get(&(canary.name.to_string(), "n000".to_owned(), 5))
        .copied()
        .flatten()
        .ok_or("the first site's failing node never reported")?;
    let slowest = halted
        .iter()
        .map(|at| at.saturating_duration_since(sent))
        .max()
        .unwrap_or_default();
    table.row_ms(
        "D: bad report at the first site → every site's rollout halted",
        slowest,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let offered = behaviour
        .offers
        .lock()
        .map_err(|_| "poisoned".to_owned())?
        .get(&5)
        .copied()
        .unwrap_or(0);
    table.row(
        "D: nodes offered the halted release (the first site's first wave only: one)",
        offered,
        "nodes",
    );
    Ok(())
}

async fn wait(what: &str, done: impl Fn() -> bool) -> Result<(), Error> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {PHASE_TIMEOUT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// When each site's rollout of `revision` was first seen in `state`.
async fn watch(
    operator: &reqwest::Client,
    central: &Central,
    sites: &[BenchSite],
    revision: u64,
    state: RolloutState,
) -> Result<Vec<Instant>, Error> {
    let mut seen: Vec<Option<Instant>> = vec![None; sites.len()];
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while seen.iter().any(Option::is_none) {
        for (i, site) in sites.iter().enumerate() {
            if seen[i].is_some() {
                continue;
            }
            let rollouts = rollouts(operator, central, site).await?;
            if rollouts
                .iter()
                .any(|r| r.revision == revision && r.state == state)
            {
                seen[i] = Some(Instant::now());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "revision {revision} not {state} on every site in time"
            ));
        }
        tokio::time::sleep(WATCH_EVERY).await;
    }
    Ok(seen.into_iter().flatten().collect())
}

async fn rollouts(
    operator: &reqwest::Client,
    central: &Central,
    site: &BenchSite,
) -> Result<Vec<Rollout>, Error> {
    let path = format!("{}?limit=3", path::rollouts(&site.name));
    let authorization = pimesh_revision::operator::authorization(
        &site.key.pkcs8,
        &site.name,
        "GET",
        &path,
        now_ms(),
        b"",
    )
    .map_err(|e| e.to_string())?;
    let answer = operator
        .get(central.url(&path))
        .header("authorization", authorization)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let body = answer.text().await.map_err(|e| e.to_string())?;
    serde_json::from_str(&body).map_err(|e| format!("rollouts of {}: {e}: {body}", site.name))
}

async fn publish(
    operator: &reqwest::Client,
    central: &Central,
    site: &BenchSite,
    number: u64,
    extra: &str,
) -> Result<(), Error> {
    let config = format!("site = \"{}\"\n{extra}", site.name);
    let answer = operator
        .put(central.url(&path::revisions(&site.name)))
        .body(site.key.revision(&site.name, number, &config))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if answer.status() != 201 {
        return Err(format!(
            "publish {number} of {}: {}",
            site.name,
            answer.status()
        ));
    }
    Ok(())
}

/// One node: long-polls, applies (or rolls back, as `behaviour` says) and reports.
async fn node_loop(
    client: reqwest::Client,
    config: String,
    reports: String,
    site: String,
    node: String,
    behaviour: Arc<Behaviour>,
) {
    let mut after = 0u64;
    loop {
        let answer = client
            .get(format!("{config}?after={after}&wait=60"))
            .send()
            .await;
        let Ok(answer) = answer else {
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
        if let Ok(mut offers) = behaviour.offers.lock() {
            *offers.entry(revision).or_default() += 1;
        }
        let key = (site.clone(), node.clone(), revision);
        let fails = behaviour
            .fail
            .lock()
            .map(|fail| fail.contains_key(&key))
            .unwrap_or(false);
        let report = if fails {
            serde_json::json!({"revision": after, "state": "rolled-back",
                               "detail": format!("revision {revision}: unhealthy"), "about": revision})
        } else {
            serde_json::json!({"revision": revision, "state": "applied", "detail": "", "about": revision})
        };
        if fails {
            if let Ok(mut fail) = behaviour.fail.lock() {
                fail.insert(key, Some(Instant::now()));
            }
        }
        let sent = client.post(&reports).body(report.to_string()).send().await;
        if sent.is_err() {
            continue;
        }
        if revision == 1 {
            behaviour.ready.fetch_add(1, Ordering::SeqCst);
        }
        // A node that rolled back asks after the revision it refused, as the OTA client does.
        after = revision;
    }
}
