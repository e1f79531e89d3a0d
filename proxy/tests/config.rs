//! The real `pimesh-proxy` binary with a site config in a temp folder: load, report on
//! `/config`, readiness, reload on SIGHUP and on file change. Tests wait with deadlines
//! but never assert on speed.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Generous: a loaded CI machine may be slow; a passing run never waits this long.
const DEADLINE: Duration = Duration::from_secs(30);

const GOOD: &str = "site = \"lab\"\n\n[proxy]\nmax_connections = 100\n\n\
                    [services.web]\nport = 8080\nnodes = [\"pi-a\"]\n\n\
                    [services.db]\nport = 5432\nnodes = [\"pi-b\"]\n";

const GOOD_V2: &str = "site = \"lab\"\n\n[proxy]\nmax_connections = 200\n\n\
                       [services.web]\nport = 8080\nnodes = [\"pi-a\", \"pi-b\"]\n";

/// Valid TOML, refused by the schema: 12 control replicas (1 to 9 allowed).
const SCHEMA_INVALID: &str = "site = \"lab\"\n\n[control]\nreplicas = 12\n\n\
                              [proxy]\nmax_connections = 100\n";

/// Valid for the schema (a u32), but no open-file limit holds 8 000 000 064 descriptors.
const TOO_MANY_CONNECTIONS: &str = "site = \"lab\"\n\n[proxy]\nmax_connections = 4000000000\n";

struct Proxy {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Proxy {
    /// Starts the proxy on a free loopback port with `config` as its site config path and
    /// waits until `/live` answers. Retries with another port if the one picked was taken.
    fn start(dir: &Path, config: &Path) -> Proxy {
        Proxy::start_with_soft_nofile(dir, config, None)
    }

    /// Like [`Proxy::start`], with the child's soft `RLIMIT_NOFILE` lowered to `soft`.
    fn start_with_soft_nofile(dir: &Path, config: &Path, soft: Option<u64>) -> Proxy {
        let log = dir.join("proxy.log");
        for _ in 0..5 {
            let addr = free_port();
            let mut command = Command::new(env!("CARGO_BIN_EXE_pimesh-proxy"));
            if let Some(soft) = soft {
                use std::os::unix::process::CommandExt as _;
                // SAFETY: between fork and exec only async-signal-safe calls are allowed;
                // getrlimit and setrlimit are plain system calls that allocate nothing.
                unsafe {
                    command.pre_exec(move || {
                        use nix::sys::resource::{getrlimit, setrlimit, Resource};
                        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
                        setrlimit(Resource::RLIMIT_NOFILE, soft, hard)?;
                        Ok(())
                    });
                }
            }
            let child = command
                .arg("--admin-addr")
                .arg(addr.to_string())
                .arg("--outbound-addr")
                .arg(free_port().to_string())
                .arg("--inbound-addr")
                .arg(free_port().to_string())
                .arg("--identity-dir")
                .arg(dir.join("no-identity"))
                .arg("--config")
                .arg(config)
                .env("RUST_LOG", "info")
                .env_remove("NOTIFY_SOCKET")
                .env_remove("WATCHDOG_USEC")
                .env_remove("JOURNAL_STREAM")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("create the log file"))
                .spawn()
                .expect("start pimesh-proxy");
            let mut proxy = Proxy {
                child,
                addr,
                log: log.clone(),
            };
            let deadline = Instant::now() + DEADLINE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = proxy.child.try_wait() {
                    break; // port taken meanwhile, most likely: try another
                }
                if let Some((200, _)) = try_get(addr, "/live") {
                    return proxy;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("proxy did not come up on {addr}:\n{}", proxy.log_text());
        }
        panic!("pimesh-proxy never came up");
    }

    fn get(&self, path: &str) -> (u16, String) {
        try_get(self.addr, path)
            .unwrap_or_else(|| panic!("GET {path} failed; log:\n{}", self.log_text()))
    }

    fn config(&self) -> serde_json::Value {
        let (code, body) = self.get("/config");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|err| panic!("/config: {err}: {body}"))
    }

    fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.child.id()).expect("a pid fits i32");
        kill(Pid::from_raw(pid), signal).expect("signal the proxy");
    }

    /// Polls `path` until `done` holds for its answer, or panics at the deadline.
    fn wait_for(&self, path: &str, what: &str, done: impl Fn(u16, &str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (code, body) = self.get(path);
            if done(code, &body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: last answer {code} {body}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_for_sha(&self, sha: &str) {
        self.wait_for("/config", &format!("sha256 {sha}"), |_, body| {
            body.contains(&format!("\"sha256\":\"{sha}\""))
        });
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], common::free_port()))
}

/// A minimal HTTP/1.1 GET: status code and body, `None` when the connection fails.
fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Replaces `file` by rename, as the supervisor does: a new inode every time.
fn replace(file: &Path, text: &str) {
    let temp = file.with_extension("tmp");
    std::fs::write(&temp, text).expect("write the new config");
    std::fs::rename(&temp, file).expect("rename over the config");
}

