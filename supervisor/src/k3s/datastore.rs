//! K3s's data folder (`/var/lib/rancher`) on a USB or NVMe disk instead of the SD card,
//! when the node has one, and the `fsync` latency of whichever disk holds it.
//!
//! - [`disks`]: which disk, if any (pure: sysfs, udev's records, the mount table);
//! - [`prepare`]: formatting a blank disk and mounting it, through systemd's transient
//!   units (the supervisor's sandbox has no `/dev` and cannot mount);
//! - [`fsync`]: the probe and its last hour.
//!
//! [`Datastore::run`] chooses once per start of the supervisor, prepares, then opens the
//! [`Gate`] and asks for K3s to be placed again; then it probes every [`fsync::EVERY`].
//!
//! Invariants:
//! - K3s is not placed (its config is not written, its unit not started) while the gate is
//!   closed; the gate opens once the choice is settled, whatever the outcome: a disk that
//!   cannot be prepared is reported (`k3s.datastore.note`) and K3s runs on the SD card.
//!   Each step is bounded in time;
//! - a blank disk is adopted only while K3s has no data on the SD card (neither
//!   `k3s/server/db` nor `k3s/agent`); a disk labelled `pimesh-data` is mounted on every
//!   boot (transient units do not outlive a boot); nothing is mounted while K3s's unit
//!   runs; no disk is touched with `[k3s] datastore = "sd-card"` in the seed, without a
//!   valid seed, or off a node (`--no-node-setup`);
//! - the status's `device`, `mounted_at` and `filesystem` are what the supervisor itself
//!   finds at the folder (`stat` and its mount table), never what it meant to do.

pub mod disks;
pub mod fsync;
pub mod prepare;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pimesh_schema::DatastoreChoice;
use tracing::{info, warn};

use crate::paths::NodePaths;
use crate::status::{DatastoreReport, FsyncReport, StatusHandle};
use crate::units::systemd::Systemd;
use disks::{Decision, DevNo, Plan};

/// How long the choice waits for udev to finish probing the disks at boot.
const UDEV_SETTLE: Duration = Duration::from_secs(30);

/// Whether K3s may be placed: open once the datastore is settled. Cheap to clone; open by
/// default (off a node, in tests).
#[derive(Debug, Clone)]
pub struct Gate(Arc<AtomicBool>);

impl Default for Gate {
    fn default() -> Self {
        Gate(Arc::new(AtomicBool::new(true)))
    }
}

impl Gate {
    pub fn closed() -> Gate {
        Gate(Arc::new(AtomicBool::new(false)))
    }

