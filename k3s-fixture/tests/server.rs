//! One fixture server: its token, kubeconfig, `/readyz` and Node list, its restart and
//! stop, against the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::{anonymous_client, kube_client, port, server_args, strs, NodeDir};
use nix::sys::signal::Signal;

const UNAUTHORIZED: &str = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn a_server_writes_its_kubeconfig_and_token_and_lists_itself_ready() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeDir::new(dir.path(), "srv-one");
    let port = port();
    let args = server_args(&node, port);
    let mut server = node.spawn("server", &strs(&args));
    let kubeconfig = node.kubeconfig();
    server
        .wait_until("the server lists itself Ready", || async {
            common::find_node(&kubeconfig, "srv-one")
                .await
                .is_some_and(|n| common::node_ready(&n))
        })
        .await;
    assert_eq!(mode(&kubeconfig), 0o600);

    let (client, url) = kube_client(&kubeconfig).unwrap();
    assert_eq!(url, format!("https://127.0.0.1:{port}"));
    assert_eq!(
        common::get(&client, &format!("{url}/readyz")).await,
        Some((200, "ok".to_owned()))
    );
    let ca_path = node.data_dir().join("server/tls/server-ca.crt");
    let ca = std::fs::read(&ca_path).unwrap();
    let anonymous = anonymous_client(&ca);
    assert_eq!(
        common::get(&anonymous, &format!("{url}/readyz")).await,
        Some((401, UNAUTHORIZED.to_owned()))
    );
    assert_eq!(
        common::get(&anonymous, &format!("{url}/ping")).await,
        Some((200, "pong".to_owned()))
    );
    let (status, cacerts) = common::get(&anonymous, &format!("{url}/cacerts"))
        .await
        .unwrap();
    assert_eq!((status, cacerts.as_bytes()), (200, ca.as_slice()));
    let wrong = anonymous
        .get(format!("{url}/api/v1/nodes"))
        .basic_auth("node", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);

    let srv = common::find_node(&kubeconfig, "srv-one").await.unwrap();
    let labels = &srv["metadata"]["labels"];
    assert_eq!(labels["node-role.kubernetes.io/control-plane"], "true");
    assert_eq!(labels["node-role.kubernetes.io/master"], "true");
    assert!(
        labels["node-role.kubernetes.io/etcd"].is_null(),
        "no etcd without cluster-init"
    );
    assert_eq!(srv["status"]["addresses"][0]["type"], "InternalIP");
    assert_eq!(srv["status"]["addresses"][0]["address"], "127.0.0.1");
    assert_eq!(srv["status"]["nodeInfo"]["kubeletVersion"], "v1.34.3+k3s1");
    let (status, missing) = common::get(&client, &format!("{url}/api/v1/nodes/nobody"))
        .await
        .unwrap();
    assert_eq!(status, 404);
    assert!(missing.contains(r#""reason":"NotFound""#), "{missing}");

    let token_path = node.data_dir().join("server/token");
    assert_eq!(mode(&token_path), 0o600);
    let token = std::fs::read_to_string(&token_path).unwrap();
    let token = token.trim();
    let digest = sha256_hex(&ca);
    let (hash, credentials) = token.strip_prefix("K10").unwrap().split_once("::").unwrap();
    assert_eq!(hash, digest, "the token's hash is the CA file's SHA-256");
    let password = credentials.strip_prefix("server:").unwrap();
    assert!(!password.is_empty());
    let with_token = anonymous
        .get(format!("{url}/readyz"))
        .basic_auth("server", Some(password))
        .send()
        .await
        .unwrap();
    assert_eq!(with_token.status().as_u16(), 200);

    // SIGTERM stops it at once with status 0; a restart keeps the CA and the token.
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit().code(), Some(0), "{}", server.log_text());
    let mut server = node.spawn("server", &strs(&args));
    server
        .wait_until("the restarted server answers", || async {
            let Some((client, url)) = kube_client(&kubeconfig) else {
                return false;
            };
            common::get(&client, &format!("{url}/readyz")).await == Some((200, "ok".to_owned()))
        })
        .await;
    assert_eq!(std::fs::read(&ca_path).unwrap(), ca);
    assert_eq!(std::fs::read_to_string(&token_path).unwrap().trim(), token);
    drop(server);

    // A full token whose hash is not this CA's is refused with K3s's message.
    let mut args = args.clone();
    args.extend([
        "--token".to_owned(),
        format!("K10{}::server:{password}", "0".repeat(64)),
    ]);
    let mut server = node.spawn("server", &strs(&args));
    assert_eq!(server.wait_exit().code(), Some(1));
    assert!(
        server
            .log_text()
            .contains("token CA hash does not match the Cluster CA certificate hash"),
        "{}",
        server.log_text()
    );
}