#[test]
fn valid_config_is_ready_and_reports_the_sha256_of_its_bytes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.toml");
    std::fs::write(&file, GOOD).expect("write");
    let proxy = Proxy::start(dir.path(), &file);
    let (code, body) = proxy.get("/ready");
    assert_eq!(code, 200, "{body}");
    let config = proxy.config();
    assert_eq!(config["sha256"], sha256_hex(GOOD.as_bytes()));
    assert_eq!(config["file"], file.to_string_lossy().as_ref());
    assert_eq!(config["site"], "lab");
    assert_eq!(config["services"], 2);
    assert!(config["loaded_at_ms"].as_u64().is_some_and(|ms| ms > 0));
    assert_eq!(config["last_error"], serde_json::Value::Null);
    assert_eq!(proxy.get("/live").0, 200);
    assert_eq!(proxy.get("/nowhere").0, 404);
}

#[test]
fn missing_file_is_ready_with_no_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.toml");
    let proxy = Proxy::start(dir.path(), &file);
    let (code, body) = proxy.get("/ready");
    assert_eq!(code, 200, "{body}");
    let config = proxy.config();
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
    let proxy = Proxy::start(dir.path(), &file);
    let good_sha = sha256_hex(GOOD.as_bytes());
    proxy.wait_for_sha(&good_sha);

    // (c) a schema-invalid revision: not ready, the reason names file and key, the old
    // config stays in use.
    replace(&file, SCHEMA_INVALID);
    proxy.signal(Signal::SIGHUP);
    let body = proxy.wait_for("/ready", "503 after a bad revision", |code, _| code == 503);
    let file_name = file.to_string_lossy();
    assert!(body.contains(file_name.as_ref()), "{body}");
    assert!(body.contains("control.replicas"), "{body}");
    let config = proxy.config();
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
    proxy.wait_for("/ready", "ready after the fix", |code, _| code == 200);
    let config = proxy.config();
    assert_eq!(config["sha256"], sha256_hex(GOOD_V2.as_bytes()));
    assert_eq!(config["services"], 1);
    assert_eq!(config["last_error"], serde_json::Value::Null);
}

#[test]
fn more_connections_than_the_open_file_limit_is_refused_by_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.toml");
    std::fs::write(&file, GOOD).expect("write");
    let proxy = Proxy::start(dir.path(), &file);
    proxy.wait_for_sha(&sha256_hex(GOOD.as_bytes()));

    replace(&file, TOO_MANY_CONNECTIONS);
    proxy.signal(Signal::SIGHUP);
    let body = proxy.wait_for("/ready", "503 for max_connections", |code, _| code == 503);
    assert!(body.contains("proxy.max_connections"), "{body}");
    assert!(body.contains("4000000000"), "{body}");
    assert!(body.contains(file.to_string_lossy().as_ref()), "{body}");
    assert_eq!(proxy.config()["sha256"], sha256_hex(GOOD.as_bytes()));
}

#[test]
fn a_low_soft_open_file_limit_is_raised_to_fit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.toml");
    // 100 connections need 2 * 100 + 64 = 264 descriptors, above a soft limit of 128.
    std::fs::write(&file, GOOD).expect("write");
    let proxy = Proxy::start_with_soft_nofile(dir.path(), &file, Some(128));
    let (code, body) = proxy.get("/ready");
    assert_eq!(code, 200, "{body}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.child.id()))
        .expect("read the proxy's limits");
    let soft: u64 = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok())
        .unwrap_or_else(|| panic!("no open-file limit in {limits}"));
    assert!(soft >= 264, "soft limit {soft}\n{limits}");
}

#[test]
fn a_refused_config_at_start_still_serves_the_admin_port() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.toml");
    std::fs::write(&file, TOO_MANY_CONNECTIONS).expect("write");
    let proxy = Proxy::start(dir.path(), &file);
    let (code, body) = proxy.get("/ready");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("proxy.max_connections"), "{body}");
    assert_eq!(proxy.config()["sha256"], serde_json::Value::Null);
}

#[test]
fn a_changed_file_is_picked_up_without_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cluster.toml");
    let proxy = Proxy::start(dir.path(), &file);
    assert_eq!(proxy.config()["sha256"], serde_json::Value::Null);

    replace(&file, GOOD);
    proxy.wait_for_sha(&sha256_hex(GOOD.as_bytes()));
    replace(&file, GOOD_V2);
    proxy.wait_for_sha(&sha256_hex(GOOD_V2.as_bytes()));
    assert_eq!(proxy.get("/ready").0, 200);
}

#[test]
fn sigterm_stops_the_proxy_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut proxy = Proxy::start(dir.path(), &dir.path().join("cluster.toml"));
    proxy.signal(Signal::SIGTERM);
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = proxy.child.try_wait().expect("wait for the proxy") {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}\n{}", proxy.log_text());
}

#[test]
fn bad_arguments_exit_2() {
    let output = Command::new(env!("CARGO_BIN_EXE_pimesh-proxy"))
        .args(["--admin-addr", "not-an-address"])
        .output()
        .expect("run pimesh-proxy");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--admin-addr"), "{stderr}");
}
