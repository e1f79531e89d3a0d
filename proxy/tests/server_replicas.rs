//! The proxy's side of a multi-server site (join design, issue 13), end to end with real
//! `pimesh-control` replicas and real proxies on 127.0.0.1:
//!
//! - heartbeats carrying `credential`, `role` and `replicas` are accepted by the
//!   replicas, and both the discovery watch and the leaf renewals fail over from the
//!   replica that dies to the other one of the start list;
//! - a proxy started with only one replica learns another server node's replica from
//!   discovery and fails over to it;
//! - a replica that stops answering (its server lost power) does not hold up a renewal:
//!   the leaf never runs out.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::collections::BTreeSet;
use std::sync::Arc;

use pimesh_test_support::control::DiscoveryStream;
use pimesh_test_support::control_plane::ControlPlane;
use pimesh_test_support::http::sample;
use pimesh_test_support::proxy::{Proxy, ProxyOptions};
use pimesh_test_support::relay::Relay;
use pimesh_test_support::tls::client_config;
use pimesh_test_support::{free_port, wait_until, Site};

/// Leaves this short are renewed every few seconds.
const LEAF_LIFETIME_SECS: &str = "6";

fn cluster_toml(nodes: &[(&str, u16)]) -> String {
    let mut text = "site = \"depot\"\n[proxy]\nmax_connections = 1000\n".to_owned();
    for (node, port) in nodes {
        text.push_str(&format!("[nodes.{node}]\naddress = \"127.0.0.1:{port}\"\n"));
    }
    text
}

/// A control plane of `count` replicas issuing short leaves.
async fn plane(config: &str, count: u16) -> ControlPlane {
    plane_with_leaves_of(config, count, LEAF_LIFETIME_SECS).await
}

/// A control plane of `count` replicas issuing leaves of `lifetime` seconds.
async fn plane_with_leaves_of(config: &str, count: u16, lifetime: &str) -> ControlPlane {
    let mut plane = ControlPlane::new(Site::new("depot"), config);
    plane
        .start_replicas(count, |replica| {
            replica
                .site("depot")
                .arg("--leaf-lifetime")
                .arg(lifetime)
                .rust_log("info")
        })
        .await;
    plane
}

/// Starts the proxy of `node` with `args` after the common ones; its config file does not
/// exist (everything comes from discovery).
async fn start_proxy(
    plane: &ControlPlane,
    node: &str,
    inbound_port: u16,
    local_ip: &str,
    args: &[String],
) -> Proxy {
    let dir = plane.path();
    let identity = plane.site.identity_dir(dir, node, &[]);
    let mut all = vec![
        "--state-dir".to_owned(),
        dir.join(format!("{node}-state"))
            .to_string_lossy()
            .into_owned(),
    ];
    all.extend_from_slice(args);
    Proxy::start_with(
        ProxyOptions {
            dir,
            name: node,
            config: &dir.join("no-cluster.toml"),
            identity: Some(&identity),
            inbound_port,
            local_ip,
        },
        &all,
    )
    .await
}

async fn config_of(proxy: &Proxy) -> serde_json::Value {
    proxy.config().await
}

fn ok_renewals(metrics: &str) -> f64 {
    sample(metrics, "pimesh_identity_renewals_total{result=\"ok\"}")
}

/// The first document of replica `port`'s discovery stream that satisfies `done`, read
/// as a node `watcher` of the site.
async fn document_of(
    site: &Site,
    port: u16,
    done: impl Fn(&serde_json::Value) -> bool + Send + 'static,
) -> serde_json::Value {
    let config = client_config(
        site.root.anchor.cert_der(),
        Some(&site.node_credential("watcher")),
    );
    tokio::task::spawn_blocking(move || {
        let mut stream = DiscoveryStream::open(port, Arc::clone(&config)).expect("stream");
        assert_eq!(stream.status, 200);
        stream.document_where(done)
    })
    .await
    .expect("the reader finished")
}

