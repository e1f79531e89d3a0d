//! Leases are site-wide: three fixture servers on 127.0.0.1; a Lease created through one
//! is read through another, a PUT with a stale resourceVersion through a third is 409, of
//! two writes racing from the same read through two servers exactly one wins, and
//! pimesh-kube's Lease lock holds across servers. With the leader (the smallest node
//! name) killed, the others go on from its last state; restarted with an old copy on
//! disk, it never answers a most-recent read from that copy, and does not accept a write
//! made from it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{kube_client, port, server_args, strs, NodeDir};
use pimesh_kube::lease::{release, try_acquire, LeaseOutcome};
use pimesh_kube::KubeClient;
use pimesh_test_support::Daemon;
use serde_json::{json, Value};

const SERVERS: [&str; 3] = ["srv-1", "srv-2", "srv-3"];
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases";
const LIMIT: Duration = Duration::from_secs(60);

/// Polls `attempt` until it gives a value, at most `limit`, naming `what` and showing the
/// servers' logs if not.
async fn until<T, F, Fut>(
    what: &str,
    limit: Duration,
    daemons: &mut [&mut Daemon],
    mut attempt: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
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

/// One server's admin client and URL.
struct Api {
    client: reqwest::Client,
    url: String,
}

impl Api {
    /// `method <url><path>` with `body`: the status and the body as JSON (`None` when the
    /// request failed).
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Option<(u16, Value)> {
        let mut request = self.client.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.ok()?;
        let status = response.status().as_u16();
        let text = response.text().await.ok()?;
        Some((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    async fn get(&self, name: &str) -> Option<(u16, Value)> {
        self.send(reqwest::Method::GET, &format!("{LEASES}/{name}"), None)
            .await
    }

    async fn put(&self, lease: &Value) -> Option<(u16, Value)> {
        let name = lease["metadata"]["name"].as_str().unwrap();
        self.send(
            reqwest::Method::PUT,
            &format!("{LEASES}/{name}"),
            Some(lease),
        )
        .await
    }
}

fn lease(name: &str, holder: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": name, "namespace": "kube-system"},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 30,
                    "renewTime": "2025-12-01T10:00:05.123456Z", "leaseTransitions": 0}})
}

/// `lease` as read, held by `holder`.
fn held_by(lease: &Value, holder: &str) -> Value {
    let mut lease = lease.clone();
    lease["spec"]["holderIdentity"] = holder.into();
    lease
}

fn rv(lease: &Value) -> String {
    lease["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A PUT through `api`, retried while the servers settle (503, or no answer), until it is
/// answered otherwise: its status and body.
async fn put_settled(
    what: &str,
    api: &Api,
    lease: &Value,
    daemons: &mut [&mut Daemon],
) -> (u16, Value) {
    until(what, LIMIT, daemons, || async {
        match api.put(lease).await {
            Some((503, _)) | None => None,
            answer => answer,
        }
    })
    .await
}

#[tokio::test]
async fn leases_are_site_wide_and_optimistic() {
    let dir = tempfile::tempdir().unwrap();
    let dirs: Vec<NodeDir> = SERVERS
        .iter()
        .map(|n| NodeDir::new(dir.path(), n))
        .collect();
    let ports: Vec<u16> = (0..3).map(|_| port()).collect();
    let first_url = format!("https://127.0.0.1:{}", ports[0]);
    let token = "pimesh-fixture-lease-token";
    let args: Vec<Vec<String>> = (0..3)
        .map(|i| {
            let mut args = server_args(&dirs[i], ports[i]);
            if i == 0 {
                args.push("--cluster-init".to_owned());
            } else {
                args.extend(["--server".to_owned(), first_url.clone()]);
            }
            args.extend(["--token".to_owned(), token.to_owned()]);
            args
        })
        .collect();
    let mut srv1 = dirs[0].spawn("server", &strs(&args[0]));
    let mut srv2 = dirs[1].spawn("server", &strs(&args[1]));
    let mut srv3 = dirs[2].spawn("server", &strs(&args[2]));

    let kubeconfigs: Vec<_> = dirs.iter().map(NodeDir::kubeconfig).collect();
    until(
        "every server lists the three servers Ready",
        LIMIT,
        &mut [&mut srv1, &mut srv2, &mut srv3],
        || async {
            for kubeconfig in &kubeconfigs {
                let list = common::nodes(kubeconfig).await?;
                if !SERVERS.iter().all(|n| common::ready_in(&list, n)) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let apis: Vec<Api> = kubeconfigs
        .iter()
        .map(|k| {
            let (client, url) = kube_client(k).unwrap();
            Api { client, url }
        })
        .collect();

    // Created through srv-2 (forwarded to the leader, srv-1), read through srv-3.
    let created = until(
        "a Lease is created through srv-2",
        LIMIT,
        &mut [&mut srv1, &mut srv2, &mut srv3],
        || async {
            match apis[1]
                .send(
                    reqwest::Method::POST,
                    LEASES,
                    Some(&lease("restart", "srv-2")),
                )
                .await
            {
                Some((201, body)) => Some(body),
                Some((503, _)) | None => None,
                Some(other) => panic!("POST: {other:?}"),
            }
        },
    )
    .await;
    assert_eq!(created["metadata"]["namespace"], "kube-system");
    let (status, read) = apis[2].get("restart").await.unwrap();
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["kind"], "Lease");
    assert_eq!(read["metadata"]["uid"], created["metadata"]["uid"]);
    assert_eq!(rv(&read), rv(&created));
    assert_eq!(read["spec"]["holderIdentity"], "srv-2");
    assert_eq!(read["spec"]["renewTime"], "2025-12-01T10:00:05.123456Z");

    // The same name again, through srv-3: AlreadyExists.
    let (status, refused) = apis[2]
        .send(
            reqwest::Method::POST,
            LEASES,
            Some(&lease("restart", "srv-3")),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, refused["reason"].as_str()),
        (409, Some("AlreadyExists")),
        "{refused}"
    );

    // Updated through srv-2; the first version again through srv-3 is a Conflict.
    let (status, updated) = apis[1].put(&held_by(&read, "srv-2b")).await.unwrap();
    assert_eq!(status, 200, "{updated}");
    assert_ne!(rv(&updated), rv(&read));
    let (status, stale) = apis[2].put(&held_by(&read, "srv-3")).await.unwrap();
    assert_eq!(status, 409, "{stale}");
    assert_eq!(stale["reason"], "Conflict");
    assert_eq!(
        stale["message"],
        "Operation cannot be fulfilled on leases.coordination.k8s.io \"restart\": the object has been modified; please apply your changes to the latest version and try again"
    );
    let mut unconditional = held_by(&read, "srv-3");
    unconditional["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    unconditional["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("uid");
    let (status, invalid) = apis[2].put(&unconditional).await.unwrap();
    assert_eq!(
        (status, invalid["reason"].as_str()),
        (422, Some("Invalid")),
        "{invalid}"
    );
    assert_eq!(
        apis[0].get("restart").await.unwrap().1["spec"]["holderIdentity"],
        "srv-2b"
    );

    // Two writers with the same read, through two servers: one wins.
    for round in 0..5 {
        let (_, current) = apis[0].get("restart").await.unwrap();
        let (mine, theirs) = (
            held_by(&current, &format!("a{round}")),
            held_by(&current, &format!("b{round}")),
        );
        let (a, b) = tokio::join!(apis[1].put(&mine), apis[2].put(&theirs));
        let mut codes = [a.unwrap().0, b.unwrap().0];
        codes.sort_unstable();
        assert_eq!(codes, [200, 409], "round {round}");
    }

    // The lock of pimesh-kube, through different servers.
    let clients: Vec<KubeClient> = kubeconfigs
        .iter()
        .map(|k| KubeClient::load(k, Duration::from_secs(10)).unwrap())
        .collect();
    // Long enough to outlast the failover below.
    let hold = Duration::from_secs(600);
    let acquired = try_acquire(
        &clients[1],
        "kube-system",
        "pimesh-k3s-restart",
        "srv-2",
        hold,
    )
    .await
    .unwrap();
    assert!(
        matches!(acquired, LeaseOutcome::Acquired { .. }),
        "{acquired:?}"
    );
    match try_acquire(
        &clients[2],
        "kube-system",
        "pimesh-k3s-restart",
        "srv-3",
        hold,
    )
    .await
    .unwrap()
    {
        LeaseOutcome::Held { holder, .. } => assert_eq!(holder, "srv-2"),
        other => panic!("srv-3 got {other:?} while srv-2 holds the Lease"),
    }
    let renewed = try_acquire(
        &clients[0],
        "kube-system",
        "pimesh-k3s-restart",
        "srv-2",
        hold,
    )
    .await
    .unwrap();
    assert!(
        matches!(renewed, LeaseOutcome::Renewed { .. }),
        "{renewed:?}"
    );
    assert!(
        !release(&clients[2], "kube-system", "pimesh-k3s-restart", "srv-3")
            .await
            .unwrap()
    );
    assert!(
        release(&clients[1], "kube-system", "pimesh-k3s-restart", "srv-2")
            .await
            .unwrap()
    );
    let acquired = try_acquire(
        &clients[2],
        "kube-system",
        "pimesh-k3s-restart",
        "srv-3",
        hold,
    )
    .await
    .unwrap();
    assert!(
        matches!(acquired, LeaseOutcome::Acquired { .. }),
        "{acquired:?}"
    );
    let (_, lock) = apis[0].get("pimesh-k3s-restart").await.unwrap();
    assert_eq!(lock["spec"]["leaseTransitions"], 1, "{lock}");
    // Racing for a new lock through two servers: one holder.
    let (a, b) = tokio::join!(
        try_acquire(&clients[1], "kube-system", "race", "srv-2", hold),
        try_acquire(&clients[2], "kube-system", "race", "srv-3", hold)
    );
    let outcomes = [a.unwrap(), b.unwrap()];
    let winners = outcomes
        .iter()
        .filter(|o| matches!(o, LeaseOutcome::Acquired { .. }))
        .count();
    assert_eq!(winners, 1, "{outcomes:?}");

    // DELETE through srv-3, gone through srv-2.
    let (status, deleted) = apis[2]
        .send(reqwest::Method::DELETE, &format!("{LEASES}/race"), None)
        .await
        .unwrap();
    assert_eq!(
        (status, deleted["status"].as_str()),
        (200, Some("Success")),
        "{deleted}"
    );
    assert_eq!(apis[1].get("race").await.unwrap().0, 404);

    // The leader goes: once srv-2 and srv-3 agree it is gone, they write on from its
    // last state. Read from the leader itself: a follower that briefly lost sight of it
    // (a loaded machine) refuses a read (503) until it sees a leader again.
    let (_, before) = apis[0].get("restart").await.unwrap();
    srv1.kill();
    let (status, after) = put_settled(
        "a write through srv-2 with srv-1 gone",
        &apis[1],
        &held_by(&before, "srv-2c"),
        &mut [&mut srv2, &mut srv3],
    )
    .await;
    assert_eq!(status, 200, "{after}");
    let outcome = until(
        "srv-2 asks for the lock srv-3 holds, through srv-2",
        LIMIT,
        &mut [&mut srv2, &mut srv3],
        || async {
            try_acquire(
                &clients[1],
                "kube-system",
                "pimesh-k3s-restart",
                "srv-2",
                hold,
            )
            .await
            .ok()
        },
    )
    .await;
    match outcome {
        LeaseOutcome::Held { holder, .. } => assert_eq!(holder, "srv-3"),
        other => panic!("srv-2 got {other:?} while srv-3 holds the Lease"),
    }
    let (status, read) = apis[2].get("restart").await.unwrap();
    assert_eq!((status, rv(&read)), (200, rv(&after)));

    // srv-1 comes back with its old copy on disk and leads again: a write made from the
    // version it had is refused, and it serves the newest.
    let mut srv1 = dirs[0].spawn("server", &strs(&args[0]));
    let (status, refused) = put_settled(
        "a stale write through the restarted srv-1",
        &apis[0],
        &held_by(&before, "srv-1"),
        &mut [&mut srv1, &mut srv2, &mut srv3],
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    let (status, read) = until(
        "the restarted srv-1 serves the newest Lease",
        LIMIT,
        &mut [&mut srv1, &mut srv2, &mut srv3],
        || async {
            apis[0].get("restart").await.filter(|(_, l)| {
                l["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"]
            })
        },
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(read["spec"]["holderIdentity"], "srv-2c");
    match try_acquire(
        &clients[0],
        "kube-system",
        "pimesh-k3s-restart",
        "srv-1",
        hold,
    )
    .await
    .unwrap()
    {
        LeaseOutcome::Held { holder, .. } => assert_eq!(holder, "srv-3"),
        other => panic!("srv-1 got {other:?} while srv-3 holds the Lease"),
    }

    // srv-1 goes, srv-2 and srv-3 write on, and go too; srv-1 comes back alone with its
    // old copy: without quorum it cannot know the newest, so a "most recent" read (no
    // resourceVersion) is refused, never answered from that copy; a
    // `resourceVersion=0` read ("any") is answered from it.
    let (_, newest) = apis[0].get("restart").await.unwrap();
    srv1.kill();
    let (status, written) = put_settled(
        "a write through srv-2 with srv-1 gone again",
        &apis[1],
        &held_by(&newest, "srv-2d"),
        &mut [&mut srv2, &mut srv3],
    )
    .await;
    assert_eq!(status, 200, "{written}");
    srv2.kill();
    srv3.kill();
    let mut srv1 = dirs[0].spawn("server", &strs(&args[0]));
    let (status, any) = until(
        "the lone srv-1 answers a resourceVersion=0 read",
        LIMIT,
        &mut [&mut srv1],
        || async {
            apis[0]
                .send(
                    reqwest::Method::GET,
                    &format!("{LEASES}/restart?resourceVersion=0"),
                    None,
                )
                .await
        },
    )
    .await;
    // Its own copy: the Lease as it last knew it, or none.
    match status {
        200 => assert_ne!(rv(&any), rv(&written), "{any}"),
        404 => {}
        other => panic!("a resourceVersion=0 read answered {other}: {any}"),
    }
    let (status, refused) = apis[0].get("restart").await.unwrap();
    assert_eq!(
        status, 503,
        "a most-recent read without quorum must not answer from an old copy: {refused}"
    );
}
