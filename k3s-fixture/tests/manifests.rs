//! The auto-deploying manifests of a fixture server: what a manifest file holds shows in
//! the Namespace, Service and EndpointSlice lists, follows the file when it changes, stays
//! when it is deleted (as in K3s) and goes when it is emptied.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{kube_client, port, server_args, strs, NodeDir};
use serde_json::Value;

/// The fleet manifest every K3s test deploys.
const FLEET: &str = include_str!("../../tests/k3s/fleet.yaml");

const EXTRA: &str = "---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: tracker
---
apiVersion: v1
kind: Service
metadata:
  namespace: fleet
spec:
  ports:
  - port: 80
";

/// The fixture server of `node`, once it answers, with a client of its API and the API's
/// URL.
async fn start_server(node: &NodeDir) -> (pimesh_test_support::Daemon, reqwest::Client, String) {
    let args = server_args(node, port());
    let mut server = node.spawn("server", &strs(&args));
    let kubeconfig = node.kubeconfig();
    server
        .wait_until("the server answers", || async {
            common::nodes(&kubeconfig).await.is_some()
        })
        .await;
    let (client, url) = kube_client(&kubeconfig).unwrap();
    (server, client, url)
}

/// `GET <url><path>`: the status and the body as JSON.
async fn get_json(client: &reqwest::Client, url: &str, path: &str) -> (u16, Value) {
    let (status, body) = common::get(client, &format!("{url}{path}")).await.unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The `metadata.name`s of a list's items.
fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| {
            item["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn manifests_become_objects_that_follow_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeDir::new(dir.path(), "srv-manifests");
    let manifests = node.data_dir().join("server/manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let fleet = manifests.join("pimesh-fleet.yaml");
    std::fs::write(&fleet, format!("{FLEET}{EXTRA}")).unwrap();
    std::fs::write(
        manifests.join("pimesh-off.yaml"),
        FLEET.replace("fleet", "off"),
    )
    .unwrap();
    std::fs::write(manifests.join("pimesh-off.yaml.skip"), "").unwrap();
    let (mut server, client, url) = start_server(&node).await;

    let (status, mesh) = get_json(
        &client,
        &url,
        "/api/v1/namespaces?labelSelector=pimesh.dev%2Fmesh%3Denabled",
    )
    .await;
    assert_eq!(status, 200, "{mesh}");
    assert_eq!(mesh["kind"], "NamespaceList");
    assert_eq!(mesh["apiVersion"], "v1");
    assert!(mesh["metadata"]["resourceVersion"].is_string(), "{mesh}");
    assert_eq!(names(&mesh), ["fleet"], "the skipped file is not applied");
    assert!(mesh["items"][0].get("kind").is_none(), "typed list items");
    let (_, all) = get_json(&client, &url, "/api/v1/namespaces").await;
    assert_eq!(
        names(&all),
        [
            "default",
            "fleet",
            "kube-node-lease",
            "kube-public",
            "kube-system"
        ]
    );

    let (_, services) = get_json(&client, &url, "/api/v1/namespaces/fleet/services").await;
    assert_eq!(services["kind"], "ServiceList");
    assert_eq!(
        names(&services),
        ["tracker"],
        "the invalid Service is skipped"
    );
    let tracker = &services["items"][0];
    assert_eq!(tracker["spec"]["clusterIP"], "10.43.100.10");
    assert_eq!(tracker["spec"]["clusterIPs"][0], "10.43.100.10");
    assert_eq!(tracker["spec"]["type"], "ClusterIP");
    assert_eq!(tracker["spec"]["ports"][0]["protocol"], "TCP");
    assert_eq!(tracker["spec"]["ports"][0]["targetPort"], 8080);
    assert_eq!(tracker["spec"]["ports"][0]["appProtocol"], "http");
    assert!(tracker["metadata"]["uid"].is_string());
    let (status, one) = get_json(&client, &url, "/api/v1/namespaces/fleet/services/tracker").await;
    assert_eq!(
        (status, &one["kind"], &one["apiVersion"]),
        (200, &"Service".into(), &"v1".into())
    );
    let (_, everywhere) = get_json(&client, &url, "/api/v1/services").await;
    assert_eq!(names(&everywhere), ["kubernetes", "tracker"]);

    let (_, slices) = get_json(
        &client,
        &url,
        "/apis/discovery.k8s.io/v1/namespaces/fleet/endpointslices?labelSelector=kubernetes.io/service-name==tracker",
    )
    .await;
    assert_eq!(slices["kind"], "EndpointSliceList");
    assert_eq!(slices["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(names(&slices), ["tracker-1"]);
    let endpoint = &slices["items"][0]["endpoints"][0];
    assert_eq!(endpoint["addresses"][0], "10.42.3.7");
    assert_eq!(endpoint["nodeName"], "pi-c");
    assert_eq!(endpoint["conditions"]["ready"], true);

    let (status, bad) =
        get_json(&client, &url, "/api/v1/services?labelSelector=a%20in%20(b)").await;
    assert_eq!(
        (status, &bad["kind"], &bad["code"]),
        (400, &"Status".into(), &400.into())
    );
    let (status, missing) = get_json(&client, &url, "/api/v1/namespaces/fleet/services/nope").await;
    assert_eq!((status, &missing["reason"]), (404, &"NotFound".into()));
    assert_eq!(missing["message"], "services \"nope\" not found");
    let log = server.log_text();
    assert!(
        log.contains("does not apply kind Deployment (file "),
        "{log}"
    );
    assert!(
        log.contains("pimesh-fleet.yaml document 5: invalid metadata.name"),
        "{log}"
    );

    // A changed file is applied again: a new Service gets a cluster IP, and the
    // EndpointSlice that left the file is deleted.
    let changed = FLEET.split("---\napiVersion: discovery.k8s.io/v1").next().unwrap().to_owned()
        + "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: fleet\nspec:\n  ports:\n  - port: 443\n";
    std::fs::write(&fleet, changed).unwrap();
    server
        .wait_until("the changed manifest is applied", || async {
            let (_, services) = get_json(&client, &url, "/api/v1/namespaces/fleet/services").await;
            let (_, slices) =
                get_json(&client, &url, "/apis/discovery.k8s.io/v1/endpointslices").await;
            names(&services) == ["tracker", "web"] && names(&slices).is_empty()
        })
        .await;
    let (_, web) = get_json(&client, &url, "/api/v1/namespaces/fleet/services/web").await;
    let ip = web["spec"]["clusterIP"].as_str().unwrap();
    assert!(ip.starts_with("10.43.") && ip != "10.43.0.1", "{ip}");

    // A deleted file leaves its objects in place, as in K3s.
    std::fs::remove_file(&fleet).unwrap();
    server
        .wait_until("the deletion is seen", || async {
            std::fs::read_to_string(node.log())
                .unwrap_or_default()
                .contains("no longer applying")
        })
        .await;
    let (_, services) = get_json(&client, &url, "/api/v1/namespaces/fleet/services").await;
    assert_eq!(names(&services), ["tracker", "web"]);

    // An emptied file deletes them (K3s prunes what the AddOn applied before).
    std::fs::write(&fleet, "# emptied\n").unwrap();
    server
        .wait_until("the emptied manifest is applied", || async {
            let (status, _) = get_json(&client, &url, "/api/v1/namespaces/fleet").await;
            let (_, services) = get_json(&client, &url, "/api/v1/services").await;
            status == 404 && names(&services) == ["kubernetes"]
        })
        .await;
}

/// The Gateway API resources of tests/k3s/gateway.yaml, without their CRDs.
fn gateway_without_definitions() -> String {
    GATEWAY
        .split("\n---\n")
        .filter(|doc| !doc.contains("kind: CustomResourceDefinition"))
        .collect::<Vec<_>>()
        .join("\n---\n")
}

const GATEWAY: &str = include_str!("../../tests/k3s/gateway.yaml");

#[tokio::test]
async fn gateway_routes_are_served_once_their_definitions_are_installed() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeDir::new(dir.path(), "srv-gateway");
    let manifests = node.data_dir().join("server/manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("pimesh-fleet.yaml"), FLEET).unwrap();
    let gateway = manifests.join("pimesh-gateway.yaml");
    std::fs::write(&gateway, gateway_without_definitions()).unwrap();
    let (mut server, client, url) = start_server(&node).await;
    server
        .wait_until("the canary Service is applied", || async {
            let (_, services) = get_json(&client, &url, "/api/v1/namespaces/fleet/services").await;
            names(&services) == ["tracker", "tracker-canary"]
        })
        .await;
    // K3s ships no Gateway API CRDs: without them the routes' API is not there.
    let routes = "/apis/gateway.networking.k8s.io/v1/httproutes";
    let (status, missing) = get_json(&client, &url, routes).await;
    assert_eq!(
        (status, &missing["reason"]),
        (404, &"NotFound".into()),
        "{missing}"
    );

    std::fs::write(&gateway, GATEWAY).unwrap();
    server
        .wait_until("the routes are served", || async {
            get_json(&client, &url, routes).await.0 == 200
        })
        .await;
    let (_, list) = get_json(&client, &url, routes).await;
    assert_eq!(list["kind"], "HTTPRouteList");
    assert_eq!(names(&list), ["tracker-canary"]);
    let item = &list["items"][0];
    // Custom resources are listed with their kind and apiVersion, spec as applied.
    assert_eq!(item["kind"], "HTTPRoute");
    assert_eq!(item["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(item["metadata"]["namespace"], "fleet");
    assert_eq!(item["spec"]["parentRefs"][0]["name"], "tracker");
    assert_eq!(
        item["spec"]["rules"][0]["backendRefs"][0]["name"],
        "tracker-canary"
    );
    let (status, one) = get_json(
        &client,
        &url,
        "/apis/gateway.networking.k8s.io/v1/namespaces/fleet/httproutes/tracker-canary",
    )
    .await;
    assert_eq!((status, &one["kind"]), (200, &"HTTPRoute".into()));
    let (status, grpc) = get_json(
        &client,
        &url,
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
    )
    .await;
    assert_eq!((status, names(&grpc).len()), (200, 0));
    let (status, crd) = get_json(
        &client,
        &url,
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/httproutes.gateway.networking.k8s.io",
    )
    .await;
    assert_eq!(
        (status, &crd["spec"]["names"]["plural"]),
        (200, &"httproutes".into())
    );
}
