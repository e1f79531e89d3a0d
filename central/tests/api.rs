//! The central server binary over real TLS: an operator publishes signed revisions, nodes
//! long-poll for them with their node certificates and report back.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use pimesh_revision::{Mode, Revision};
use pimesh_test_support::central::{Central, OperatedSite};
use reqwest::blocking::Client;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The central server with `sites`, long-polls held at most 30 s.
fn start_central(dir: &Path, sites: &[&OperatedSite]) -> Central {
    let sites: Vec<_> = sites.iter().map(|site| site.central_site()).collect();
    Central::start(dir, "long_poll_max = \"30s\"\n", &sites)
}

/// One kept-alive HTTP/1.1 connection over TLS: every request goes on the same connection
/// (reqwest pools, so it cannot show that).
struct Connection {
    stream: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
}

impl Connection {
    fn open(central: &Central, identity: Option<&[u8]>) -> Connection {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(&central.server_pem).expect("server cert"))
            .expect("root");
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots);
        let config = match identity {
            Some(pem) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(pem)
                        .collect::<Result<_, _>>()
                        .expect("chain"),
                    PrivateKeyDer::from_pem_slice(pem).expect("key"),
                )
                .expect("client auth"),
            None => builder.with_no_client_auth(),
        };
        let name = ServerName::try_from("localhost").expect("name");
        let tls = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("tls");
        let tcp = TcpStream::connect(central.addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Connection {
            stream: BufReader::new(rustls::StreamOwned::new(tls, tcp)),
        }
    }

    /// Sends one request and reads its response: the status and the body.
    fn request(&mut self, method: &str, path: &str, body: &str) -> (u16, String) {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let stream = self.stream.get_mut();
        stream.write_all(request.as_bytes()).expect("send");
        stream.flush().expect("flush");
        let mut status_line = String::new();
        self.stream
            .read_line(&mut status_line)
            .expect("status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {status_line:?}"));
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).expect("header");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                assert!(
                    !name.eq_ignore_ascii_case("connection") || !value.contains("close"),
                    "the server closes the connection"
                );
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().expect("content-length");
                }
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).expect("body");
        (status, String::from_utf8(body).expect("utf-8"))
    }

    /// Sends only the head of a request whose body would be `length` bytes, and reads the
    /// status the server answers with before any of the body.
    fn declare(&mut self, method: &str, path: &str, length: usize) -> u16 {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {length}\r\n\r\n"
        );
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes()).expect("send");
        stream.flush().expect("flush");
        let mut status_line = String::new();
        self.stream
            .read_line(&mut status_line)
            .expect("status line");
        status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {status_line:?}"))
    }

    fn get(&mut self, path: &str) -> u16 {
        self.request("GET", path, "").0
    }
}

const CONFIG_1: &str = "site = \"depot-7\"\n[services.web]\nport = 8080\nnodes = [\"pi-a\"]\n";
const CONFIG_2: &str = "site = \"depot-7\"\n[services.web]\nport = 8081\nnodes = [\"pi-a\"]\n";

fn revision_of(body: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(body).expect("json")["revision"]
        .as_u64()
        .expect("revision")
}

