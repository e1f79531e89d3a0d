//! Plug-in join on the host: a real `pimesh-supervisor` whose seed holds nothing but the
//! site, `role = "join"`, a join token and (so that nothing is multicast from the host)
//! the address of a real `pimesh-control` replica. The node joins with no other step,
//! becomes a server (the site wants three), receives the issuer, and refuses a rogue
//! server and a wrong token with a reason in its status; a server that takes the
//! connection and never answers does not hold it; kill -9 at random instants of its join
//! leaves one key, one certificate and one name, and so does kill -9 of the server; a
//! server that joined follows the issuer
//! and anchor rotations made where the anchor key is.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use pimesh_test_support::control::Replica;
use pimesh_test_support::http::get_blocking;
use pimesh_test_support::pki::Site;
use pimesh_test_support::{free_addr, Binary, Daemon};
use rustls_pki_types::pem::PemObject as _;

const SECRET: &str = "JoinSecret0123456789abcdef";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The token of `site` with `secret`: `K10<sha256 of the anchor>::<secret>`.
fn token(site: &Site, secret: &str) -> String {
    let pin = pimesh_join::anchor_pin(site.root.anchor.cert_der());
    format!("K10{}::{secret}", hex(&pin))
}

/// A replica of `site` (replica 1 of node `pi-a`) whose trust folder accepts `SECRET`.
fn replica_of(site: &Site, dir: &Path) -> Replica {
    replica_with(site, dir, "", Some("pi-a"))
}

/// [`replica_of`] with `config` in the site config (`site = ...` is written here), on
/// `node` (`None`: a replica that holds no seat itself).
fn replica_with(site: &Site, dir: &Path, config: &str, node: Option<&str>) -> Replica {
    let trust = dir.join("trust");
    site.write_trust(&trust);
    let accepted =
        pimesh_join::AcceptedTokens(vec![pimesh_join::AcceptedToken::for_secret(SECRET, None)]);
    std::fs::write(
        trust.join("join.json"),
        serde_json::json!({ "tokens": accepted }).to_string(),
    )
    .unwrap();
    let cluster = dir.join("cluster.toml");
    std::fs::write(&cluster, format!("site = \"{}\"\n{config}", site.name)).unwrap();
    replica_in(site, dir, node).start_blocking()
}

/// The options of a replica whose folders [`replica_with`] wrote under `dir`: the same
/// ones start it again after a cut, from what its folders hold.
fn replica_in(
    site: &Site,
    dir: &Path,
    node: Option<&str>,
) -> pimesh_test_support::control::ReplicaOptions {
    let mut options = Replica::options(1)
        .trust_dir(&dir.join("trust"))
        .config(&dir.join("cluster.toml"))
        .site(site.name.as_str());
    if let Some(node) = node {
        options = options.arg("--node").arg(node);
    }
    options
        .arg("--state-dir")
        .arg(dir.join("control-state"))
        .log(&dir.join("control.log"))
}

/// A joining node: the supervisor with its folders under a temporary root.
struct Node {
    daemon: Daemon,
    status_addr: SocketAddr,
    root: tempfile::TempDir,
}

impl Node {
    fn start(seed: &str) -> Node {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("boot")).unwrap();
        std::fs::write(root.path().join("boot/pimesh.toml"), seed).unwrap();
        std::fs::write(root.path().join("supervisor.toml"), "unit = []\n").unwrap();
        Node::start_in(root)
    }

    /// The supervisor on the node whose folders are under `root` (a restart keeps them).
    fn start_in(root: tempfile::TempDir) -> Node {
        let path = |p: &str| root.path().join(p);
        let status_addr = free_addr();
        let mut command = Daemon::command(Binary::Supervisor, "info");
        command
            .arg("--seed")
            .arg(path("boot/pimesh.toml"))
            .args(["--status-addr", &status_addr.to_string(), "--no-node-setup"])
            .arg("--supervisor-config")
            .arg(path("supervisor.toml"))
            .arg("--etc-dir")
            .arg(path("etc"))
            .arg("--state-dir")
            .arg(path("var/lib/pimesh"))
            .arg("--run-dir")
            .arg(path("run"))
            .arg("--rancher-etc")
            .arg(path("etc/rancher/k3s"))
            .arg("--rancher-data")
            .arg(path("var/lib/rancher/k3s"))
            .arg("--manifest")
            .arg(path("no-manifest.json"));
        let log = path(&format!("supervisor-{}.log", status_addr.port()));
        let mut daemon = Daemon::spawn("pimesh-supervisor", command, Some(&log));
        daemon.wait_until_blocking("the status API", || {
            get_blocking(status_addr, "/status").is_some()
        });
        Node {
            daemon,
            status_addr,
            root,
        }
    }

    fn file(&self, path: &str) -> PathBuf {
        self.root.path().join(path)
    }

    fn wait_for_join_state(&mut self, state: &str) -> serde_json::Value {
        let addr = self.status_addr;
        let mut last = serde_json::Value::Null;
        self.daemon
            .wait_until_blocking(&format!("join state {state}"), || {
                let Some((200, body)) = get_blocking(addr, "/status") else {
                    return false;
                };
                last = serde_json::from_str(&body).unwrap();
                last["join"]["state"] == state
            });
        last
    }
}

