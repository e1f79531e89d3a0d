//! The join protocol's server side on the replica binary, over real sockets and TLS: a
//! board with nothing but the site's join token becomes a node (pinned anchor, server
//! name join.pimesh.invalid, no client certificate), and every way a join can be wrong
//! is refused with its code.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pimesh_identity::{
    cert_validity, certificate_key_sha256, request_key_sha256, verify_leaf, Authority, LeafRequest,
    SpiffeId, Usage,
};
use pimesh_join::{IssuerHandover, JoinAnswer, Refusal, RefusalCode, Role};
use pimesh_test_support::control::{DiscoveryStream, Replica};
use pimesh_test_support::http::HttpResponse;
use pimesh_test_support::join::{
    join, join_body, join_json, node_request, pinned_config, request_for_key, request_from,
    sha256_hex, JOIN_SERVER_NAME,
};
use pimesh_test_support::tls::{alert, client_config, tls_request};
use pimesh_test_support::{temp_dir, wait_until_blocking, Credential, Site};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

const SITE: &str = "depot-7";
const SECRET: &str = "correct-horse-battery-staple";

/// A loopback source address of its own for each simulated board (127.0.0.N): failures
/// count per source.
fn src(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    site: Site,
    replica: Replica,
}

impl Fixture {
    fn port(&self) -> u16 {
        self.replica.port
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn join(&self, from: u8, node: &str, secret: &str, csr: &str) -> HttpResponse {
        join(&self.site, self.port(), src(from), node, secret, csr)
    }

    /// A join connection's answer to `method path` with `body`.
    fn on_join_connection(&self, from: u8, method: &str, path: &str, body: &[u8]) -> HttpResponse {
        request_from(
            src(from),
            self.port(),
            pinned_config(&self.site),
            JOIN_SERVER_NAME,
            method,
            path,
            body,
        )
        .expect("answered")
    }

    /// `POST /v1/heartbeat` as `credential` with `body`: the status.
    fn heartbeat(&self, credential: &Credential, body: &str) -> u16 {
        let config = client_config(self.site.root.anchor.cert_der(), Some(credential));
        tls_request(
            self.port(),
            config,
            "POST",
            "/v1/heartbeat",
            "",
            body.as_bytes(),
        )
        .expect("answered")
        .status
    }

    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state().join("joins.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON record"))
            .collect()
    }
}

/// Replica 1 of a fresh site with `extra` in its site config, `--node node` when given,
/// and a trust folder whose join.json accepts `tokens` (none: no join.json).
fn start(extra: &str, node: Option<&str>, tokens: &[(&str, Option<SystemTime>)]) -> Fixture {
    let (guard, dir) = temp_dir();
    let site = Site::new(SITE);
    let trust = dir.join("trust");
    site.write_trust(&trust);
    if !tokens.is_empty() {
        std::fs::write(trust.join("join.json"), join_json(tokens)).expect("join.json");
    }
    let config = dir.join("cluster.toml");
    std::fs::write(&config, format!("site = \"{SITE}\"\n{extra}")).expect("cluster.toml");
    let mut options = Replica::options(1)
        .trust_dir(&trust)
        .config(&config)
        .site(SITE)
        .arg("--state-dir")
        .arg(dir.join("state"));
    if let Some(node) = node {
        options = options.arg("--node").arg(node);
    }
    let replica = options.start_blocking();
    Fixture {
        _dir: guard,
        dir,
        site,
        replica,
    }
}

fn accepted(response: &HttpResponse) -> JoinAnswer {
    assert_eq!(response.status, 200, "{}", response.text());
    serde_json::from_slice(&response.body).expect("a join answer")
}

/// The refusal of `response`, checked to carry `code` with its status.
fn refusal(response: &HttpResponse, code: RefusalCode) -> Refusal {
    let refusal: Refusal = serde_json::from_slice(&response.body)
        .unwrap_or_else(|err| panic!("{err}: {}", response.text()));
    assert_eq!(refusal.error, code, "{}", response.text());
    assert_eq!(response.status, code.status(), "{}", response.text());
    refusal
}

fn pem_chain(text: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .expect("PEM certificates")
}

