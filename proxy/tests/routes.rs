//! Routes written as operators write them — Gateway API HTTPRoute and GRPCRoute files and
//! an SMI TrafficSplit in a site folder's `routes/` — compiled the way `pimeshctl config
//! publish` compiles them, and run by two real proxies (client → proxy a → mTLS → proxy
//! b → backend).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pimesh_schema::routes::{gateway, site_folder};
use pimesh_test_support::backends::Backend;
use pimesh_test_support::http::{h1, H1};
use pimesh_test_support::proxy::{mesh, Mesh};
use pimesh_test_support::Site;
use tokio::net::TcpStream;

/// `method path` to the service `staff` with `headers`: (status, body).
async fn send(
    sender: &mut H1,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let (status, _, body) =
        pimesh_test_support::http::send(sender, method, "staff", path, headers).await;
    (status, body)
}

fn service(name: &str, port: u16) -> String {
    format!("[services.{name}]\nport = {port}\nnodes = [\"b\"]\n")
}

/// Writes a site folder (`cluster.toml` with `services`, `routes/<name>` files), compiles
/// it as `pimeshctl config publish` does, and starts the two proxies on the result.
async fn mesh_with_route_files(site: &Site, services: &str, files: &[(&str, &str)]) -> Mesh {
    let folder = tempfile::tempdir().expect("temp dir");
    let file = folder.path().join("cluster.toml");
    std::fs::write(&file, format!("site = \"{}\"\n{services}", site.name)).expect("write");
    std::fs::create_dir(folder.path().join("routes")).expect("mkdir");
    for (name, text) in files {
        std::fs::write(folder.path().join("routes").join(name), text).expect("write");
    }
    let compiled = site_folder::compile(&file).expect("the site folder compiles");
    assert_eq!(compiled.route_files.len(), files.len());
    let routes = gateway::to_toml(&compiled.config.routes).expect("toml");
    mesh(site, &format!("{services}\n{routes}")).await
}

const HTTP_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: staff-routes
spec:
  parentRefs:
    - {group: "", kind: Service, name: staff}
  rules:
    - matches:
        - path: {type: PathPrefix, value: /api/v2}
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-route, value: v2}]
            remove: [x-secret]
      backendRefs:
        - name: staff-v2
    - matches:
        - path: {type: Exact, value: /api/v2/exact}
        - headers: [{name: x-canary, value: "yes"}]
        - method: DELETE
          path: {type: Exact, value: /items}
          queryParams: [{name: all, value: "true"}]
      backendRefs:
        - name: staff
          weight: 1
        - name: staff-v2
          weight: 0
    - matches:
        - path: {type: PathPrefix, value: /only-staff}
"#;

#[tokio::test]
async fn an_http_route_file_routes_by_path_header_method_and_query() {
    let site = Site::new("depot");
    let staff = Backend::start("staff").await;
    let v2 = Backend::start("v2").await;
    let services = format!(
        "{}{}",
        service("staff", staff.port),
        service("staff-v2", v2.port)
    );
    let m = mesh_with_route_files(&site, &services, &[("staff.yaml", HTTP_ROUTE)]).await;
    let mut client = h1(m.a.outbound).await;

    // A prefix match, with its header edits.
    let (status, body) = send(&mut client, "GET", "/api/v2/drivers", &[("x-secret", "s")]).await;
    assert_eq!((status, body.as_str()), (200, "v2\n"));
    let seen = v2.seen().pop().expect("v2 saw the request");
    assert_eq!(seen.headers["x-route"], "v2");
    assert!(!seen.headers.contains_key("x-secret"));
    // Prefixes match whole segments: /api/v2x is not under /api/v2, and nothing else
    // matches it: 404 (Gateway API).
    let (status, body) = send(&mut client, "GET", "/api/v2x", &[]).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no route"), "{body}");
    // An exact path beats the longer rule's prefix; a weight of 0 gets nothing.
    for _ in 0..20 {
        let (status, body) = send(&mut client, "GET", "/api/v2/exact", &[]).await;
        assert_eq!((status, body.as_str()), (200, "staff\n"));
    }
    // A header match.
    let (_, body) = send(&mut client, "GET", "/anything", &[("x-canary", "yes")]).await;
    assert_eq!(body, "staff\n");
    let (status, _) = send(&mut client, "GET", "/anything", &[("x-canary", "no")]).await;
    assert_eq!(status, 404);
    // Method and query together.
    let (_, body) = send(&mut client, "DELETE", "/items?all=true", &[]).await;
    assert_eq!(body, "staff\n");
    let (status, _) = send(&mut client, "GET", "/items?all=true", &[]).await;
    assert_eq!(status, 404);
    let (status, _) = send(&mut client, "DELETE", "/items?all=false", &[]).await;
    assert_eq!(status, 404);
    // A rule without backends sends to the route's own service.
    let (_, body) = send(&mut client, "GET", "/only-staff/x", &[]).await;
    assert_eq!(body, "staff\n");

    assert_eq!(
        m.a.metric("pimesh_route_matched_total{service=\"staff\",route=\"staff-routes/0\"}")
            .await,
        1.0
    );
    assert_eq!(
        m.a.metric("pimesh_route_matched_total{service=\"staff\",route=\"staff-routes/1\"}")
            .await,
        22.0
    );
}

