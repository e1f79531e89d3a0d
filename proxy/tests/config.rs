//! The real `pimesh-proxy` binary with a site config in a temp folder: load, report on
//! `/config`, readiness, reload on SIGHUP and on file change. Tests wait with deadlines
//! but never assert on speed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pimesh_test_support::http::get_blocking;
use pimesh_test_support::proxy::{Proxy, ProxyOptions};
use pimesh_test_support::{free_port, replace, Binary, DEADLINE};

const GOOD: &str = "site = \"lab\"\n\n[proxy]\nmax_connections = 100\n\n\
                    [services.web]\nport = 8080\nnodes = [\"pi-a\"]\n\n\
                    [services.db]\nport = 5432\nnodes = [\"pi-b\"]\n";

const GOOD_V2: &str = "site = \"lab\"\n\n[proxy]\nmax_connections = 200\n\n\
                       [services.web]\nport = 8080\nnodes = [\"pi-a\", \"pi-b\"]\n";

/// Valid TOML, refused by the schema: 12 control replicas (1 to 9 allowed).
const SCHEMA_INVALID: &str = "site = \"lab\"\n\n[control]\nreplicas = 12\n\n\
                              [proxy]\nmax_connections = 100\n";

/// Valid for the schema (its highest), but it needs 524 416 descriptors: above the hard
/// open-file limit of this machine (20 000) and of systemd's services (524 288).
const TOO_MANY_CONNECTIONS: &str = "site = \"lab\"\n\n[proxy]\nmax_connections = 262144\n";

/// Starts the proxy on free loopback ports with `config` as its site config path and
/// waits until `/live` answers. Retries with other ports if one picked was taken.
fn start(dir: &Path, config: &Path) -> Proxy {
    start_with_soft_nofile(dir, config, None)
}

/// Like [`start`], with the child's soft `RLIMIT_NOFILE` lowered to `soft`.
fn start_with_soft_nofile(dir: &Path, config: &Path, soft: Option<u64>) -> Proxy {
    for _ in 0..5 {
        let options = ProxyOptions {
            dir,
            name: "proxy",
            config,
            identity: None,
            inbound_port: free_port(),
            local_ip: "127.0.0.1",
        };
        let mut proxy = Proxy::spawn(&options, &[], |command: &mut Command| {
            if let Some(soft) = soft {
                use std::os::unix::process::CommandExt as _;
                // SAFETY: between fork and exec only async-signal-safe calls are allowed;
                // getrlimit and setrlimit are plain system calls that allocate nothing.
                // The test's one `unsafe`: a child with a lower soft limit than its parent.
                #[allow(unsafe_code)]
                unsafe {
                    command.pre_exec(move || {
                        use nix::sys::resource::{getrlimit, setrlimit, Resource};
                        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
                        setrlimit(Resource::RLIMIT_NOFILE, soft, hard)?;
                        Ok(())
                    });
                }
            }
        });
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if proxy.daemon.exited().is_some() {
                break; // port taken meanwhile, most likely: try another
            }
            if let Some((200, _)) = get_blocking(proxy.admin, "/live") {
                return proxy;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "proxy did not come up on {}:\n{}",
            proxy.admin,
            proxy.log_text()
        );
    }
    panic!("pimesh-proxy never came up");
}