/// The node credential a join answered, with the key of its request.
fn credential(answer: &JoinAnswer, request: &LeafRequest) -> Credential {
    Credential {
        chain: pem_chain(&answer.certificate),
        key: request.key.serialize_der(),
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

#[test]
fn a_board_joins_with_the_token_and_gets_a_certificate_for_its_name_and_key() {
    let f = start("", Some("pi-a"), &[(SECRET, None)]);
    let bundle = f.on_join_connection(1, "GET", "/v1/join/bundle", b"");
    assert_eq!(bundle.status, 200, "{}", bundle.text());
    assert_eq!(
        pem_chain(&bundle.text()),
        vec![f.site.root.anchor.cert_der().clone()]
    );

    let request = node_request(&f.site, "pi-b");
    let answer = accepted(&f.join(1, "pi-b", SECRET, &request.csr_pem));
    let chain = pem_chain(&answer.certificate);
    assert_eq!(chain.len(), 2, "node certificate and issuer");
    assert_eq!(&chain[1], f.site.root.issuer.cert_der());
    let anchors = pem_chain(&answer.anchors);
    assert_eq!(anchors, vec![f.site.root.anchor.cert_der().clone()]);
    let now = SystemTime::now();
    for usage in [Usage::Client, Usage::Server] {
        let ids = verify_leaf(&chain[0], &chain[1..], &anchors, &f.site.name, usage, now)
            .expect("verifies under the anchor");
        assert_eq!(ids, vec![f.site.node_id("pi-b")]);
    }
    assert_eq!(
        certificate_key_sha256(&chain[0]),
        request_key_sha256(&request.csr),
        "the certificate is for the CSR's key"
    );
    let (_, not_after) = cert_validity(&chain[0]).expect("validity");
    let life = not_after.duration_since(now).expect("future");
    let year = pimesh_identity::NODE_LIFETIME;
    assert!(
        life > year - Duration::from_secs(120) && life <= year,
        "{life:?}"
    );
    assert_eq!(answer.role, Role::Server, "pi-a and pi-b: 2 of 3 seats");
    assert_eq!(answer.k3s_token, None);
    let servers: Vec<&str> = answer.servers.iter().map(|s| s.node.as_str()).collect();
    assert_eq!(servers, ["pi-a"], "the answering node");
    assert_eq!(answer.servers[0].replicas, vec![f.port()]);

    // A power cut mid-join: the same key asks again and gets a certificate again.
    let again = accepted(&f.join(1, "pi-b", SECRET, &request.csr_pem));
    assert_eq!(again.role, Role::Server);

    let records = f.records();
    assert_eq!(records.len(), 2, "{records:?}");
    for record in &records {
        assert_eq!(record["node"], "pi-b");
        assert_eq!(record["from"], "127.0.0.1");
        assert_eq!(record["result"], "joined");
        assert_eq!(record["role"], "server");
        assert_eq!(record["replica"], 1);
        assert!(record["at"].as_str().is_some_and(|at| at.ends_with('Z')));
    }
    assert!(f.replica.daemon.log_text().contains("join answered"));

    // Once the trust folder holds the site's K3s token, joining nodes receive it.
    std::fs::write(f.dir.join("trust").join("k3s-token"), "k3s-s3cret\n").expect("k3s-token");
    pimesh_test_support::wait::wait_until_blocking("the K3s token in a join answer", || {
        accepted(&f.join(1, "pi-b", SECRET, &request.csr_pem))
            .k3s_token
            .as_deref()
            == Some("k3s-s3cret")
    });
}

#[test]
fn a_join_connection_reaches_the_join_routes_only_and_mutual_tls_still_needs_a_certificate() {
    let f = start("", None, &[(SECRET, None)]);
    for (method, path) in [
        ("GET", "/v1/discovery"),
        ("POST", "/v1/identity"),
        ("GET", "/v1/trust-bundle"),
        ("GET", "/v1/join/issuer"),
        ("POST", "/v1/heartbeat"),
        ("GET", "/ready"),
    ] {
        let response = f.on_join_connection(1, method, path, b"");
        assert_eq!(response.status, 404, "{method} {path}: {}", response.text());
        assert!(response.text().contains("join"), "{}", response.text());
    }
    let response = f.on_join_connection(1, "GET", "/v1/join", b"");
    assert_eq!(response.status, 405);

    // Any other server name is the mutual-TLS side, unchanged: no certificate, no answer.
    let config = client_config(f.site.root.anchor.cert_der(), None);
    let body = join_body("pi-b", SECRET, &node_request(&f.site, "pi-b").csr_pem);
    let refused = tls_request(f.port(), config, "POST", "/v1/join", "", &body)
        .expect_err("no answer without a certificate");
    assert_eq!(
        alert(&refused),
        Some(rustls::AlertDescription::CertificateRequired),
        "{refused}"
    );
    // And with one, the join routes are not there.
    let node = client_config(
        f.site.root.anchor.cert_der(),
        Some(&f.site.node_credential("pi-c")),
    );
    let response = tls_request(f.port(), node, "POST", "/v1/join", "", &body).expect("answered");
    assert_eq!(response.status, 404, "{}", response.text());
}

#[test]
fn every_wrong_join_is_refused_with_its_code_and_recorded() {
    let expired = SystemTime::now() - Duration::from_secs(3600);
    let f = start("", None, &[(SECRET, None), ("old-secret", Some(expired))]);
    let csr = node_request(&f.site, "pi-b").csr_pem;

    let wrong = refusal(&f.join(2, "pi-b", "guess", &csr), RefusalCode::WrongToken);
    assert!(
        wrong.reason.contains("not one this site accepts"),
        "{}",
        wrong.reason
    );
    refusal(
        &f.join(3, "pi-b", "old-secret", &csr),
        RefusalCode::TokenExpired,
    );

    let other_node = node_request(&f.site, "pi-c").csr_pem;
    let mismatch = refusal(
        &f.join(4, "pi-b", SECRET, &other_node),
        RefusalCode::CsrMismatch,
    );
    assert!(
        mismatch.reason.contains("spiffe://depot-7/node/pi-c")
            && mismatch
                .reason
                .contains("expected spiffe://depot-7/node/pi-b"),
        "{}",
        mismatch.reason
    );
    let two = LeafRequest::new(&[f.site.node_id("pi-b"), f.site.svc_id("web")]).expect("csr");
    refusal(
        &f.join(4, "pi-b", SECRET, &two.csr_pem),
        RefusalCode::CsrMismatch,
    );
    let foreign: SpiffeId = "spiffe://depot-8/node/pi-b".parse().expect("id");
    let other_site = LeafRequest::new(&[foreign]).expect("csr").csr_pem;
    let site = refusal(
        &f.join(5, "pi-b", SECRET, &other_site),
        RefusalCode::WrongSite,
    );
    assert!(
        site.reason.contains("spiffe://depot-8/node/pi-b"),
        "{}",
        site.reason
    );

    refusal(
        &f.on_join_connection(6, "POST", "/v1/join", b"{\"node\": \"pi-b\""),
        RefusalCode::BadRequest,
    );
    refusal(
        &f.join(6, "pi-b", SECRET, "not a CSR"),
        RefusalCode::BadRequest,
    );
    let oversize = vec![b' '; pimesh_join::MAX_REQUEST_BYTES + 1];
    let too_large = f.on_join_connection(7, "POST", "/v1/join", &oversize);
    assert_eq!(too_large.status, 413, "{}", too_large.text());
    let body: Refusal = serde_json::from_slice(&too_large.body).expect("refusal");
    assert_eq!(body.error, RefusalCode::BadRequest);

    let results: Vec<String> = f
        .records()
        .iter()
        .map(|record| record["result"].as_str().expect("result").to_owned())
        .collect();
    assert_eq!(
        results,
        [
            "wrong_token",
            "token_expired",
            "csr_mismatch",
            "csr_mismatch",
            "wrong_site",
            "bad_request",
            "bad_request",
            "bad_request"
        ]
    );
    assert_eq!(f.records()[0]["from"], "127.0.0.2");
}

#[test]
fn six_failed_attempts_from_one_source_are_rate_limited_even_with_the_right_token() {
    let f = start("", None, &[(SECRET, None)]);
    let csr = node_request(&f.site, "pi-b").csr_pem;
    for _ in 0..5 {
        refusal(&f.join(9, "pi-b", "guess", &csr), RefusalCode::WrongToken);
    }
    let limited = f.join(9, "pi-b", "guess", &csr);
    refusal(&limited, RefusalCode::RateLimited);
    let wait: u64 = limited
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&wait), "{wait}");
    refusal(&f.join(9, "pi-b", SECRET, &csr), RefusalCode::RateLimited);
    // Another source is heard.
    accepted(&f.join(10, "pi-b", SECRET, &csr));
}

