//! pimeshctl against a real central server: publish signed revisions, read the fleet.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{pimeshctl, text};

/// The central server binary of this workspace, built when missing.
fn central_binary() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "pimesh-central"])
        .status()
        .expect("cargo build");
    assert!(status.success(), "cannot build pimesh-central");
    let exe = std::env::current_exe().expect("test path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    profile_dir.join("pimesh-central")
}

struct Central(Child);

impl Drop for Central {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn publish_signs_and_uploads_and_status_shows_the_fleet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site_dir = dir.path().join("depot-7");
    let init = pimeshctl(&[
        "site",
        "init",
        "depot-7",
        "--out",
        site_dir.to_str().expect("utf-8"),
    ]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    let public_key = text(&init.stdout)
        .lines()
        .find_map(|l| {
            l.split("public_key = \"")
                .nth(1)
                .map(|k| k.trim_end_matches('"').to_owned())
        })
        .expect("public key printed");

    let server = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let ca = dir.path().join("server.pem");
    std::fs::write(&ca, server.cert.pem()).expect("cert");
    std::fs::write(
        dir.path().join("server.key"),
        server.signing_key.serialize_pem(),
    )
    .expect("key");
    let addr = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let config = dir.path().join("central.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{addr}\"\nstate_dir = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n[[sites]]\nname = \"depot-7\"\nanchor = \"{}\"\npublic_key = \"{public_key}\"\n",
            dir.path().join("state").display(),
            ca.display(),
            dir.path().join("server.key").display(),
            site_dir.join("anchor.pem").display(),
        ),
    )
    .expect("config");
    let _central = Central(
        Command::new(central_binary())
            .arg("--config")
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .stderr(Stdio::null())
            .spawn()
            .expect("start central"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "central did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }

    let central = format!("https://localhost:{}", addr.port());
    let cluster = dir.path().join("cluster.toml");
    let common = |extra: &[&str]| -> Output {
        let mut args = vec![
            "config",
            "publish",
            cluster.to_str().expect("utf-8"),
            "--site-dir",
            site_dir.to_str().expect("utf-8"),
            "--central",
            &central,
            "--central-ca",
            ca.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_pimeshctl"))
            .args(&args)
            .output()
            .expect("publish")
    };
    // `localhost` must resolve to the test server: it does on every Debian machine.
    std::fs::write(
        &cluster,
        "site = \"depot-7\"\n[services.web]\nport = 8080\nnodes = [\"pi-a\"]\n",
    )
    .expect("cluster");
    let first = common(&[]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(text(&first.stdout).contains("published revision 1 of site depot-7"));
    std::fs::write(
        &cluster,
        "site = \"depot-7\"\n[services.web]\nport = 8081\nnodes = [\"pi-a\"]\n",
    )
    .expect("cluster");
    let second = common(&[]);
    assert!(
        text(&second.stdout).contains("published revision 2"),
        "{}",
        text(&second.stderr)
    );

    let replay = common(&["--revision", "1"]);
    assert!(!replay.status.success());
    assert!(
        text(&replay.stderr).contains("not newer"),
        "{}",
        text(&replay.stderr)
    );
    std::fs::write(
        &cluster,
        "site = \"depot-7\"\n[services.web]\nnodes = [\"pi-a\"]\n",
    )
    .expect("cluster");
    let invalid = common(&[]);
    assert!(!invalid.status.success());
    assert!(
        text(&invalid.stderr).contains(&format!("{}:3:", cluster.display())),
        "{}",
        text(&invalid.stderr)
    );

    let status = pimeshctl(&[
        "status",
        "--central",
        &central,
        "--central-ca",
        ca.to_str().expect("utf-8"),
    ]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert!(
        text(&status.stdout).contains("site depot-7: newest revision 2"),
        "{}",
        text(&status.stdout)
    );
}