fn seed(site: &Site, token: &str, node: &str, server: SocketAddr) -> String {
    format!(
        "site = \"{}\"\nrole = \"join\"\nnode = \"{node}\"\njoin_token = \"{token}\"\nservers = [\"{server}\"]\n",
        site.name
    )
}

#[test]
fn a_node_joins_with_nothing_but_its_seed_and_becomes_a_server() {
    let site = Site::new("lab");
    let dir = tempfile::tempdir().unwrap();
    let replica = replica_of(&site, dir.path());
    let mut node = Node::start(&seed(&site, &token(&site, SECRET), "pi-b", replica.addr));

    let status = node.wait_for_join_state("joined");
    assert_eq!(status["join"]["role"], "server", "{status:#}");
    assert_eq!(status["join"]["via"]["address"], replica.addr.to_string());
    assert!(status["join"]["last_error"].is_null(), "{status:#}");

    // The certificate is the node's, for its own key, under the site's anchor.
    let chain = std::fs::read(node.file("var/lib/pimesh/identity/node.pem")).unwrap();
    let certs = pimesh_meshtls::pem::certificates(&chain).unwrap();
    let ids = pimesh_identity::verify_leaf(
        &certs[0],
        &certs[1..],
        std::slice::from_ref(site.root.anchor.cert_der()),
        &site.name,
        pimesh_identity::Usage::Client,
        std::time::SystemTime::now(),
    )
    .expect("the node certificate verifies under the site's anchor");
    assert_eq!(ids, vec![site.node_id("pi-b")]);
    let key = std::fs::read(node.file("var/lib/pimesh/identity/node.key")).unwrap();
    pimesh_meshtls::Credential::from_pem(&chain, &key)
        .expect("the certificate is of the node's key");
    assert_eq!(
        std::fs::read_to_string(node.file("var/lib/pimesh/identity/anchor.pem")).unwrap(),
        site.root.anchor.cert_pem()
    );

    // A server node holds the site issuer, and its proxy says it is a server.
    assert_eq!(
        std::fs::read_to_string(node.file("var/lib/pimesh/trust/issuer.pem")).unwrap(),
        site.root.issuer.cert_pem()
    );
    let proxy_env = std::fs::read_to_string(node.file("run/proxy.env")).unwrap();
    assert!(proxy_env.contains("--role server"), "{proxy_env}");
    let control_env = std::fs::read_to_string(node.file("run/control.env")).unwrap();
    assert!(
        control_env.contains("--site lab --node pi-b"),
        "{control_env}"
    );

    // The replica recorded the join.
    let joins = std::fs::read_to_string(dir.path().join("control-state/joins.jsonl")).unwrap();
    assert!(
        joins.contains("\"pi-b\"") && joins.contains("joined"),
        "{joins}"
    );

    // A restart keeps the role and joins no more.
    let record = node.file("var/lib/pimesh/join/state.json");
    let before = std::fs::read_to_string(&record).unwrap();
    drop(node.daemon);
    let mut again = Node::start_in(node.root);
    let status = again.wait_for_join_state("joined");
    assert_eq!(status["join"]["role"], "server");
    assert_eq!(std::fs::read_to_string(&record).unwrap(), before);
}

