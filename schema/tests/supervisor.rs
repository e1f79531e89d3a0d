use std::path::Path;
use std::time::Duration;

use pimesh_schema::SupervisorConfig;

const FILE: &str = "/etc/pimesh/supervisor.toml";

fn parse(text: &str) -> Result<SupervisorConfig, pimesh_schema::ConfigError> {
    SupervisorConfig::parse(Path::new(FILE), text)
}

#[test]
fn defaults_manage_the_proxy_and_three_control_replicas() {
    let config = SupervisorConfig::default();
    let names: Vec<_> = config.units.iter().map(|u| u.name.to_string()).collect();
    assert_eq!(
        names,
        [
            "pimesh-proxy.service",
            "pimesh-control@1.service",
            "pimesh-control@2.service",
            "pimesh-control@3.service"
        ]
    );
    let urls: Vec<_> = config
        .units
        .iter()
        .map(|u| u.ready_url.as_ref().map(|url| url.to_string()))
        .collect();
    assert_eq!(urls[0].as_deref(), Some("http://127.0.0.1:4191/ready"));
    assert_eq!(urls[3].as_deref(), Some("http://127.0.0.1:8088/ready"));
    assert_eq!(config.heal.probe_interval, Duration::from_secs(1));
    assert_eq!(config.heal.hang_threshold, Duration::from_secs(3));
    assert_eq!(config.heal.backoff_initial, Duration::from_millis(200));
    assert_eq!(config.heal.backoff_max, Duration::from_secs(30));
    assert!(!config.heal.allow_reboot);
}

#[test]
fn an_empty_file_and_a_missing_file_are_the_defaults() {
    assert_eq!(parse("").expect("empty"), SupervisorConfig::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("supervisor.toml");
    assert_eq!(
        SupervisorConfig::load(&missing).expect("missing"),
        SupervisorConfig::default()
    );
}

#[test]
fn the_shipped_example_is_the_default() {
    let text = include_str!("../../configs/supervisor.toml");
    assert_eq!(
        parse(text).expect("configs/supervisor.toml"),
        SupervisorConfig::default()
    );
}

#[test]
fn a_complete_file_is_read_whole() {
    let config = parse(
        r#"
[heal]
probe_interval_ms = 500
hang_threshold_ms = 2000
backoff_initial_ms = 100
backoff_max_ms = 5000
escalate_after = 3
allow_reboot = true

[[unit]]
name = "pimesh-proxy.service"
ready_url = "http://127.0.0.1:4191/ready"
dependencies = ["pimesh-control@1.service"]

[[unit]]
name = "pimesh-control@1.service"
"#,
    )
    .expect("valid");
    assert_eq!(config.units.len(), 2);
    assert_eq!(
        config.units[0].dependencies[0].as_str(),
        "pimesh-control@1.service"
    );
    assert!(config.units[1].ready_url.is_none());
    assert_eq!(config.heal.escalate_after, 3);
    assert!(config.heal.allow_reboot);
    assert!(
        !config.replicas_follow_site,
        "a listed set is kept as listed"
    );
}

#[test]
fn without_listed_units_the_replica_count_follows_the_site() {
    assert!(SupervisorConfig::default().replicas_follow_site);
    let config = parse("[heal]\nescalate_after = 2\n").expect("valid");
    assert!(config.replicas_follow_site);
    let replica = pimesh_schema::supervisor::control_replica(5);
    assert_eq!(replica.name.as_str(), "pimesh-control@5.service");
    assert_eq!(
        replica.ready_url.map(|url| url.to_string()).as_deref(),
        Some("http://127.0.0.1:8090/ready")
    );
}

#[test]
fn unknown_keys_are_refused_with_line_and_key() {
    let err = parse("[heal]\nprobe_interval_ms = 500\nbackof_max_ms = 3\n").unwrap_err();
    assert_eq!(err.line, Some(3), "{err}");
    assert!(err.to_string().contains("backof_max_ms"), "{err}");
}

#[test]
fn bad_unit_names_and_urls_name_their_key() {
    let err = parse("[[unit]]\nname = \"pimesh-proxy\"\n").unwrap_err();
    assert_eq!(err.key.as_deref(), Some("unit[0].name"), "{err}");
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains(".service"), "{err}");

    let err =
        parse("[[unit]]\nname = \"a.service\"\nready_url = \"https://x/ready\"\n").unwrap_err();
    assert_eq!(err.key.as_deref(), Some("unit[0].ready_url"), "{err}");
    assert_eq!(err.line, Some(3));
}

