//! The identity API of the replica binary over real sockets and mutual TLS: a node sends a
//! CSR with its node credential and gets a leaf for exactly the identities the site config
//! places on it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::collections::BTreeSet;
use std::time::SystemTime;

use pimesh_identity::{verify_leaf, LeafRequest, SpiffeId, Usage};
use pimesh_test_support::control::Replica;
use pimesh_test_support::http::{plain_get, HttpResponse};
use pimesh_test_support::tls::{alert, client_config, tls_exchange, tls_request};
use pimesh_test_support::{path_str, temp_dir, Credential, Site};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

const SITE: &str = "depot-7";
const WEB_ON_PI_A: &str = "site = \"depot-7\"\n\
    [services.web]\nport = 8080\nnodes = [\"pi-a\"]\n\
    [services.db]\nport = 5432\nnodes = [\"pi-b\"]\n";

/// POSTs a CSR for `ids` to `/v1/identity` as `credential`; the response and the key.
fn ask(
    port: u16,
    site: &Site,
    credential: &Credential,
    ids: &[SpiffeId],
) -> (HttpResponse, LeafRequest) {
    let request = LeafRequest::new(ids).expect("request");
    let config = client_config(site.root.anchor.cert_der(), Some(credential));
    let response = tls_request(
        port,
        config,
        "POST",
        "/v1/identity",
        "",
        request.csr_pem.as_bytes(),
    )
    .expect("answered");
    (response, request)
}

fn error_text(response: &HttpResponse) -> String {
    let value: serde_json::Value = serde_json::from_slice(&response.body).expect("JSON error");
    value["error"].as_str().expect("error string").to_owned()
}

#[test]
fn a_node_gets_its_own_and_its_placed_services_identities_and_renews_with_them() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    let wanted = [site.node_id("pi-a"), site.svc_id("web")];
    let (response, request) = ask(replica.port, &site, &site.node_credential("pi-a"), &wanted);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.header("content-type"),
        Some("application/x-pem-file")
    );

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&response.body)
        .collect::<Result<_, _>>()
        .expect("PEM chain");
    assert_eq!(chain.len(), 2, "leaf and issuer");
    assert_eq!(&chain[1], site.root.issuer.cert_der());
    let now = SystemTime::now();
    let anchors = [site.root.anchor.cert_der().clone()];
    for usage in [Usage::Client, Usage::Server] {
        let ids = verify_leaf(&chain[0], &chain[1..], &anchors, &site.name, usage, now)
            .expect("verifies against the anchor");
        let ids: BTreeSet<SpiffeId> = ids.into_iter().collect();
        assert_eq!(ids, BTreeSet::from(wanted.clone()));
    }
    let not_after: u64 = response
        .header("pimesh-not-after")
        .and_then(|v| v.parse().ok())
        .expect("pimesh-not-after");
    let in_a_day = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("now")
        .as_secs()
        + 24 * 3600;
    assert!(
        (in_a_day - 60..=in_a_day + 60).contains(&not_after),
        "{not_after} vs {in_a_day}"
    );

    // The proxy renews with the leaf it got: the node is read from it.
    let leaf = Credential {
        chain,
        key: request.key.serialize_der(),
    };
    let (renewed, _) = ask(replica.port, &site, &leaf, &wanted);
    assert_eq!(renewed.status, 200, "{}", renewed.text());
}

#[test]
fn a_service_not_placed_on_the_node_is_refused_by_name() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    let pi_a = site.node_credential("pi-a");
    let (response, _) = ask(replica.port, &site, &pi_a, &[site.svc_id("db")]);
    assert_eq!(response.status, 403);
    let error = error_text(&response);
    assert!(error.contains("spiffe://depot-7/svc/db"), "{error}");
    // Refused whole: a permitted identity beside it does not help.
    let (response, _) = ask(
        replica.port,
        &site,
        &pi_a,
        &[site.node_id("pi-a"), site.svc_id("db")],
    );
    assert_eq!(response.status, 403);
    // The replicas' own identity is never issued.
    let (response, _) = ask(replica.port, &site, &pi_a, &[site.svc_id("pimesh-control")]);
    assert_eq!(response.status, 403);
}