#[test]
fn a_rogue_server_and_a_wrong_token_get_nothing_and_the_node_says_why() {
    let site = Site::new("lab");
    let dir = tempfile::tempdir().unwrap();
    let replica = replica_of(&site, dir.path());

    // A server of a site of the same name under another anchor: the pin does not match.
    let rogue_site = Site::new("lab");
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue = replica_of(&rogue_site, rogue_dir.path());
    let mut node = Node::start(&seed(&site, &token(&site, SECRET), "pi-r", rogue.addr));
    let status = node.wait_for_join_state("discovering");
    let addr = node.status_addr;
    node.daemon
        .wait_until_blocking("the rogue server named", || {
            get_blocking(addr, "/status").is_some_and(|(_, body)| body.contains("rogue server"))
        });
    assert!(
        !node.file("var/lib/pimesh/identity/node.pem").exists(),
        "{status:#}"
    );
    assert!(
        !rogue_dir.path().join("control-state/joins.jsonl").exists(),
        "the rogue server never saw a join request"
    );

    // The right server, a wrong secret: refused for good, with the replica's reason.
    let mut wrong = Node::start(&seed(
        &site,
        &token(&site, "WrongSecret0123456789abcdef"),
        "pi-w",
        replica.addr,
    ));
    let status = wrong.wait_for_join_state("refused");
    let error = status["join"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("wrong_token"), "{status:#}");
    assert!(!wrong.file("var/lib/pimesh/identity/node.pem").exists());
}

#[test]
fn a_node_enrolled_by_hand_while_it_looks_for_servers_stops_joining() {
    let site = Site::new("lab");
    // Nothing listens here: the node keeps looking.
    let nowhere = free_addr();
    let mut node = Node::start(&seed(&site, &token(&site, SECRET), "pi-h", nowhere));
    node.wait_for_join_state("discovering");
    let request = node.file("var/lib/pimesh/identity/node.csr");
    node.daemon
        .wait_until_blocking("the node's request", || request.exists());
    let csr = rustls_pki_types::CertificateSigningRequestDer::from_pem_file(&request).unwrap();
    let chain = site
        .root
        .issuer
        .sign_node_chain(
            &csr,
            &site.name,
            &pimesh_test_support::pki::label("pi-h"),
            std::time::SystemTime::now(),
            pimesh_identity::NODE_LIFETIME,
        )
        .unwrap();
    std::fs::write(node.file("var/lib/pimesh/identity/node.pem"), chain).unwrap();
    let status = node.wait_for_join_state("manual");
    assert!(status["join"]["last_error"].is_null(), "{status:#}");
    assert!(!node.file("var/lib/pimesh/join/state.json").exists());
    let note = status["control"]["note"].as_str().unwrap_or_default();
    assert!(!note.contains("waiting to join"), "{status:#}");
}

/// A seed listing `servers` in order.
fn seed_listing(site: &Site, token: &str, node: &str, servers: &[SocketAddr]) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "site = \"{}\"\nrole = \"join\"\nnode = \"{node}\"\njoin_token = \"{token}\"\nservers = [{}]\n",
        site.name,
        servers.join(", ")
    )
}

#[test]
fn a_server_that_hangs_mid_join_does_not_hold_the_node() {
    let site = Site::new("lab");
    let dir = tempfile::tempdir().unwrap();
    let replica = replica_of(&site, dir.path());
    // Takes every connection and never says a word (not even a TLS hello).
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hanging_addr = hanging.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in hanging.incoming().flatten() {
            held.push(stream);
        }
    });
    let mut node = Node::start(&seed_listing(
        &site,
        &token(&site, SECRET),
        "pi-g",
        &[hanging_addr, replica.addr],
    ));
    let status = node.wait_for_join_state("joined");
    assert_eq!(status["join"]["via"]["address"], replica.addr.to_string());
    let log = node.daemon.log_text();
    assert!(
        log.contains(&hanging_addr.to_string()),
        "the node never tried the hanging server (the test would prove nothing): {log}"
    );
}

/// The node's key file, when it is there.
fn key_file_bytes(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

#[test]
fn power_cuts_while_joining_end_in_one_key_one_certificate_one_name() {
    let site = Site::new("lab");
    let dir = tempfile::tempdir().unwrap();
    let replica = replica_of(&site, dir.path());
    let mut node = Node::start(&seed(&site, &token(&site, SECRET), "pi-k", replica.addr));
    let key_file = node.file("var/lib/pimesh/identity/node.key");
    let mut first_key = None;
    // kill -9 at a random instant of the join, a few times; the node starts again from
    // whatever the cut left.
    for _ in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(fastrand::u64(0..300)));
        node.daemon.kill();
        let key = key_file_bytes(&key_file);
        if first_key.is_none() {
            first_key = key;
        } else {
            assert_eq!(key, first_key, "a cut made the node change its key");
        }
        node = Node::start_in(node.root);
    }
    let status = node.wait_for_join_state("joined");
    assert!(status["join"]["last_error"].is_null(), "{status:#}");
    let key = key_file_bytes(&key_file).expect("the node's key");
    if let Some(first) = first_key {
        assert_eq!(key, first, "one key across every cut");
    }
    let chain = std::fs::read(node.file("var/lib/pimesh/identity/node.pem")).unwrap();
    let pem_key = std::fs::read(&key_file).unwrap();
    pimesh_meshtls::Credential::from_pem(&chain, &pem_key)
        .expect("the certificate is of the node's one key");
    // Every answer the replica gave the node was a join under its one name, never a
    // refusal of that name.
    let joins = std::fs::read_to_string(dir.path().join("control-state/joins.jsonl")).unwrap();
    for line in joins.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["node"], "pi-k", "{line}");
        assert_eq!(record["result"], "joined", "{line}");
    }
}

