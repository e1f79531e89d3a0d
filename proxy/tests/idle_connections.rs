//! What an idle client connection costs the proxy. Apps keep HTTP/1.1 connections to their
//! local proxy open between requests (connection pools) and hold TCP connections open to
//! queues and databases, so a node's proxy holds hundreds of idle connections; each must
//! cost a few KiB of memory, not the buffers a busy one works with (two of 8 KiB for HTTP/1,
//! released while a connection waits by the patched hyper in `third_party/hyper`; none
//! for a tunnel, whose copy borrows a per-thread buffer).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use pimesh_test_support::backends::{tcp_echo, Backend};
use pimesh_test_support::http::raw_get;
use pimesh_test_support::proxy::{mesh, mesh_with};
use pimesh_test_support::{free_port, wait_until, Site};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Idle connections held open through proxy A.
const IDLE_CONNECTIONS: usize = 300;
/// The most an idle connection may add to the proxy's anonymous memory. With hyper's
/// buffers held, or copy buffers (8 KiB each way), a connection costs 16 KiB or more.
const MAX_KIB_PER_CONNECTION: u64 = 12;

/// The proxy's resident anonymous memory (heap and stacks, not the mapped binary), KiB.
fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/PID/status")
}

/// Waits until proxy a's anonymous memory is at most `before` plus
/// [`MAX_KIB_PER_CONNECTION`] for each of the [`IDLE_CONNECTIONS`] `what` (the memory the
/// first exchanges used is given back within a trim interval).
async fn wait_for_cost(pid: u32, before: u64, what: &str) {
    let limit = before + MAX_KIB_PER_CONNECTION * IDLE_CONNECTIONS as u64;
    let measured = std::cell::Cell::new(0);
    wait_until(
        &format!(
            "proxy a's anonymous memory with {IDLE_CONNECTIONS} idle {what} at most \
             {limit} KiB ({before} KiB before them, {MAX_KIB_PER_CONNECTION} KiB each; \
             the last measured values are printed above)"
        ),
        || {
            let now = rss_anon_kib(pid);
            if now > limit && now != measured.get() {
                eprintln!("proxy a: {now} KiB of anonymous memory, above {limit} KiB");
            }
            measured.set(now);
            async move { now <= limit }
        },
    )
    .await;
    eprintln!(
        "{IDLE_CONNECTIONS} idle {what}: {before} KiB -> {} KiB of anonymous memory",
        measured.get()
    );
}

/// Sends one keep-alive GET on `stream` and reads its whole response; returns the status
/// line.
async fn get(stream: &mut TcpStream, host: &str) -> String {
    let (head, _) = raw_get(stream, host, "keep-alive")
        .await
        .unwrap_or_else(|err| panic!("keep-alive GET through the proxy: {err}"));
    head.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn an_idle_keep_alive_connection_costs_a_few_kib() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let local = free_port();
    // Idle connections are closed at the header timeout; this test holds them longer.
    let m = mesh_with(
        &site,
        "header_timeout = \"10m\"",
        &format!(
            "[services.web]\nport = {}\nnodes = [\"b\"]\nlocal_port = {local}\n",
            web.port
        ),
    )
    .await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], local));
    let host = format!("127.0.0.1:{local}");
    let pid = m.a.daemon.pid();

    // Warm up: the pooled connection to b, the route table, the allocator's first arenas.
    for _ in 0..20 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        assert!(get(&mut stream, &host).await.contains(" 200 "));
    }
    let before = rss_anon_kib(pid);

    let mut held = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let status = get(&mut stream, &host).await;
        assert!(status.contains(" 200 "), "answered {status:?}");
        held.push(stream);
    }

    wait_for_cost(pid, before, "keep-alive connections").await;

    // Idle connections still serve their next request.
    for stream in held.iter_mut().step_by(30) {
        let status = get(stream, &host).await;
        assert!(status.contains(" 200 "), "answered {status:?} after idling");
    }
}

#[tokio::test]
async fn an_idle_tunnel_costs_a_few_kib() {
    let site = Site::new("depot");
    let (echo_port, _echo) = tcp_echo().await;
    let local = free_port();
    let m = mesh(
        &site,
        &format!(
            "[services.queue]\nport = {echo_port}\nnodes = [\"b\"]\nprotocol = \"tcp\"\n\
             local_port = {local}\n"
        ),
    )
    .await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], local));
    let pid = m.a.daemon.pid();

    // Each tunnel carries a ping to the echo service and its answer, then waits.
    async fn ping(stream: &mut TcpStream) {
        stream.write_all(b"ping").await.expect("write");
        let mut answer = [0u8; 4];
        stream
            .read_exact(&mut answer)
            .await
            .expect("the echo through the tunnel");
        assert_eq!(&answer, b"ping");
    }
    for _ in 0..20 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        ping(&mut stream).await;
    }
    let before = rss_anon_kib(pid);

    let mut held = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        ping(&mut stream).await;
        held.push(stream);
    }
    wait_for_cost(pid, before, "tunnels").await;

    // Idle tunnels still carry bytes.
    for stream in held.iter_mut().step_by(30) {
        ping(stream).await;
    }
}