    pub fn is_open(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn open(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The datastore task's inputs.
pub struct Datastore {
    gate: Gate,
    /// The seed's `[k3s] datastore`; `None` without a valid seed.
    choice: Option<DatastoreChoice>,
    /// Whether disks may be touched (`false` with `--no-node-setup`).
    on_node: bool,
    /// K3s's data folder (`/var/lib/rancher`).
    dir: PathBuf,
    /// K3s's own folder in it (`/var/lib/rancher/k3s`).
    k3s_data: PathBuf,
    /// Where `sys/`, `run/udev/` and `proc/` are: `/`.
    root: PathBuf,
}

impl Datastore {
    /// The datastore of the node at `paths`; on a node its gate starts closed.
    pub fn new(paths: &NodePaths, choice: Option<DatastoreChoice>, on_node: bool) -> Datastore {
        let k3s_data = paths.rancher_data.clone();
        Datastore {
            gate: if on_node {
                Gate::closed()
            } else {
                Gate::default()
            },
            choice,
            on_node,
            dir: k3s_data
                .parent()
                .map_or_else(|| k3s_data.clone(), Path::to_path_buf),
            k3s_data,
            root: PathBuf::from("/"),
        }
    }

    /// What K3s's placement checks.
    pub fn gate(&self) -> Gate {
        self.gate.clone()
    }

    /// Settles the datastore (see the module doc), calls `settled` (which places K3s
    /// again), then probes the folder's disk every [`fsync::EVERY`], for ever.
    pub async fn run(self, status: StatusHandle, settled: Box<dyn FnOnce() + Send>) {
        let mut report = if !self.on_node {
            DatastoreReport {
                state: "off-node",
                note: Some("no disk is chosen off a node (--no-node-setup)".into()),
                ..DatastoreReport::default()
            }
        } else if in_container() {
            // A container sees its host's /sys/block: those disks are not its own.
            DatastoreReport {
                state: "off-node",
                note: Some(
                    "no disk is chosen in a container (its host's disks are not the node's)".into(),
                ),
                ..DatastoreReport::default()
            }
        } else {
            self.settle(&status).await
        };
        self.gate.open();
        self.locate(&mut report);
        status.update(|status| status.k3s.datastore = Some(report.clone()));
        settled();
        self.probe_for_ever(report, status).await;
    }

    /// Chooses and prepares; returns the report (without the folder's location).
    async fn settle(&self, status: &StatusHandle) -> DatastoreReport {
        let show = |report: &DatastoreReport| {
            let report = report.clone();
            status.update(|status| status.k3s.datastore = Some(report));
        };
        let mut report = DatastoreReport {
            state: "choosing",
            ..DatastoreReport::default()
        };
        show(&report);
        let decision = self.choose().await;
        report.left_alone = decision.left_alone.clone();
        for why in &decision.left_alone {
            info!(why, "a disk is not used for K3s's data");
        }
        let (disk, uuid, because) = match decision.plan {
            Plan::Mounted => {
                report.state = "disk";
                report.chosen_because = Some(format!("{} is a mount already", self.dir.display()));
                return report;
            }
            Plan::SdCard { note } => {
                info!(%note, "K3s's data stays on the SD card");
                report.state = "sd-card";
                report.note = Some(note);
                return report;
            }
            Plan::Adopt { disk, because } => {
                let uuid = match &disk.contents {
                    disks::Contents::Prepared { uuid } => uuid.clone(),
                    _ => String::new(),
                };
                (disk, Some(uuid), because)
            }
            Plan::Format { disk, because } => (disk, None, because),
        };
        report.state = "preparing";
        report.chosen_because = Some(because.clone());
        report.note = Some(format!(
            "{} {}; K3s waits",
            if uuid.is_some() {
                "mounting"
            } else {
                "formatting"
            },
            disk.device()
        ));
        show(&report);
        match self.prepare(&disk.device(), uuid).await {
            Ok(()) => {
                info!(device = %disk.device(), because, dir = %self.dir.display(), "K3s's data is on its own disk");
                report.state = "disk";
                report.note = None;
            }
            Err(err) => {
                warn!(device = %disk.device(), %err, "cannot put K3s's data on its own disk; it stays on the SD card");
                report.state = "sd-card";
                report.chosen_because = None;
                report.note = Some(format!(
                    "{} was chosen ({because}) but not prepared: {err}; K3s's data stays on the SD card",
                    disk.device()
                ));
            }
        }
        report
    }

    /// Looks at the disks, waiting (bounded) while udev still probes them.
    async fn choose(&self) -> Decision {
        let started = Instant::now();
        loop {
            let mountinfo =
                std::fs::read_to_string(self.root.join("proc/self/mountinfo")).unwrap_or_default();
            let mounts = disks::mounts(&mountinfo);
            let scan = disks::scan(&self.root, &mounts);
            let udev_busy = self.root.join("run/udev/queue").exists();
            if (udev_busy || scan.unprobed()) && started.elapsed() < UDEV_SETTLE {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let on_sd_card =
                self.k3s_data.join("server/db").exists() || self.k3s_data.join("agent").exists();
            return disks::decide(&disks::Inputs {
                choice: self.choice,
                scan: &scan,
                mounted: disks::mounted_at(&mounts, &self.dir),
                k3s_data_on_sd_card: on_sd_card,
            });
        }
    }

    /// Formats `device` (when `uuid` is `None`) and mounts it on the folder.
    async fn prepare(
        &self,
        device: &str,
        uuid: Option<String>,
    ) -> Result<(), prepare::PrepareError> {
        let systemd = Systemd::connect()
            .await
            .map_err(|source| prepare::PrepareError::Bus {
                unit: "systemd".into(),
                source,
            })?;
        if let Some(unit) = prepare::k3s_running(&systemd).await? {
            return Err(prepare::PrepareError::K3sRunning { unit });
        }
        let uuid = match uuid {
            Some(uuid) => uuid,
            None => {
                let uuid = prepare::new_uuid();
                prepare::format(&systemd, device, &uuid).await?;
                uuid
            }
        };
        prepare::mount(&systemd, &uuid, &self.dir).await?;
        // A new filesystem holds nothing: K3s's auto-deploy folder, which the supervisor
        // writes the site's manifests to, is made as the image makes it on the card.
        let manifests = self.k3s_data.join("server/manifests");
        if let Err(err) = std::fs::create_dir_all(&manifests) {
            warn!(folder = %manifests.display(), %err, "cannot make K3s's manifests folder on its disk");
        }
        Ok(())
    }

    /// Fills in where the folder is: its disk, mount point, filesystem and label.
    fn locate(&self, report: &mut DatastoreReport) {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(meta) = std::fs::metadata(&self.dir) else {
            report.device = None;
            report.mounted_at = None;
            report.filesystem = None;
            report.label = None;
            return;
        };
        let devno = DevNo::from_st_dev(meta.dev());
        let mountinfo =
            std::fs::read_to_string(self.root.join("proc/self/mountinfo")).unwrap_or_default();
        // The filesystem mounted whole whose mount point holds the folder (not the
        // sandbox's bind of the folder itself).
        let mount = disks::mounts(&mountinfo)
            .into_iter()
            .filter(|mount| {
                mount.devno == devno
                    && mount.root == Path::new("/")
                    && self.dir.starts_with(&mount.mount_point)
            })
            .max_by_key(|mount| mount.mount_point.as_os_str().len());
        report.mounted_at = mount
            .as_ref()
            .map(|mount| mount.mount_point.display().to_string());
        report.filesystem = mount.map(|mount| mount.fstype);
        report.device = whole_disk(&self.root, devno).map(|name| format!("/dev/{name}"));
        report.label = disks::udev_record(&self.root, devno)
            .and_then(|record| record.get("ID_FS_LABEL").cloned());
    }

    /// The probe every [`fsync::EVERY`]: each bounded by [`fsync::TIMEOUT`]; one that
    /// does not return is waited for before the next starts.
    async fn probe_for_ever(self, mut report: DatastoreReport, status: StatusHandle) {
        let file = self.dir.join(fsync::FILE_NAME);
        let mut window = fsync::Window::default();
        let mut every = tokio::time::interval(fsync::EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<(Instant, tokio::task::JoinHandle<_>)> = None;
        let mut last_error: Option<String> = None;
        loop {
            every.tick().await;
            self.locate(&mut report);
            let (started, mut handle) = match pending.take() {
                Some((started, handle)) if !handle.is_finished() => {
                    let error = format!(
                        "the fsync started {}s ago has not returned",
                        started.elapsed().as_secs()
                    );
                    pending = Some((started, handle));
                    report.fsync_ms = Some(fsync_report(&window, Some(error)));
                    status.update(|status| status.k3s.datastore = Some(report.clone()));
                    continue;
                }
                _ => {
                    let file = file.clone();
                    (
                        Instant::now(),
                        tokio::task::spawn_blocking(move || fsync::probe(&file)),
                    )
                }
            };
            let error = match tokio::time::timeout(fsync::TIMEOUT, &mut handle).await {
                Ok(Ok(Ok(took))) => {
                    window.record(Instant::now(), took);
                    None
                }
                Ok(Ok(Err(err))) => Some(err.to_string()),
                Ok(Err(err)) => Some(format!("the fsync probe stopped: {err}")),
                Err(_) => {
                    pending = Some((started, handle));
                    Some(format!(
                        "no answer within {}s from fsync on {}",
                        fsync::TIMEOUT.as_secs(),
                        file.display()
                    ))
                }
            };
            if error != last_error {
                if let Some(error) = &error {
                    warn!(%error, "the datastore's fsync probe failed");
                }
                last_error.clone_from(&error);
            }
            report.fsync_ms = Some(fsync_report(&window, error));
            status.update(|status| status.k3s.datastore = Some(report.clone()));
        }
    }
}

fn fsync_report(window: &fsync::Window, error: Option<String>) -> FsyncReport {
    FsyncReport {
        last: window.last().map(fsync::millis),
        max_of_last_hour: window.max().map(fsync::millis),
        error,
    }
}

/// The whole disk of the block device `devno` (`mmcblk0` for `mmcblk0p2`), from
/// `root/sys/dev/block/<devno>`; `None` for a filesystem on no block device.
fn whole_disk(root: &Path, devno: DevNo) -> Option<String> {
    let dir = std::fs::canonicalize(root.join(format!("sys/dev/block/{devno}"))).ok()?;
    let disk = if dir.join("partition").exists() {
        dir.parent()?
    } else {
        &dir
    };
    disk.file_name()?.to_str().map(str::to_owned)
}

/// Whether this system runs in a container (systemd writes `/run/systemd/container` in
/// one, nspawn's included).
fn in_container() -> bool {
    Path::new("/run/systemd/container").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_is_open_by_default_and_closed_on_a_node_until_settled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = NodePaths::under(dir.path());
        assert!(Gate::default().is_open());
        let datastore = Datastore::new(&paths, Some(DatastoreChoice::Auto), true);
        assert!(!datastore.gate().is_open());
        assert_eq!(datastore.dir, dir.path().join("var/lib/rancher"));
        datastore.gate.open();
        assert!(datastore.gate().is_open());
        assert!(Datastore::new(&paths, None, false).gate().is_open());
    }

    #[test]
    fn the_whole_disk_of_a_partition_is_its_parent_in_sysfs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let part = root.join("sys/devices/platform/mmc0/block/mmcblk0/mmcblk0p2");
        std::fs::create_dir_all(&part).expect("mkdir");
        std::fs::write(part.join("partition"), "2\n").expect("partition");
        let nvme = root.join("sys/devices/pci0000:00/nvme/nvme0/nvme0n1");
        std::fs::create_dir_all(&nvme).expect("mkdir");
        std::fs::create_dir_all(root.join("sys/dev/block")).expect("mkdir");
        std::os::unix::fs::symlink(&part, root.join("sys/dev/block/179:2")).expect("link");
        std::os::unix::fs::symlink(&nvme, root.join("sys/dev/block/259:0")).expect("link");
        let devno = |text| DevNo::parse(text).expect("devno");
        assert_eq!(whole_disk(root, devno("179:2")).as_deref(), Some("mmcblk0"));
        assert_eq!(whole_disk(root, devno("259:0")).as_deref(), Some("nvme0n1"));
        assert_eq!(whole_disk(root, devno("0:25")), None);
    }

    #[tokio::test]
    async fn off_a_node_nothing_is_chosen_and_the_folder_is_probed_where_it_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = NodePaths::under(dir.path());
        std::fs::create_dir_all(&paths.rancher_data).expect("mkdir");
        let mut datastore = Datastore::new(&paths, Some(DatastoreChoice::Auto), false);
        datastore.root = dir.path().to_path_buf();
        let status = StatusHandle::new(crate::status::NodeStatus::new(
            crate::status::NodeInfo {
                name: "pi-a".into(),
                name_source: "seed",
                model: None,
                boot_id: None,
            },
            crate::status::SeedReport {
                state: "valid",
                file: PathBuf::from("pimesh.toml"),
                summary: None,
                reason: None,
                error: None,
            },
            crate::status::K3sPresence {
                present: false,
                path: "/usr/local/bin/k3s".into(),
                version: None,
            },
            None,
            Vec::new(),
            crate::status::ConfigReport {
                file: PathBuf::from("supervisor.toml"),
                source: "defaults",
                error: None,
            },
        ));
        let (placed, was_placed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(datastore.run(
            status.clone(),
            Box::new(move || {
                let _ = placed.send(());
            }),
        ));
        was_placed.await.expect("placed again once settled");
        let report = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let report = status.0.read().expect("status").k3s.datastore.clone();
                if let Some(report) = report.filter(|report| report.fsync_ms.is_some()) {
                    return report;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("probed once at the start");
        task.abort();
        assert_eq!(report.state, "off-node");
        let fsync = report.fsync_ms.expect("probed");
        assert!(fsync.error.is_none(), "{fsync:?}");
        assert!(fsync.last.is_some() && fsync.max_of_last_hour >= fsync.last);
        assert!(dir
            .path()
            .join("var/lib/rancher")
            .join(fsync::FILE_NAME)
            .exists());
    }
}