#[tokio::test]
async fn the_kubeconfig_mode_comes_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeDir::new(dir.path(), "srv-mode");
    node.write_config(
        None,
        "write-kubeconfig-mode: \"0644\"\ncluster-init: true\n",
    );
    let args = server_args(&node, port());
    let mut server = node.spawn("server", &strs(&args));
    let kubeconfig = node.kubeconfig();
    server
        .wait_until("the server lists itself Ready", || async {
            common::find_node(&kubeconfig, "srv-mode")
                .await
                .is_some_and(|n| common::node_ready(&n))
        })
        .await;
    assert_eq!(mode(&kubeconfig), 0o644);
    let srv = common::find_node(&kubeconfig, "srv-mode").await.unwrap();
    assert_eq!(
        srv["metadata"]["labels"]["node-role.kubernetes.io/etcd"], "true",
        "cluster-init means embedded etcd"
    );
    let (client, url) = kube_client(&kubeconfig).unwrap();
    assert_eq!(
        common::get(&client, &format!("{url}/readyz")).await,
        Some((200, "ok".to_owned())),
        "a cluster of one server has quorum"
    );
}

/// SHA-256 as lowercase hex.
fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Receives one datagram on `socket`, waiting at most the test deadline.
fn receive(socket: &std::os::unix::net::UnixDatagram) -> String {
    socket
        .set_read_timeout(Some(pimesh_test_support::wait::DEADLINE))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn a_server_and_an_agent_notify_systemd_when_ready() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = NodeDir::new(dir.path(), "srv-notify");
    let server_socket_path = dir.path().join("server-notify.sock");
    let server_socket = std::os::unix::net::UnixDatagram::bind(&server_socket_path).unwrap();
    let port = port();
    let args = server_args(&server_dir, port);
    let mut command = server_dir.command("server", &strs(&args));
    command.env("NOTIFY_SOCKET", &server_socket_path);
    let _server =
        pimesh_test_support::Daemon::spawn("srv-notify", command, Some(&server_dir.log()));
    let message = receive(&server_socket);
    assert!(message.contains("READY=1"), "{message}");
    // Ready means listening with the kubeconfig written.
    let (client, url) = kube_client(&server_dir.kubeconfig()).unwrap();
    assert_eq!(
        common::get(&client, &format!("{url}/readyz")).await,
        Some((200, "ok".to_owned()))
    );

    let agent_dir = NodeDir::new(dir.path(), "agent-notify");
    let agent_socket_path = dir.path().join("agent-notify.sock");
    let agent_socket = std::os::unix::net::UnixDatagram::bind(&agent_socket_path).unwrap();
    let token = std::fs::read_to_string(server_dir.data_dir().join("server/token")).unwrap();
    let lb_port = common::port().to_string();
    let server_url = format!("https://127.0.0.1:{port}");
    let mut command = agent_dir.command(
        "agent",
        &[
            "--server",
            &server_url,
            "--token",
            token.trim(),
            "--node-name",
            "agent-notify",
            "--lb-server-port",
            &lb_port,
        ],
    );
    command.env("NOTIFY_SOCKET", &agent_socket_path);
    let _agent =
        pimesh_test_support::Daemon::spawn("agent-notify", command, Some(&agent_dir.log()));
    let message = receive(&agent_socket);
    assert!(message.contains("READY=1"), "{message}");
    // Ready means registered.
    let agent = common::find_node(&server_dir.kubeconfig(), "agent-notify")
        .await
        .expect("the agent's node is registered");
    assert!(common::node_ready(&agent), "{agent}");
    assert!(
        agent["metadata"]["labels"]["node-role.kubernetes.io/control-plane"].is_null(),
        "{agent}"
    );
    let password = std::fs::read_to_string(agent_dir.data_dir().join("node-password")).unwrap();
    assert!(!password.trim().is_empty());
    assert!(
        !agent.to_string().contains(password.trim()),
        "the node password is never shown"
    );

    // Another node with the agent's name and another password is refused (K3s's node
    // password check).
    let mut impostor = agent.clone();
    impostor["metadata"]["annotations"]["k3s.io/node-password"] = "not-the-password".into();
    let refused = client
        .post(format!("{url}/api/v1/nodes"))
        .header("Content-Type", "application/json")
        .body(impostor.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    let body = refused.text().await.unwrap();
    assert!(body.contains("Node password rejected"), "{body}");
}
