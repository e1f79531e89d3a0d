//! Staged rollouts through the central server binary over real TLS: nodes long-poll with
//! their node certificates and report as the supervisor's OTA client does; the operator
//! reads and steers rollouts with requests signed by the site key.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::path::Path;

use pimesh_revision::path;
use pimesh_revision::rollout::Command;
use pimesh_revision::RolloutState;
use pimesh_schema::DnsLabel;
use pimesh_test_support::central::{Central, FleetNode, OperatedSite, SiteOperator};

fn start(dir: &Path, sites: &[&OperatedSite]) -> Central {
    let sites: Vec<_> = sites.iter().map(|site| site.central_site()).collect();
    Central::start(dir, "long_poll_max = \"30s\"\n", &sites)
}

type Node = FleetNode;
type Operator<'a> = SiteOperator<'a>;

const PLAIN: &str = "site = \"depot-7\"\n";
const STAGED: &str =
    "site = \"depot-7\"\n[rollout]\ncanary = [\"pi-c\"]\nwaves = [60, 100]\nmax_failed = 0\n";

const FIVE: [&str; 5] = ["pi-a", "pi-b", "pi-c", "pi-d", "pi-e"];

/// The site's operator and its nodes `names`, at `central`.
fn operator_and_nodes<'a>(
    central: &'a Central,
    site: &'a OperatedSite,
    names: &[&'static str],
) -> (Operator<'a>, Vec<Node>) {
    let operator = Operator::new(central, site);
    let nodes = names
        .iter()
        .map(|name| Node::new(central, site, name))
        .collect();
    (operator, nodes)
}

fn names(nodes: &std::collections::BTreeSet<DnsLabel>) -> Vec<&str> {
    nodes.iter().map(DnsLabel::as_str).collect()
}

#[test]
fn a_staged_rollout_goes_wave_by_wave_and_halts_on_the_first_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = OperatedSite::new(dir.path(), "depot-7");
    let mut central = start(dir.path(), &[&site]);
    let (operator, nodes) = operator_and_nodes(&central, &site, &FIVE);
    let node = |name: &str| nodes.iter().find(|n| n.name == name).expect("node");

    // Revision 1 says nothing of rollouts: every node at once.
    operator.publish(1, PLAIN);
    for node in &nodes {
        assert_eq!(node.poll(0, 5), Some(1), "{}", node.name);
        node.report(1, "applied", "");
    }
    operator.wait_for(1, "revision 1 completes", |r| {
        r.state == RolloutState::Complete
    });

    // Revision 2: the canary first, alone.
    operator.publish(2, STAGED);
    assert_eq!(node("pi-c").poll(1, 5), Some(2));
    for other in ["pi-a", "pi-b", "pi-d", "pi-e"] {
        assert_eq!(
            node(other).poll(1, 1),
            None,
            "{other} is not in the canary wave"
        );
    }
    let rollout = operator.rollout(2);
    assert_eq!(rollout.state, RolloutState::Running);
    assert_eq!(rollout.waves.len(), 1);
    assert_eq!(names(&rollout.waves[0].nodes), ["pi-c"]);

    // A node parked in a long-poll is woken when its wave starts: 60 % of 5 nodes is 3,
    // the canary and the first two by name.
    let parked = {
        let pi_a = Node::new(&central, &site, "pi-a");
        std::thread::spawn(move || pi_a.poll(1, 30))
    };
    node("pi-c").report(2, "applied", "");
    assert_eq!(parked.join().expect("parked poll"), Some(2));
    let rollout = operator.wait_for(2, "the 60 % wave starts", |r| r.waves.len() == 2);
    assert_eq!(names(&rollout.waves[1].nodes), ["pi-a", "pi-b"]);
    assert_eq!(node("pi-b").poll(1, 5), Some(2));
    assert_eq!(node("pi-d").poll(1, 1), None);

    // pi-a's health gate fails: the rollout halts; nobody else is offered revision 2.
    node("pi-a").report(1, "rolled-back", "revision 2: unhealthy: pimesh-proxy");
    let halted = operator.wait_for(2, "the rollout halts", |r| r.state == RolloutState::Halted);
    assert!(halted
        .failed
        .contains_key(&DnsLabel::try_from("pi-a".to_owned()).unwrap()));
    let reason = halted.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("pi-a (rolled-back: revision 2: unhealthy"),
        "{reason}"
    );
    for other in ["pi-b", "pi-d", "pi-e"] {
        assert_eq!(node(other).poll(1, 1), None, "{other}: halted");
    }
    // (A report is taken into account before it is answered.)
    node("pi-b").report(2, "applied", "");
    assert_eq!(
        operator.rollout(2).waves.len(),
        2,
        "a halted rollout never starts a wave"
    );

    // The plan, its progress and the halt survive a crash of the server.
    central.kill_and_restart();
    let (operator, nodes) = operator_and_nodes(&central, &site, &FIVE);
    let node = |name: &str| nodes.iter().find(|n| n.name == name).expect("node");
    let after_restart = operator.rollout(2);
    assert_eq!(after_restart.state, RolloutState::Halted);
    assert_eq!(after_restart.waves, halted.waves);
    assert_eq!(node("pi-d").poll(1, 1), None);
    let (status, body) = operator.command(2, Command::Resume);
    assert_eq!(status, 409, "a halted rollout is not resumed: {body}");

    // The fix goes out to every node at once; the halted rollout stays in the history.
    operator.publish(3, PLAIN);
    for node in &nodes {
        assert_eq!(node.poll(2, 5), Some(3), "{}", node.name);
    }
    let history = operator.rollouts();
    let revisions: Vec<(u64, RolloutState)> =
        history.iter().map(|r| (r.revision, r.state)).collect();
    assert_eq!(
        revisions,
        [
            (3, RolloutState::Running),
            (2, RolloutState::Halted),
            (1, RolloutState::Complete)
        ]
    );
}

