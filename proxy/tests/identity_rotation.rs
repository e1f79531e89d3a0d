//! Workload identity from real control replicas (`pimesh-control` processes): two proxies
//! enroll with `--control`, renew their leaves, and follow issuer and anchor rotations
//! while a steady stream of requests crosses the mesh from node a to a service on node b;
//! every request is counted and none may fail.
//!
//! The site config places `web` (a backend in this process) on node b, allowed only to
//! callers holding `spiffe://depot/svc/client`, and `client` on node a: requests pass only
//! once a's proxy presents a leaf from a replica, which carries that service ID (the node
//! credential names the node alone).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use pimesh_identity::{anchor_sha256_hex, Authority};
use pimesh_test_support::backends::Backend;
use pimesh_test_support::control_plane::ControlPlane;
use pimesh_test_support::http::{get_text, raw_get, sample};
use pimesh_test_support::proxy::{Proxy, ProxyOptions};
use pimesh_test_support::{free_port, replace, wait_until, Site};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A proxy's `/config` as JSON.
async fn config_of(proxy: &Proxy) -> serde_json::Value {
    let (status, body) = get_text(proxy.admin, "/config").await.expect("/config");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("/config is JSON")
}

/// Two replicas, two proxies enrolled with them, a backend on node b.
struct Fixture {
    plane: ControlPlane,
    a_port: u16,
    a_id: PathBuf,
    a: Proxy,
    b: Proxy,
    _web: Backend,
}

impl Fixture {
    async fn start(lifetime_secs: u64) -> Fixture {
        let site = Site::new("depot");
        let web = Backend::start("web").await;
        let (a_port, b_port) = (free_port(), free_port());
        let text = format!(
            "site = \"depot\"\n[proxy]\nmax_connections = 1000\n\
             [nodes.a]\naddress = \"127.0.0.1:{a_port}\"\n\
             [nodes.b]\naddress = \"127.0.0.1:{b_port}\"\n\
             [services.web]\nport = {}\nnodes = [\"b\"]\nallow = [\"spiffe://depot/svc/client\"]\n\
             [services.private]\nport = {}\nnodes = [\"b\"]\nallow = [\"spiffe://depot/svc/nobody\"]\n\
             [services.client]\nport = {}\nnodes = [\"a\"]\n",
            web.port,
            web.port,
            free_port()
        );
        let mut plane = ControlPlane::new(site, &text);
        plane
            .start_replicas(2, |replica| {
                replica
                    .site("depot")
                    .arg("--leaf-lifetime")
                    .arg(lifetime_secs.to_string())
                    .rust_log("info")
            })
            .await;
        let dir = plane.path();
        let a_id = plane.site.identity_dir(dir, "a", &[]);
        let b_id = plane.site.identity_dir(dir, "b", &[]);
        let b = start_proxy(&plane, "b", "b", &b_id, b_port, "127.0.0.2").await;
        let a = start_proxy(&plane, "a", "a", &a_id, a_port, "127.0.0.1").await;
        let fixture = Fixture {
            plane,
            a_port,
            a_id,
            a,
            b,
            _web: web,
        };
        for proxy in [&fixture.a, &fixture.b] {
            wait_until("a leaf from the replicas", || async {
                config_of(proxy).await["identity"]["source"] == "control"
            })
            .await;
        }
        fixture
    }

    /// Waits until `check` holds for the identity in `/config` of both proxies.
    async fn wait_both(&self, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
        for proxy in [&self.a, &self.b] {
            wait_until(what, || async {
                check(&config_of(proxy).await["identity"])
            })
            .await;
        }
    }
}

/// Starts proxy `name` of the plane's site config, with `--control` and the state
/// directory `<dir>/<state>-state`.
async fn start_proxy(
    plane: &ControlPlane,
    name: &str,
    state: &str,
    identity: &Path,
    inbound_port: u16,
    local_ip: &str,
) -> Proxy {
    Proxy::start_with(
        ProxyOptions {
            dir: plane.path(),
            name,
            config: &plane.config,
            identity: Some(identity),
            inbound_port,
            local_ip,
        },
        &plane.proxy_args(state),
    )
    .await
}

