#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly
use std::path::Path;
use std::time::Duration;

use pimesh_schema::cluster::{ClusterConfig, Protocol};
use pimesh_schema::{DnsLabel, SpiffeId};

const FILE: &str = "/etc/pimesh/cluster.toml";

fn parse(text: &str) -> Result<ClusterConfig, pimesh_schema::ConfigError> {
    ClusterConfig::parse(Path::new(FILE), text)
}

fn label(s: &str) -> DnsLabel {
    DnsLabel::try_from(s.to_owned()).expect("label")
}

#[test]
fn the_example_site_is_read_whole() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/cluster.example.toml");
    let config = ClusterConfig::load(&file).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(config.site.as_str(), "fleet-depot-7");
    assert_eq!(config.control.replicas, 3);
    assert_eq!(config.k3s.servers, 3);
    let apex = &config.services[&label("fleetman-staff-service")];
    let weights: Vec<_> = apex
        .split
        .iter()
        .map(|b| (b.service.as_str(), b.weight))
        .collect();
    assert_eq!(
        weights,
        [
            ("fleetman-staff-service-stable", 90),
            ("error-injector", 10)
        ]
    );
    assert_eq!(apex.local_port, Some(18082));
    assert_eq!(
        config.nodes[&label("pi-b")].address.0,
        "192.168.1.22:4143".parse().expect("address")
    );
    let injector = &config.services[&label("error-injector")];
    let abort = injector
        .fault
        .as_ref()
        .and_then(|f| f.abort.as_ref())
        .expect("abort");
    assert_eq!((abort.status.0, abort.percent.0), (503, 100.0));
    let stable = &config.services[&label("fleetman-staff-service-stable")];
    let delay = stable
        .fault
        .as_ref()
        .and_then(|f| f.delay.as_ref())
        .expect("delay");
    assert_eq!(delay.duration.0, Duration::from_millis(200));
    assert_eq!(
        config.services[&label("fleetman-queue")].protocol,
        Protocol::Tcp
    );
}

#[test]
fn a_node_may_hold_its_own_identity_and_its_services_only() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/cluster.example.toml");
    let config = ClusterConfig::load(&file).unwrap_or_else(|err| panic!("{err}"));
    let ids: Vec<String> = config
        .identities_of_node(&label("pi-a"))
        .iter()
        .map(SpiffeId::to_string)
        .collect();
    assert_eq!(
        ids,
        [
            "spiffe://fleet-depot-7/node/pi-a",
            "spiffe://fleet-depot-7/svc/fleetman-staff-service-stable",
            "spiffe://fleet-depot-7/svc/fleetman-webapp",
        ]
    );
}

#[test]
fn defaults_fill_what_is_not_said() {
    let config = parse("site = \"s\"\n").expect("minimal");
    assert_eq!(config.control.replicas, 3);
    assert_eq!(config.k3s.disable, ["traefik"]);
    assert_eq!(config.proxy.retry_budget_percent, 20);
    assert_eq!(config.proxy.otlp_url, None);
    assert_eq!(config.proxy.span_queue_dir, None);
    assert_eq!(config.proxy.span_queue_max_bytes, 16 * 1024 * 1024);
    assert!(config.services.is_empty());
}

