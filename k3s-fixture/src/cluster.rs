//! What one fixture server knows of its cluster: its node table, the cluster CA, the
//! token's password, which servers answered lately, and the readiness and server list
//! derived from them.
//!
//! Quorum stand-in for etcd: with embedded etcd (cluster-init, or joined with `--server`),
//! `/readyz` is ready only while more than half of the servers in the node table (nodes
//! with the control-plane label, at least 1) answered `/ping` within [`REACHABLE_WITHIN`]
//! (this server counts as answered). Without embedded etcd (one server on SQLite) it is
//! ready once listening.
//!
//! The Lease leader (see `sitewide`): the live server (this one, or one that answered
//! `/ping` within [`REACHABLE_WITHIN`]) with the smallest node name, as long as this server
//! has quorum; each server judges it from its own view.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::leases::Leases;
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
    /// This server's copy of the site's Leases.
    leases: Mutex<Replica>,
    /// Held by the leader through a Lease write and its replication, one at a time.
    pub lease_writes: tokio::sync::Mutex<()>,
    /// HTTPS client of the other servers (basic auth is added per request); `None` without
    /// embedded etcd, where there are no other servers.
    pub peer_client: Option<reqwest::Client>,
}

/// A server's copy of the Leases.
pub struct Replica {
    pub store: Leases,
    /// This server, as leader, has made sure no server has a newer copy (see `sitewide`).
    pub synced: bool,
}

/// A server of the cluster: its node name and `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub url: String,
}

impl ClusterState {
    pub fn new(
        ca: Ca,
        password: String,
        own_name: String,
        own_url: String,
        etcd: bool,
        objects: Store,
        peer_client: Option<reqwest::Client>,
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
            leases: Mutex::new(Replica {
                store: Leases::default(),
                synced: false,
            }),
            lease_writes: tokio::sync::Mutex::new(()),
            peer_client,
        }
    }

    pub fn replica(&self) -> MutexGuard<'_, Replica> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cluster's servers, this one included (at [`ClusterState::own_url`]), by name.
    pub fn members(&self) -> Vec<Member> {
        let mut members: Vec<Member> = self
            .table()
            .servers()
            .into_iter()
            .filter(|s| s.name != self.own_name)
            .map(|s| Member {
                name: s.name,
                url: url_of(s.address),
            })
            .collect();
        members.push(Member {
            name: self.own_name.clone(),
            url: self.own_url.clone(),
        });
        members.sort_by(|a, b| a.name.cmp(&b.name));
        members
    }

    /// The members that answered `/ping` lately, this one included.
    pub fn live_members(&self) -> Vec<Member> {
        self.members()
            .into_iter()
            .filter(|m| m.name == self.own_name || self.reachable(&m.url))
            .collect()
    }

    /// The Lease leader as this server sees it: the live member with the smallest name;
    /// `None` without quorum.
    pub fn leader(&self) -> Option<Member> {
        self.readiness().ok()?;
        self.live_members().into_iter().next()
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