#[test]
fn the_operator_pauses_resumes_and_aborts_and_no_one_else_can() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = OperatedSite::new(dir.path(), "depot-7");
    let other = OperatedSite::new(dir.path(), "depot-8");
    let central = start(dir.path(), &[&site, &other]);
    let (operator, nodes) = operator_and_nodes(&central, &site, &["pi-a", "pi-b", "pi-c"]);
    operator.publish(1, PLAIN);
    for node in &nodes {
        assert_eq!(node.poll(0, 5), Some(1));
        node.report(1, "applied", "");
    }
    operator.publish(2, STAGED);

    // Another site's operator, a node, and anyone else: refused.
    let intruder = Operator {
        http: central.client(None),
        central: &central,
        site: &site,
        key: &other.key,
    };
    let (status, body) = intruder.command(2, Command::Abort);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("does not verify"), "{body}");
    let rollouts_url = central.url(&path::rollouts(site.name()));
    let anonymous = central.client(None).get(&rollouts_url).send().expect("get");
    assert_eq!(anonymous.status(), 401);
    let as_node = nodes[0].http().get(&rollouts_url).send().expect("get");
    assert_eq!(as_node.status(), 401, "a node certificate is no operator");
    let revision_url = central.url(&path::revision(site.name(), 2));
    let response = central.client(None).get(&revision_url).send().expect("get");
    assert_eq!(response.status(), 401);
    let response = operator
        .http
        .get(&revision_url)
        .header(
            "authorization",
            operator.signed("GET", &path::revision(site.name(), 2)),
        )
        .send()
        .expect("get");
    assert_eq!(response.status(), 200);
    let stored: serde_json::Value = response.json().expect("revision");
    assert_eq!(stored["config"], STAGED);

    // Paused: the canary applies, and no wave follows.
    let (status, body) = operator.command(2, Command::Pause);
    assert_eq!(status, 200, "{body}");
    let canary = nodes.iter().find(|n| n.name == "pi-c").expect("canary");
    assert_eq!(
        canary.poll(1, 5),
        Some(2),
        "a paused rollout keeps its started waves"
    );
    canary.report(2, "applied", "");
    assert_eq!(operator.rollout(2).waves.len(), 1);
    assert_eq!(nodes[0].poll(1, 1), None);

    // A captured command replayed: refused.
    let path = path::rollout_command(site.name(), 2, Command::Pause);
    let replay = operator.signed("POST", &path);
    let first = operator
        .http
        .post(central.url(&path))
        .header("authorization", &replay)
        .send()
        .expect("post");
    assert_eq!(first.status(), 409, "already paused");
    let (status, _) = operator.command(2, Command::Resume);
    assert_eq!(status, 200);
    let again = operator
        .http
        .post(central.url(&path))
        .header("authorization", &replay)
        .send()
        .expect("post");
    assert_eq!(again.status(), 409);
    assert!(again.text().expect("body").contains("replay"));

    // Resumed: the next wave starts; aborted: nobody is offered the revision any more.
    operator.wait_for(2, "the next wave starts", |r| r.waves.len() == 2);
    assert_eq!(nodes[0].poll(1, 5), Some(2));
    let (status, body) = operator.command(2, Command::Abort);
    assert_eq!(status, 200, "{body}");
    assert_eq!(nodes[1].poll(1, 1), None);
    assert_eq!(
        canary.poll(1, 1),
        None,
        "not even to the canary that asks again"
    );
    let aborted = operator.rollout(2);
    assert_eq!(aborted.state, RolloutState::Aborted);
    assert_eq!(
        operator.command(2, Command::Resume).0,
        409,
        "an aborted rollout stays aborted"
    );
    let (status, body) = operator.command(9, Command::Pause);
    assert_eq!(status, 404, "{body}");
}

