//! The discovery API of the replica binary over real sockets and mutual TLS: proxies post
//! heartbeats, and a watch streams the site config with the live node addresses.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::time::Duration;

use pimesh_test_support::control::{DiscoveryStream, Replica};
use pimesh_test_support::http::plain_get;
use pimesh_test_support::tls::{alert, client_config, tls_request};
use pimesh_test_support::{path_str, temp_dir, Credential, Site};

const SITE: &str = "depot-7";
const WEB_ON_PI_A: &str = "site = \"depot-7\"\n[services.web]\nport = 8080\nnodes = [\"pi-a\"]\n";

fn heartbeat(port: u16, site: &Site, credential: &Credential, body: &str) -> (u16, String) {
    post_heartbeat(port, site, credential, "", body)
}

/// A heartbeat that asks for the servers the replica hears: the status and the answer.
fn heartbeat_asking(
    port: u16,
    site: &Site,
    credential: &Credential,
    body: &str,
) -> (u16, serde_json::Value) {
    let (status, text) =
        post_heartbeat(port, site, credential, "Accept: application/json\r\n", body);
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// `POST /v1/heartbeat` as `credential` with `headers` beside the content type.
fn post_heartbeat(
    port: u16,
    site: &Site,
    credential: &Credential,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let config = client_config(site.root.anchor.cert_der(), Some(credential));
    let response = tls_request(
        port,
        config,
        "POST",
        "/v1/heartbeat",
        &format!("Content-Type: application/json\r\n{headers}"),
        body.as_bytes(),
    )
    .expect("answered");
    (response.status, response.text())
}

#[test]
fn a_heartbeat_that_asks_hears_which_servers_the_replica_hears() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    let (pi_a, pi_e, pi_d) = (
        site.node_credential("pi-a"),
        site.node_credential("pi-e"),
        site.node_credential("pi-d"),
    );
    // pi-a is a server; the agent pi-d, asking, is told of it (and only of servers).
    let (status, _) = heartbeat_asking(
        replica.port,
        &site,
        &pi_a,
        r#"{"port": 4143, "role": "server", "replicas": [8086, 8087]}"#,
    );
    assert_eq!(status, 200);
    let (status, answer) = heartbeat_asking(
        replica.port,
        &site,
        &pi_d,
        r#"{"port": 4143, "role": "agent"}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(
        answer,
        serde_json::json!({"servers": {"pi-a": {"address": "127.0.0.1", "replicas": [8086, 8087]}}})
    );
    // A server heard later is in the next answer; a caller that does not ask gets 204.
    heartbeat_asking(
        replica.port,
        &site,
        &pi_e,
        r#"{"port": 4143, "role": "server", "replicas": [8086]}"#,
    );
    let (_, answer) = heartbeat_asking(replica.port, &site, &pi_d, r#"{"port": 4143}"#);
    let servers: Vec<&String> = answer["servers"]
        .as_object()
        .map(|servers| servers.keys().collect())
        .unwrap_or_default();
    assert_eq!(servers, ["pi-a", "pi-e"]);
    assert_eq!(
        heartbeat(replica.port, &site, &pi_d, r#"{"port": 4143}"#).0,
        204
    );
}

fn watch(port: u16, site: &Site, credential: &Credential) -> DiscoveryStream {
    let config = client_config(site.root.anchor.cert_der(), Some(credential));
    let stream = DiscoveryStream::open(port, config).expect("stream opened");
    assert_eq!(stream.status, 200);
    assert_eq!(stream.header("content-type"), Some("application/x-ndjson"));
    stream
}

#[test]
fn a_heartbeat_puts_the_node_with_its_address_into_the_watch() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    let pi_a = site.node_credential("pi-a");
    let mut stream = watch(replica.port, &site, &pi_a);
    let first = stream.next_document();
    assert_eq!(first["site"], SITE);
    assert_eq!(first["config"], WEB_ON_PI_A);
    assert_eq!(first["nodes"], serde_json::json!({}));
    assert_eq!(first["version"].as_str().map(str::len), Some(64));

    assert_eq!(
        heartbeat(replica.port, &site, &pi_a, r#"{"port": 4143}"#).0,
        204
    );
    let next = stream.next_document();
    assert_eq!(next["nodes"], serde_json::json!({"pi-a": "127.0.0.1:4143"}));
    assert_ne!(next["version"], first["version"]);
    assert_eq!(next["config"], WEB_ON_PI_A);

    // A refresh at the same address is not news; a bad body is named.
    assert_eq!(
        heartbeat(replica.port, &site, &pi_a, r#"{"port": 4143}"#).0,
        204
    );
    let (status, body) = heartbeat(replica.port, &site, &pi_a, r#"{"prot": 4143}"#);
    assert_eq!(status, 400);
    assert!(
        body.contains("{\\\"port\\\": P}") && body.contains("prot"),
        "{body}"
    );
    // Another node moves in: a new document, and only then.
    let pi_b = site.node_credential("pi-b");
    assert_eq!(
        heartbeat(replica.port, &site, &pi_b, r#"{"port": 5143}"#).0,
        204
    );
    let both = stream.next_document();
    assert_eq!(
        both["nodes"],
        serde_json::json!({"pi-a": "127.0.0.1:4143", "pi-b": "127.0.0.1:5143"})
    );
}

#[test]
fn a_node_whose_heartbeats_stop_leaves_after_the_ttl() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    site.write_trust(&dir.join("trust"));
    std::fs::write(dir.join("cluster.toml"), WEB_ON_PI_A).expect("config");
    let mut replica = Replica::start(&[
        "--trust-dir",
        &path_str(&dir.join("trust")),
        "--config",
        &path_str(&dir.join("cluster.toml")),
        "--heartbeat-ttl",
        "2",
    ]);
    replica.wait_ready();
    let pi_a = site.node_credential("pi-a");
    let mut stream = watch(replica.port, &site, &pi_a);
    stream.next_document();
    assert_eq!(
        heartbeat(replica.port, &site, &pi_a, r#"{"port": 4143}"#).0,
        204
    );
    let live = stream.document_where(|d| d["nodes"].get("pi-a").is_some());
    let gone = stream.next_document();
    assert_eq!(gone["nodes"], serde_json::json!({}), "after {live}");
}

#[test]
fn a_rewritten_config_streams_as_a_new_document_without_sighup() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    let mut stream = watch(replica.port, &site, &site.node_credential("pi-b"));
    assert_eq!(stream.next_document()["config"], WEB_ON_PI_A);
    let changed = WEB_ON_PI_A.replace("8080", "8081");
    let tmp = dir.join("cluster.toml.tmp");
    std::fs::write(&tmp, &changed).expect("write");
    std::fs::rename(&tmp, dir.join("cluster.toml")).expect("rename");
    let next = stream.next_document();
    assert_eq!(next["config"], changed.as_str());

    // A broken config keeps the last good one: no new document, the stream stays.
    std::fs::write(dir.join("cluster.toml"), "site = \"depot-7\"\nfrob = 1\n").expect("write");
    let fixed = WEB_ON_PI_A.replace("8080", "8082");
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(&tmp, &fixed).expect("write");
    std::fs::rename(&tmp, dir.join("cluster.toml")).expect("rename");
    assert_eq!(stream.next_document()["config"], fixed.as_str());
}

#[test]
fn a_half_swapped_issuer_keeps_the_last_good_one_until_the_pair_matches() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let mut replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    let next = Site::new(SITE);
    let trust = dir.join("trust");
    // The new issuer's certificate first, its key later: in between they do not match.
    std::fs::write(trust.join("issuer.pem"), next.root.issuer.cert_pem()).expect("issuer");
    let port = replica.port;
    let old_client = client_config(
        site.root.anchor.cert_der(),
        Some(&site.node_credential("pi-a")),
    );
    replica.wait_for("reporting the half-swapped issuer", || {
        plain_get(port, "/ready")
            .is_some_and(|(_, body)| body.contains("keeping the trust loaded before"))
    });
    let answered = tls_request(port, old_client, "GET", "/v1/stats", "", b"").expect("answers");
    assert_eq!(answered.status, 200, "still serving with the old issuer");

    // The rest of the swap: both anchors in the bundle, then the matching key.
    let bundle = format!(
        "{}{}",
        site.root.anchor.cert_pem(),
        next.root.anchor.cert_pem()
    );
    std::fs::write(trust.join("anchor.pem"), bundle).expect("bundle");
    std::fs::write(trust.join("issuer.key"), next.root.issuer.key_pem()).expect("key");
    let new_client = client_config(
        next.root.anchor.cert_der(),
        Some(&site.node_credential("pi-a")),
    );
    replica.wait_for("serving under the new issuer", || {
        tls_request(port, new_client.clone(), "GET", "/v1/stats", "", b"")
            .is_ok_and(|r| r.status == 200)
    });
}

#[test]
fn two_replicas_with_the_same_inputs_serve_the_same_version() {
    let site = Site::new(SITE);
    let (_one, one_dir) = temp_dir();
    let (_two, two_dir) = temp_dir();
    let one = Replica::of_site(&one_dir, &site, Some(WEB_ON_PI_A));
    let two = Replica::of_site(&two_dir, &site, Some(WEB_ON_PI_A));
    let pi_a = site.node_credential("pi-a");
    for replica in [&one, &two] {
        assert_eq!(
            heartbeat(replica.port, &site, &pi_a, r#"{"port": 4143}"#).0,
            204
        );
    }
    let with_node = |port| {
        let mut stream = watch(port, &site, &pi_a);
        stream.document_where(|d| d["nodes"].get("pi-a").is_some())
    };
    let (a, b) = (with_node(one.port), with_node(two.port));
    assert_eq!(a, b, "the whole documents, versions included");
}

#[test]
fn without_a_client_certificate_there_is_no_discovery() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let replica = Replica::of_site(&dir, &site, Some(WEB_ON_PI_A));
    let anonymous = client_config(site.root.anchor.cert_der(), None);
    let err = match DiscoveryStream::open(replica.port, anonymous.clone()) {
        Ok(stream) => panic!("answered {}", stream.status),
        Err(err) => err,
    };
    assert_eq!(
        alert(&err),
        Some(rustls::AlertDescription::CertificateRequired),
        "{err}"
    );
    let stranger = Site::new(SITE).node_credential("pi-a");
    let refused = client_config(site.root.anchor.cert_der(), Some(&stranger));
    let err = tls_request(
        replica.port,
        refused,
        "POST",
        "/v1/heartbeat",
        "",
        b"{\"port\":1}",
    )
    .expect_err("refused");
    assert!(alert(&err).is_some(), "{err}");
}
