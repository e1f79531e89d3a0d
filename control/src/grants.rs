//! Placement: whether a joining node becomes a server or an agent.
//!
//! The target is the site config's `[k3s] servers` (3 without a site config). A node X
//! is a server when it already is one (a live heartbeat saying `role: server`, an
//! unexpired grant, or a K3s server node that K3s lists), else when fewer than the target
//! are servers — the union of the live server heartbeats, the unexpired grants, the node
//! this replica runs on (`--node`) and K3s's control-plane nodes, ready or not — and then
//! X is granted a seat; else X is an agent. So a server that is powered off keeps its
//! seat (K3s keeps its etcd member) until it is deleted from the cluster, and the site
//! never grows an even number of servers while one is away.
//!
//! Grants are kept in `<state-dir>/servers.json`:
//! `{"grants": {"<node>": {"refreshed": "<RFC 3339>"}}}`, changed under the state
//! folder's lock and replaced atomically. A grant expires [`GRANT_LIFETIME`] after it was
//! last refreshed — by the grant itself, a heartbeat of the node, or its fetching the
//! issuer — so a board that died mid-join frees its seat.
//!
//! Two joins on two different server nodes at once can exceed the target by one (each
//! node counts its own grants and the live heartbeats): known, not prevented.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

use pimesh_join::Role;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::state_dir::StateDir;

/// How long a grant lasts without a heartbeat or an issuer fetch of its node.
pub const GRANT_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// The file in the state folder.
pub const FILE: &str = "servers.json";
/// The target without a site config (`[k3s] servers`' default).
pub const DEFAULT_TARGET: usize = 3;
/// A heartbeat refreshes a grant only when it is older than this (not a write per beat).
const REFRESH_EVERY: Duration = Duration::from_secs(60);

/// The content of `servers.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsFile {
    pub grants: BTreeMap<String, Grant>,
}

/// One server seat given to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// RFC 3339: when it was given or last refreshed.
    pub refreshed: String,
}

impl Grant {
    fn at(now: SystemTime) -> Grant {
        Grant {
            refreshed: humantime::format_rfc3339_seconds(now).to_string(),
        }
    }

    /// Whether it still holds at `now` (an unreadable time does not).
    fn live(&self, now: SystemTime) -> bool {
        humantime::parse_rfc3339_weak(&self.refreshed).is_ok_and(|at| at + GRANT_LIFETIME > now)
    }

    fn refreshed_within(&self, now: SystemTime, within: Duration) -> bool {
        humantime::parse_rfc3339_weak(&self.refreshed).is_ok_and(|at| at + within > now)
    }
}

/// What is known of the site's servers when a join is placed.
#[derive(Debug, Clone)]
pub struct Seats<'a> {
    /// Nodes whose live heartbeat says `role: server`.
    pub live_servers: &'a BTreeSet<String>,
    /// The node this replica runs on, a server.
    pub own: Option<&'a str>,
    /// K3s's control-plane nodes, as this server node's K3s lists them (empty without K3s).
    pub k3s_servers: &'a BTreeSet<String>,
    /// `[k3s] servers`.
    pub target: usize,
}

impl GrantsFile {
    /// Drops the grants expired at `now`; `true` when any was.
    fn expire(&mut self, now: SystemTime) -> bool {
        let before = self.grants.len();
        self.grants.retain(|_, grant| grant.live(now));
        self.grants.len() != before
    }

    /// Places `node` (see the module documentation), granting or refreshing its seat
    /// when it is a server by grant.
    pub fn place(&mut self, node: &str, seats: &Seats<'_>, now: SystemTime) -> Role {
        self.expire(now);
        if seats.own == Some(node)
            || seats.live_servers.contains(node)
            || seats.k3s_servers.contains(node)
        {
            return Role::Server;
        }
        if let Some(grant) = self.grants.get_mut(node) {
            *grant = Grant::at(now);
            return Role::Server;
        }
        let mut servers: BTreeSet<&str> = seats.live_servers.iter().map(String::as_str).collect();
        servers.extend(self.grants.keys().map(String::as_str));
        servers.extend(seats.own);
        servers.extend(seats.k3s_servers.iter().map(String::as_str));
        if servers.len() < seats.target {
            self.grants.insert(node.to_owned(), Grant::at(now));
            Role::Server
        } else {
            Role::Agent
        }
    }

    /// Whether `node` holds an unexpired grant at `now`.
    #[cfg(test)]
    pub fn granted(&self, node: &str, now: SystemTime) -> bool {
        self.grants.get(node).is_some_and(|grant| grant.live(now))
    }
}

/// `servers.json` of a state folder.
#[derive(Debug, Clone)]
pub struct Grants {
    dir: StateDir,
}

impl Grants {
    pub fn new(dir: StateDir) -> Grants {
        Grants { dir }
    }

    /// Places `node` under the lock, saving the file when it changed.
    pub fn place(&self, node: &str, seats: &Seats<'_>, now: SystemTime) -> io::Result<Role> {
        self.dir.locked(|dir| {
            let mut file = read(dir);
            let before = file.clone();
            let role = file.place(node, seats, now);
            if file != before {
                write(dir, &file)?;
            }
            Ok(role)
        })
    }

    /// Whether `node` holds an unexpired grant (read without the lock: the file is
    /// replaced whole).
    #[cfg(test)]
    pub fn granted(&self, node: &str, now: SystemTime) -> bool {
        read(self.dir.path()).granted(node, now)
    }

