//! The changes the supervisor makes to the node from the seed, on every start: the
//! hostname and who may log in over SSH. Each is idempotent; a failure is reported in the
//! status and never stops the supervisor.

use std::path::Path;

use tracing::{info, warn};

use crate::node::facts::NodeFacts;
use crate::node::seed::SeedState;
use crate::paths::NodePaths;
use crate::status::TaskReport;
use pimesh_runtime::atomic_file;

/// The report of one setup task, logged as it is made.
fn task_report(task: &'static str, outcome: &'static str, detail: impl Into<String>) -> TaskReport {
    let report = TaskReport {
        task,
        outcome,
        detail: detail.into(),
    };
    if outcome == "failed" {
        warn!(task, detail = %report.detail, "node setup task failed");
    } else {
        info!(task, outcome, detail = %report.detail, "node setup task");
    }
    report
}

pub async fn apply(paths: &NodePaths, facts: &NodeFacts, seed: &SeedState) -> Vec<TaskReport> {
    vec![
        set_hostname(&facts.node_name).await,
        write_authorized_keys(&paths.authorized_keys("root"), seed),
    ]
}

#[zbus::proxy(
    interface = "org.freedesktop.hostname1",
    default_service = "org.freedesktop.hostname1",
    default_path = "/org/freedesktop/hostname1"
)]
trait Hostname1 {
    fn set_static_hostname(&self, hostname: &str, interactive: bool) -> zbus::Result<()>;
    fn set_hostname(&self, hostname: &str, interactive: bool) -> zbus::Result<()>;
    #[zbus(property)]
    fn static_hostname(&self) -> zbus::Result<String>;
}

/// How long systemd-hostnamed gets to answer.
const HOSTNAMED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sets the static and transient hostname through systemd-hostnamed over D-Bus.
async fn set_hostname(name: &str) -> TaskReport {
    const TASK: &str = "hostname";
    let change = async {
        let bus = zbus::Connection::system().await?;
        let hostnamed = Hostname1Proxy::new(&bus).await?;
        if hostnamed.static_hostname().await? == name {
            return Ok(false);
        }
        hostnamed.set_static_hostname(name, false).await?;
        hostnamed.set_hostname(name, false).await?;
        Ok::<_, zbus::Error>(true)
    };
    // A stuck bus must not hold back the supervisor's readiness (systemd would kill it).
    let result = match tokio::time::timeout(HOSTNAMED_TIMEOUT, change).await {
        Ok(result) => result,
        Err(_) => Err(zbus::Error::Failure(format!(
            "no answer within {}s",
            HOSTNAMED_TIMEOUT.as_secs()
        ))),
    };
    match result {
        Ok(true) => task_report(TASK, "changed", format!("hostname set to {name}")),
        Ok(false) => task_report(TASK, "unchanged", format!("hostname is {name}")),
        Err(err) => task_report(
            TASK,
            "failed",
            format!("cannot set hostname {name} through systemd-hostnamed: {err}"),
        ),
    }
}

/// Writes the seed's SSH keys as the whole of `path`. A seed that is invalid or not
/// configured leaves the file as it is, so a typo on the boot partition never locks the
/// operator out.
pub fn write_authorized_keys(path: &Path, seed: &SeedState) -> TaskReport {
    const TASK: &str = "ssh-authorized-keys";
    let Some(seed) = seed.seed() else {
        return task_report(TASK, "skipped", "no valid seed: keys left as they were");
    };
    let mut contents = String::from(
        "# Written by pimesh-supervisor from the seed's ssh_authorized_keys; edits are replaced.\n",
    );
    for key in &seed.ssh_authorized_keys {
        contents.push_str(key.as_line());
        contents.push('\n');
    }
    let count = seed.ssh_authorized_keys.len();
    match atomic_file::replace(path, contents.as_bytes(), 0o600) {
        Ok(true) => task_report(
            TASK,
            "changed",
            format!("{count} key(s) in {}", path.display()),
        ),
        Ok(false) => task_report(
            TASK,
            "unchanged",
            format!("{count} key(s) in {}", path.display()),
        ),
        Err(err) => task_report(
            TASK,
            "failed",
            format!("cannot write {}: {err}", path.display()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_a_valid_seed_and_survive_a_broken_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seed_path = dir.path().join("pimesh.toml");
        let keys = dir.path().join("etc/authorized_keys/root");
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq6Xv0m1d8h5JmG2bTpQ1N6s8t3ZxW9kH4cY ops@example";
        std::fs::write(
            &seed_path,
            format!("site = \"s\"\nrole = \"init\"\nssh_authorized_keys = [\"{key}\"]\n"),
        )
        .expect("seed");
        let report = write_authorized_keys(&keys, &SeedState::load(&seed_path));
        assert_eq!(report.outcome, "changed");
        assert!(std::fs::read_to_string(&keys).expect("keys").contains(key));

        std::fs::write(&seed_path, "site = \"s\"\nrole = \"chief\"\n").expect("broken seed");
        let report = write_authorized_keys(&keys, &SeedState::load(&seed_path));
        assert_eq!(report.outcome, "skipped");
        assert!(
            std::fs::read_to_string(&keys).expect("keys").contains(key),
            "keys kept"
        );
    }
}