#[test]
fn a_node_cannot_get_another_nodes_identity() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    let pi_b = site.node_credential("pi-b");
    let (response, _) = ask(replica.port, &site, &pi_b, &[site.node_id("pi-a")]);
    assert_eq!(response.status, 403);
    let error = error_text(&response);
    assert!(error.contains("spiffe://depot-7/node/pi-a"), "{error}");
    let (response, _) = ask(replica.port, &site, &pi_b, &[site.svc_id("web")]);
    assert_eq!(response.status, 403, "web is placed on pi-a only");
    let (response, _) = ask(
        replica.port,
        &site,
        &pi_b,
        &[site.node_id("pi-b"), site.svc_id("db")],
    );
    assert_eq!(response.status, 200, "{}", response.text());
}

#[test]
fn without_a_client_certificate_the_handshake_is_refused() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    let request = LeafRequest::new(&[site.node_id("pi-a")]).expect("request");
    let config = client_config(site.root.anchor.cert_der(), None);
    let refused = tls_request(
        replica.port,
        config,
        "POST",
        "/v1/identity",
        "",
        request.csr_pem.as_bytes(),
    )
    .expect_err("no answer without a certificate");
    assert_eq!(
        alert(&refused),
        Some(rustls::AlertDescription::CertificateRequired),
        "{refused}"
    );
}

#[test]
fn a_node_of_another_site_is_refused_at_the_handshake() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    // Another site's node: its chain leads to no anchor of the bundle. An impostor's own
    // anchor for this very site's name: the names chain up, the signatures do not.
    let cases = [
        (Site::new("depot-8"), rustls::AlertDescription::UnknownCA),
        (Site::new(SITE), rustls::AlertDescription::DecryptError),
    ];
    for (stranger, expected) in cases {
        let credential = stranger.node_credential("pi-a");
        let request = LeafRequest::new(&[site.node_id("pi-a")]).expect("request");
        let config = client_config(site.root.anchor.cert_der(), Some(&credential));
        let refused = tls_request(
            replica.port,
            config,
            "POST",
            "/v1/identity",
            "",
            request.csr_pem.as_bytes(),
        )
        .expect_err("no answer to a foreign certificate");
        assert_eq!(
            alert(&refused),
            Some(expected),
            "{}: {refused}",
            stranger.name
        );
    }
}

#[test]
fn malformed_oversized_and_misrouted_requests_are_refused_and_the_replica_stays_up() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    let pi_a = site.node_credential("pi-a");
    let config = || client_config(site.root.anchor.cert_der(), Some(&pi_a));
    let post = |body: &[u8]| {
        tls_request(replica.port, config(), "POST", "/v1/identity", "", body).expect("answered")
    };
    for garbage in [
        &b""[..],
        b"not a CSR",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        &[0u8, 0xff, 0x16, 0x03][..],
    ] {
        let response = post(garbage);
        assert_eq!(response.status, 400, "{garbage:?}: {}", response.text());
    }
    // A valid CSR that names no identity.
    let nameless = LeafRequest::new(&[]).expect("request").csr_pem;
    let response = post(nameless.as_bytes());
    assert_eq!(response.status, 400, "{}", response.text());

    // Declared too large: refused before the body is sent.
    let head = "POST /v1/identity HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
                Content-Length: 16385\r\nExpect: 100-continue\r\n\r\n";
    let response = tls_exchange(replica.port, config(), head.as_bytes()).expect("answered");
    assert_eq!(response.status, 413, "{}", response.text());

    let response =
        tls_request(replica.port, config(), "GET", "/v1/nowhere", "", b"").expect("answered");
    assert_eq!(response.status, 404);
    let response =
        tls_request(replica.port, config(), "GET", "/v1/identity", "", b"").expect("answered");
    assert_eq!(response.status, 405);

    // Still serving.
    let (response, _) = ask(replica.port, &site, &pi_a, &[site.node_id("pi-a")]);
    assert_eq!(response.status, 200, "{}", response.text());
}

#[test]
fn readiness_and_liveness_answer_in_plain_http_on_the_same_port_until_sigterm() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let mut replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    let (status, body) = plain_get(replica.port, "/ready").expect("ready answers");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("site depot-7, 2 placed service(s)"), "{body}");
    assert_eq!(plain_get(replica.port, "/live").map(|r| r.0), Some(200));
    // Plain HTTP never reaches the identity API.
    let (status, body) = plain_get(replica.port, "/v1/stats").expect("answers");
    assert_eq!(status, 404);
    assert!(body.contains("mutual TLS"), "{body}");

    replica.signal(nix::sys::signal::Signal::SIGTERM);
    let exit = replica.wait_exit();
    assert!(exit.success(), "{exit}");
}