#[test]
fn a_live_node_keeps_its_name_against_another_key_and_the_same_key_rejoins() {
    let f = start("", None, &[(SECRET, None)]);
    let held = f.site.node_credential("pi-b");
    let key = pimesh_join::hex(&certificate_key_sha256(&held.chain[0]).expect("key"));
    let beat = format!(r#"{{"port": 4143, "credential": "{key}", "role": "agent"}}"#);
    assert_eq!(f.heartbeat(&held, &beat), 204);

    let stranger = node_request(&f.site, "pi-b").csr_pem;
    let taken = refusal(
        &f.join(11, "pi-b", SECRET, &stranger),
        RefusalCode::NameTaken,
    );
    assert!(taken.reason.contains("pi-b"), "{}", taken.reason);
    let same = request_for_key(&held.key, &["spiffe://depot-7/node/pi-b"]);
    accepted(&f.join(12, "pi-b", SECRET, &same));

    // Without a heartbeat, the replica remembers whom it answered for a name.
    let first = node_request(&f.site, "pi-c");
    accepted(&f.join(13, "pi-c", SECRET, &first.csr_pem));
    let second = node_request(&f.site, "pi-c").csr_pem;
    refusal(&f.join(14, "pi-c", SECRET, &second), RefusalCode::NameTaken);
    accepted(&f.join(13, "pi-c", SECRET, &first.csr_pem));

    // An old heartbeat body still works.
    assert_eq!(f.heartbeat(&held, r#"{"port": 4143}"#), 204);
}

#[test]
fn seats_fill_up_to_the_target_and_the_issuer_goes_to_server_nodes_only() {
    let f = start("[k3s]\nservers = 3\n", Some("pi-a"), &[(SECRET, None)]);
    let mut joined = Vec::new();
    for (i, node) in ["pi-b", "pi-c", "pi-d"].into_iter().enumerate() {
        let request = node_request(&f.site, node);
        let from = 20 + u8::try_from(i).expect("small");
        let answer = accepted(&f.join(from, node, SECRET, &request.csr_pem));
        joined.push((node, answer, request));
    }
    let roles: Vec<Role> = joined.iter().map(|(_, a, _)| a.role).collect();
    assert_eq!(roles, [Role::Server, Role::Server, Role::Agent]);
    let grants: serde_json::Value =
        serde_json::from_str(&read(&f.state().join("servers.json"))).expect("servers.json");
    let granted: Vec<&String> = grants["grants"]
        .as_object()
        .expect("grants")
        .keys()
        .collect();
    assert_eq!(granted, ["pi-b", "pi-c"]);

    let issuer = |i: usize| {
        let (_, answer, request) = &joined[i];
        let config = client_config(
            f.site.root.anchor.cert_der(),
            Some(&credential(answer, request)),
        );
        tls_request(f.port(), config, "GET", "/v1/join/issuer", "", b"").expect("answered")
    };
    refusal(&issuer(2), RefusalCode::NotAServer);
    let handover = issuer(0);
    assert_eq!(handover.status, 200, "{}", handover.text());
    let handover: IssuerHandover = serde_json::from_slice(&handover.body).expect("handover");
    assert_eq!(handover.issuer_cert, f.site.root.issuer.cert_pem());
    assert_eq!(handover.issuer_key, f.site.root.issuer.key_pem());
    Authority::from_pem(&handover.issuer_cert, &handover.issuer_key).expect("the key fits");
    assert_eq!(
        pem_chain(&handover.anchors),
        vec![f.site.root.anchor.cert_der().clone()]
    );
    assert_eq!(handover.tokens.len(), 1);
    assert_eq!(handover.tokens.check(SECRET, SystemTime::now()), Ok(()));
    assert!(!f.replica.daemon.log_text().contains("PRIVATE KEY"));
}

#[test]
fn with_one_seat_the_replicas_own_node_holds_it() {
    let f = start("[k3s]\nservers = 1\n", Some("pi-a"), &[(SECRET, None)]);
    let request = node_request(&f.site, "pi-b");
    assert_eq!(
        accepted(&f.join(1, "pi-b", SECRET, &request.csr_pem)).role,
        Role::Agent
    );
    assert!(!f.state().join("servers.json").exists(), "no grant made");
}

#[test]
fn live_server_nodes_are_in_the_discovery_document_and_the_join_answer() {
    let f = start("[k3s]\nservers = 1\n", None, &[(SECRET, None)]);
    let pi_a = f.site.node_credential("pi-a");
    let beat = format!(
        r#"{{"port": 4143, "role": "server", "replicas": [{}]}}"#,
        f.port()
    );
    assert_eq!(f.heartbeat(&pi_a, &beat), 204);
    let config = client_config(f.site.root.anchor.cert_der(), Some(&pi_a));
    let mut stream = DiscoveryStream::open(f.port(), config).expect("stream");
    let document = stream.document_where(|d| d["servers"].get("pi-a").is_some());
    assert_eq!(
        document["servers"],
        serde_json::json!({ "pi-a": { "address": "127.0.0.1", "replicas": [f.port()] } })
    );

    let request = node_request(&f.site, "pi-b");
    let answer = accepted(&f.join(1, "pi-b", SECRET, &request.csr_pem));
    assert_eq!(
        answer.role,
        Role::Agent,
        "the live server holds the one seat"
    );
    assert_eq!(answer.servers.len(), 1);
    assert_eq!(answer.servers[0].node.as_str(), "pi-a");
    assert_eq!(answer.servers[0].address, src(1));
    assert_eq!(answer.servers[0].replicas, vec![f.port()]);
}

#[test]
fn tokens_come_from_join_json_or_the_site_config_and_follow_their_changes() {
    let f = start("", None, &[]);
    let csr = node_request(&f.site, "pi-b").csr_pem;
    let none = refusal(&f.join(30, "pi-b", SECRET, &csr), RefusalCode::WrongToken);
    assert!(
        none.reason.contains("accepts no join tokens"),
        "{}",
        none.reason
    );

    // Each try from a source of its own: refusals while waiting do not add up.
    let mut from = 31;
    let mut joins = |secret: &str| {
        from += 1;
        f.join(from, "pi-b", secret, &csr).status == 200
    };
    std::fs::write(f.dir.join("trust/join.json"), join_json(&[(SECRET, None)])).expect("write");
    wait_until_blocking("join.json is read", || joins(SECRET));

    std::fs::write(f.dir.join("trust/join.json"), "{\"tokens\": 7}").expect("write");
    wait_until_blocking("a broken join.json is reported", || {
        f.replica.daemon.log_text().contains("join.json")
    });
    assert!(
        joins(SECRET),
        "a broken join.json keeps the previous tokens"
    );

    let rotated = format!(
        "site = \"{SITE}\"\n[join]\ntokens = [{{ sha256 = \"{}\" }}]\n",
        sha256_hex(b"new-secret")
    );
    std::fs::write(f.dir.join("cluster.toml"), rotated).expect("write");
    wait_until_blocking("the site config's tokens replace join.json's", || {
        joins("new-secret")
    });
    assert!(!joins(SECRET));
}

#[test]
fn a_joined_node_renews_its_certificate_with_its_own_key_only_when_due() {
    let f = start("[k3s]\nservers = 1\n", Some("pi-a"), &[(SECRET, None)]);
    let request = node_request(&f.site, "pi-b");
    let answer = accepted(&f.join(30, "pi-b", SECRET, &request.csr_pem));
    let renew = |csr: &str| {
        let config = client_config(
            f.site.root.anchor.cert_der(),
            Some(&credential(&answer, &request)),
        );
        tls_request(
            f.port(),
            config,
            "POST",
            "/v1/join/renew",
            "",
            csr.as_bytes(),
        )
        .expect("answered")
    };

    // Its certificate is of the current issuer and young: nothing to renew.
    let current = renew(&request.csr_pem);
    assert_eq!(current.status, 204, "{}", current.text());

    // A CSR of another key (another node's, or a key the caller made up) is refused.
    let other = node_request(&f.site, "pi-b");
    refusal(&renew(&other.csr_pem), RefusalCode::CsrMismatch);
    refusal(&renew("not a csr"), RefusalCode::BadRequest);

    // Without a client certificate nothing is answered.
    let anonymous = client_config(f.site.root.anchor.cert_der(), None);
    let answer_anonymous = tls_request(
        f.port(),
        anonymous,
        "POST",
        "/v1/join/renew",
        "",
        request.csr_pem.as_bytes(),
    );
    assert!(
        answer_anonymous
            .as_ref()
            .map_or(true, |r| r.status != 200 && r.status != 204),
        "an anonymous renewal was answered"
    );
}