fn addr_list(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn heartbeats_with_the_role_are_accepted_and_watch_and_renewals_fail_over() {
    let s1_port = free_port();
    let mut plane = plane(&cluster_toml(&[("s1", s1_port)]), 2).await;
    let replica_ports: Vec<u16> = plane.replicas.iter().map(|r| r.addr.port()).collect();
    let own = replica_ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let args = [
        "--control".to_owned(),
        plane.control_list(),
        "--role".to_owned(),
        "server".to_owned(),
        "--server-replicas".to_owned(),
        own,
    ];
    let s1 = start_proxy(&plane, "s1", s1_port, "127.0.0.1", &args).await;
    wait_until("a live document and a leaf from the replicas", || async {
        let config = config_of(&s1).await;
        config["control"]["source"] == "live" && config["identity"]["source"] == "control"
    })
    .await;

    // Both replicas took the heartbeats with the new fields: the node is live on each.
    for port in &replica_ports {
        let document = document_of(&plane.site, *port, |d| d["nodes"].get("s1").is_some()).await;
        assert_eq!(document["nodes"]["s1"], format!("127.0.0.1:{s1_port}"));
    }
    let metrics = s1.metrics().await;
    assert_eq!(
        sample(&metrics, "pimesh_control_heartbeat_failures_total"),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "pimesh_control_replicas"),
        2.0,
        "{metrics}"
    );

    // kill -9 the replica the watch is open to: the watch and the renewals go on through
    // the other one.
    let watched = config_of(&s1).await["control"]["replica"]
        .as_str()
        .map(str::to_owned)
        .expect("a watched replica");
    let at = plane
        .replicas
        .iter()
        .position(|r| r.addr.to_string() == watched)
        .expect("one of the plane's");
    plane.replicas.remove(at).kill();
    let survivor = plane.replicas[0].addr.to_string();
    wait_until("the watch moves to the surviving replica", || async {
        let control = config_of(&s1).await["control"].clone();
        control["replica"] == survivor.as_str() && control["source"] == "live"
    })
    .await;
    let before = ok_renewals(&s1.metrics().await);
    wait_until("two renewals by the surviving replica", || async {
        let config = config_of(&s1).await;
        ok_renewals(&s1.metrics().await) >= before + 2.0
            && config["enrollment"]["signed_by"] == survivor.as_str()
    })
    .await;
    let metrics = s1.metrics().await;
    assert!(
        sample(&metrics, "pimesh_control_failovers_total") >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "pimesh_control_replicas"),
        2.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_proxy_learns_a_server_nodes_replicas_from_discovery_and_fails_over_to_them() {
    let (s1_port, a_port) = (free_port(), free_port());
    let mut plane = plane(&cluster_toml(&[("s1", s1_port), ("a", a_port)]), 2).await;
    let a1 = plane.replicas[0].addr;
    let b1 = plane.replicas[1].addr;

    // Server node s1 runs replica B1 and heartbeats so to both replicas.
    let s1_args = [
        "--control".to_owned(),
        format!("{a1},{b1}"),
        "--role".to_owned(),
        "server".to_owned(),
        "--server-replicas".to_owned(),
        b1.port().to_string(),
    ];
    let _s1 = start_proxy(&plane, "s1", s1_port, "127.0.0.1", &s1_args).await;
    // Agent node a is only told of A1.
    let a_args = [
        "--control".to_owned(),
        a1.to_string(),
        "--role".to_owned(),
        "agent".to_owned(),
    ];
    let a = start_proxy(&plane, "a", a_port, "127.0.0.2", &a_args).await;

    let document = document_of(&plane.site, a1.port(), |d| d["servers"].get("s1").is_some()).await;
    assert_eq!(
        document["servers"]["s1"]["replicas"],
        serde_json::json!([b1.port()]),
        "{document}"
    );
    assert!(document["servers"].get("a").is_none(), "{document}");
    let b1_text = b1.to_string();
    wait_until("proxy a adds s1's replica to its set", || async {
        addr_list(&config_of(&a).await["control"]["replicas"]).contains(&b1_text)
    })
    .await;
    let metrics = a.metrics().await;
    assert_eq!(
        sample(&metrics, "pimesh_control_replicas"),
        2.0,
        "{metrics}"
    );

    // A1, the only replica a was started with, dies: a goes on through B1.
    plane.replicas.remove(0).kill();
    wait_until("proxy a watches the discovered replica", || async {
        let control = config_of(&a).await["control"].clone();
        control["replica"] == b1_text.as_str() && control["source"] == "live"
    })
    .await;
    let before = ok_renewals(&a.metrics().await);
    wait_until(
        "proxy a renews its leaf through the discovered replica",
        || async {
            let config = config_of(&a).await;
            ok_renewals(&a.metrics().await) >= before + 1.0
                && config["enrollment"]["signed_by"] == b1_text.as_str()
        },
    )
    .await;
}

#[tokio::test]
async fn a_replica_that_stops_answering_does_not_let_the_leaf_run_out() {
    let a_port = free_port();
    // Leaves of 15 s are renewed about 10 s into their life: 5 s to get the next one, more
    // than a dead replica's exchange timeout would leave.
    let plane = plane_with_leaves_of(&cluster_toml(&[("a", a_port)]), 2, "15").await;
    // The first replica of the start list is reached through a relay that will swallow
    // every connection, as a server that lost power does.
    let relay = Relay::start(plane.replicas[0].addr).await;
    let survivor = plane.replicas[1].addr.to_string();
    let args = [
        "--control".to_owned(),
        format!("{},{survivor}", relay.addr()),
        "--role".to_owned(),
        "agent".to_owned(),
    ];
    let a = start_proxy(&plane, "a", a_port, "127.0.0.1", &args).await;
    let relayed = relay.addr().to_string();
    wait_until("a leaf signed through the relay", || async {
        let config = config_of(&a).await;
        config["identity"]["source"] == "control"
            && config["enrollment"]["signed_by"] == relayed.as_str()
    })
    .await;

    relay.swallow();
    let before = ok_renewals(&a.metrics().await);
    let sources = std::cell::RefCell::new(BTreeSet::new());
    wait_until("two renewals by the replica that still answers", || async {
        let config = config_of(&a).await;
        sources
            .borrow_mut()
            .insert(config["identity"]["source"].to_string());
        ok_renewals(&a.metrics().await) >= before + 2.0
            && config["enrollment"]["signed_by"] == survivor.as_str()
    })
    .await;
    // The leaf was renewed before it ran out: the proxy never fell back to its node
    // credential (its services would have lost their identities).
    assert_eq!(
        sources.into_inner(),
        BTreeSet::from(["\"control\"".to_owned()]),
        "{}",
        a.log_text()
    );
}