#[test]
fn sighup_reloads_the_placement_and_a_broken_config_keeps_the_last_good_one() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let mut replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    let pi_a = site.node_credential("pi-a");
    let db = [site.svc_id("db")];
    assert_eq!(ask(replica.port, &site, &pi_a, &db).0.status, 403);

    let config = dir.join("cluster.toml");
    let moved = WEB_ON_PI_A.replace("nodes = [\"pi-b\"]", "nodes = [\"pi-a\", \"pi-b\"]");
    std::fs::write(&config, moved).expect("write");
    replica.signal(nix::sys::signal::Signal::SIGHUP);
    let port = replica.port;
    replica.wait_for("reloaded", || {
        let (response, _) = ask(port, &site, &pi_a, &db);
        response.status == 200
    });

    std::fs::write(&config, "site = \"depot-7\"\n[services.db]\nport = \"x\"\n").expect("write");
    replica.signal(nix::sys::signal::Signal::SIGHUP);
    replica.wait_for("reload refused", || {
        plain_get(port, "/ready").is_some_and(|(_, body)| body.contains("last reload failed"))
    });
    let (status, body) = plain_get(port, "/ready").expect("ready");
    assert_eq!(status, 200, "still ready on the last good config: {body}");
    assert!(body.contains("cluster.toml"), "{body}");
    assert_eq!(ask(replica.port, &site, &pi_a, &db).0.status, 200);
}

#[test]
fn stats_count_issued_refused_and_refused_handshakes() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    let pi_a = site.node_credential("pi-a");
    assert_eq!(
        ask(replica.port, &site, &pi_a, &[site.node_id("pi-a")])
            .0
            .status,
        200
    );
    assert_eq!(
        ask(replica.port, &site, &pi_a, &[site.svc_id("db")])
            .0
            .status,
        403
    );
    let anonymous = client_config(site.root.anchor.cert_der(), None);
    assert!(tls_request(replica.port, anonymous, "GET", "/v1/stats", "", b"").is_err());

    let config = client_config(site.root.anchor.cert_der(), Some(&pi_a));
    let response = tls_request(replica.port, config, "GET", "/v1/stats", "", b"").expect("stats");
    assert_eq!(response.status, 200);
    let stats: serde_json::Value = serde_json::from_slice(&response.body).expect("JSON");
    assert_eq!(stats["site"], "depot-7");
    assert_eq!(stats["issued"], 1);
    assert_eq!(stats["refused"], 1);
    assert_eq!(stats["handshakes_refused"], 1);
}

#[test]
fn the_trust_bundle_is_served_to_nodes_and_leaves_live_the_leaf_lifetime() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let next = Site::new(SITE);
    let trust = dir.join("trust");
    site.write_trust(&trust);
    let bundle = format!(
        "{}{}",
        site.root.anchor.cert_pem(),
        next.root.anchor.cert_pem()
    );
    std::fs::write(trust.join("anchor.pem"), bundle).expect("bundle");
    let mut replica = Replica::start(&[
        "--trust-dir",
        &path_str(&trust),
        "--config",
        &path_str(&dir.join("cluster.toml")),
        "--site",
        SITE,
        "--leaf-lifetime",
        "6",
    ]);
    replica.wait_ready();

    let credential = site.node_credential("pi-a");
    let config = client_config(site.root.anchor.cert_der(), Some(&credential));
    let response =
        tls_request(replica.port, config, "GET", "/v1/trust-bundle", "", b"").expect("answered");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.header("content-type"),
        Some("application/x-pem-file")
    );
    let anchors: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&response.body)
        .collect::<Result<_, _>>()
        .expect("PEM bundle");
    assert_eq!(
        anchors,
        vec![
            site.root.anchor.cert_der().clone(),
            next.root.anchor.cert_der().clone()
        ]
    );
    // Plain HTTP on the same port never reaches it.
    let (status, _) = plain_get(replica.port, "/v1/trust-bundle").expect("answered");
    assert_eq!(status, 404);

    let (response, _) = ask(replica.port, &site, &credential, &[site.node_id("pi-a")]);
    assert_eq!(response.status, 200, "{}", response.text());
    let not_after: u64 = response
        .header("pimesh-not-after")
        .and_then(|v| v.parse().ok())
        .expect("pimesh-not-after");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("now")
        .as_secs();
    assert!(
        (now..=now + 7).contains(&not_after),
        "{not_after} vs now {now}"
    );
}
