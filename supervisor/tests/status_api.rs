//! The supervisor binary on the host: reads a seed, serves `/status`, stops on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitStatus;

use nix::sys::signal::Signal;
use pimesh_test_support::http::get_blocking;
use pimesh_test_support::{free_addr, Binary, Daemon};

struct Supervisor {
    daemon: Daemon,
    addr: SocketAddr,
    _scratch: tempfile::TempDir,
}

impl Supervisor {
    fn start(seed: &Path, extra: &[&str]) -> Supervisor {
        let addr = free_addr();
        // Off a node there is no systemd to manage units with: manage none unless a test
        // names its own supervisor configuration.
        let scratch = tempfile::tempdir().expect("tempdir");
        let mut own_config = Vec::new();
        if !extra.contains(&"--supervisor-config") {
            let config = scratch.path().join("supervisor.toml");
            std::fs::write(&config, "unit = []\n").expect("supervisor config");
            own_config = vec!["--supervisor-config".into(), config.into_os_string()];
        }
        // Every folder the supervisor writes under the scratch folder: nothing of a test
        // lands in the host's /etc, /var/lib or /run.
        let folders: Vec<std::ffi::OsString> = [
            ("--etc-dir", "etc/pimesh"),
            ("--state-dir", "var/lib/pimesh"),
            ("--run-dir", "run/pimesh"),
            ("--rancher-etc", "etc/rancher/k3s"),
            ("--rancher-data", "var/lib/rancher/k3s"),
        ]
        .into_iter()
        .filter(|(flag, _)| !extra.contains(flag))
        .flat_map(|(flag, folder)| [flag.into(), scratch.path().join(folder).into_os_string()])
        .collect();
        let mut command = Daemon::command(Binary::Supervisor, "info");
        command
            .arg("--seed")
            .arg(seed)
            .args(["--status-addr", &addr.to_string(), "--no-node-setup"])
            .args(own_config)
            .args(folders)
            .args(extra);
        let log = scratch.path().join("supervisor.log");
        let mut daemon = Daemon::spawn("pimesh-supervisor", command, Some(&log));
        daemon.wait_until_blocking("the status API listening", || {
            TcpStream::connect(addr).is_ok()
        });
        Supervisor {
            daemon,
            addr,
            _scratch: scratch,
        }
    }

    fn scratch(&self) -> &Path {
        self._scratch.path()
    }

    fn get(&self, path: &str) -> (u16, String) {
        get_blocking(self.addr, path)
            .unwrap_or_else(|| panic!("GET {path} failed; log:\n{}", self.daemon.log_text()))
    }

    fn status(&self) -> serde_json::Value {
        let (code, body) = self.get("/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status is JSON")
    }

    /// Sends SIGTERM and returns the exit status and everything logged.
    fn terminate(mut self) -> (ExitStatus, String) {
        self.daemon.signal(Signal::SIGTERM);
        let exit = self.daemon.wait_exit();
        (exit, self.daemon.log_text())
    }
}

