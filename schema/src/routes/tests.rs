use std::collections::BTreeSet;
use std::path::Path;

use super::gateway;
use super::*;
use crate::cluster::ClusterConfig;

const SITE: &str = r#"
site = "depot"

[services.staff]
port = 8080
nodes = ["pi-a"]

[services.staff-v2]
port = 8081
nodes = ["pi-b"]

[services.errors]
port = 8082
nodes = ["pi-b"]
"#;

fn site() -> ClusterConfig {
    ClusterConfig::parse(Path::new("cluster.toml"), SITE).unwrap()
}

fn yaml(text: &str) -> Result<Vec<Route>, crate::ConfigError> {
    gateway::parse(
        Path::new("routes/staff.yaml"),
        text,
        &site().services,
        &mut BTreeSet::new(),
    )
}

const HTTP_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: staff-canary
  namespace: fleet
  annotations:
    retry.linkerd.io/http: 5xx,429
    retry.linkerd.io/limit: "2"
    timeout.linkerd.io/request: 3s
spec:
  parentRefs:
    - group: ""
      kind: Service
      name: staff
      port: 8080
  rules:
    - matches:
        - path:
            type: PathPrefix
            value: /api
          method: GET
          headers:
            - name: x-canary
              value: "1"
          queryParams:
            - name: v
              value: "2"
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set:
              - name: x-route
                value: canary
            remove: ["x-debug"]
      backendRefs:
        - name: staff-v2
          port: 8081
      timeouts:
        request: 2s
        backendRequest: 500ms
    - backendRefs:
        - name: staff
          weight: 90
        - name: errors
          weight: 10
"#;

#[test]
fn an_http_route_reads_into_the_model() {
    let routes = yaml(HTTP_ROUTE).unwrap();
    assert_eq!(routes.len(), 1);
    let route = &routes[0];
    assert_eq!(route.name.as_str(), "staff-canary");
    assert_eq!(route.service.as_str(), "staff");
    assert_eq!(route.retries, 2);
    assert_eq!(
        route.retry_on,
        vec![
            RetryOn::Status {
                low: 500,
                high: 599
            },
            RetryOn::Status {
                low: 429,
                high: 429
            }
        ]
    );
    assert_eq!(route.timeout.map(|d| d.0.as_secs()), Some(3));
    let first = &route.rules[0];
    assert_eq!(
        first.matches[0].path,
        Some(PathMatch::Prefix("/api".into()))
    );
    assert_eq!(first.matches[0].method.as_deref(), Some("GET"));
    assert_eq!(first.matches[0].headers["x-canary"], "1");
    assert_eq!(first.matches[0].query["v"], "2");
    assert_eq!(first.request_headers.set["x-route"], "canary");
    assert_eq!(first.request_headers.remove, vec!["x-debug".to_owned()]);
    assert_eq!(first.backends[0].service.as_str(), "staff-v2");
    assert_eq!(first.backends[0].weight, 1);
    assert_eq!(first.backend_timeout.map(|d| d.0.as_millis()), Some(500));
    let second = &route.rules[1];
    assert!(second.matches.is_empty());
    let weights: Vec<u32> = second.backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, vec![90, 10]);
}

#[test]
fn a_grpc_route_and_a_traffic_split_read_into_the_model() {
    let text = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: staff-grpc
  annotations:
    retry.linkerd.io/grpc: unavailable
spec:
  parentRefs: [{group: "", kind: Service, name: staff}]
  rules:
    - matches:
        - method: {service: fleet.v1.Staff, method: GetDriver}
      backendRefs: [{name: staff-v2}]
---
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata:
  name: errors-split
spec:
  service: staff-v2
  backends:
    - service: staff-v2
      weight: 90
    - service: errors
      weight: 10
"#;
    let routes = yaml(text).unwrap();
    assert_eq!(routes.len(), 2);
    assert_eq!(routes[0].kind, RouteKind::Grpc);
    assert_eq!(routes[0].retries, 1, "Linkerd's default limit is 1");
    assert_eq!(
        routes[0].retry_on,
        vec![RetryOn::Grpc(GrpcCode::Unavailable)]
    );
    assert_eq!(
        routes[0].rules[0].matches[0].effective_path(),
        Some(PathMatch::Exact("/fleet.v1.Staff/GetDriver".into()))
    );
    assert_eq!(routes[1].kind, RouteKind::TrafficSplit);
    assert_eq!(routes[1].service.as_str(), "staff-v2");
    assert_eq!(routes[1].rules[0].backends.len(), 2);
}

