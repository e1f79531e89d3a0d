//! Two `pimesh-central` replicas on one real PostgreSQL server (Debian's, started by the
//! test in a folder of its own, on a Unix socket only): a publish on either reaches the
//! long-polls parked on both, reports and rollout steps taken by one are the other's, a
//! replica killed during a rollout loses nothing (its nodes fail over to the other), a
//! dashboard session opened at one reads the overview at the other, and a publish while
//! the database is down is refused whole.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::path::Path;

use pimesh_revision::{FleetView, RolloutState};
use pimesh_test_support::central::{Central, FleetNode, OperatedSite, SiteOperator};
use pimesh_test_support::postgres::Postgres;
use pimesh_test_support::wait::wait_until_blocking;

const PLAIN: &str = "site = \"depot-7\"\n";
/// The canary pi-c, then half the site, then all of it; the first failure halts.
const STAGED: &str =
    "site = \"depot-7\"\n[rollout]\ncanary = [\"pi-c\"]\nwaves = [50, 100]\nmax_failed = 0\n";

/// Replica `name` of the central server, in a folder of its own under `dir`.
fn replica(dir: &Path, name: &str, postgres: &Postgres, site: &OperatedSite) -> Central {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).expect("replica folder");
    Central::start_on_postgres(
        &home,
        &postgres.connect_string(),
        "long_poll_max = \"30s\"\n",
        &[site.central_site()],
    )
}