#[test]
fn publish_then_nodes_long_poll_and_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = OperatedSite::new(dir.path(), "depot-7");
    let central = start_central(dir.path(), &[&site]);
    let operator = central.client(None);
    let node = central.client(Some(&site.site.node_identity_pem("pi-a")));

    let published = operator
        .put(central.url("/v1/sites/depot-7/revisions"))
        .body(site.revision(1, CONFIG_1))
        .send()
        .expect("publish");
    assert_eq!(published.status(), 201);

    // Newer than what the node has: answered at once.
    let fetched = node
        .get(central.url("/v1/sites/depot-7/config?after=0&wait=20"))
        .send()
        .expect("fetch");
    assert_eq!(fetched.status(), 200);
    assert_eq!(revision_of(&fetched.text().expect("body")), 1);

    // Nothing newer: held, then empty.
    let empty = node
        .get(central.url("/v1/sites/depot-7/config?after=1&wait=1"))
        .send()
        .expect("poll");
    assert_eq!(empty.status(), 204);

    // A publish while a node waits wakes it with the new revision.
    let publisher = {
        let operator = operator.clone();
        let url = central.url("/v1/sites/depot-7/revisions");
        let body = site.revision(2, CONFIG_2);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            operator
                .put(url)
                .body(body)
                .send()
                .expect("publish 2")
                .status()
        })
    };
    let woken = node
        .get(central.url("/v1/sites/depot-7/config?after=1&wait=30"))
        .send()
        .expect("long-poll");
    assert_eq!(woken.status(), 200);
    assert_eq!(revision_of(&woken.text().expect("body")), 2);
    assert_eq!(publisher.join().expect("publisher"), 201);

    // The node reports; the fleet view names it by its certificate.
    let report = node
        .post(central.url("/v1/sites/depot-7/reports"))
        .body(r#"{"revision": 2, "state": "applied", "detail": ""}"#)
        .send()
        .expect("report");
    assert_eq!(report.status(), 200);
    // Only the site's operator reads it: a request signed with the site key.
    assert_eq!(
        operator
            .get(central.url("/v1/fleet"))
            .send()
            .expect("fleet")
            .status(),
        401
    );
    let signed = site.authorization("GET", "/v1/fleet");
    let fleet: serde_json::Value = serde_json::from_str(
        &operator
            .get(central.url("/v1/fleet"))
            .header("authorization", signed)
            .send()
            .expect("fleet")
            .text()
            .expect("body"),
    )
    .expect("json");
    assert_eq!(fleet["sites"].as_array().map(Vec::len), Some(1));
    assert_eq!(fleet["sites"][0]["latest_revision"], 2);
    assert_eq!(fleet["sites"][0]["nodes"][0]["node"], "pi-a");
    assert_eq!(fleet["sites"][0]["nodes"][0]["revision"], 2);
    assert_eq!(fleet["sites"][0]["nodes"][0]["state"], "applied");

    // The metrics say the same, and count a long-poll while it waits.
    let metrics = |client: &Client| -> String {
        let response = client.get(central.url("/metrics")).send().expect("metrics");
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("application/openmetrics-text"));
        response.text().expect("body")
    };
    let text = metrics(&operator);
    for line in [
        "pimesh_central_reports_total{site=\"depot-7\"} 1",
        "pimesh_central_publishes_total{site=\"depot-7\",outcome=\"stored\"} 2",
        "pimesh_central_long_poll_answers_total{site=\"depot-7\",answer=\"revision\"} 2",
        "pimesh_central_long_poll_answers_total{site=\"depot-7\",answer=\"nothing_newer\"} 1",
        "pimesh_central_site_revision{site=\"depot-7\"} 2",
        "pimesh_central_site_nodes{site=\"depot-7\"} 1",
        "pimesh_central_site_nodes_behind{site=\"depot-7\"} 0",
        "pimesh_central_long_polls{site=\"depot-7\"} 0",
    ] {
        assert!(text.contains(line), "{line}:\n{text}");
    }
    assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
    let waiting = {
        let url = central.url("/v1/sites/depot-7/config?after=2&wait=20");
        let node = node.clone();
        std::thread::spawn(move || node.get(url).send().expect("long-poll").status())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !metrics(&operator).contains("pimesh_central_long_polls{site=\"depot-7\"} 1") {
        assert!(
            std::time::Instant::now() < deadline,
            "the long-poll is never counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A third revision wakes it; the node has not reported it: one node behind.
    let published = operator
        .put(central.url("/v1/sites/depot-7/revisions"))
        .body(site.revision(3, CONFIG_1))
        .send()
        .expect("publish 3");
    assert_eq!(published.status(), 201);
    assert_eq!(waiting.join().expect("long-poll thread"), 200);
    let text = metrics(&operator);
    assert!(
        text.contains("pimesh_central_site_nodes_behind{site=\"depot-7\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("pimesh_central_long_polls{site=\"depot-7\"} 0"),
        "{text}"
    );
}

#[test]
fn bad_publishes_and_strangers_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = OperatedSite::new(dir.path(), "depot-7");
    let other = OperatedSite::new(dir.path(), "depot-8");
    let central = start_central(dir.path(), &[&site, &other]);
    let operator = central.client(None);
    let put = |body: Vec<u8>| {
        operator
            .put(central.url("/v1/sites/depot-7/revisions"))
            .body(body)
            .send()
            .expect("publish")
    };

    assert_eq!(put(site.revision(1, CONFIG_1)).status(), 201);
    let replay = put(site.revision(1, CONFIG_1));
    assert_eq!(replay.status(), 409);
    assert!(replay.text().expect("body").contains("not newer"));
    let forged = Revision {
        site: site.site.name.clone(),
        revision: 2,
        mode: Mode::Apply,
        config: CONFIG_2.to_owned(),
    }
    .sign(&other.key.pkcs8)
    .expect("sign");
    assert_eq!(put(forged.to_json()).status(), 403);
    let invalid = put(site.revision(
        3,
        "site = \"depot-7\"\n[services.web]\nnodes = [\"pi-a\"]\n",
    ));
    assert_eq!(invalid.status(), 400);
    assert!(invalid.text().expect("body").contains("services.web.nodes"));
    assert_eq!(put(b"{\"truncated\": ".to_vec()).status(), 400);
    // An oversized body is refused before it is read (the client sends only the head, and
    // the answer comes without waiting for the body); the server then closes that
    // connection, so it goes on a connection of its own.
    let oversized = Connection::open(&central, None).declare(
        "PUT",
        "/v1/sites/depot-7/revisions",
        2 * 1024 * 1024,
    );
    assert_eq!(oversized, 413);
    // A body declared and never sent is refused once its time is up (10 s), not held
    // open with its memory for as long as the client likes.
    let mut stalled = Connection::open(&central, None);
    stalled
        .stream
        .get_ref()
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(40)))
        .expect("timeout");
    let started = std::time::Instant::now();
    assert_eq!(
        stalled.declare("PUT", "/v1/sites/depot-7/revisions", 1_000),
        408
    );
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "answered before the body's time"
    );

    // Without a node certificate, or with a node certificate of another site.
    let anonymous = operator
        .get(central.url("/v1/sites/depot-7/config?after=0"))
        .send()
        .expect("fetch");
    assert_eq!(anonymous.status(), 401);
    let stranger = central.client(Some(&other.site.node_identity_pem("pi-a")));
    let refused = stranger
        .get(central.url("/v1/sites/depot-7/config?after=0"))
        .send()
        .expect("fetch");
    assert_eq!(refused.status(), 403);
    // A certificate from an anchor the server does not know fails the handshake.
    let unknown = OperatedSite::new(&dir.path().join(".."), "depot-7");
    let outsider = central.client(Some(&unknown.site.node_identity_pem("pi-a")));
    assert!(outsider
        .get(central.url("/v1/sites/depot-7/config?after=0"))
        .send()
        .is_err());
    assert_eq!(
        operator
            .get(central.url("/v1/sites/nowhere/config"))
            .send()
            .expect("fetch")
            .status(),
        404
    );
}