#[test]
fn power_cuts_of_the_server_during_a_join_end_in_one_joined_node() {
    let site = Site::new("lab");
    let dir = tempfile::tempdir().unwrap();
    let mut replica = replica_of(&site, dir.path());
    let addr = replica.addr;
    let mut node = Node::start(&seed(&site, &token(&site, SECRET), "pi-s", addr));
    // kill -9 of the server at a random instant of the join, a few times; it starts again
    // at the same address from whatever its folders hold.
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(fastrand::u64(0..400)));
        replica.kill();
        replica = replica_in(&site, dir.path(), Some("pi-a"))
            .listen(addr)
            .start_blocking();
    }
    let status = node.wait_for_join_state("joined");
    assert!(status["join"]["last_error"].is_null(), "{status:#}");
    let chain = std::fs::read(node.file("var/lib/pimesh/identity/node.pem")).unwrap();
    let key = std::fs::read(node.file("var/lib/pimesh/identity/node.key")).unwrap();
    pimesh_meshtls::Credential::from_pem(&chain, &key)
        .expect("the certificate is of the node's one key");
    // The server's records survived the cuts: every line whole, and no answer it gave
    // refused the node's name (a seat or name held by a join cut short is the node's own).
    let joins = std::fs::read_to_string(dir.path().join("control-state/joins.jsonl")).unwrap();
    assert!(joins.ends_with('\n'), "a record cut short: {joins}");
    for line in joins.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["node"], "pi-s", "{line}");
        assert_eq!(record["result"], "joined", "{line}");
    }
    let seats = std::fs::read_to_string(dir.path().join("control-state/servers.json")).unwrap();
    let seats: serde_json::Value = serde_json::from_str(&seats).unwrap();
    assert!(seats["grants"]["pi-s"].is_object(), "{seats:#}");
    // Its seat is a server's: it holds the site issuer, which only a whole join gives.
    assert_eq!(status["join"]["role"], "server", "{status:#}");
    assert_eq!(
        std::fs::read_to_string(node.file("var/lib/pimesh/trust/issuer.pem")).unwrap(),
        site.root.issuer.cert_pem()
    );
    drop(replica);
}

/// Replaces `file` whole, as the init node's trust store swaps a generation.
fn replace(file: &Path, text: &str) {
    let next = file.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, file).unwrap();
}

/// The replica's trust folder after a lifecycle step on the node holding the anchor key.
fn publish_trust(
    trust: &Path,
    issuer: &pimesh_identity::Authority,
    anchors: &[&pimesh_identity::Authority],
) {
    let bundle: String = anchors.iter().map(|anchor| anchor.cert_pem()).collect();
    replace(&trust.join("anchor.pem"), &bundle);
    replace(&trust.join("issuer.key"), &issuer.key_pem());
    replace(&trust.join("issuer.pem"), issuer.cert_pem());
}

/// Reads the issuer of the chain in `file` (its second certificate).
fn chain_issuer(file: &Path) -> Option<rustls_pki_types::CertificateDer<'static>> {
    let pem = std::fs::read(file).ok()?;
    pimesh_meshtls::pem::certificates(&pem)
        .ok()?
        .into_iter()
        .nth(1)
}

fn text(file: &Path) -> Option<String> {
    std::fs::read_to_string(file).ok()
}