/// The value of the metric `name` (with its labels) in `central`'s `/metrics`.
fn metric(central: &Central, name: &str) -> Option<f64> {
    let text = central
        .client(None)
        .get(central.url("/metrics"))
        .send()
        .and_then(|response| response.text())
        .expect("metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// A dashboard session of the site opened at `operator`'s replica: its token.
fn open_session(operator: &SiteOperator<'_>) -> String {
    let path = format!(
        "{}?ttl=600",
        pimesh_revision::path::site(
            operator.site.name(),
            pimesh_revision::path::SiteResource::Sessions
        )
    );
    let response = operator
        .http
        .post(operator.central.url(&path))
        .header("authorization", operator.signed("POST", &path))
        .send()
        .expect("session");
    assert_eq!(response.status(), 201);
    let answer: serde_json::Value = response.json().expect("json");
    answer["token"].as_str().expect("token").to_owned()
}

/// The status of the site's overview read at `central` with the session `token`.
fn overview(central: &Central, site: &OperatedSite, token: &str) -> u16 {
    let path =
        pimesh_revision::path::site(site.name(), pimesh_revision::path::SiteResource::Overview);
    central
        .client(None)
        .get(central.url(&path))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .expect("overview")
        .status()
        .as_u16()
}

/// Long-polls parked on `central` now, as its metrics say.
fn parked(central: &Central) -> u64 {
    metric(central, "pimesh_central_long_polls{site=\"depot-7\"}").unwrap_or(0.0) as u64
}

/// The nodes' latest reports as the operator reads them at `operator`'s replica.
fn reported(operator: &SiteOperator<'_>) -> Vec<(String, Option<u64>, String)> {
    let path = pimesh_revision::path::FLEET;
    let response = operator
        .http
        .get(operator.central.url(path))
        .header("authorization", operator.signed("GET", path))
        .send()
        .expect("fleet view");
    assert_eq!(response.status(), 200);
    let view: FleetView = response.json().expect("fleet view");
    view.sites
        .iter()
        .flat_map(|site| &site.nodes)
        .map(|node| {
            (
                node.node.to_string(),
                node.recorded.report.revision,
                node.recorded.report.state.to_string(),
            )
        })
        .collect()
}

#[test]
fn two_replicas_serve_one_site_and_a_replica_killed_mid_rollout_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let postgres = Postgres::start();
    let site = OperatedSite::new(dir.path(), "depot-7");
    let mut a = replica(dir.path(), "a", &postgres, &site);
    let b = replica(dir.path(), "b", &postgres, &site);
    let at_a = SiteOperator::new(&a, &site);
    let at_b = SiteOperator::new(&b, &site);
    // pi-a and pi-b talk to replica a first, pi-c and pi-d to b.
    let node = |name: &str| {
        let order: [&Central; 2] = if name < "pi-c" { [&a, &b] } else { [&b, &a] };
        FleetNode::of_replicas(&order, &site, name)
    };
    let nodes: Vec<FleetNode> = ["pi-a", "pi-b", "pi-c", "pi-d"]
        .into_iter()
        .map(node)
        .collect();

    // A publish on a wakes the long-polls parked on both replicas.
    let waiting: Vec<_> = ["pi-a", "pi-c"]
        .into_iter()
        .map(|name| {
            let waiter = node(name);
            std::thread::spawn(move || waiter.poll(0, 30))
        })
        .collect();
    wait_until_blocking("a long-poll parked on each replica", || {
        parked(&a) == 1 && parked(&b) == 1
    });
    at_a.publish(1, PLAIN);
    for waiter in waiting {
        assert_eq!(waiter.join().expect("long-poll"), Some(1));
    }
    // Reports to either replica count on both.
    for node in &nodes {
        assert_eq!(node.poll(0, 5), Some(1), "{}", node.name);
        node.report(1, "applied", "");
    }
    for operator in [&at_a, &at_b] {
        operator.wait_for(1, "revision 1 complete on both replicas", |r| {
            r.state == RolloutState::Complete
        });
    }

    // A staged rollout published on b: a offers it by b's plan, the canary alone.
    at_b.publish(2, STAGED);
    assert_eq!(nodes[2].poll(1, 5), Some(2), "pi-c is the canary");
    assert_eq!(
        nodes[0].poll(1, 1),
        None,
        "a holds pi-a back for the canary"
    );
    assert_eq!(nodes[0].replica(), 0, "pi-a still talks to a");

    // Replica a dies; its nodes go on with b, and the rollout goes on to its end.
    a.daemon.kill();
    nodes[2].report(2, "applied", "");
    let rollout = at_b.wait_for(2, "the 50 % wave starts", |r| r.waves.len() == 2);
    let second: Vec<&str> = rollout.waves[1].nodes.iter().map(|n| n.as_str()).collect();
    assert_eq!(second, ["pi-a"], "half of 4 nodes: the canary and pi-a");
    assert_eq!(nodes[0].poll(1, 5), Some(2));
    assert_eq!(nodes[0].replica(), 1, "pi-a failed over to b");
    nodes[0].report(2, "applied", "");
    at_b.wait_for(2, "the last wave starts", |r| r.waves.len() == 3);
    for node in [&nodes[1], &nodes[3]] {
        assert_eq!(node.poll(1, 5), Some(2), "{}", node.name);
        node.report(2, "applied", "");
    }
    at_b.wait_for(2, "revision 2 complete", |r| {
        r.state == RolloutState::Complete
    });

    // Nothing a acknowledged is lost: every node's report is there, and a restarted a
    // reads the same rollouts from the database.
    let mut seen = reported(&at_b);
    seen.sort();
    let expected: Vec<(String, Option<u64>, String)> = ["pi-a", "pi-b", "pi-c", "pi-d"]
        .into_iter()
        .map(|name| (name.to_owned(), Some(2), "applied".to_owned()))
        .collect();
    assert_eq!(seen, expected);
    a.kill_and_restart();
    let at_a = SiteOperator::new(&a, &site);
    let history: Vec<(u64, RolloutState)> = at_a
        .rollouts()
        .iter()
        .map(|r| (r.revision, r.state))
        .collect();
    assert_eq!(
        history,
        [(2, RolloutState::Complete), (1, RolloutState::Complete)]
    );
    assert_eq!(reported(&at_a), expected);
}

#[test]
fn a_halt_on_one_replica_holds_on_the_other_and_a_publish_without_the_database_is_refused_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut postgres = Postgres::start();
    let site = OperatedSite::new(dir.path(), "depot-7");
    let a = replica(dir.path(), "a", &postgres, &site);
    let b = replica(dir.path(), "b", &postgres, &site);
    let at_a = SiteOperator::new(&a, &site);
    let at_b = SiteOperator::new(&b, &site);
    let on_a = |name: &str| FleetNode::of_replicas(&[&a], &site, name);
    let on_b = |name: &str| FleetNode::of_replicas(&[&b], &site, name);
    let (pi_a, pi_b, pi_c) = (on_a("pi-a"), on_a("pi-b"), on_b("pi-c"));
    at_a.publish(1, PLAIN);
    for node in [&pi_a, &pi_b, &pi_c] {
        assert_eq!(node.poll(0, 5), Some(1));
        node.report(1, "applied", "");
    }

    // The canary fails on b: the rollout halts, and a never starts the next wave.
    at_a.publish(2, STAGED);
    assert_eq!(pi_c.poll(1, 5), Some(2));
    pi_c.report(1, "rolled-back", "revision 2: unhealthy: pimesh-proxy");
    let halted = at_a.wait_for(2, "a sees the halt", |r| r.state == RolloutState::Halted);
    assert_eq!(halted.waves.len(), 1);
    assert_eq!(
        pi_a.poll(1, 1),
        None,
        "a offers nothing of a halted rollout"
    );
    assert_eq!(
        at_a.command(2, pimesh_revision::rollout::Command::Resume).0,
        409
    );
    let halted_metric = "pimesh_central_rollouts{site=\"depot-7\",state=\"halted\"}";
    assert_eq!(metric(&a, halted_metric), Some(1.0));
    let listening = "pimesh_central_replication_listening";
    assert_eq!(metric(&b, listening), Some(1.0));

    // A dashboard session opened at a reads the overview at b too (the session is in the
    // database); an unknown token is refused at both.
    let token = open_session(&at_a);
    assert_eq!(overview(&b, &site, &token), 200, "a's session at b");
    assert_eq!(overview(&a, &site, &token), 200);
    let unknown = "0".repeat(64);
    assert_eq!(overview(&b, &site, &unknown), 403);
    assert_eq!(overview(&a, &site, &unknown), 403);

    // The database is down: a publish is refused and leaves nothing behind.
    postgres.stop();
    let (status, body) = at_a.try_publish(3, PLAIN);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("PostgreSQL"), "{body}");
    assert_eq!(pi_a.poll(2, 1), None, "nothing was published");
    // b cannot tell whether an unknown token is another replica's session: it says so.
    assert_eq!(overview(&b, &site, &unknown), 503);
    wait_until_blocking("b notices the database is gone", || {
        metric(&b, listening) == Some(0.0)
    });
    postgres.restart();
    wait_until_blocking("b listens again", || metric(&b, listening) == Some(1.0));

    // Back: the same number is published (nothing of the refused one was stored), and
    // the nodes of both replicas converge on it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, body) = at_a.try_publish(3, PLAIN);
        if status == 201 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "publish after the database came back: {status} {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for node in [&pi_a, &pi_b, &pi_c] {
        assert_eq!(node.poll(2, 30), Some(3), "{}", node.name);
    }
    let history: Vec<(u64, RolloutState)> = at_b
        .rollouts()
        .iter()
        .map(|r| (r.revision, r.state))
        .collect();
    assert_eq!(
        history[1..],
        [(2, RolloutState::Halted), (1, RolloutState::Complete)]
    );
}

