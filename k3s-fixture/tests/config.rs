//! The fixture's command line and config file: unknown keys and flags, drop-ins, YAML
//! errors and `--version`, each against the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{kube_client, port, server_args, strs, NodeDir};

#[test]
fn version_names_the_fixture() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_k3s-fixture"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "k3s version v1.34.3+k3s1 (pimesh fixture, not K3s)"
    );
}

#[tokio::test]
async fn a_server_warns_about_an_unknown_config_key_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeDir::new(dir.path(), "srv-warn");
    node.write_config(None, "no-such-key: 1\ndisable: [traefik]\n");
    let args = server_args(&node, port());
    let mut server = node.spawn("server", &strs(&args));
    let kubeconfig = node.kubeconfig();
    server
        .wait_until("the server answers /readyz", || async {
            let Some((client, url)) = kube_client(&kubeconfig) else {
                return false;
            };
            common::get(&client, &format!("{url}/readyz")).await == Some((200, "ok".to_owned()))
        })
        .await;
    let log = server.log_text();
    assert!(
        log.contains(
            "level=warning msg=\"Unknown flag --no-such-key found in config.yaml, skipping\""
        ),
        "{log}"
    );
    assert!(!log.contains("Unknown flag --disable"), "{log}");
}

#[test]
fn an_agent_exits_on_an_unknown_config_key() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeDir::new(dir.path(), "agent-bad-key");
    node.write_config(
        None,
        "server: https://127.0.0.1:1\ntoken: secret\ndisable:\n- traefik\n",
    );
    let mut agent = node.spawn("agent", &[]);
    let status = agent.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", agent.log_text());
    let log = agent.log_text();
    assert!(
        log.contains("level=fatal") && log.contains("flag provided but not defined: -disable"),
        "{log}"
    );
}

#[test]
fn an_unknown_command_line_flag_is_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeDir::new(dir.path(), "bad-flag");
    let mut server = node.spawn("server", &["--no-such-flag=1"]);
    assert_eq!(server.wait_exit().code(), Some(1));
    assert!(
        server
            .log_text()
            .contains("flag provided but not defined: -no-such-flag"),
        "{}",
        server.log_text()
    );
    // A server-only flag is unknown to the agent.
    let agent_dir = NodeDir::new(dir.path(), "bad-agent-flag");
    let mut agent = agent_dir.spawn("agent", &["--cluster-init"]);
    assert_eq!(agent.wait_exit().code(), Some(1));
    assert!(
        agent
            .log_text()
            .contains("flag provided but not defined: -cluster-init"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn an_agent_needs_a_server_and_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeDir::new(dir.path(), "agent-alone");
    let mut agent = node.spawn("agent", &["--token", "x"]);
    assert_eq!(agent.wait_exit().code(), Some(1));
    assert!(
        agent.log_text().contains("--server is required"),
        "{}",
        agent.log_text()
    );
    let mut agent = node.spawn("agent", &["--server", "https://127.0.0.1:1"]);
    assert_eq!(agent.wait_exit().code(), Some(1));
    assert!(
        agent.log_text().contains("--token is required"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn a_yaml_error_is_fatal_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeDir::new(dir.path(), "bad-yaml");
    node.write_config(Some("50-broken.yaml"), "node-label: [unclosed\n");
    let mut server = node.spawn("server", &[]);
    assert_eq!(server.wait_exit().code(), Some(1));
    let log = server.log_text();
    assert!(
        log.contains("level=fatal") && log.contains("50-broken.yaml"),
        "{log}"
    );
}

#[tokio::test]
async fn drop_ins_override_and_append() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeDir::new(dir.path(), "srv-dropins");
    let port = port();
    node.write_config(
        None,
        &format!(
            "node-name: from-main\nnode-label:\n- pimesh.test/a=1\nnode-ip: 127.0.0.1\n\
             bind-address: 127.0.0.1\nhttps-listen-port: {port}\nwrite-kubeconfig: {}\n",
            node.kubeconfig().display()
        ),
    );
    node.write_config(
        Some("10-first.yaml"),
        "node-name: from-drop-in\nnode-label+:\n- pimesh.test/b=2\n",
    );
    node.write_config(Some("20-second.yml"), "node-label+: pimesh.test/c=3\n");
    node.write_config(Some("30-ignored.txt"), "node-name: not-read\n");
    let mut server = node.spawn("server", &[]);
    let kubeconfig = node.kubeconfig();
    server
        .wait_until("the node named by the drop-in is listed", || async {
            common::find_node(&kubeconfig, "from-drop-in")
                .await
                .is_some()
        })
        .await;
    let node_object = common::find_node(&kubeconfig, "from-drop-in")
        .await
        .unwrap();
    let labels = &node_object["metadata"]["labels"];
    assert_eq!(labels["pimesh.test/a"], "1", "{labels}");
    assert_eq!(labels["pimesh.test/b"], "2", "{labels}");
    assert_eq!(labels["pimesh.test/c"], "3", "{labels}");
    // Command-line values replace the config file's list.
    drop(server);
    let mut server = node.spawn("server", &["--node-label", "pimesh.test/cli=yes"]);
    server
        .wait_until(
            "the node is listed with the command line's label",
            || async {
                common::find_node(&kubeconfig, "from-drop-in")
                    .await
                    .is_some_and(|n| n["metadata"]["labels"]["pimesh.test/cli"] == "yes")
            },
        )
        .await;
    let node_object = common::find_node(&kubeconfig, "from-drop-in")
        .await
        .unwrap();
    assert!(
        node_object["metadata"]["labels"]["pimesh.test/a"].is_null(),
        "{node_object}"
    );
}
