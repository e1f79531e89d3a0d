//! The replica binary's life: health endpoints on its one port, not ready (with the
//! reason) until its trust folder is there, ready after SIGHUP, stops on SIGTERM.

use nix::sys::signal::Signal;
use pimesh_test_support::control::Replica;
use pimesh_test_support::http::plain_get;
use pimesh_test_support::{path_str, temp_dir, Binary, Site};

#[test]
fn a_replica_without_its_trust_folder_is_live_not_ready_until_provisioned() {
    let (_dir, dir) = temp_dir();
    let trust = dir.join("trust");
    let config = dir.join("cluster.toml");
    std::fs::write(
        &config,
        "site = \"depot-7\"\n[services.web]\nport = 8080\nnodes = [\"pi-a\"]\n",
    )
    .expect("config");
    let mut replica = Replica::start(&[
        "--trust-dir",
        &path_str(&trust),
        "--config",
        &path_str(&config),
    ]);
    assert_eq!(plain_get(replica.port, "/live").map(|r| r.0), Some(200));
    let (status, body) = plain_get(replica.port, "/ready").expect("ready answers");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("anchor.pem"),
        "the reason names the file: {body}"
    );

    Site::new("depot-7").write_trust(&trust);
    replica.signal(Signal::SIGHUP);
    replica.wait_ready();

    replica.signal(Signal::SIGTERM);
    let exit = replica.wait_exit();
    assert!(exit.success(), "{exit}");
}

#[test]
fn a_config_of_another_site_than_site_flag_is_not_ready() {
    let (_dir, dir) = temp_dir();
    let trust = dir.join("trust");
    Site::new("depot-7").write_trust(&trust);
    let config = dir.join("cluster.toml");
    std::fs::write(&config, "site = \"depot-8\"\n").expect("config");
    let replica = Replica::start(&[
        "--trust-dir",
        &path_str(&trust),
        "--config",
        &path_str(&config),
        "--site",
        "depot-7",
    ]);
    let (status, body) = plain_get(replica.port, "/ready").expect("ready answers");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("depot-8"), "{body}");
}

#[test]
fn a_missing_replica_number_is_a_usage_error() {
    let output = Binary::Control
        .command()
        .output()
        .expect("run pimesh-control");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--replica is required"));
}
