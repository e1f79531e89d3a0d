//! Three fixture servers (the first with cluster-init, two joining with `--server`) and
//! one agent on 127.0.0.1, each with its own ports, data folder and node name: every
//! server lists all four nodes Ready, the agent's kubelet kubeconfig works through its
//! load balancer, and with two servers killed the third loses quorum.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{kube_client, port, server_args, strs, NodeDir};
use pimesh_test_support::Daemon;

const NODES: [&str; 4] = ["srv-1", "srv-2", "srv-3", "agent-1"];

/// Waits until `done` holds, at most `limit`, naming `what` and showing the logs if not.
async fn wait_for<F, Fut>(what: &str, limit: Duration, daemons: &mut [&mut Daemon], mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        for daemon in daemons.iter_mut() {
            if let Some(status) = daemon.exited() {
                panic!(
                    "{} exited ({status}) before {what}; log:\n{}",
                    daemon.name(),
                    daemon.log_text()
                );
            }
        }
        if tokio::time::Instant::now() > deadline {
            let logs: Vec<String> = daemons
                .iter()
                .map(|d| format!("--- {}:\n{}", d.name(), d.log_text()))
                .collect();
            panic!("not in time ({limit:?}): {what}\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn three_servers_and_an_agent_form_a_cluster_and_lose_quorum() {
    let dir = tempfile::tempdir().unwrap();
    let dirs: Vec<NodeDir> = NODES.iter().map(|n| NodeDir::new(dir.path(), n)).collect();
    let ports: Vec<u16> = (0..3).map(|_| port()).collect();
    let lb_port = port();
    let token = "pimesh-fixture-test-token";
    let first_url = format!("https://127.0.0.1:{}", ports[0]);

    let mut args = server_args(&dirs[0], ports[0]);
    args.extend([
        "--cluster-init".to_owned(),
        "--token".to_owned(),
        token.to_owned(),
    ]);
    let mut srv1 = dirs[0].spawn("server", &strs(&args));
    let mut joined = Vec::new();
    for i in 1..3 {
        let mut args = server_args(&dirs[i], ports[i]);
        args.extend([
            "--server".to_owned(),
            first_url.clone(),
            "--token".to_owned(),
            token.to_owned(),
        ]);
        joined.push(dirs[i].spawn("server", &strs(&args)));
    }
    let mut srv3 = joined.pop().unwrap();
    let mut srv2 = joined.pop().unwrap();

    // The agent joins with the full token the first server wrote.
    let token_path = dirs[0].data_dir().join("server/token");
    wait_for(
        "the first server writes its token",
        Duration::from_secs(30),
        &mut [&mut srv1],
        || async { token_path.exists() },
    )
    .await;
    let full_token = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_owned();
    let agent_args = [
        "--server",
        &first_url,
        "--token",
        &full_token,
        "--node-name",
        "agent-1",
        "--node-ip",
        "127.0.0.1",
        "--lb-server-port",
        &lb_port.to_string(),
    ]
    .map(str::to_owned);
    let mut agent = dirs[3].spawn("agent", &strs(&agent_args));

    let kubeconfigs: Vec<_> = dirs[..3].iter().map(NodeDir::kubeconfig).collect();
    wait_for(
        "every server lists all four nodes Ready",
        Duration::from_secs(60),
        &mut [&mut srv1, &mut srv2, &mut srv3, &mut agent],
        || async {
            for kubeconfig in &kubeconfigs {
                let Some(list) = common::nodes(kubeconfig).await else {
                    return false;
                };
                if !NODES.iter().all(|n| common::ready_in(&list, n)) {
                    return false;
                }
            }
            true
        },
    )
    .await;

    // The agent's load balancer learns every server (as K3s, it keeps them in a file).
    let lb_file = dirs[3]
        .data_dir()
        .join("agent/etc/k3s-agent-load-balancer.json");
    let expected: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    wait_for(
        "the agent's load balancer knows the three servers",
        Duration::from_secs(30),
        &mut [&mut srv1, &mut srv2, &mut srv3, &mut agent],
        || async {
            let Ok(bytes) = std::fs::read(&lb_file) else {
                return false;
            };
            let kept: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            expected.iter().all(|e| {
                kept["ServerAddresses"]
                    .as_array()
                    .is_some_and(|a| a.contains(&e.as_str().into()))
            })
        },
    )
    .await;

    // The servers share the first one's CA: one token, and the admin credentials of one
    // are good at another (as the supervisor's quorum check uses them).
    for d in &dirs[1..3] {
        let other = std::fs::read_to_string(d.data_dir().join("server/token")).unwrap();
        assert_eq!(other.trim(), full_token);
    }
    let (admin1, _) = kube_client(&kubeconfigs[0]).unwrap();
    assert_eq!(
        common::get(&admin1, &format!("https://127.0.0.1:{}/readyz", ports[1])).await,
        Some((200, "ok".to_owned()))
    );
    let list = common::nodes(&kubeconfigs[2]).await.unwrap();
    for item in list["items"].as_array().unwrap() {
        let name = item["metadata"]["name"].as_str().unwrap();
        let labels = &item["metadata"]["labels"];
        let server = name.starts_with("srv-");
        assert_eq!(
            labels["node-role.kubernetes.io/control-plane"].as_str() == Some("true"),
            server,
            "{name}"
        );
        assert_eq!(
            labels["node-role.kubernetes.io/etcd"].as_str() == Some("true"),
            server,
            "{name}"
        );
    }

    // The agent's kubelet kubeconfig: files under <data-dir>/agent, the local load
    // balancer as server, its own Node and /readyz through it.
    let kubelet = dirs[3].kubelet_kubeconfig();
    let text = std::fs::read_to_string(&kubelet).unwrap();
    let agent_dir = dirs[3].data_dir().join("agent");
    for file in ["server-ca.crt", "client-kubelet.crt", "client-kubelet.key"] {
        assert!(
            text.contains(&agent_dir.join(file).display().to_string()),
            "{file}: {text}"
        );
    }
    let (kubelet_client, lb_url) = kube_client(&kubelet).unwrap();
    assert_eq!(lb_url, format!("https://127.0.0.1:{lb_port}"));
    let (status, body) = common::get(&kubelet_client, &format!("{lb_url}/api/v1/nodes/agent-1"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        common::node_ready(&serde_json::from_str(&body).unwrap()),
        "{body}"
    );
    assert_eq!(
        common::get(&kubelet_client, &format!("{lb_url}/readyz")).await,
        Some((200, "ok".to_owned()))
    );

    // Two of three servers gone: the third has no quorum; the agent fails over to it.
    srv1.kill();
    srv2.kill();
    let (admin3, url3) = kube_client(&kubeconfigs[2]).unwrap();
    let answer = std::cell::RefCell::new(None);
    wait_for(
        "the third server's /readyz reports no quorum",
        Duration::from_secs(30),
        &mut [&mut srv3, &mut agent],
        || async {
            let got = common::get(&admin3, &format!("{url3}/readyz")).await;
            let lost = matches!(&got, Some((503, _)));
            *answer.borrow_mut() = got;
            lost
        },
    )
    .await;
    let (_, reason) = answer.into_inner().unwrap();
    assert_eq!(reason, "etcd: no quorum (1 of 3 servers reachable)");
    wait_for(
        "the agent's node is read through its load balancer from the third server",
        Duration::from_secs(30),
        &mut [&mut srv3, &mut agent],
        || async {
            let Some((200, body)) =
                common::get(&kubelet_client, &format!("{lb_url}/api/v1/nodes/agent-1")).await
            else {
                return false;
            };
            serde_json::from_str(&body).is_ok_and(|n| common::node_ready(&n))
        },
    )
    .await;

    // A restarted server still counts three servers (its node table is kept on disk)…
    drop(srv3);
    let args3 = {
        let mut args = server_args(&dirs[2], ports[2]);
        args.extend([
            "--server".to_owned(),
            first_url.clone(),
            "--token".to_owned(),
            token.to_owned(),
        ]);
        args
    };
    let mut srv3 = dirs[2].spawn("server", &strs(&args3));
    wait_for(
        "the restarted third server still reports no quorum",
        Duration::from_secs(30),
        &mut [&mut srv3],
        || async {
            common::get(&admin3, &format!("{url3}/readyz")).await
                == Some((503, "etcd: no quorum (1 of 3 servers reachable)".to_owned()))
        },
    )
    .await;
    // …and has quorum again once the first server is back.
    let mut srv1 = dirs[0].spawn("server", &strs(&args));
    wait_for(
        "the third server is ready again with two of three servers",
        Duration::from_secs(30),
        &mut [&mut srv1, &mut srv3],
        || async {
            common::get(&admin3, &format!("{url3}/readyz")).await == Some((200, "ok".to_owned()))
        },
    )
    .await;
}