#[test]
fn a_revision_stored_without_its_rollout_starts_its_plan_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = OperatedSite::new(dir.path(), "depot-7");
    let mut central = start(dir.path(), &[&site]);
    let (operator, nodes) = operator_and_nodes(&central, &site, &["pi-a", "pi-b", "pi-c"]);
    operator.publish(1, PLAIN);
    for node in &nodes {
        assert_eq!(node.poll(0, 5), Some(1));
        node.report(1, "applied", "");
    }
    operator.publish(2, STAGED);
    // What a power cut between storing revision 2 and its rollout leaves.
    let stored = dir.path().join("state/depot-7/rollouts/2.json");
    std::fs::remove_file(&stored).expect("the rollout's file");
    central.kill_and_restart();

    let (operator, nodes) = operator_and_nodes(&central, &site, &["pi-a", "pi-b", "pi-c"]);
    let rollout = operator.wait_for(2, "the plan started again", |r| !r.waves.is_empty());
    assert_eq!(names(&rollout.waves[0].nodes), ["pi-c"], "the canary first");
    assert_eq!(nodes[2].poll(1, 5), Some(2));
    assert_eq!(nodes[0].poll(1, 1), None, "pi-a waits for the canary");
    assert_eq!(operator.rollout(1).state, RolloutState::Complete);
}

/// Revision `number` of `site` carrying `release`: the canary site `depot-2`, then half
/// of the fleet, then all of it.
fn release(site: &str, release: &str) -> String {
    format!(
        "site = \"{site}\"\n[rollout]\nrelease = \"{release}\"\nfleet_canary = [\"depot-2\"]\n\
         fleet_waves = [50, 100]\n"
    )
}

/// Each site's operator and its one node, `pi-a`.
fn site_nodes<'a>(central: &'a Central, sites: &'a [OperatedSite]) -> Vec<(Operator<'a>, Node)> {
    sites
        .iter()
        .map(|site| {
            let (operator, mut nodes) = operator_and_nodes(central, site, &["pi-a"]);
            (operator, nodes.remove(0))
        })
        .collect()
}