#[test]
fn routes_convert_to_yaml_and_toml_and_back_unchanged() {
    let routes = yaml(HTTP_ROUTE).unwrap();
    let back = yaml(&gateway::to_yaml(&routes).unwrap()).unwrap();
    assert_eq!(back, routes);
    let toml_text = format!("{SITE}\n{}", gateway::to_toml(&routes).unwrap());
    let config = ClusterConfig::parse(Path::new("cluster.toml"), &toml_text).unwrap();
    assert_eq!(config.routes, routes);
}

#[test]
fn unknown_backend_names_file_line_and_yaml_field() {
    let text = HTTP_ROUTE.replace("name: errors", "name: nowhere");
    let err = yaml(&text).unwrap_err();
    assert_eq!(err.file, Path::new("routes/staff.yaml"));
    assert_eq!(
        err.key.as_deref(),
        Some("spec.rules[1].backendRefs[1].name")
    );
    let line = text.lines().position(|l| l.contains("nowhere")).unwrap() + 1;
    assert_eq!(err.line, Some(line), "{err}");
    assert!(err.message.contains("nowhere"), "{err}");
}

#[test]
fn bad_input_is_refused_with_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        // a header value that is not valid HTTP
        ("value: canary", "value: \"a\\nb\"", "spec.rules[0].filters"),
        // regular expressions are refused, not ignored
        (
            "type: PathPrefix",
            "type: RegularExpression",
            "spec.rules[0].matches[0].path.type",
        ),
        // a Gateway parent
        ("kind: Service", "kind: Gateway", "spec.parentRefs[0]"),
        // an unknown parent service
        (
            "name: staff\n      port",
            "name: ghost\n      port",
            "spec.parentRefs[0].name",
        ),
        // the mesh's own header
        ("name: x-route", "name: pimesh-dst", "spec.rules[0].filters"),
        // a method in the wrong case
        (
            "method: GET",
            "method: get",
            "spec.rules[0].matches[0].method",
        ),
        // an annotation this proxy does not implement
        (
            "timeout.linkerd.io/request: 3s",
            "timeout.linkerd.io/idle: 3s",
            "metadata.annotations.\"timeout.linkerd.io/idle\"",
        ),
    ];
    for (from, to, field) in cases {
        let text = HTTP_ROUTE.replacen(from, to, 1);
        assert_ne!(text, HTTP_ROUTE, "case {to} did not apply");
        let err = yaml(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some(*field), "{to}: {err}");
        assert!(err.line.is_some(), "{to}: {err}");
    }
    // Every weight zero.
    let text = HTTP_ROUTE
        .replace("weight: 90", "weight: 0")
        .replace("weight: 10", "weight: 0");
    let err = yaml(&text).unwrap_err();
    assert_eq!(
        err.key.as_deref(),
        Some("spec.rules[1].backendRefs"),
        "{err}"
    );
    // Two weights, one zero: valid, the zero backend gets nothing.
    let text = HTTP_ROUTE.replace("weight: 10", "weight: 0");
    assert_eq!(yaml(&text).unwrap()[0].rules[1].backends[1].weight, 0);
}

#[test]
fn structural_errors_come_with_serde_locations() {
    let text = HTTP_ROUTE.replace("backendRequest: 500ms", "backendRequest: soon");
    let err = yaml(&text).unwrap_err();
    assert_eq!(
        err.key.as_deref(),
        Some("spec.rules[0].timeouts.backendRequest")
    );
    let line = text.lines().position(|l| l.contains("soon")).unwrap() + 1;
    assert_eq!(err.line, Some(line), "{err}");
    let text = HTTP_ROUTE.replace(
        "backendRefs:\n        - name: staff-v2",
        "backendRefz:\n        - name: staff-v2",
    );
    let err = yaml(&text).unwrap_err();
    assert!(err.message.contains("backendRefz"), "{err}");
}