#[test]
fn each_broken_rule_names_its_key_and_line() {
    let cases: &[(&str, &str, usize, &str)] = &[
        ("site = \"s\"\n[control]\nreplicas = 0\n", "control.replicas", 3, "1 to 9"),
        ("site = \"s\"\n[k3s]\nservers = 2\n", "k3s.servers", 3, "odd quorum"),
        ("site = \"s\"\n[services.a]\nnodes = [\"pi-a\"]\n", "services.a.nodes", 3, "port"),
        ("site = \"s\"\n[services.a]\nport = 80\n", "services.a", 2, "split"),
        (
            "site = \"s\"\n[services.a]\nsplit = [{ service = \"b\", weight = 1 }]\n",
            "services.a.split[0].service",
            3,
            "name of a service",
        ),
        (
            "site = \"s\"\n[services.b]\nport = 1\nnodes = [\"n\"]\n[services.a]\nsplit = [\n  { service = \"b\", weight = 0 },\n]\n",
            "services.a.split",
            6,
            "weight above 0",
        ),
        (
            "site = \"s\"\n[services.b]\nport = 1\nnodes = [\"n\", \"n\"]\n",
            "services.b.nodes[1]",
            4,
            "twice",
        ),
        (
            "site = \"s\"\n[services.b]\nport = 1\nnodes = [\"n\"]\nallow = [\"spiffe://other/svc/x\"]\n",
            "services.b.allow[0]",
            5,
            "site s",
        ),
        ("site = \"s\"\n[services.b]\nport = 1\nnodes = [\"n\"]\nretries = 9\n", "services.b.retries", 5, "0 to 5"),
        // Values a proxy could not use: a listener that refuses everything, a deadline
        // past the end of the clock, a delay that holds requests for days.
        ("site = \"s\"\n[proxy]\nmax_connections = 0\n", "proxy.max_connections", 3, "1 to 262144"),
        ("site = \"s\"\n[proxy]\nmax_header_bytes = 10\n", "proxy.max_header_bytes", 3, "1024 to"),
        ("site = \"s\"\n[proxy]\nheader_timeout = \"10000000000000s\"\n", "proxy.header_timeout", 3, "100ms to 10m"),
        ("site = \"s\"\n[proxy]\nheader_timeout = \"0s\"\n", "proxy.header_timeout", 3, "found 0s"),
        ("site = \"s\"\n[proxy]\ndefault_timeout = \"0s\"\n", "proxy.default_timeout", 3, "1ms to 1day"),
        ("site = \"s\"\n[proxy]\ndefault_timeout = \"2days\"\n", "proxy.default_timeout", 3, "found 2days"),
        ("site = \"s\"\n[services.b]\nport = 1\nnodes = [\"n\"]\ntimeout = \"400days\"\n", "services.b.timeout", 5, "1ms to 1day"),
        ("site = \"s\"\n[proxy]\notlp_url = \"https://c:4318/v1/traces\"\n", "proxy.otlp_url", 3, "only http://"),
        ("site = \"s\"\n[proxy]\notlp_url = \"collector:4318\"\n", "proxy.otlp_url", 3, "http:// URL"),
        ("site = \"s\"\n[proxy]\notlp_url = \"http://u:p@c/v1/traces\"\n", "proxy.otlp_url", 3, "credentials"),
        ("site = \"s\"\n[proxy]\notlp_url = \"not a url\"\n", "proxy.otlp_url", 3, "http:// URL"),
        ("site = \"s\"\n[proxy]\nspan_queue_dir = \"spans\"\n", "proxy.span_queue_dir", 3, "absolute path"),
        ("site = \"s\"\n[proxy]\nspan_queue_max_bytes = 2147483648\n", "proxy.span_queue_max_bytes", 3, "0 to 1073741824"),
        ("site = \"s\"\n[services.b]\nport = 1\nnodes = [\"n\"]\nidle_timeout = \"0s\"\n", "services.b.idle_timeout", 5, "1s to 1day"),
        (
            "site = \"s\"\n[services.b]\nport = 1\nnodes = [\"n\"]\nfault = { delay = { duration = \"2h\", percent = 5.0 } }\n",
            "services.b.fault.delay.duration",
            5,
            "0s to 1h",
        ),
        ("site = \"s\"\n[rollout]\nwaves = []\n", "rollout.waves", 3, "found none"),
        ("site = \"s\"\n[rollout]\nwaves = [10, 50]\n", "rollout.waves", 3, "last wave of 50"),
        ("site = \"s\"\n[rollout]\nwaves = [50, 10, 100]\n", "rollout.waves[1]", 3, "found 10 after 50"),
        ("site = \"s\"\n[rollout]\nwaves = [0, 100]\n", "rollout.waves[0]", 3, "1 to 100"),
        ("site = \"s\"\n[rollout]\ncanary = [\"pi-a\", \"pi-a\"]\n", "rollout.canary[1]", 3, "twice"),
        ("site = \"s\"\n[rollout]\noffline_after = \"1s\"\n", "rollout.offline_after", 3, "10s to 7days"),
        ("site = \"s\"\n[rollout]\nfleet_waves = [10, 100]\n", "rollout.fleet_waves", 3, "needs a `release`"),
        ("site = \"s\"\n[rollout]\nfleet_canary = [\"depot-1\"]\n", "rollout.fleet_canary", 3, "needs a `release`"),
        ("site = \"s\"\n[rollout]\nrelease = \"a b\"\n", "rollout.release", 3, "found \"a b\""),
        ("site = \"s\"\n[rollout]\nrelease = \"r\"\nfleet_waves = [50, 20, 100]\n", "rollout.fleet_waves[1]", 4, "found 20 after 50"),
        ("site = \"s\"\n[rollout]\nrelease = \"r\"\nfleet_canary = [\"d-1\", \"d-1\"]\n", "rollout.fleet_canary[1]", 4, "site d-1 is listed twice"),
    ];
    for (text, key, line, says) in cases {
        let err = parse(text).expect_err(text);
        assert_eq!(err.key.as_deref(), Some(*key), "{text}\n{err}");
        assert_eq!(err.line, Some(*line), "{text}\n{err}");
        assert!(err.message.contains(says), "{err}");
    }
}

