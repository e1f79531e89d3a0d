//! `[k3s]` of the site configuration: the Services range and the manifests the servers
//! deploy.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly
use std::path::Path;

use pimesh_schema::cluster::{ClusterConfig, Ipv4Cidr, K3sManifest};
use pimesh_schema::DnsLabel;

const FILE: &str = "/etc/pimesh/cluster.toml";

fn parse(text: &str) -> Result<ClusterConfig, pimesh_schema::ConfigError> {
    ClusterConfig::parse(Path::new(FILE), text)
}

const TRACKER: &str = "\
site = \"s\"
[k3s.manifests]
tracker = \"\"\"
apiVersion: v1
kind: Service
metadata:
  name: tracker
  namespace: fleet
spec:
  ports: [{port: 8081}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: tracker-settings}
---
\"\"\"
";

#[test]
fn the_services_range_is_k3s_default_unless_said() {
    let config = parse("site = \"s\"\n").expect("minimal");
    assert_eq!(config.k3s.service_cidr.to_string(), "10.43.0.0/16");
    assert!(config.k3s.manifests.is_empty());
    let config = parse("site = \"s\"\n[k3s]\nservice_cidr = \"10.96.0.0/12\"\n").expect("valid");
    assert_eq!(config.k3s.service_cidr.to_string(), "10.96.0.0/12");
    assert!(config
        .k3s
        .service_cidr
        .contains("10.111.2.3".parse().expect("ip")));
    assert!(!config
        .k3s
        .service_cidr
        .contains("10.112.0.1".parse().expect("ip")));
}

#[test]
fn a_wrong_services_range_names_its_key_and_line() {
    for (value, says) in [
        ("10.43.0.0", "such as \"10.43.0.0/16\""),
        ("fd00::/108", "IPv4 network"),
        ("10.0.0.0/8", "prefix 12 to 28"),
        ("10.43.0.0/30", "prefix 12 to 28"),
        ("10.43.1.0/16", "first address, 10.43.0.0/16"),
    ] {
        let text = format!("site = \"s\"\n[k3s]\nservice_cidr = \"{value}\"\n");
        let err = parse(&text).expect_err(value);
        assert_eq!(err.key.as_deref(), Some("k3s.service_cidr"), "{err}");
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains(says), "{value}: {err}");
    }
    assert!(Ipv4Cidr::try_from("10.43.0.0/16".to_owned()).is_ok());
}

#[test]
fn manifests_are_kept_as_written() {
    let config = parse(TRACKER).expect("valid");
    let name = DnsLabel::try_from("tracker".to_owned()).expect("label");
    let text = config.k3s.manifests[&name].text();
    assert!(
        text.starts_with("apiVersion: v1\nkind: Service\n"),
        "{text}"
    );
    assert!(text.ends_with("---\n"), "{text}");
}

#[test]
fn each_broken_manifest_names_its_document_and_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("kind: Service\nmetadata: {name: a}\n", "k3s.manifests.m[0].apiVersion", "found nothing"),
        ("apiVersion: v1\nkind: 5\nmetadata: {name: a}\n", "k3s.manifests.m[0].kind", "found a number"),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {}\n",
            "k3s.manifests.m[1].metadata.name",
            "found nothing",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: \"\"}\n",
            "k3s.manifests.m[0].metadata.name",
            "an empty string",
        ),
        ("- a\n- b\n", "k3s.manifests.m[0]", "found a list"),
        ("apiVersion: v1\nkind: [\n", "k3s.manifests.m[0]", "expected YAML"),
        ("---\n", "k3s.manifests.m[0]", "at least one Kubernetes object"),
    ];
    for (manifest, key, says) in cases {
        let text = format!("site = \"s\"\n\n[k3s.manifests]\nm = '''\n{manifest}'''\n");
        let err = parse(&text).expect_err(manifest);
        assert_eq!(err.key.as_deref(), Some(*key), "{manifest}: {err}");
        assert_eq!(err.line, Some(4), "the manifest's line: {err}");
        assert!(err.message.contains(says), "{manifest}: {err}");
    }
    let err = parse("site = \"s\"\n[k3s.manifests]\nNot_A_Label = \"\"\n").expect_err("name");
    assert!(err.to_string().contains("k3s.manifests"), "{err}");
}

#[test]
fn a_manifest_can_be_made_from_text() {
    assert!(K3sManifest::parse(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: fleet}\n".into()
    )
    .is_ok());
    let fault = K3sManifest::parse("kind: Namespace\n".into()).expect_err("no apiVersion");
    assert_eq!((fault.document, fault.field), (0, Some("apiVersion")));
}