#[test]
fn a_route_in_toml_is_checked_against_the_services() {
    let text = format!(
        "{SITE}\n[[routes]]\nname = \"r\"\nservice = \"staff\"\n[[routes.rules]]\nbackends = [{{ service = \"ghost\" }}]\n"
    );
    let err = ClusterConfig::parse(Path::new("cluster.toml"), &text).unwrap_err();
    assert_eq!(
        err.key.as_deref(),
        Some("routes[0].rules[0].backends[0].service")
    );
    assert!(err.line.is_some());
    // The same route name twice for one service.
    let route = "[[routes]]\nname = \"r\"\nservice = \"staff\"\n[[routes.rules]]\n";
    let text = format!("{SITE}\n{route}{route}");
    let err = ClusterConfig::parse(Path::new("cluster.toml"), &text).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("routes[1].name"));
}

#[test]
fn precedence_follows_gateway_api() {
    let m = |path: Option<PathMatch>, method: Option<&str>, headers: usize| RouteMatch {
        path,
        method: method.map(str::to_owned),
        headers: (0..headers)
            .map(|i| (format!("h{i}"), "v".into()))
            .collect(),
        ..RouteMatch::default()
    };
    let exact = m(Some(PathMatch::Exact("/a".into())), None, 0);
    let long_prefix = m(Some(PathMatch::Prefix("/api/v1".into())), None, 0);
    let short_prefix_method = m(Some(PathMatch::Prefix("/api".into())), Some("GET"), 0);
    let short_prefix_headers = m(Some(PathMatch::Prefix("/api".into())), None, 2);
    let none = m(None, None, 0);
    let mut sorted = [
        &none,
        &short_prefix_headers,
        &short_prefix_method,
        &long_prefix,
        &exact,
    ];
    sorted.sort_by_key(|m| std::cmp::Reverse(m.precedence()));
    assert_eq!(
        sorted,
        [
            &exact,
            &long_prefix,
            &short_prefix_method,
            &short_prefix_headers,
            &none
        ]
    );
}

#[test]
fn prefixes_match_whole_segments() {
    let prefix = PathMatch::Prefix("/api/".into());
    assert!(prefix.matches("/api"));
    assert!(prefix.matches("/api/x"));
    assert!(!prefix.matches("/apis"));
    assert!(PathMatch::Prefix("/".into()).matches("/anything"));
}

#[test]
fn retry_conditions_parse_and_print() {
    for text in ["5xx", "503", "500-504", "unavailable"] {
        assert_eq!(RetryOn::parse(text).unwrap().to_string(), text);
    }
    assert_eq!(
        RetryOn::parse("gateway-error").unwrap(),
        RetryOn::Status {
            low: 502,
            high: 504
        }
    );
    assert!(RetryOn::parse("6xx").is_err());
    assert!(RetryOn::parse("504-500").is_err());
}

#[test]
fn a_site_folder_compiles_its_route_files_into_the_text_nodes_receive() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.toml");
    let toml_route = "[[routes]]\nname = \"by-toml\"\nservice = \"staff-v2\"\n[[routes.rules]]\n";
    std::fs::write(&file, format!("{SITE}\n{toml_route}")).unwrap();
    std::fs::create_dir(dir.path().join("routes")).unwrap();
    std::fs::write(dir.path().join("routes/a.yaml"), HTTP_ROUTE).unwrap();
    std::fs::write(dir.path().join("routes/notes.txt"), "not a route").unwrap();
    let site = site_folder::compile(&file).unwrap();
    assert_eq!(site.route_files.len(), 1);
    let names: Vec<&str> = site.config.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["by-toml", "staff-canary"]);
    // What nodes receive parses to the same routes on its own.
    let again = ClusterConfig::parse(&file, &site.text).unwrap();
    assert_eq!(again.routes, site.config.routes);
    // A bad file is named, with its line.
    std::fs::write(
        dir.path().join("routes/b.yaml"),
        HTTP_ROUTE.replace("name: staff-v2", "name: ghost"),
    )
    .unwrap();
    let err = site_folder::compile(&file).unwrap_err();
    assert!(err.file.ends_with("routes/b.yaml"), "{err}");
    assert!(err.line.is_some());
}