#[test]
fn a_rollout_plan_is_read_and_its_absence_means_every_node_at_once() {
    let plain = parse("site = \"s\"\n").unwrap();
    assert!(plain.rollout.is_all_at_once());
    assert_eq!(plain.rollout.waves, vec![100]);
    let staged = parse(
        "site = \"s\"\n[rollout]\ncanary = [\"pi-a\"]\nwaves = [10, 50, 100]\nmax_failed = 1\noffline_after = \"2m\"\n",
    )
    .unwrap();
    assert!(!staged.rollout.is_all_at_once());
    assert_eq!(staged.rollout.canary, vec![label("pi-a")]);
    assert_eq!(staged.rollout.waves, vec![10, 50, 100]);
    assert_eq!(staged.rollout.max_failed, 1);
    assert_eq!(staged.rollout.offline_after.0, Duration::from_secs(120));
    assert_eq!(staged.rollout.release, None);
    assert_eq!(staged.rollout.fleet_waves, vec![100]);
    let fleet = parse(
        "site = \"s\"\n[rollout]\nrelease = \"2026.12-tls\"\nfleet_canary = [\"depot-1\"]\nfleet_waves = [10, 100]\n",
    )
    .unwrap();
    assert_eq!(fleet.rollout.release.as_deref(), Some("2026.12-tls"));
    assert_eq!(fleet.rollout.fleet_canary, vec![label("depot-1")]);
    assert_eq!(fleet.rollout.fleet_waves, vec![10, 100]);
}

#[test]
fn the_limits_bounds_are_accepted() {
    use pimesh_schema::cluster::limits;
    let text = format!(
        "site = \"s\"\n[proxy]\nmax_connections = {}\nmax_header_bytes = {}\nheader_timeout = \"10m\"\n\
         default_timeout = \"1day\"\n[services.b]\nport = 1\nnodes = [\"n\"]\ntimeout = \"1ms\"\nidle_timeout = \"1day\"\n",
        limits::MAX_CONNECTIONS.end(),
        limits::MAX_HEADER_BYTES.start()
    );
    let config = parse(&text).expect("the bounds themselves are valid");
    assert_eq!(config.proxy.max_connections, *limits::MAX_CONNECTIONS.end());
    assert_eq!(config.proxy.header_timeout.0, *limits::HEADER_TIMEOUT.end());
    assert_eq!(
        config.proxy.default_timeout.0,
        *limits::REQUEST_TIMEOUT.end()
    );
}

