//! Where a node stands in its site at the supervisor's start, and how that places its
//! units: the init node is a server from the start; a node that joins by token runs
//! nothing until it has joined, then runs as its [`JoinRecord`] says; a node without a
//! token, whose card brought the site's anchor (`pimesh-trust/anchor.pem`, written by
//! `pimeshctl image configure --trust`: the operator enrolls it by hand), or that holds a
//! certificate no join gave it, keeps to the seed's servers and a certificate signed by
//! hand.

use std::net::SocketAddr;
use std::path::Path;

use pimesh_join::Role;
use pimesh_schema::Seed;
use tracing::warn;

use crate::credential::CredentialFiles;
use crate::join::record::JoinRecord;
use crate::status::JoinReport;
use crate::units::placement::Placement;

/// The node's standing at start.
#[derive(Debug, Clone)]
pub enum Plan {
    /// The site's first server (seed `role = "init"`).
    Init,
    /// A node whose seed has no join token, whose card brought the anchor, or without a
    /// valid seed: enrolled by hand.
    Manual,
    /// Joined at an earlier start.
    Joined(JoinRecord),
    /// To join.
    Waiting,
}

impl Plan {
    /// `boot_anchor`: whether the card brought the site's anchor.
    pub fn of(
        seed: Option<&Seed>,
        record_file: &Path,
        credential: &CredentialFiles,
        boot_anchor: bool,
    ) -> Plan {
        let Some(seed) = seed else {
            return Plan::Manual;
        };
        if seed.role == pimesh_schema::Role::Init {
            return Plan::Init;
        }
        if seed.join_token.is_none() || boot_anchor {
            return Plan::Manual;
        }
        // The join writes `node.pem` after its record (see `crate::join`): a certificate
        // without a record was put there by hand.
        match JoinRecord::load(record_file) {
            Ok(Some(record)) if credential.has_certificate() => Plan::Joined(record),
            Ok(None) if credential.has_certificate() => Plan::Manual,
            Ok(_) => Plan::Waiting,
            Err(err) => {
                warn!(%err, "the join record is unreadable; the node joins again with its key");
                Plan::Waiting
            }
        }
    }

    /// Whether the join task has work: joining, fetching a server's issuer, or keeping a
    /// joined node's servers within reach (`crate::join::relocate`).
    pub fn needs_join(&self) -> bool {
        match self {
            Plan::Waiting | Plan::Joined(_) => true,
            Plan::Init | Plan::Manual => false,
        }
    }

    /// Sets the placement's join fields for this standing.
    pub fn place(&self, placement: &mut Placement) {
        match self {
            Plan::Init => {
                placement.role = Some(Role::Server);
                placement.k3s.first_server = true;
            }
            Plan::Manual => {}
            Plan::Joined(record) => placed(placement, record, placement.holds_issuer),
            Plan::Waiting => placement.waiting_to_join = true,
        }
    }

    /// The status's `join` at start.
    pub fn report(&self) -> JoinReport {
        let mut report = JoinReport::default();
        match self {
            Plan::Init => {
                report.state = "init";
                report.role = Some(Role::Server.as_str());
            }
            Plan::Manual => {}
            Plan::Joined(record) => {
                crate::join::show(&mut report, record);
                report.state = "joined";
            }
            Plan::Waiting => report.state = "discovering",
        }
        report
    }
}

/// The placement of a joined node: its role, the servers' replicas, and whether it holds
/// the issuer (a server node does once it has fetched it).
pub fn placed(placement: &mut Placement, record: &JoinRecord, holds_issuer: bool) {
    placement.waiting_to_join = false;
    placement.role = Some(record.role);
    placement.join_warmup = true;
    placement.holds_issuer = holds_issuer;
    // The replica that answered first, then every listed server's; a loopback address only
    // when the node reached the replica there (a site on one host, as in tests): another
    // node's 127.0.0.1 is this node's own.
    let listed = record.servers.iter().flat_map(|server| {
        server
            .replicas
            .iter()
            .map(move |port| SocketAddr::new(server.address, *port))
    });
    // K3s's first contact is the server that answered; it learns the others from it.
    placement.k3s.via = Some(record.via.address.ip());
    placement.k3s.servers = record.servers.iter().map(|server| server.address).collect();
    placement.joined_replicas.clear();
    let via_loopback = record.via.address.ip().is_loopback();
    for addr in std::iter::once(record.via.address).chain(listed) {
        let usable = via_loopback || !(addr.ip().is_loopback() || addr.ip().is_unspecified());
        if usable && !placement.joined_replicas.contains(&addr) {
            placement.joined_replicas.push(addr);
        }
    }
}