#[test]
fn requests_on_one_kept_alive_connection_share_its_authorization() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = OperatedSite::new(dir.path(), "depot-7");
    let other = OperatedSite::new(dir.path(), "depot-8");
    let central = start_central(dir.path(), &[&site, &other]);
    let published = central
        .client(None)
        .put(central.url("/v1/sites/depot-7/revisions"))
        .body(site.revision(1, CONFIG_1))
        .send()
        .expect("publish");
    assert_eq!(published.status(), 201);

    // A node: its certificate is checked by the first request, the next ones reuse that.
    let mut node = Connection::open(&central, Some(&site.site.node_identity_pem("pi-a")));
    let (status, body) = node.request("GET", "/v1/sites/depot-7/config?after=0", "");
    assert_eq!(status, 200);
    assert_eq!(revision_of(&body), 1);
    assert_eq!(node.get("/v1/sites/depot-7/config?after=1&wait=0"), 204);
    let report = r#"{"revision": 1, "state": "applied", "detail": ""}"#;
    let (status, _) = node.request("POST", "/v1/sites/depot-7/reports", report);
    assert_eq!(status, 200);

    // A node of another site: refused on every request, while the same connection remains
    // a node of its own site.
    let mut stranger = Connection::open(&central, Some(&other.site.node_identity_pem("pi-b")));
    for _ in 0..2 {
        assert_eq!(stranger.get("/v1/sites/depot-7/config?after=0"), 403);
    }
    assert_eq!(stranger.get("/v1/sites/depot-8/config?after=0&wait=0"), 204);
    assert_eq!(stranger.get("/v1/sites/depot-7/config?after=0"), 403);

    // No certificate: refused on every request.
    let mut anonymous = Connection::open(&central, None);
    for _ in 0..2 {
        assert_eq!(anonymous.get("/v1/sites/depot-7/config?after=0"), 401);
    }
    assert_eq!(
        anonymous.get("/v1/fleet"),
        401,
        "the fleet view is the operators'"
    );
    assert_eq!(node.get("/v1/fleet"), 401, "not a node's");
}

#[test]
fn revisions_survive_a_kill_and_interrupted_writes_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = OperatedSite::new(dir.path(), "depot-7");
    let mut central = start_central(dir.path(), &[&site]);
    let operator = central.client(None);
    for (number, config) in [(1, CONFIG_1), (2, CONFIG_2)] {
        let status = operator
            .put(central.url("/v1/sites/depot-7/revisions"))
            .body(site.revision(number, config))
            .send()
            .expect("publish")
            .status();
        assert_eq!(status, 201);
    }
    // What a crash in the middle of storing revision 3 leaves behind: a temporary file.
    let revisions = dir.path().join("state/depot-7/revisions");
    std::fs::write(
        revisions.join(".3.json.tmp-4242"),
        &site.revision(3, CONFIG_1)[..40],
    )
    .expect("torn write");
    central.kill_and_restart();

    let node = central.client(Some(&site.site.node_identity_pem("pi-a")));
    let fetched = node
        .get(central.url("/v1/sites/depot-7/config?after=0"))
        .send()
        .expect("fetch");
    assert_eq!(
        revision_of(&fetched.text().expect("body")),
        2,
        "the newest complete revision"
    );
    let status = operator
        .put(central.url("/v1/sites/depot-7/revisions"))
        .body(site.revision(2, CONFIG_2))
        .send()
        .expect("replay")
        .status();
    assert_eq!(status, 409, "revision order survives the restart");
}
