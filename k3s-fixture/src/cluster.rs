//! What one fixture server knows of its cluster: its node table, the cluster CA, the
//! token's password, which servers answered lately, and the readiness and server list
//! derived from them.
//!
//! Quorum stand-in for etcd: with embedded etcd (cluster-init, or joined with `--server`),
//! `/readyz` is ready only while more than half of the servers in the node table (nodes
//! with the control-plane label, at least 1) answered `/ping` within [`REACHABLE_WITHIN`]
//! (this server counts as answered). Without embedded etcd (one server on SQLite) it is
//! ready once listening.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::nodes::Table;
use crate::objects::Store;
use crate::pki::Ca;

/// A server counts as reachable this long after its last answer to `/ping`.
pub const REACHABLE_WITHIN: Duration = Duration::from_secs(10);

/// A fixture server's shared state.
pub struct ClusterState {
    pub table: Mutex<Table>,
    pub ca: Ca,
    /// The token's password (`server:<password>`, `node:<password>`).
    pub password: String,
    pub own_name: String,
    /// `https://<address>:<port>` this server is reached at by the others.
    pub own_url: String,
    /// Embedded etcd (HA) rather than SQLite.
    pub etcd: bool,
    /// Last answer to `/ping`, per server URL.
    pings: Mutex<HashMap<String, Instant>>,
    /// Namespaces, Services and EndpointSlices (from the manifests).
    objects: Mutex<Store>,
}

impl ClusterState {
    pub fn new(
        ca: Ca,
        password: String,
        own_name: String,
        own_url: String,
        etcd: bool,
        objects: Store,
    ) -> Self {
        ClusterState {
            table: Mutex::new(Table::default()),
            ca,
            password,
            own_name,
            own_url,
            etcd,
            pings: Mutex::new(HashMap::new()),
            objects: Mutex::new(objects),
        }
    }

    pub fn objects(&self) -> MutexGuard<'_, Store> {
        self.objects.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that the server at `url` answered `/ping` now.
    pub fn answered(&self, url: &str) {
        self.pings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(url.to_owned(), Instant::now());
    }

    fn reachable(&self, url: &str) -> bool {
        url == self.own_url
            || self
                .pings
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(url)
                .is_some_and(|at| at.elapsed() <= REACHABLE_WITHIN)
    }

    /// `Ok` when ready; else the reason `/readyz` gives.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.etcd {
            return Ok(());
        }
        let servers = self.table().servers();
        let total = servers.len().max(1);
        let mut reachable = servers
            .iter()
            .filter(|s| s.name == self.own_name || self.reachable(&url_of(s.address)))
            .count();
        if !servers.iter().any(|s| s.name == self.own_name) {
            reachable += 1;
        }
        if reachable * 2 > total {
            Ok(())
        } else {
            Err(format!(
                "etcd: no quorum ({reachable} of {total} servers reachable)"
            ))
        }
    }

    /// `host:port` of the servers that answered lately, this one first.
    pub fn live_servers(&self) -> Vec<String> {
        let own = self.own_url.trim_start_matches("https://").to_owned();
        let mut live = vec![own.clone()];
        for server in self.table().servers() {
            let address = server.address.to_string();
            if address != own && self.reachable(&url_of(server.address)) {
                live.push(address);
            }
        }
        live
    }
}

/// `https://<address>`.
pub fn url_of(address: std::net::SocketAddr) -> String {
    format!("https://{address}")
}
