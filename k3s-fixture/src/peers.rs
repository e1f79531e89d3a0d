//! A fixture server's exchanges with the other servers: the stand-in for embedded etcd's
//! replication and membership (the fixture has no etcd).
//!
//! Every [`EXCHANGE_EVERY`], for each server it knows (the table's control-plane nodes at
//! InternalIP and the `pimesh.fixture/https-port` annotation, plus the `--server` it
//! joined through), a server with embedded etcd: asks `GET /ping` (an answer counts
//! toward quorum, see `cluster`), pushes its own Node (`POST /api/v1/nodes`, its
//! heartbeat there), pulls `GET /api/v1/nodes`, merging entries by newest heartbeat, and
//! pulls its copy of the Leases, keeping it when newer (see `sitewide`).
//! Requests use basic auth `server:<password>` and trust only the cluster CA.
//!
//! Every node, servers included, re-registers every 5 s; [`heartbeat`] does it for the
//! server's own Node in its own table.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinSet;

use crate::cluster::{url_of, ClusterState};
use crate::log::now_secs;
use crate::nodes::{node_object, NodeInfo, HEARTBEAT_EVERY};

/// How often the other servers are asked.
pub const EXCHANGE_EVERY: Duration = Duration::from_secs(2);
/// Each request's timeout.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Refreshes this server's own Node in its table every [`HEARTBEAT_EVERY`].
pub async fn heartbeat(state: Arc<ClusterState>, own: NodeInfo) {
    let mut every = tokio::time::interval(HEARTBEAT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(err) = state.table().register(node_object(&own), now_secs()) {
            crate::log::error(&format!(
                "k3s fixture: cannot register this server's node {}: {err:?}",
                own.name
            ));
        }
    }
}

/// Exchanges with the other servers forever.
pub async fn replicate(
    state: Arc<ClusterState>,
    client: reqwest::Client,
    join: Option<String>,
    own: NodeInfo,
) {
    let mut every = tokio::time::interval(EXCHANGE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: BTreeMap<String, Result<(), String>> = BTreeMap::new();
    loop {
        every.tick().await;
        let mut targets: BTreeSet<String> = state
            .table()
            .servers()
            .into_iter()
            .filter(|s| s.name != state.own_name)
            .map(|s| url_of(s.address))
            .collect();
        if let Some(join) = &join {
            targets.insert(join.clone());
        }
        targets.remove(&state.own_url);
        let own_node = Arc::new(node_object(&own));
        let mut tasks = JoinSet::new();
        for url in targets {
            let (state, client, own_node) = (state.clone(), client.clone(), own_node.clone());
            tasks.spawn(async move {
                let result = exchange(&state, &client, &url, &own_node).await;
                (url, result)
            });
        }
        while let Some(done) = tasks.join_next().await {
            let Ok((url, result)) = done else { continue };
            if last.get(&url) != Some(&result) {
                match &result {
                    Ok(()) => crate::log::info(&format!("k3s fixture: server {url} is reachable")),
                    Err(err) => crate::log::warn(&format!("k3s fixture: server {url}: {err}")),
                }
            }
            last.insert(url, result);
        }
    }
}

/// Ping, push, pull with one server.
async fn exchange(
    state: &ClusterState,
    client: &reqwest::Client,
    url: &str,
    own_node: &Value,
) -> Result<(), String> {
    let ping = client
        .get(format!("{url}/ping"))
        .send()
        .await
        .map_err(|e| format!("ping: {e}"))?;
    if !ping.status().is_success() {
        return Err(format!("ping: {}", ping.status()));
    }
    state.answered(url);
    let pushed = client
        .post(format!("{url}/api/v1/nodes"))
        .basic_auth("server", Some(&state.password))
        .header("Content-Type", "application/json")
        .body(own_node.to_string())
        .send()
        .await
        .map_err(|e| format!("push: {e}"))?;
    if !pushed.status().is_success() {
        let code = pushed.status();
        let body = pushed.text().await.unwrap_or_default();
        return Err(format!(
            "push of this server's node refused: {code}: {body}"
        ));
    }
    let pulled = client
        .get(format!("{url}/api/v1/nodes"))
        .basic_auth("server", Some(&state.password))
        .send()
        .await
        .map_err(|e| format!("pull: {e}"))?;
    if !pulled.status().is_success() {
        return Err(format!("pull: {}", pulled.status()));
    }
    let list = crate::client::json_value(pulled)
        .await
        .map_err(|e| format!("pull: {e}"))?;
    let now = now_secs();
    {
        let mut table = state.table();
        for item in list["items"].as_array().into_iter().flatten() {
            table.merge(item.clone(), &state.own_name, now);
        }
    }
    crate::sitewide::catch_up(state, url)
        .await
        .map_err(|e| format!("pull of the Leases: {e}"))
}