#[test]
fn status_reports_the_seed_and_k3s_presence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("pimesh.toml");
    std::fs::write(
        &seed,
        "site = \"fleet-depot-7\"\nrole = \"init\"\nnode = \"pi-a\"\nservers = [\"10.0.0.10\"]\n",
    )
    .expect("seed");
    let k3s = dir.path().join("k3s");
    let manifest = dir.path().join("manifest.json");
    std::fs::write(
        &manifest,
        r#"{"version":"9.9.9","k3s":{"version":"v1.33.5+k3s1"}}"#,
    )
    .expect("manifest");

    // K3s absent: never reported present.
    let supervisor = Supervisor::start(
        &seed,
        &[
            "--k3s-bin",
            k3s.to_str().expect("utf-8"),
            "--manifest",
            manifest.to_str().expect("utf-8"),
        ],
    );
    let status = supervisor.status();
    assert_eq!(status["seed"]["state"], "valid");
    assert_eq!(status["seed"]["summary"]["site"], "fleet-depot-7");
    assert_eq!(status["seed"]["summary"]["role"], "init");
    assert_eq!(status["seed"]["summary"]["servers"][0], "10.0.0.10");
    assert_eq!(status["node"]["name"], "pi-a");
    assert_eq!(status["node"]["name_source"], "seed");
    assert_eq!(status["k3s"]["present"], false);
    assert_eq!(status["image"]["version"], "9.9.9");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    let (code, _) = supervisor.get("/nowhere");
    assert_eq!(code, 404);
    // The same status as metrics: no central server in the seed, so OTA is disabled.
    let (code, metrics) = supervisor.get("/metrics");
    assert_eq!(code, 200, "{metrics}");
    assert!(
        metrics.contains("pimesh_supervisor_ota_state{state=\"disabled\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pimesh_supervisor_ota_state{state=\"idle\"} 0"),
        "{metrics}"
    );
    // (Units and their heals are counted under systemd: tests/nspawn/test_heal.py.)
    assert!(
        metrics.contains("\nprocess_resident_memory_bytes "),
        "{metrics}"
    );
    let (exit, _) = supervisor.terminate();
    assert!(exit.success(), "clean exit on SIGTERM: {exit}");

    // An executable at the K3s path: reported present, with the manifest's version.
    std::fs::write(&k3s, "#!/bin/sh\n").expect("k3s file");
    std::fs::set_permissions(&k3s, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let supervisor = Supervisor::start(
        &seed,
        &[
            "--k3s-bin",
            k3s.to_str().expect("utf-8"),
            "--manifest",
            manifest.to_str().expect("utf-8"),
        ],
    );
    let status = supervisor.status();
    assert_eq!(status["k3s"]["present"], true);
    assert_eq!(status["k3s"]["version"], "v1.33.5+k3s1");
    // The init node is the site's first K3s server: its config is written, and until K3s
    // answers, the status and the probe say it is not ready.
    assert_eq!(status["k3s"]["role"], "server", "{}", status["k3s"]);
    let config = supervisor.scratch().join("etc/rancher/k3s/config.yaml");
    let text = std::fs::read_to_string(&config).expect("config.yaml written");
    assert!(text.contains("cluster-init: true"), "{text}");
    assert!(text.contains("node-name: pi-a"), "{text}");
    let (code, body) = supervisor.get("/k3s/ready");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("k3s.yaml"),
        "names the missing kubeconfig: {body}"
    );
}

#[test]
fn a_broken_seed_is_reported_with_line_and_key_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("pimesh.toml");
    std::fs::write(&seed, "site = \"fleet-depot-7\"\nrole = \"captain\"\n").expect("seed");
    let supervisor = Supervisor::start(&seed, &[]);
    let status = supervisor.status();
    assert_eq!(status["seed"]["state"], "invalid");
    assert_eq!(status["seed"]["error"]["line"], 2);
    assert_eq!(status["seed"]["error"]["key"], "role");
    assert_eq!(
        status["seed"]["error"]["file"],
        seed.to_str().expect("utf-8")
    );
    assert!(status["seed"]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("`init` or `join`")));
    // Still serving after the error.
    assert_eq!(supervisor.status()["seed"]["state"], "invalid");
    let (exit, logs) = supervisor.terminate();
    assert!(exit.success(), "{exit}");
    let location = format!("{}:2:8: key `role`", seed.display());
    assert!(
        logs.contains(&location),
        "the log names file, line and key: {logs}"
    );
}

#[test]
fn an_unedited_template_is_unconfigured() {
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/pimesh.toml");
    let supervisor = Supervisor::start(&template, &[]);
    let status = supervisor.status();
    assert_eq!(status["seed"]["state"], "unconfigured");
    assert!(status["node"]["name"]
        .as_str()
        .is_some_and(|n| n.starts_with("pimesh")));
}

#[test]
fn a_broken_supervisor_config_is_reported_and_the_defaults_are_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("pimesh.toml");
    std::fs::write(&seed, "site = \"fleet-depot-7\"\nrole = \"init\"\n").expect("seed");
    let config = dir.path().join("supervisor.toml");
    std::fs::write(&config, "[heal]\nprobe_intervall_ms = 5\n").expect("config");
    let supervisor = Supervisor::start(
        &seed,
        &["--supervisor-config", config.to_str().expect("utf-8")],
    );
    let status = supervisor.status();
    assert_eq!(status["supervisor_config"]["source"], "defaults");
    assert_eq!(status["supervisor_config"]["error"]["line"], 2);
    assert!(status["config_errors"][0]
        .as_str()
        .is_some_and(|e| e.contains("probe_intervall_ms") && e.contains(":2:")));
    // The default units are what the supervisor keeps (or tries to, without systemd).
    let units: Vec<_> = status["units"]
        .as_array()
        .expect("units")
        .iter()
        .map(|u| u["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(units.len(), 4, "{units:?}");
    assert_eq!(units[0], "pimesh-proxy.service");
    assert!(status["units"][0]["desired_state"] == "running");
    let (exit, logs) = supervisor.terminate();
    assert!(exit.success(), "{exit}");
    assert!(logs.contains("probe_intervall_ms"), "{logs}");
}