#[test]
fn joined_nodes_follow_issuer_and_anchor_rotation_made_where_the_anchor_key_is() {
    use pimesh_identity::Authority;
    use std::time::{Duration, SystemTime};

    // One seat, taken by the first node to join (pi-b); pi-c is an agent.
    let site = Site::new("lab");
    let dir = tempfile::tempdir().unwrap();
    let replica = replica_with(&site, dir.path(), "[k3s]\nservers = 1\n", None);
    let trust = dir.path().join("trust");
    let mut server = Node::start(&seed(&site, &token(&site, SECRET), "pi-b", replica.addr));
    assert_eq!(
        server.wait_for_join_state("joined")["join"]["role"],
        "server"
    );
    let mut agent = Node::start(&seed(&site, &token(&site, SECRET), "pi-c", replica.addr));
    assert_eq!(agent.wait_for_join_state("joined")["join"]["role"], "agent");
    let files = |node: &Node| {
        (
            node.file("var/lib/pimesh/identity/node.pem"),
            node.file("var/lib/pimesh/identity/anchor.pem"),
        )
    };
    let (server_chain, server_anchors) = files(&server);
    let (agent_chain, agent_anchors) = files(&agent);
    let server_issuer = server.file("var/lib/pimesh/trust/issuer.pem");
    let server_trust_anchors = server.file("var/lib/pimesh/trust/anchor.pem");
    // A server asks every 15 s, an agent every 30 s: a loaded machine gets three chances.
    let limit = Duration::from_secs(100);

    // The init node rotates its issuer and begins an anchor rotation (a next anchor joins
    // the bundle): the server takes both, the agent the bundle, and both certificates move
    // to the new issuer.
    // Certificates count time in whole seconds: each step is made a few seconds after the
    // one before, as an operator's steps (months apart in real life) would be.
    let step = |n: u64| site.now + Duration::from_secs(2 * n);
    let a = &site.root.anchor;
    let rotated = a.new_issuer(&site.name, step(1)).unwrap();
    let b = Authority::new_anchor(&site.name, step(1)).unwrap();
    publish_trust(&trust, &rotated, &[a, &b]);
    let both = format!("{}{}", a.cert_pem(), b.cert_pem());
    server.daemon.wait_until_blocking_for(
        "the server takes the rotated issuer and the begun bundle",
        limit,
        || {
            text(&server_issuer).as_deref() == Some(rotated.cert_pem())
                && chain_issuer(&server_chain).as_ref() == Some(rotated.cert_der())
                && text(&server_anchors).as_deref() == Some(both.as_str())
        },
    );
    agent.daemon.wait_until_blocking_for(
        "the agent's certificate by the rotated issuer, the begun bundle",
        limit,
        || {
            chain_issuer(&agent_chain).as_ref() == Some(rotated.cert_der())
                && text(&agent_anchors).as_deref() == Some(both.as_str())
        },
    );

    // The switch: a new issuer signed by the next anchor.
    let switched = b.new_issuer(&site.name, step(2)).unwrap();
    publish_trust(&trust, &switched, &[a, &b]);
    server
        .daemon
        .wait_until_blocking_for("the switched issuer on the server", limit, || {
            text(&server_issuer).as_deref() == Some(switched.cert_pem())
                && chain_issuer(&server_chain).as_ref() == Some(switched.cert_der())
        });
    agent.daemon.wait_until_blocking_for(
        "the agent's certificate by the switched issuer",
        limit,
        || chain_issuer(&agent_chain).as_ref() == Some(switched.cert_der()),
    );

    // The finish: the old anchor leaves the bundle; both nodes trust the new one alone, and
    // their certificates verify under it.
    publish_trust(&trust, &switched, &[&b]);
    server
        .daemon
        .wait_until_blocking_for("the finished bundle on the server", limit, || {
            text(&server_anchors).as_deref() == Some(b.cert_pem())
                && text(&server_trust_anchors).as_deref() == Some(b.cert_pem())
        });
    agent
        .daemon
        .wait_until_blocking_for("the finished bundle on the agent", limit, || {
            text(&agent_anchors).as_deref() == Some(b.cert_pem())
        });
    for (name, chain) in [("pi-b", &server_chain), ("pi-c", &agent_chain)] {
        let pem = std::fs::read(chain).unwrap();
        let certs = pimesh_meshtls::pem::certificates(&pem).unwrap();
        let ids = pimesh_identity::verify_leaf(
            &certs[0],
            &certs[1..],
            std::slice::from_ref(b.cert_der()),
            &site.name,
            pimesh_identity::Usage::Client,
            SystemTime::now(),
        )
        .unwrap_or_else(|err| panic!("{name}'s certificate under the new anchor alone: {err}"));
        assert_eq!(ids, vec![site.node_id(name)]);
    }
    for node in [&mut server, &mut agent] {
        let status = node.wait_for_join_state("joined");
        assert!(status["trust"]["error"].is_null(), "{status:#}");
    }
}