#[test]
fn malformed_values_are_refused_where_they_are() {
    let cases: &[(&str, &str, usize)] = &[
        ("site = \"s\"\n[services.b]\nport = 1\nnodes = [\"n\"]\nfault = { abort = { status = 200, percent = 5.0 } }\n", "services.b.fault.abort.status", 5),
        ("site = \"s\"\n[services.b]\nport = 1\nnodes = [\"n\"]\nfault = { delay = { duration = \"soon\", percent = 5.0 } }\n", "services.b.fault.delay.duration", 5),
        ("site = \"s\"\n[services.b]\nport = 1\nnodes = [\"n\"]\nfault = { delay = { duration = \"1s\", percent = 150.0 } }\n", "services.b.fault.delay.percent", 5),
        ("site = \"s\"\n[services.b]\nport = 70000\nnodes = [\"n\"]\n", "services.b.port", 3),
        ("site = \"s\"\n[services.b]\nport = 1\nnodes = [\"n\"]\nprotocol = \"udp\"\n", "services.b.protocol", 5),
        ("site = \"s\"\n[services.B]\nport = 1\n", "services", 2),
        ("site = \"s\"\n[services.b]\nport = 1\nnodes = [\"n\"]\nweight = 3\n", "services.b", 5),
    ];
    for (text, key, line) in cases {
        let err = parse(text).expect_err(text);
        assert!(
            err.key.as_deref().is_some_and(|k| k.starts_with(key)),
            "{text}\n{err}"
        );
        assert_eq!(err.line, Some(*line), "{text}\n{err}");
    }
}

#[test]
fn node_addresses_and_local_ports_are_checked() {
    let ok = parse(
        "site = \"s\"\n[nodes.a]\naddress = \"127.0.0.1:24143\"\n\
         [services.web]\nport = 80\nnodes = [\"a\"]\nlocal_port = 18080\n",
    )
    .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(ok.nodes[&label("a")].address.0.port(), 24143);
    let err = parse("site = \"s\"\n[nodes.a]\naddress = \"pi-a.local\"\n")
        .expect_err("a host name is not an address");
    let text = err.to_string();
    assert!(
        text.contains("nodes.a.address") && text.contains("IP"),
        "{text}"
    );
    let err =
        parse("site = \"s\"\n[services.web]\nport = 80\nnodes = [\"a\"]\nlocal_port = 4143\n")
            .expect_err("the inbound port is taken");
    let text = err.to_string();
    assert!(
        text.contains("services.web.local_port") && text.contains("inbound"),
        "{text}"
    );
    let err = parse(
        "site = \"s\"\n[services.web]\nport = 80\nnodes = [\"a\"]\nlocal_port = 9000\n\
         [services.api]\nport = 81\nnodes = [\"a\"]\nlocal_port = 9000\n",
    )
    .expect_err("one port, two services");
    let text = err.to_string();
    assert!(text.contains("already the local port of"), "{text}");
}

#[test]
fn join_tokens_are_digests_with_an_optional_expiry_and_replace_only_when_said() {
    let none = parse("site = \"s\"\n").expect("minimal");
    assert_eq!(
        none.join.tokens, None,
        "no [join]: the trust folder decides"
    );
    let empty = parse("site = \"s\"\n[join]\ntokens = []\n").expect("empty list");
    assert_eq!(
        empty.join.tokens,
        Some(vec![]),
        "an empty list accepts no token"
    );
    let digest = "AB".repeat(32);
    let text = format!(
        "site = \"s\"\n[join]\ntokens = [\n  {{ sha256 = \"{digest}\", expires = \"2027-01-31T12:00:00Z\" }},\n  {{ sha256 = \"{}\" }},\n]\n",
        "0".repeat(64)
    );
    let config = parse(&text).unwrap_or_else(|err| panic!("{err}"));
    let tokens = config.join.tokens.expect("tokens");
    assert_eq!(tokens.len(), 2);
    assert_eq!(tokens[0].sha256.as_str(), "ab".repeat(32), "lower-cased");
    let expires = tokens[0].expires.expect("expiry").0;
    assert_eq!(
        expires
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs(),
        1_801_396_800
    );
    assert_eq!(tokens[1].expires, None);
}

