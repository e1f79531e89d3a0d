//! The replica binary on the host: serves /live and /ready on 8085+N, stops on SIGTERM.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

#[test]
fn a_replica_serves_its_health_endpoints_and_stops_on_sigterm() {
    let replica = 59;
    let port = 8085 + replica;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pimesh-control"))
        .args(["--replica", &replica.to_string()])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stderr(Stdio::null())
        .spawn()
        .expect("start pimesh-control");
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        if let Some(response) = get(port, "/ready") {
            break response;
        }
        assert!(Instant::now() < deadline, "no answer on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let live = get(port, "/live").expect("live");
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "{exit}");
}

#[test]
fn a_missing_replica_number_is_a_usage_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_pimesh-control"))
        .output()
        .expect("run pimesh-control");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--replica is required"));
}