/// An HTTPRoute as kube-apiserver serves it: defaults filled in, server-side metadata,
/// a status written by a controller.
const SERVED_ROUTE: &str = r#"{"apiVersion":"gateway.networking.k8s.io/v1","kind":"HTTPRoute",
 "metadata":{"name":"tracker-canary","namespace":"fleet","uid":"5d1c","resourceVersion":"812",
   "generation":1,"creationTimestamp":"2026-12-03T10:00:00Z",
   "annotations":{"retry.linkerd.io/http":"5xx","retry.linkerd.io/limit":"2"}},
 "spec":{"parentRefs":[{"group":"","kind":"Service","name":"tracker","port":80}],
   "rules":[{"matches":[{"path":{"type":"PathPrefix","value":"/"},
                          "headers":[{"type":"Exact","name":"x-canary","value":"1"}]}],
             "backendRefs":[{"group":"","kind":"Service","name":"tracker-canary","port":80,"weight":1}]},
            {"matches":[{"path":{"type":"PathPrefix","value":"/"}}],
             "backendRefs":[{"group":"","kind":"Service","name":"tracker","namespace":"fleet","port":80,"weight":1}]}]},
 "status":{"parents":[]}}"#;

fn meshed(names: &[&str]) -> Vec<crate::kube_services::KubeService> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| crate::kube_services::KubeService {
            name: (*name).to_owned(),
            cluster_ip: std::net::IpAddr::from([10, 43, 100, 10 + i as u8]),
            port: 80,
            protocol: crate::cluster::Protocol::Http,
            endpoints: Vec::new(),
        })
        .collect()
}

#[test]
fn a_served_http_route_reads_into_the_model_for_its_namespace() {
    let origin = Path::new("httproute fleet/tracker-canary");
    let (namespace, routes) = gateway::parse_object(origin, SERVED_ROUTE).unwrap();
    assert_eq!(namespace.as_str(), "fleet");
    assert_eq!(routes.len(), 1);
    let route = &routes[0];
    assert_eq!(route.service.as_str(), "tracker");
    assert_eq!(route.retries, 2);
    assert_eq!(
        route.rules[0].backends[0].service.as_str(),
        "tracker-canary"
    );
    assert_eq!(route.rules[0].matches[0].headers["x-canary"], "1");
    // Checked against the namespace's meshed Services, ports of several-port ones too.
    let services = meshed(&[
        "tracker.fleet:80",
        "tracker.fleet:81",
        "tracker-canary.fleet",
    ]);
    let set = crate::kube_services::NamespaceServices {
        namespace: &namespace,
        services: &services,
    };
    check(route, &set, &mut BTreeSet::new()).unwrap();
    let without_canary = meshed(&["tracker.fleet", "tracker-canary.other"]);
    let set = crate::kube_services::NamespaceServices {
        namespace: &namespace,
        services: &without_canary,
    };
    let fault = check(route, &set, &mut BTreeSet::new()).unwrap_err();
    assert_eq!(fault.field, ["rules", "0", "backends", "0", "service"]);
    assert!(
        fault.message.contains("meshed namespace fleet"),
        "{}",
        fault.message
    );
}

#[test]
fn a_served_route_naming_another_namespace_or_not_a_route_is_refused_with_the_field() {
    let origin = Path::new("httproute fleet/tracker-canary");
    let other_parent = SERVED_ROUTE.replace(
        r#""name":"tracker","port":80}]"#,
        r#""name":"tracker","namespace":"shop","port":80}]"#,
    );
    let err = gateway::parse_object(origin, &other_parent).unwrap_err();
    assert_eq!(
        err.key.as_deref(),
        Some("spec.parentRefs[0].namespace"),
        "{err}"
    );
    assert!(
        err.to_string().contains("httproute fleet/tracker-canary"),
        "{err}"
    );
    let other_backend = SERVED_ROUTE.replace(
        r#""namespace":"fleet","port""#,
        r#""namespace":"shop","port""#,
    );
    let err = gateway::parse_object(origin, &other_backend).unwrap_err();
    assert_eq!(
        err.key.as_deref(),
        Some("spec.rules[1].backendRefs[0].namespace"),
        "{err}"
    );
    let regex = SERVED_ROUTE.replace(
        r#""type":"PathPrefix","value":"/"}}]"#,
        r#""type":"RegularExpression","value":"/"}}]"#,
    );
    let err = gateway::parse_object(origin, &regex).unwrap_err();
    assert!(err.message.contains("PathPrefix or Exact"), "{err}");
    let split = r#"{"apiVersion":"split.smi-spec.io/v1alpha2","kind":"TrafficSplit","metadata":{"name":"s"},"spec":{"service":"a","backends":[]}}"#;
    let err = gateway::parse_object(origin, split).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("kind"), "{err}");
    assert!(gateway::parse_object(origin, "{not json").is_err());
}