    /// Refreshes `node`'s grant when it has one; `Ok(true)` when it has. With
    /// `only_if_older`, a grant refreshed within the last minute is left as it is.
    pub fn refresh(&self, node: &str, now: SystemTime, only_if_older: bool) -> io::Result<bool> {
        let current = read(self.dir.path());
        let Some(grant) = current.grants.get(node).filter(|g| g.live(now)) else {
            return Ok(false);
        };
        if only_if_older && grant.refreshed_within(now, REFRESH_EVERY) {
            return Ok(true);
        }
        self.dir.locked(|dir| {
            let mut file = read(dir);
            file.expire(now);
            let Some(grant) = file.grants.get_mut(node) else {
                return Ok(false);
            };
            *grant = Grant::at(now);
            write(dir, &file)?;
            Ok(true)
        })
    }
}

/// The file in `dir`; a missing one is empty, a broken one is logged and counts as empty
/// (the next change rewrites it).
fn read(dir: &Path) -> GrantsFile {
    let path = dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
            warn!(file = %path.display(), %err, "unreadable server grants: counted as none");
            GrantsFile::default()
        }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => GrantsFile::default(),
        Err(err) => {
            warn!(file = %path.display(), %err, "unreadable server grants: counted as none");
            GrantsFile::default()
        }
    }
}

fn write(dir: &Path, file: &GrantsFile) -> io::Result<()> {
    let mut text = serde_json::to_string_pretty(file).map_err(io::Error::other)?;
    text.push('\n');
    pimesh_runtime::atomic_file::replace(&dir.join(FILE), text.as_bytes(), 0o640).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn seats_fill_up_to_the_target_counting_live_servers_grants_and_this_node() {
        let now = SystemTime::now();
        let live = set(&["pi-a"]);
        let seats = Seats {
            live_servers: &live,
            own: Some("pi-a"),
            k3s_servers: &BTreeSet::new(),
            target: 3,
        };
        let mut file = GrantsFile::default();
        assert_eq!(file.place("pi-b", &seats, now), Role::Server);
        assert_eq!(file.place("pi-c", &seats, now), Role::Server);
        assert_eq!(file.place("pi-d", &seats, now), Role::Agent);
        assert_eq!(file.place("pi-b", &seats, now), Role::Server, "a rejoin");
        assert!(file.granted("pi-c", now));
        assert!(!file.granted("pi-d", now));
        // The own node alone fills a target of 1.
        let none = set(&[]);
        let one = Seats {
            live_servers: &none,
            own: Some("pi-a"),
            k3s_servers: &BTreeSet::new(),
            target: 1,
        };
        assert_eq!(GrantsFile::default().place("pi-b", &one, now), Role::Agent);
        let anonymous = Seats { own: None, ..one };
        assert_eq!(
            GrantsFile::default().place("pi-b", &anonymous, now),
            Role::Server
        );
    }

    #[test]
    fn a_server_that_k3s_lists_keeps_its_seat_while_it_is_away() {
        let now = SystemTime::now();
        // pi-a is powered off: no heartbeat, but K3s still lists it (NotReady).
        let live = set(&["pi-b"]);
        let k3s = set(&["pi-a", "pi-b", "pi-c"]);
        let seats = Seats {
            live_servers: &live,
            own: Some("pi-b"),
            k3s_servers: &k3s,
            target: 3,
        };
        let mut file = GrantsFile::default();
        assert_eq!(file.place("pi-e", &seats, now), Role::Agent);
        assert_eq!(
            file.place("pi-a", &seats, now),
            Role::Server,
            "back as a server"
        );
        assert!(!file.granted("pi-e", now));
    }

    #[test]
    fn a_grant_expires_ten_minutes_after_its_last_refresh() {
        let now = SystemTime::now();
        let none = set(&[]);
        let seats = Seats {
            live_servers: &none,
            own: None,
            k3s_servers: &BTreeSet::new(),
            target: 1,
        };
        let mut file = GrantsFile::default();
        assert_eq!(file.place("pi-b", &seats, now), Role::Server);
        assert_eq!(file.place("pi-c", &seats, now), Role::Agent);
        let later = now + GRANT_LIFETIME + Duration::from_secs(1);
        assert!(!file.granted("pi-b", later));
        assert_eq!(
            file.place("pi-c", &seats, later),
            Role::Server,
            "the seat is free"
        );
    }

    #[test]
    fn grants_are_kept_in_the_state_folder() {
        let dir = tempfile::tempdir().expect("temp dir");
        let grants = Grants::new(StateDir::new(dir.path().join("state")));
        let now = SystemTime::now();
        let none = set(&[]);
        let seats = Seats {
            live_servers: &none,
            own: None,
            k3s_servers: &BTreeSet::new(),
            target: 1,
        };
        assert!(!grants.granted("pi-b", now));
        assert_eq!(
            grants.place("pi-b", &seats, now).expect("placed"),
            Role::Server
        );
        assert!(grants.granted("pi-b", now));
        assert_eq!(
            grants.place("pi-c", &seats, now).expect("placed"),
            Role::Agent
        );
        assert!(grants.refresh("pi-b", now, false).expect("refresh"));
        assert!(!grants.refresh("pi-c", now, false).expect("refresh"));
        let text = std::fs::read_to_string(dir.path().join("state").join(FILE)).expect("file");
        assert!(
            text.contains("\"pi-b\"") && !text.contains("pi-c"),
            "{text}"
        );
        std::fs::write(dir.path().join("state").join(FILE), "garbage").expect("write");
        assert!(!grants.granted("pi-b", now), "a broken file counts as none");
    }
}
