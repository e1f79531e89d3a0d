//! What a joined node keeps of its join: `/var/lib/pimesh/join/state.json`.
//!
//! Invariant: the file is written after the anchors and before `node.pem` (a certificate
//! without this file was put there by hand; this file without a certificate is a join to
//! finish with the same key), and the role in it never changes by itself: a node told once that it is a server stays one across reboots (and fetches
//! the issuer again until it has it), an agent stays an agent.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use pimesh_join::{Role, ServerEntry};
use pimesh_schema::DnsLabel;
use serde::{Deserialize, Serialize};

/// The join as the node keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRecord {
    pub role: Role,
    /// The replica that answered.
    pub via: Via,
    /// The site's server nodes as the answer listed them.
    pub servers: Vec<ServerEntry>,
    /// RFC 3339.
    pub joined_at: String,
}

/// A replica a node talked to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Via {
    /// The server node's name, when the candidate came with one (mDNS).
    pub node: Option<String>,
    pub address: std::net::SocketAddr,
}

/// Why the record cannot be read or written; each names the file.
#[derive(Debug)]
pub enum RecordError {
    Io {
        path: PathBuf,
        source: io::Error,
    },
    Invalid {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            RecordError::Invalid { path, source } => write!(
                f,
                "{}: not a join record ({{\"role\", \"via\", \"servers\", \"joined_at\"}}): {source}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for RecordError {}

impl JoinRecord {
    /// The recorded replicas of every server node but `own`: first the replica that
    /// answered the join, then the others in the order the answer listed them.
    pub fn replicas_of_others(&self, own: &DnsLabel) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        if self.via.node.as_deref() != Some(own.as_str()) {
            out.push(self.via.address);
        }
        for server in self.servers.iter().filter(|server| &server.node != own) {
            for port in &server.replicas {
                let addr = SocketAddr::new(server.address, *port);
                if !out.contains(&addr) {
                    out.push(addr);
                }
            }
        }
        out
    }

    /// The record in `path`; `None` when the node has not joined.
    pub fn load(path: &Path) -> Result<Option<JoinRecord>, RecordError> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RecordError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| RecordError::Invalid {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Writes the record whole (a cut leaves the old file or none).
    pub fn store(&self, path: &Path) -> Result<(), RecordError> {
        let io = |source| RecordError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = serde_json::to_vec_pretty(self)
            .map_err(|err| io(io::Error::new(io::ErrorKind::InvalidData, err)))?;
        pimesh_runtime::atomic_file::replace(path, &text, 0o644)
            .map(drop)
            .map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    #[test]
    fn a_record_round_trips_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("join/state.json");
        assert!(JoinRecord::load(&path).expect("load").is_none());
        let record = JoinRecord {
            role: Role::Agent,
            via: Via {
                node: Some("pi-a".into()),
                address: "10.0.0.1:8086".parse().expect("addr"),
            },
            servers: Vec::new(),
            joined_at: "2026-12-02T06:00:00Z".into(),
        };
        record.store(&path).expect("store");
        assert_eq!(JoinRecord::load(&path).expect("load"), Some(record));
        std::fs::write(&path, b"{\"role\":").expect("truncate");
        let err = JoinRecord::load(&path).expect_err("truncated").to_string();
        assert!(
            err.contains("state.json") && err.contains("not a join record"),
            "{err}"
        );
    }

    #[test]
    fn the_replicas_of_others_are_the_other_servers_recorded() {
        let record = JoinRecord {
            role: pimesh_join::Role::Server,
            via: Via {
                node: Some("pi-a".into()),
                address: "169.254.1.1:8086".parse().expect("addr"),
            },
            servers: vec![
                ServerEntry {
                    node: label("pi-a"),
                    address: "169.254.1.1".parse().expect("ip"),
                    replicas: vec![8086, 8087],
                },
                ServerEntry {
                    node: label("pi-b"),
                    address: "169.254.1.2".parse().expect("ip"),
                    replicas: vec![8086],
                },
            ],
            joined_at: "2026-12-02T06:00:00Z".into(),
        };
        let checked = record.replicas_of_others(&label("pi-b"));
        let want: Vec<SocketAddr> = ["169.254.1.1:8086", "169.254.1.1:8087"]
            .iter()
            .map(|addr| addr.parse().expect("addr"))
            .collect();
        assert_eq!(checked, want, "its own entry is not listed");
    }
}
