//! One time for the site: server nodes serve it, every other node takes it from them
//! (chrony, configured through the image's `/etc/chrony/conf.d/pimesh.conf`, which reads
//! `/run/pimesh/chrony` as both its `sourcedir` and its `confdir`).
//!
//! | file | on | what |
//! |---|---|---|
//! | `pimesh-server.conf` | server nodes | `local stratum 10` (serve the node's clock when no better source is reachable) and `allow` (answer the site's nodes) |
//! | `pimesh.sources` | joined nodes | `server <ip> iburst` for each other server node of the site |
//!
//! chrony reads both when it starts, so the supervisor restarts it (`TryRestartUnit`:
//! only when it runs; a container, where chrony is skipped, is left alone) whenever a file
//! changed. Invariant: the files describe the node's current role and servers, and are
//! written whole (a reader never sees half a file).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::units::systemd::Systemd;

const SERVER_CONF: &str = "pimesh-server.conf";
const SOURCES: &str = "pimesh.sources";
const CHRONY_UNIT: &str = "chrony.service";

/// What chrony on this node is told.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimePlan {
    /// Serve time to the site.
    pub serve: bool,
    /// Take time from these (the other server nodes).
    pub sources: Vec<IpAddr>,
}

impl TimePlan {
    /// The text of each file; `None`: the file should not exist.
    fn files(&self) -> [(&'static str, Option<String>); 2] {
        let conf = self.serve.then(|| {
            "# Written by pimesh-supervisor: this server node serves time to its site.\n\
             local stratum 10\nallow\n"
                .to_owned()
        });
        let sources = (!self.sources.is_empty()).then(|| {
            let mut text =
                String::from("# Written by pimesh-supervisor: the site's server nodes.\n");
            for ip in &self.sources {
                text.push_str(&format!("server {ip} iburst\n"));
            }
            text
        });
        [(SERVER_CONF, conf), (SOURCES, sources)]
    }

    /// What the status shows as the node's time sources.
    pub fn describe(&self) -> Vec<String> {
        let mut out: Vec<String> = self.sources.iter().map(ToString::to_string).collect();
        if self.serve {
            out.push("local (this server node, stratum 10)".into());
        }
        out
    }
}

/// Writes `plan` into `dir`; returns whether a file changed.
pub fn write(dir: &Path, plan: &TimePlan) -> std::io::Result<bool> {
    let mut changed = false;
    for (name, text) in plan.files() {
        let path = dir.join(name);
        match text {
            Some(text) => {
                changed |= pimesh_runtime::atomic_file::replace(&path, text.as_bytes(), 0o644)?;
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => changed = true,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            },
        }
    }
    Ok(changed)
}

/// Writes `plan` and restarts chrony when that changed anything. Failures are logged: the
/// node keeps the time it has.
pub async fn apply(dir: PathBuf, plan: TimePlan) {
    match write(&dir, &plan) {
        Ok(false) => {}
        Ok(true) => {
            info!(serve = plan.serve, sources = ?plan.sources, "the site's time settings changed; restarting chrony");
            if let Err(err) = Systemd::try_restart(CHRONY_UNIT).await {
                warn!(%err, "cannot restart chrony; it takes the new settings at its next start");
            }
        }
        Err(err) => warn!(dir = %dir.display(), %err, "cannot write chrony's settings"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_serves_and_an_agent_takes_the_servers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = TimePlan {
            serve: true,
            sources: vec!["192.168.1.10".parse().expect("ip")],
        };
        assert!(write(dir.path(), &server).expect("write"));
        let conf = std::fs::read_to_string(dir.path().join(SERVER_CONF)).expect("conf");
        assert!(conf.contains("local stratum 10\nallow\n"), "{conf}");
        let sources = std::fs::read_to_string(dir.path().join(SOURCES)).expect("sources");
        assert!(
            sources.contains("server 192.168.1.10 iburst\n"),
            "{sources}"
        );
        assert!(!write(dir.path(), &server).expect("again"), "unchanged");

        let agent = TimePlan {
            serve: false,
            sources: vec![
                "192.168.1.10".parse().expect("ip"),
                "192.168.1.11".parse().expect("ip"),
            ],
        };
        assert!(write(dir.path(), &agent).expect("write"));
        assert!(
            !dir.path().join(SERVER_CONF).exists(),
            "an agent serves no time"
        );
        assert_eq!(agent.describe(), ["192.168.1.10", "192.168.1.11"]);
    }
}