#[test]
fn a_broken_join_token_names_its_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "site = \"s\"\n[join]\ntokens = [{ sha256 = \"abc\" }]\n",
            "join.tokens[0].sha256",
            "64 hex digits",
        ),
        (
            "site = \"s\"\n[join]\ntokens = [{ sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\", expires = \"tomorrow\" }]\n",
            "join.tokens[0].expires",
            "RFC 3339",
        ),
        (
            "site = \"s\"\n[join]\ntokens = [{ secret = \"x\" }]\n",
            "join.tokens[0]",
            "secret",
        ),
        ("site = \"s\"\n[join]\ntoken = []\n", "join", "token"),
    ];
    for (text, key, says) in cases {
        let err = parse(text).expect_err(text);
        assert!(
            err.key.as_deref().is_some_and(|k| k.starts_with(key)),
            "{text}\n{err}"
        );
        assert_eq!(err.line, Some(3), "{text}\n{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
}

#[test]
fn span_export_settings_are_read() {
    let config = parse(
        "site = \"s\"\n[proxy]\nzipkin_url = \"http://zipkin:9411/api/v2/spans\"\n\
         otlp_url = \"http://collector:4318/v1/traces\"\nspan_queue_dir = \"/var/lib/spans\"\n\
         span_queue_max_bytes = 0\n",
    )
    .expect("valid");
    assert_eq!(
        config.proxy.otlp_url.as_deref(),
        Some("http://collector:4318/v1/traces")
    );
    assert_eq!(
        config.proxy.span_queue_dir.as_deref(),
        Some(Path::new("/var/lib/spans"))
    );
    assert_eq!(config.proxy.span_queue_max_bytes, 0);
}

#[test]
fn every_error_is_reported_not_only_the_first() {
    let text = "site = \"depot\"\n\
                [proxy]\n\
                zipkin_url = \"zipkin:9411\"\n\
                max_connections = 0\n\
                [services.web]\n\
                port = 4143\n\
                nodes = [\"a\"]\n\
                [services.api]\n\
                nodes = [\"b\"]\n";
    let errors = ClusterConfig::parse_all(Path::new(FILE), text)
        .map(|_| ())
        .expect_err("four faults");
    let keys: Vec<String> = errors
        .iter()
        .map(|e| e.key.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        keys,
        [
            "proxy.max_connections",
            "proxy.zipkin_url",
            "services.api.nodes",
            "services.web.port",
        ],
        "{errors:?}"
    );
    let port = &errors[3];
    assert_eq!(port.line, Some(6));
    assert!(port.message.contains("the proxy's inbound port"), "{port}");
    assert!(
        errors[1].message.contains("expected an http:// URL"),
        "{}",
        errors[1]
    );
    // `parse` reports the first of them.
    let first = parse(text).map(|_| ()).expect_err("invalid");
    assert_eq!(first.key.as_deref(), Some("proxy.max_connections"));
}

#[test]
fn a_daemons_http_api_may_be_meshed_but_not_the_proxys_traffic_ports() {
    // The supervisor's status API of pi-1, reached from other nodes through the mesh.
    let status =
        "site = \"lab\"\n[services.status]\nport = 4200\nlocal_port = 14200\nnodes = [\"pi-1\"]\n";
    parse(status).unwrap_or_else(|err| panic!("{err}"));
    let metrics = status.replace("4200\n", "4191\n");
    parse(&metrics).unwrap_or_else(|err| panic!("{err}"));
    let looping = status.replace("port = 4200\n", "port = 4140\n");
    let err = parse(&looping).map(|_| ()).expect_err("a loop");
    assert!(err.message.contains("come back into the proxy"), "{err}");
}