/// Requests from node a to `web` on node b, from a few client tasks, until stopped: every
/// request is counted, and every one that is not a 200 `web` is kept with why.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(outbound: std::net::SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut tasks = Vec::new();
        for client in 0..3 {
            let (stop, sent, failures) = (stop.clone(), sent.clone(), failures.clone());
            // Client 0 opens a connection per request; the others keep theirs open.
            let keep_alive = client != 0;
            tasks.push(tokio::spawn(async move {
                let mut stream = None;
                while !stop.load(Ordering::Relaxed) {
                    if stream.is_none() {
                        match tokio::net::TcpStream::connect(outbound).await {
                            Ok(s) => stream = Some(s),
                            Err(err) => {
                                sent.fetch_add(1, Ordering::Relaxed);
                                failures
                                    .lock()
                                    .expect("lock")
                                    .push(format!("connect: {err}"));
                                continue;
                            }
                        }
                    }
                    let Some(s) = stream.as_mut() else { continue };
                    sent.fetch_add(1, Ordering::Relaxed);
                    match one_request(s, keep_alive).await {
                        Ok(()) => {}
                        Err(why) => {
                            failures.lock().expect("lock").push(why);
                            stream = None;
                            continue;
                        }
                    }
                    if !keep_alive {
                        stream = None;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        Load {
            stop,
            sent,
            failures,
            tasks,
        }
    }

    /// Stops the clients; the number of requests sent and the failures.
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("client task");
        }
        let failures = self.failures.lock().expect("lock").clone();
        (self.sent.load(Ordering::Relaxed), failures)
    }
}

/// `GET /` with `Host: web` on `stream`; `Err` describes anything but `200` and `web\n`.
async fn one_request(stream: &mut tokio::net::TcpStream, keep_alive: bool) -> Result<(), String> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let (head, body) = raw_get(stream, "web", connection).await?;
    if head.starts_with("HTTP/1.1 200") && body == "web\n" {
        Ok(())
    } else {
        Err(format!("{head}{body}"))
    }
}

fn assert_no_failures(sent: u64, failures: &[String]) {
    eprintln!("{sent} requests sent, {} failed", failures.len());
    assert!(sent > 0, "no request was sent");
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed; first ones: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

fn ok_renewals(metrics: &str) -> f64 {
    sample(metrics, "pimesh_identity_renewals_total{result=\"ok\"}")
}

#[tokio::test]
async fn leaves_are_renewed_under_load_and_no_request_fails() {
    let f = Fixture::start(6).await;
    // The leaf names the node and the services placed on it, and only those.
    for (proxy, ids) in [
        (
            &f.a,
            vec!["spiffe://depot/node/a", "spiffe://depot/svc/client"],
        ),
        (
            &f.b,
            vec![
                "spiffe://depot/node/b",
                "spiffe://depot/svc/private",
                "spiffe://depot/svc/web",
            ],
        ),
    ] {
        let config = config_of(proxy).await;
        let identity = &config["identity"];
        assert_eq!(identity["ids"], serde_json::json!(ids), "{config}");
        assert!(identity["not_after"].as_u64().is_some(), "{config}");
        assert!(identity["issuer"].as_str().is_some(), "{config}");
        assert!(config["enrollment"]["signed_by"].is_string(), "{config}");
    }
    let load = Load::start(f.a.outbound);
    for proxy in [&f.a, &f.b] {
        let before = ok_renewals(&proxy.metrics().await);
        wait_until("two renewals", || async {
            ok_renewals(&proxy.metrics().await) >= before + 2.0
        })
        .await;
    }
    let (sent, failures) = load.finish().await;
    assert_no_failures(sent, &failures);

    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let expiry = f.a.metric("pimesh_identity_expiry_timestamp_seconds").await;
    assert!(expiry > now - 1.0, "expiry {expiry} vs now {now}");

    // The leaf's key is a secret: mode 0600 in the state directory.
    use std::os::unix::fs::PermissionsExt as _;
    for name in ["a", "b"] {
        let key = f
            .plane
            .path()
            .join(format!("{name}-state/identity/leaf.key"));
        let mode = std::fs::metadata(&key)
            .expect("leaf.key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }

    // A service allowing another service ID refuses a's, names why and counts it.
    let mut stream = tokio::net::TcpStream::connect(f.a.outbound)
        .await
        .expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: private\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("pimesh-proxy-error:")
            && answer.contains("not allowed to call service private"),
        "{answer}"
    );
    wait_until("the refusal is counted", || async {
        f.b.metric("pimesh_rejected_total{direction=\"inbound\",reason=\"unauthorized\"}")
            .await
            >= 1.0
    })
    .await;
}

#[tokio::test]
async fn an_issuer_rotation_under_load_fails_no_request() {
    let f = Fixture::start(6).await;
    let load = Load::start(f.a.outbound);
    let issuer = f
        .plane
        .site
        .root
        .anchor
        .new_issuer(&f.plane.site.name, SystemTime::now())
        .expect("a new issuer");
    let new_sha = anchor_sha256_hex(issuer.cert_der());
    f.plane.rotate_trust(&[&f.plane.site.root.anchor], &issuer);
    f.plane.hangup_replicas();
    f.wait_both("leaves from the new issuer", |identity| {
        identity["issuer_sha256"] == new_sha.as_str()
    })
    .await;
    let (sent, failures) = load.finish().await;
    assert_no_failures(sent, &failures);
}

#[tokio::test]
async fn an_anchor_rotation_under_load_fails_no_request() {
    let f = Fixture::start(6).await;
    let load = Load::start(f.a.outbound);
    let old = &f.plane.site.root.anchor;
    let old_sha = anchor_sha256_hex(old.cert_der());
    let now = SystemTime::now();
    let anchor = Authority::new_anchor(&f.plane.site.name, now).expect("a new anchor");
    let new_sha = anchor_sha256_hex(anchor.cert_der());
    let issuer = anchor
        .new_issuer(&f.plane.site.name, now)
        .expect("its issuer");

    // (a) Both anchors trusted; the old issuer still signs.
    f.plane
        .rotate_trust(&[old, &anchor], &f.plane.site.root.issuer);
    f.plane.hangup_replicas();
    f.wait_both("bundles with both anchors", |identity| {
        identity["bundle_sha256"] == serde_json::json!([old_sha, new_sha])
    })
    .await;

    // (b) The new anchor's issuer signs.
    f.plane.rotate_trust(&[old, &anchor], &issuer);
    f.plane.hangup_replicas();
    f.wait_both("leaves under the new anchor", |identity| {
        identity["anchor_sha256"] == new_sha.as_str()
    })
    .await;

    // (c) The old anchor is dropped.
    f.plane.rotate_trust(&[&anchor], &issuer);
    f.plane.hangup_replicas();
    f.wait_both("bundles with the new anchor only", |identity| {
        identity["bundle_sha256"] == serde_json::json!([new_sha])
    })
    .await;

    let (sent, failures) = load.finish().await;
    assert_no_failures(sent, &failures);
}

#[tokio::test]
async fn a_saved_leaf_serves_after_a_restart_with_every_replica_down() {
    let mut f = Fixture::start(300).await;
    let first = config_of(&f.a).await["identity"].clone();
    let args = f.plane.proxy_args("a");
    f.plane.replicas.clear(); // every replica stops
    f.a.daemon.kill();
    f.a = Proxy::start_with(
        ProxyOptions {
            dir: f.plane.path(),
            name: "a-restarted",
            config: &f.plane.config,
            identity: Some(&f.a_id),
            inbound_port: f.a_port,
            local_ip: "127.0.0.1",
        },
        &args,
    )
    .await;
    let config = config_of(&f.a).await;
    let identity = &config["identity"];
    assert_eq!(identity["source"], "cache", "{config}");
    assert_eq!(identity["ids"], first["ids"], "{config}");
    assert_eq!(identity["not_after"], first["not_after"], "{config}");

    // The saved leaf carries svc/client, so web's allow list still lets a in.
    let load = Load::start(f.a.outbound);
    wait_until("some requests", || async {
        load.sent.load(Ordering::Relaxed) >= 20
    })
    .await;
    let (sent, failures) = load.finish().await;
    assert_no_failures(sent, &failures);
    wait_until("the failed renewal in /config", || async {
        config_of(&f.a).await["enrollment"]["last_error"].is_string()
    })
    .await;
}

#[tokio::test]
async fn a_service_newly_placed_on_the_node_joins_its_leaf_at_once() {
    // Leaves live 5 minutes: the new one comes from the placement change, not a renewal.
    let f = Fixture::start(300).await;
    let text = std::fs::read_to_string(&f.plane.config).expect("config");
    let extra = format!(
        "[services.extra]\nport = {}\nnodes = [\"a\"]\n",
        free_port()
    );
    replace(&f.plane.config, &format!("{text}{extra}"));
    f.plane.hangup_replicas(); // replicas reload on SIGHUP; proxies see the change by polling
    wait_until("svc/extra in a's leaf", || async {
        let config = config_of(&f.a).await;
        config["identity"]["ids"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|id| id == "spiffe://depot/svc/extra"))
    })
    .await;
    let identity = config_of(&f.a).await["identity"].clone();
    assert_eq!(identity["source"], "control", "{identity}");
}

#[tokio::test]
async fn a_node_credential_under_another_anchor_gets_no_leaf_and_config_says_why() {
    let f = Fixture::start(60).await;
    let stranger = Site::new("depot");
    let id = stranger.identity_dir(&f.plane.path().join("stranger"), "c", &[]);
    let c = start_proxy(&f.plane, "c", "c", &id, free_port(), "127.0.0.3").await;
    wait_until("an enrollment error in /config", || async {
        config_of(&c).await["enrollment"]["last_error"].is_string()
    })
    .await;
    let config = config_of(&c).await;
    let why = config["enrollment"]["last_error"]
        .as_str()
        .unwrap_or_default();
    eprintln!("proxy c: {why}");
    assert!(
        why.contains("TLS handshake failed")
            && why.contains("does not chain to any of the 1 anchor"),
        "{config}"
    );
    assert!(
        f.plane
            .replicas
            .iter()
            .any(|r| why.contains(&r.addr.to_string())),
        "names the replica: {why}"
    );
    assert_eq!(config["identity"]["source"], "node-credential", "{config}");
    assert_eq!(ok_renewals(&c.metrics().await), 0.0);
}
