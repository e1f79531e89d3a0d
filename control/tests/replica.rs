//! The replica binary's life: health endpoints on its one port, not ready (with the
//! reason) until its trust folder is there, ready after SIGHUP, stops on SIGTERM; one
//! host cannot take the replica port's connections from the others.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

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

#[test]
fn one_host_holds_at_most_its_share_of_the_replica_port() {
    let (_dir, dir) = temp_dir();
    let replica = Replica::of_site(&dir, &Site::new("depot-7"), None);
    let before = replica.daemon.open_descriptors();
    // Silent connections from one host (no first byte): the replica keeps 64 of them
    // open until their first-byte timeout and closes the rest at once.
    let silent: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(replica.addr).expect("connect"))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Another host (127.0.0.2) is answered meanwhile.
    let answer = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, 2], 0)))
            .expect("bind the other host");
        let mut stream = socket.connect(replica.addr).await.expect("connect");
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        stream
            .write_all(b"GET /live HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    });
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let held = replica.daemon.open_descriptors();
    assert!(
        held <= before + 64 + 8,
        "{held} descriptors open with 300 silent connections of one host, {before} before"
    );
    drop(silent);
}
