//! Meshed Kubernetes Services: a replica given `--kubeconfig` reads K3s's API (here the
//! K3s test fixture `k3s-fixture`, which applies its auto-deploy manifests as K3s does)
//! and streams the Services of namespaces labelled for the mesh, and the Gateway API
//! routes of those namespaces, in discovery.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::time::{Duration, Instant};

use pimesh_test_support::binary::Binary;
use pimesh_test_support::control::{DiscoveryStream, Replica};
use pimesh_test_support::ports::free_port;
use pimesh_test_support::tls::client_config;
use pimesh_test_support::{path_str, temp_dir, Daemon, Site};

const SITE: &str = "depot-7";

/// The fleet manifest every K3s test deploys (the meshed namespace `fleet`).
const FLEET: &str = include_str!("../../tests/k3s/fleet.yaml");
/// Gateway API CRDs, a canary Service and an HTTPRoute of `fleet` to it.
const GATEWAY: &str = include_str!("../../tests/k3s/gateway.yaml");
/// A namespace not labelled for the mesh, with a Service.
const PLAIN: &str = "---
apiVersion: v1
kind: Namespace
metadata:
  name: plain
---
apiVersion: v1
kind: Service
metadata:
  name: hidden
  namespace: plain
spec:
  ports:
  - port: 80
";

/// Reads documents until one satisfies `done` or `deadline` passes.
fn document_where(
    stream: &mut DiscoveryStream,
    deadline: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        let line = stream.next_line().expect("a line of the discovery stream");
        if line.is_empty() {
            continue;
        }
        let document: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        if done(&document) {
            return document;
        }
    }
    panic!("no such discovery document within {deadline:?}");
}

#[test]
fn a_replica_streams_the_meshed_services_that_k3s_serves() {
    let (_dir, dir) = temp_dir();
    let site = Site::new(SITE);
    let data = dir.join("k3s");
    let manifests = data.join("server/manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("pimesh-fleet.yaml"),
        format!("{FLEET}{PLAIN}"),
    )
    .unwrap();
    std::fs::write(dir.join("k3s-config.yaml"), "").unwrap();
    let kubeconfig = dir.join("k3s.yaml");

    // The replica starts before K3s: no kubeconfig yet is no Services, not an error.
    let trust = dir.join("trust");
    site.write_trust(&trust);
    let config = dir.join("cluster.toml");
    std::fs::write(&config, format!("site = \"{SITE}\"\n")).unwrap();
    let mut replica = Replica::options(1)
        .trust_dir(&trust)
        .config(&config)
        .site(SITE)
        .arg("--kubeconfig")
        .arg(path_str(&kubeconfig))
        .start_blocking();
    let credential = site.node_credential("pi-a");
    let mut stream = DiscoveryStream::open(
        replica.port,
        client_config(site.root.anchor.cert_der(), Some(&credential)),
    )
    .expect("stream opened");
    let first = stream.next_document();
    assert!(first.get("kube_services").is_none(), "{first}");

    let mut k3s = Binary::K3sFixture.command();
    k3s.env_remove("NOTIFY_SOCKET")
        .args(["server", "--config"])
        .arg(dir.join("k3s-config.yaml"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--node-name", "srv", "--node-ip", "127.0.0.1"])
        .args(["--bind-address", "127.0.0.1", "--https-listen-port"])
        .arg(free_port().to_string())
        .arg("--write-kubeconfig")
        .arg(&kubeconfig);
    let _k3s = Daemon::spawn("k3s-fixture", k3s, Some(&dir.join("k3s.log")));

    let document = document_where(&mut stream, Duration::from_secs(120), |d| {
        d.get("kube_services").is_some()
    });
    assert_eq!(
        document["kube_services"],
        serde_json::json!([{
            "name": "tracker.fleet",
            "cluster_ip": "10.43.100.10",
            "port": 80,
            "protocol": "http",
            "endpoints": [{"node": "pi-c", "address": "10.42.3.7:8080"}],
        }]),
        "only the meshed namespace's Service, with its endpoint's node and port"
    );

    // K3s ships no Gateway API CRDs: the routes' API answers 404 until they are
    // installed, which is no routes rather than an error (the Services still stream).
    let gateway = manifests.join("pimesh-gateway.yaml");
    let without_definitions: Vec<&str> = GATEWAY
        .split("\n---\n")
        .filter(|doc| !doc.contains("kind: CustomResourceDefinition"))
        .collect();
    std::fs::write(&gateway, without_definitions.join("\n---\n")).unwrap();
    let document = document_where(&mut stream, Duration::from_secs(120), |d| {
        d["kube_services"].as_array().map(Vec::len) == Some(2)
    });
    assert!(document.get("kube_routes").is_none(), "{document}");

    // A route to a Service the namespace does not have is left out, and named in the log.
    let dangling = GATEWAY.replace(
        "    - name: tracker-canary\n      port: 80",
        "    - name: tracker-v9\n      port: 80",
    );
    std::fs::write(&gateway, dangling).unwrap();
    let log = replica.daemon.log().to_path_buf();
    replica.daemon.wait_until_blocking_for(
        "the dangling route named in the log",
        Duration::from_secs(120),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("httproute fleet/tracker-canary: rules.0.backends.0.service")
        },
    );
    std::fs::write(&gateway, GATEWAY).unwrap();
    let document = document_where(&mut stream, Duration::from_secs(120), |d| {
        d.get("kube_routes").is_some()
    });
    assert_eq!(
        document["kube_routes"],
        serde_json::json!([{
            "namespace": "fleet",
            "route": {
                "name": "tracker-canary",
                "service": "tracker",
                "rules": [
                    {"matches": [{"headers": {"x-canary": "1"}}],
                     "backends": [{"service": "tracker-canary", "weight": 1}]},
                    {"backends": [{"service": "tracker", "weight": 1}]},
                ],
            },
        }]),
        "the route of the meshed namespace, in the model the proxies read"
    );

    // The replica's metrics (plain HTTP, beside /ready) count what it read from K3s.
    let (status, text) =
        pimesh_test_support::http::plain_get(replica.port, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    for line in [
        "\npimesh_control_ready 1\n",
        "\npimesh_control_kube_services 2\n",
        "\npimesh_control_kube_routes 1\n",
        "\npimesh_control_certificates_issued_total ",
        "\nprocess_open_fds ",
    ] {
        assert!(text.contains(line), "{line:?}:\n{text}");
    }
}