#[test]
fn inconsistent_heal_settings_are_refused() {
    let err = parse("[heal]\nbackoff_initial_ms = 5000\nbackoff_max_ms = 100\n").unwrap_err();
    assert_eq!(err.key.as_deref(), Some("heal.backoff_max_ms"), "{err}");
    assert_eq!(err.line, Some(3), "{err}");
    assert_eq!(
        err.to_string(),
        "/etc/pimesh/supervisor.toml:3:18: key `heal.backoff_max_ms`: expected at least \
         heal.backoff_initial_ms (5000), found 100"
    );
    let err = parse("[heal]\nprobe_interval_ms = 0\n").unwrap_err();
    assert_eq!(err.key.as_deref(), Some("heal.probe_interval_ms"));
    let err = parse("[heal]\nhang_threshold_ms = 10\n").unwrap_err();
    assert_eq!(err.key.as_deref(), Some("heal.hang_threshold_ms"));
}

#[test]
fn duplicate_units_are_refused() {
    let err =
        parse("[[unit]]\nname = \"a.service\"\n[[unit]]\nname = \"a.service\"\n").unwrap_err();
    assert_eq!(err.key.as_deref(), Some("unit[1].name"));
    assert_eq!(err.line, Some(4));
}

#[test]
fn ota_settings_are_read_and_checked() {
    let config =
        parse("[ota]\nhealth_deadline_ms = 15000\nsettle_ms = 1000\ntry_window_ms = 6000\n")
            .expect("valid");
    assert_eq!(config.ota.health_deadline, Duration::from_secs(15));
    assert_eq!(config.ota.settle, Duration::from_secs(1));
    assert_eq!(config.ota.try_window, Duration::from_secs(6));
    for (text, key, line) in [
        (
            "[ota]\nhealth_deadline_ms = 1000\nsettle_ms = 2000\n",
            "ota.settle_ms",
            3,
        ),
        ("[ota]\nlong_poll_wait_s = 0\n", "ota.long_poll_wait_s", 2),
        ("[ota]\nmax_bundle_bytes = 0\n", "ota.max_bundle_bytes", 2),
        (
            "[ota]\nproxy_config_url = \"ftp://x\"\n",
            "ota.proxy_config_url",
            2,
        ),
        ("[ota]\nwindow = 3\n", "ota.window", 2),
        // Past any sane wait: refused before a clock could overflow on it.
        (
            "[ota]\nhealth_deadline_ms = 18446744073709551615\n",
            "ota.health_deadline_ms",
            2,
        ),
        ("[ota]\ntry_window_ms = 604800001\n", "ota.try_window_ms", 2),
        (
            "[ota]\nlong_poll_wait_s = 3601\n",
            "ota.long_poll_wait_s",
            2,
        ),
        (
            "[ota]\nmax_bundle_bytes = 67108865\n",
            "ota.max_bundle_bytes",
            2,
        ),
        (
            "[heal]\nhang_threshold_ms = 86400001\n",
            "heal.hang_threshold_ms",
            2,
        ),
    ] {
        let err = parse(text).expect_err(text);
        assert_eq!(err.key.as_deref(), Some(key), "{text}: {err}");
        assert_eq!(err.line, Some(line), "{text}: {err}");
    }
}

#[test]
fn mesh_traffic_is_measured_every_five_minutes_unless_turned_off() {
    let ota = SupervisorConfig::default().ota;
    assert_eq!(ota.traffic_every, Some(Duration::from_secs(300)));
    assert_eq!(
        ota.proxy_metrics_url.to_string(),
        "http://127.0.0.1:4191/metrics"
    );
    let off = parse("[ota]\ntraffic_every_s = 0\n").expect("valid");
    assert_eq!(off.ota.traffic_every, None);
    let err = parse("[ota]\ntraffic_every_s = 86401\n").expect_err("too long");
    let text = err.to_string();
    assert!(text.contains("traffic_every_s"), "{text}");
}