/// Polls `path` until `done` holds for its answer, or panics at the deadline.
fn wait_for(proxy: &Proxy, path: &str, what: &str, done: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (code, body) = proxy.get_blocking(path);
        if done(code, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: last answer {code} {body}\nlog:\n{}",
            proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_sha(proxy: &Proxy, sha: &str) {
    wait_for(proxy, "/config", &format!("sha256 {sha}"), |_, body| {
        body.contains(&format!("\"sha256\":\"{sha}\""))
    });
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn valid_config_is_ready_and_reports_the_sha256_of_its_bytes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.toml");
    std::fs::write(&file, GOOD).expect("write");
    let proxy = start(dir.path(), &file);
    let (code, body) = proxy.get_blocking("/ready");
    assert_eq!(code, 200, "{body}");
    let config = proxy.config_blocking();
    assert_eq!(config["sha256"], sha256_hex(GOOD.as_bytes()));
    assert_eq!(config["file"], file.to_string_lossy().as_ref());
    assert_eq!(config["site"], "lab");
    assert_eq!(config["services"], 2);
    assert!(config["loaded_at_ms"].as_u64().is_some_and(|ms| ms > 0));
    assert_eq!(config["last_error"], serde_json::Value::Null);
    assert_eq!(proxy.get_blocking("/live").0, 200);
    assert_eq!(proxy.get_blocking("/nowhere").0, 404);
}

#[test]
fn missing_file_is_ready_with_no_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.toml");
    let proxy = start(dir.path(), &file);
    let (code, body) = proxy.get_blocking("/ready");
    assert_eq!(code, 200, "{body}");
    let config = proxy.config_blocking();
    assert_eq!(config["sha256"], serde_json::Value::Null);
    assert_eq!(config["site"], serde_json::Value::Null);
    assert_eq!(config["services"], 0);
    assert_eq!(config["last_error"], serde_json::Value::Null);
}

#[test]
fn sighup_with_a_schema_invalid_file_keeps_the_old_config_until_fixed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.toml");
    std::fs::write(&file, GOOD).expect("write");
    let proxy = start(dir.path(), &file);
    let good_sha = sha256_hex(GOOD.as_bytes());
    wait_for_sha(&proxy, &good_sha);

    // (c) a schema-invalid revision: not ready, the reason names file and key, the old
    // config stays in use.
    replace(&file, SCHEMA_INVALID);
    proxy.signal(Signal::SIGHUP);
    let body = wait_for(&proxy, "/ready", "503 after a bad revision", |code, _| {
        code == 503
    });
    let file_name = file.to_string_lossy();
    assert!(body.contains(file_name.as_ref()), "{body}");
    assert!(body.contains("control.replicas"), "{body}");
    let config = proxy.config_blocking();
    assert_eq!(config["sha256"], good_sha.as_str());
    assert!(
        config["last_error"]
            .as_str()
            .is_some_and(|err| err.contains("control.replicas")),
        "{config}"
    );

    // (d) fixed: ready again with the new revision.
    replace(&file, GOOD_V2);
    proxy.signal(Signal::SIGHUP);
    wait_for(&proxy, "/ready", "ready after the fix", |code, _| {
        code == 200
    });
    let config = proxy.config_blocking();
    assert_eq!(config["sha256"], sha256_hex(GOOD_V2.as_bytes()));
    assert_eq!(config["services"], 1);
    assert_eq!(config["last_error"], serde_json::Value::Null);
}

#[test]
fn more_connections_than_the_open_file_limit_is_refused_by_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.toml");
    std::fs::write(&file, GOOD).expect("write");
    let proxy = start(dir.path(), &file);
    wait_for_sha(&proxy, &sha256_hex(GOOD.as_bytes()));

    replace(&file, TOO_MANY_CONNECTIONS);
    proxy.signal(Signal::SIGHUP);
    let body = wait_for(&proxy, "/ready", "503 for max_connections", |code, _| {
        code == 503
    });
    assert!(body.contains("proxy.max_connections"), "{body}");
    assert!(body.contains("262144"), "{body}");
    assert!(body.contains(file.to_string_lossy().as_ref()), "{body}");
    assert_eq!(
        proxy.config_blocking()["sha256"],
        sha256_hex(GOOD.as_bytes())
    );
}

#[test]
fn a_low_soft_open_file_limit_is_raised_to_fit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.toml");
    // 100 connections need 2 * 100 + 128 = 328 descriptors, above a soft limit of 128.
    std::fs::write(&file, GOOD).expect("write");
    let proxy = start_with_soft_nofile(dir.path(), &file, Some(128));
    let (code, body) = proxy.get_blocking("/ready");
    assert_eq!(code, 200, "{body}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.daemon.pid()))
        .expect("read the proxy's limits");
    let soft: u64 = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok())
        .unwrap_or_else(|| panic!("no open-file limit in {limits}"));
    assert!(soft >= 328, "soft limit {soft}\n{limits}");
}

#[test]
fn a_refused_config_at_start_still_serves_the_admin_port() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.toml");
    std::fs::write(&file, TOO_MANY_CONNECTIONS).expect("write");
    let proxy = start(dir.path(), &file);
    let (code, body) = proxy.get_blocking("/ready");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("proxy.max_connections"), "{body}");
    assert_eq!(proxy.config_blocking()["sha256"], serde_json::Value::Null);
}

#[test]
fn a_changed_file_is_picked_up_without_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.toml");
    let proxy = start(dir.path(), &file);
    assert_eq!(proxy.config_blocking()["sha256"], serde_json::Value::Null);

    replace(&file, GOOD);
    wait_for_sha(&proxy, &sha256_hex(GOOD.as_bytes()));
    replace(&file, GOOD_V2);
    wait_for_sha(&proxy, &sha256_hex(GOOD_V2.as_bytes()));
    assert_eq!(proxy.get_blocking("/ready").0, 200);
}

#[test]
fn sigterm_stops_the_proxy_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut proxy = start(dir.path(), &dir.path().join("cluster.toml"));
    proxy.signal(Signal::SIGTERM);
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = proxy.daemon.exited() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}\n{}", proxy.log_text());
}

#[test]
fn bad_arguments_exit_2() {
    let output = Binary::Proxy
        .command()
        .args(["--admin-addr", "not-an-address"])
        .output()
        .expect("run pimesh-proxy");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--admin-addr"), "{stderr}");
}
