//! The record of every join attempt a replica answers: one `info!` (joined) or `warn!`
//! (refused) line with structured fields, and one JSON line appended to
//! `<state-dir>/joins.jsonl`, which the supervisor shows as `/status.joins`:
//!
//! `{"at": "<RFC 3339>", "node": "<name>"|null, "from": "<IP>", "result": "joined"|"<refusal code>", "role"?: "server"|"agent", "replica": N}`
//!
//! Invariant: the file holds at most [`KEEP`] lines, newest last; it is changed under the
//! state folder's lock, appended a whole line at a time, and rewritten atomically when
//! trimmed.

use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::SystemTime;

use pimesh_join::{RefusalCode, Role};
use pimesh_schema::DnsLabel;
use serde::Serialize;
use tracing::{info, warn};

use crate::state_dir::StateDir;

/// The file in the state folder.
pub const FILE: &str = "joins.jsonl";
/// How many records the file keeps.
pub const KEEP: usize = 200;

/// What came of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Joined(Role),
    Refused(RefusalCode),
}

/// One line of `joins.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    pub at: String,
    pub node: Option<String>,
    pub from: IpAddr,
    /// `joined` or the refusal code.
    pub result: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    pub replica: u16,
}

impl Record {
    pub fn new(
        node: Option<&DnsLabel>,
        from: IpAddr,
        outcome: Outcome,
        replica: u16,
        at: SystemTime,
    ) -> Record {
        let (result, role) = match outcome {
            Outcome::Joined(role) => ("joined".to_owned(), Some(role)),
            Outcome::Refused(code) => (code_name(code), None),
        };
        Record {
            at: humantime::format_rfc3339_seconds(at).to_string(),
            node: node.map(|n| n.as_str().to_owned()),
            from: from.to_canonical(),
            result,
            role,
            replica,
        }
    }

    /// Logs the record (structured fields; `reason` is the text a refusal gave).
    pub fn log(&self, reason: &str) {
        let node = self.node.as_deref().unwrap_or("?");
        let role = self.role.map_or("", Role::as_str);
        if self.role.is_some() {
            info!(node, from = %self.from, role, result = %self.result, replica = self.replica, "join answered");
        } else {
            warn!(node, from = %self.from, result = %self.result, replica = self.replica, reason, "join refused");
        }
    }
}

/// The wire name of `code` (`wrong_token`, ...).
pub fn code_name(code: RefusalCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// `joins.jsonl` of a state folder.
#[derive(Debug, Clone)]
pub struct Records {
    dir: StateDir,
}

impl Records {
    pub fn new(dir: StateDir) -> Records {
        Records { dir }
    }

    /// Appends `record`, trimming the file to the last [`KEEP`] lines.
    pub fn append(&self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_string(record).map_err(io::Error::other)?;
        line.push('\n');
        self.dir.locked(|dir| append_to(&dir.join(FILE), &line))
    }
}

fn append_to(path: &Path, line: &str) -> io::Result<()> {
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(err),
    };
    let count = existing.lines().count();
    if count < KEEP && (existing.is_empty() || existing.ends_with('\n')) {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)?;
        return file.write_all(line.as_bytes());
    }
    let lines: Vec<&str> = existing.lines().collect();
    let keep = &lines[lines.len().saturating_sub(KEEP - 1)..];
    let mut text = String::new();
    for kept in keep {
        text.push_str(kept);
        text.push('\n');
    }
    text.push_str(line);
    pimesh_runtime::atomic_file::replace(path, text.as_bytes(), 0o640).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_appended_and_the_last_two_hundred_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let records = Records::new(StateDir::new(dir.path().to_path_buf()));
        let node = DnsLabel::try_from("pi-b".to_owned()).expect("label");
        let from: IpAddr = "::ffff:10.0.0.2".parse().expect("ip");
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let joined = Record::new(Some(&node), from, Outcome::Joined(Role::Agent), 2, at);
        records.append(&joined).expect("append");
        let text = std::fs::read_to_string(dir.path().join(FILE)).expect("file");
        let value: serde_json::Value = serde_json::from_str(text.trim()).expect("json");
        assert_eq!(
            value,
            serde_json::json!({
                "at": "2027-01-15T08:00:00Z", "node": "pi-b", "from": "10.0.0.2",
                "result": "joined", "role": "agent", "replica": 2,
            })
        );
        for i in 0..KEEP + 5 {
            let refused = Record::new(None, from, Outcome::Refused(RefusalCode::WrongToken), 1, at);
            let mut refused = refused;
            refused.replica = u16::try_from(i).expect("small");
            records.append(&refused).expect("append");
        }
        let text = std::fs::read_to_string(dir.path().join(FILE)).expect("file");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), KEEP);
        assert!(lines[0].contains("\"replica\":5"), "{}", lines[0]);
        assert!(lines[KEEP - 1].contains("\"result\":\"wrong_token\""));
        assert!(lines[KEEP - 1].contains(&format!("\"replica\":{}", KEEP + 4)));
    }
}