#[test]
fn a_release_reaches_the_fleet_site_wave_by_site_wave_and_a_canary_sites_halt_stops_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let names = ["depot-1", "depot-2", "depot-3"];
    let sites: Vec<OperatedSite> = names
        .iter()
        .map(|name| OperatedSite::new(dir.path(), name))
        .collect();
    let mut central = start(dir.path(), &sites.iter().collect::<Vec<_>>());
    let fleet = site_nodes(&central, &sites);
    let [(op1, node1), (op2, node2), (op3, node3)] = &fleet[..] else {
        unreachable!()
    };

    // Every node is known to its site (a site without nodes completes at once).
    for (_, node) in &fleet {
        assert_eq!(node.poll(0, 1), None);
    }

    // Published to the later sites first: they wait for the canary site.
    op1.publish(1, &release("depot-1", "2026.12-a"));
    op3.publish(1, &release("depot-3", "2026.12-a"));
    assert_eq!(node1.poll(0, 1), None, "depot-1 waits for the canary site");
    assert_eq!(node3.poll(0, 1), None, "depot-3 waits for the first half");
    let waiting = op1.rollout(1);
    assert!(waiting.waves.is_empty());
    let reason = waiting.reason.unwrap_or_default();
    assert!(
        reason.contains("fleet wave 50% of release 2026.12-a waits for a site before it"),
        "{reason}"
    );
    op2.publish(1, &release("depot-2", "2026.12-a"));
    assert_eq!(node2.poll(0, 5), Some(1), "the canary site goes first");
    assert_eq!(node1.poll(0, 1), None, "until the canary site completes");
    op3.wait_for(1, "depot-3 waits for the sites before it", |r| {
        r.reason.as_deref()
            == Some("fleet wave 100% of release 2026.12-a waits for site(s) depot-2, depot-1 to complete it")
    });
    node2.report(1, "applied", "");

    // The canary site complete: the first half of the fleet (depot-1) takes it, then the rest.
    op1.wait_for(1, "depot-1's wave starts", |r| !r.waves.is_empty());
    assert_eq!(node1.poll(0, 5), Some(1));
    assert_eq!(node3.poll(0, 1), None, "depot-3 waits for depot-1");
    node1.report(1, "applied", "");
    op3.wait_for(1, "depot-3's wave starts", |r| !r.waves.is_empty());
    assert_eq!(node3.poll(0, 5), Some(1));
    node3.report(1, "applied", "");
    op3.wait_for(1, "depot-3 completes", |r| {
        r.state == RolloutState::Complete
    });

    // The next release fails at the canary site: no other site's node is ever offered it.
    for (i, (operator, _)) in fleet.iter().enumerate() {
        operator.publish(2, &release(names[i], "2026.12-b"));
    }
    assert_eq!(node2.poll(1, 5), Some(2));
    node2.report(1, "rolled-back", "revision 2: unhealthy: pimesh-proxy");
    for operator in [op1, op3] {
        let halted = operator.wait_for(2, "the release halts at the later sites", |r| {
            r.state == RolloutState::Halted
        });
        let reason = halted.reason.unwrap_or_default();
        assert!(
            reason.starts_with(
                "release 2026.12-b halted at site depot-2 (revision 2): 1 node(s) failed"
            ),
            "{reason}"
        );
        assert!(halted.waves.is_empty());
    }
    assert_eq!(node1.poll(1, 1), None);
    assert_eq!(node3.poll(1, 1), None);

    // The halt survives a crash of the server; the fix, published again under the same
    // release, goes to the canary site alone first.
    drop(fleet);
    central.kill_and_restart();
    let fleet = site_nodes(&central, &sites);
    let [(op1, node1), (_, node2), (op3, node3)] = &fleet[..] else {
        unreachable!()
    };
    assert_eq!(op1.rollout(2).state, RolloutState::Halted);
    assert_eq!(node1.poll(1, 1), None);
    for (i, (operator, _)) in fleet.iter().enumerate() {
        operator.publish(3, &release(names[i], "2026.12-b"));
    }
    assert_eq!(node2.poll(1, 5), Some(3));
    assert_eq!(
        node1.poll(1, 1),
        None,
        "depot-1 waits for the fix at the canary site"
    );
    assert_eq!(node3.poll(1, 1), None);
    node2.report(3, "applied", "");
    op1.wait_for(3, "depot-1's wave starts", |r| !r.waves.is_empty());
    assert_eq!(node1.poll(1, 5), Some(3));
    assert_eq!(op3.rollout(3).state, RolloutState::Running);
}
