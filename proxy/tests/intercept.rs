//! Transparent interception: in a network namespace this test makes (it runs as root,
//! as `make test` does), iptables `REDIRECT`s an app's connection to a service address to
//! the proxy's outbound port; the proxy reads `SO_ORIGINAL_DST` and sends the request
//! through the mesh as if the app had used the proxy port. The app is not changed: it
//! dials the service's address and port.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::process::Command;

use pimesh_test_support::backends::{tcp_echo, Backend};
use pimesh_test_support::http::get_text;
use pimesh_test_support::proxy::mesh;
use pimesh_test_support::{Site, DEADLINE};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

#[test]
fn redirected_connections_are_routed_by_their_original_destination() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test makes a network namespace and iptables rules: run it as root"
    );
    // The namespace belongs to this thread; the proxies and tools it starts inherit it.
    let worker = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare the netns");
        run("ip", &["link", "set", "lo", "up"]);
        // The service address: on loopback, as no module for a dummy link may be loadable.
        run("ip", &["addr", "add", "10.77.0.2/32", "dev", "lo"]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(scenario());
    });
    if let Err(panic) = worker.join() {
        std::panic::resume_unwind(panic);
    }
}

async fn scenario() {
    let site = Site::new("depot");
    // The app on node b listens where the service's port says; the client below dials
    // the service address 10.77.0.2 on that port, where nothing listens.
    let web = Backend::start_on("web", 8080).await;
    let (echo, _echo_task) = tcp_echo().await;
    let m = mesh(
        &site,
        &format!(
            "[services.web]\nport = 8080\nnodes = [\"b\"]\n\
             [services.queue]\nport = {echo}\nnodes = [\"b\"]\nprotocol = \"tcp\"\n"
        ),
    )
    .await;
    let a = &m.a;
    let to = a.outbound.port().to_string();
    for port in ["8080", &echo.to_string()] {
        run(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                "10.77.0.2",
                "--dport",
                port,
                "-j",
                "REDIRECT",
                "--to-ports",
                &to,
            ],
        );
    }

    // HTTP: the app dials 10.77.0.2:8080 and gets the web app on node b.
    let (status, body) = get_text(([10, 77, 0, 2], 8080).into(), "/intercepted")
        .await
        .expect("the intercepted request is answered");
    assert_eq!((status, body.as_str()), (200, "web\n"));
    let seen = web.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/intercepted");
    assert_eq!(
        a.metric("request_total{direction=\"outbound\",dst_service=\"web\",namespace=\"depot\",tls=\"true\"}")
            .await,
        1.0,
        "it went through the mesh"
    );

    // Opaque TCP: the app dials 10.77.0.2:<queue port> and talks to the echo on node b.
    let mut stream = tokio::net::TcpStream::connect(("10.77.0.2", echo))
        .await
        .expect("connect");
    stream
        .write_all(b"through the tunnel")
        .await
        .expect("write");
    let mut buf = [0u8; 18];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&buf, b"through the tunnel");
}