const GRPC_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: staff-grpc
spec:
  parentRefs: [{group: "", kind: Service, name: staff}]
  rules:
    - matches:
        - method: {service: fleet.v1.Staff, method: GetDriver}
      backendRefs: [{name: staff-v2}]
    - matches:
        - method: {service: fleet.v1.Staff}
"#;

const TRAFFIC_SPLIT: &str = r#"apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata:
  name: errors-split
spec:
  service: crew
  backends:
    - service: crew
      weight: 90
    - service: errors
      weight: 10
"#;

#[tokio::test]
async fn a_grpc_route_and_a_traffic_split_drive_the_proxy() {
    let site = Site::new("depot");
    let staff = Backend::start("staff").await;
    let v2 = Backend::start("v2").await;
    let crew = Backend::start("crew").await;
    let errors = Backend::start("errors").await;
    let services = format!(
        "{}{}{}{}",
        service("staff", staff.port),
        service("staff-v2", v2.port),
        service("crew", crew.port),
        service("errors", errors.port)
    );
    let m = mesh_with_route_files(
        &site,
        &services,
        &[("grpc.yaml", GRPC_ROUTE), ("split.yml", TRAFFIC_SPLIT)],
    )
    .await;

    // gRPC over HTTP/2 from the client: the method's path decides.
    let stream = TcpStream::connect(m.a.outbound).await.expect("connect");
    let (mut grpc, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2c handshake");
    tokio::spawn(connection);
    for (path, expected) in [
        ("/fleet.v1.Staff/GetDriver", 200),
        ("/fleet.v1.Staff/ListDrivers", 200),
        ("/fleet.v1.Vehicles/Get", 404),
    ] {
        let request = Request::post(format!("http://staff{path}"))
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = grpc.send_request(request).await.expect("response");
        assert_eq!(response.status().as_u16(), expected, "{path}");
    }
    assert_eq!(v2.seen().len(), 1, "GetDriver went to staff-v2");
    assert_eq!(staff.seen().len(), 1, "ListDrivers went to staff");

    // The TrafficSplit: 90/10 between crew and errors.
    let mut client = h1(m.a.outbound).await;
    let n = 1000;
    let mut to_errors = 0;
    for _ in 0..n {
        let request = Request::get("/")
            .header("host", "crew")
            .body(Full::new(Bytes::new()))
            .expect("request");
        client.ready().await.expect("ready");
        let response = client.send_request(request).await.expect("response");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        if body.as_ref() == b"errors\n" {
            to_errors += 1;
        }
    }
    // Binomial(1000, 0.1): mean 100, standard deviation 9.5; six of them either side.
    assert!(
        (43..=157).contains(&to_errors),
        "{to_errors} of {n} to errors"
    );
    assert_eq!(errors.seen().len(), to_errors);
}

#[tokio::test]
async fn linkerd_annotations_retry_answers_and_rule_timeouts_cut_slow_ones() {
    let site = Site::new("depot");
    let staff = Backend::start("staff").await;
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: retrying
  annotations:
    retry.linkerd.io/http: 5xx
    retry.linkerd.io/limit: "2"
spec:
  parentRefs: [{group: "", kind: Service, name: staff}]
  rules:
    - matches: [{path: {value: /held}}]
      timeouts: {request: 300ms}
    - matches: [{path: {value: /status}}]
"#;
    let m = mesh_with_route_files(&site, &service("staff", staff.port), &[("r.yaml", route)]).await;
    let mut client = h1(m.a.outbound).await;
    // An answer of 503 is retried twice: the app sees three requests.
    let (status, _) = send(&mut client, "GET", "/status/503", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(staff.seen().len(), 3, "one request and two retries");
    // 404 is not in 5xx: not retried.
    let (status, _) = send(&mut client, "GET", "/status/404", &[]).await;
    assert_eq!(status, 404);
    assert_eq!(staff.seen().len(), 4);
    // The rule's request timeout answers 504 while the app holds its answer.
    let (status, body) = send(&mut client, "GET", "/held", &[]).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("timeout"), "{body}");
    staff.release();
}