#[test]
fn replicas_reach_the_database_over_tls_only_with_its_servers_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let postgres = Postgres::start_with_tls();
    let tls = postgres.tls().expect("a server with TLS");
    let ca = dir.path().join("database-ca.pem");
    std::fs::write(&ca, &tls.ca_pem).expect("the database's CA");
    let connect = postgres.tcp_connect_string();
    assert!(
        postgres::Client::connect(&connect, postgres::NoTls).is_err(),
        "the server refuses plaintext on TCP"
    );
    let site = OperatedSite::new(dir.path(), "depot-7");
    let replica = |name: &str| {
        let home = dir.path().join(name);
        std::fs::create_dir_all(&home).expect("replica folder");
        Central::start_on_postgres_over_tls(
            &home,
            &connect,
            &ca,
            "long_poll_max = \"30s\"\n",
            &[site.central_site()],
        )
    };
    let (a, b) = (replica("a"), replica("b"));

    // A publish on a reaches a node parked on b: storage and notifications over TLS.
    let pi_a = FleetNode::of_replicas(&[&b], &site, "pi-a");
    SiteOperator::new(&a, &site).publish(1, PLAIN);
    assert_eq!(pi_a.poll(0, 10), Some(1));
    let encrypted: Vec<bool> = postgres
        .client()
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'pimesh-central'",
            &[],
        )
        .expect("the server's view of its connections")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        encrypted.len() >= 4 && encrypted.iter().all(|ssl| *ssl),
        "every connection of both replicas (storage and listener) is TLS: {encrypted:?}"
    );

    // A replica that trusts another CA sends nothing and says why.
    let other_ca = rcgen_ca();
    let home = dir.path().join("c");
    std::fs::create_dir_all(&home).expect("replica folder");
    let wrong = home.join("other-ca.pem");
    std::fs::write(&wrong, other_ca).expect("another CA");
    let config = std::fs::read_to_string(&a.config)
        .expect("a's config")
        .replace(&ca.display().to_string(), &wrong.display().to_string())
        .replace(
            &a.addr.to_string(),
            &pimesh_test_support::free_addr().to_string(),
        );
    let config_path = home.join("central.toml");
    std::fs::write(&config_path, config).expect("c's config");
    let output = pimesh_test_support::Daemon::command(pimesh_test_support::Binary::Central, "info")
        .arg("--config")
        .arg(&config_path)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run c");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("[postgres]") && stderr.contains("UnknownIssuer"),
        "names the database and the certificate: {stderr}"
    );
}

/// A CA certificate (PEM) nobody's certificate chains to.
fn rcgen_ca() -> String {
    let key = rcgen::KeyPair::generate().expect("a key");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).expect("a CA").pem()
}
