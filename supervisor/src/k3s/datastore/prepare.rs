//! The privileged steps, done by systemd for the supervisor (whose sandbox has no `/dev`
//! and cannot mount): transient units started over D-Bus (`StartTransientUnit`), which
//! systemd forgets at the next boot.
//!
//! - [`format`]: a oneshot `pimesh-datastore-mkfs.service` that checks, on the device
//!   itself, that the first and last MiB are all zeros (where partition tables, GPT's
//!   backup and every filesystem, RAID and LVM signature live) and only then runs
//!   `mkfs.ext4 -L pimesh-data -U <uuid>`; exit status 3 means "not blank", and nothing
//!   was written;
//! - [`mount`]: a mount unit for `/var/lib/rancher` (`What=/dev/disk/by-uuid/<uuid>`, which
//!   systemd waits for udev to make, `Options=noatime`, ordered before K3s's units so that
//!   a shutdown stops K3s before unmounting its data);
//! - [`k3s_running`]: whether K3s's unit runs (nothing is mounted under a running K3s).
//!
//! Every wait is bounded; a unit that failed is reset so that the next try can start it.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt as _;
use tracing::{info, warn};
use zbus::zvariant::Value;

use crate::units::role::{K3S_AGENT, K3S_SERVER};
use crate::units::systemd::Systemd;

/// The oneshot that formats a blank disk.
pub const MKFS_UNIT: &str = "pimesh-datastore-mkfs.service";

/// How long `mkfs.ext4` may take (lazy inode tables: seconds even on a large disk).
const MKFS_TIMEOUT: Duration = Duration::from_secs(300);

/// How long the mount may take, the wait for udev's link to the device included (systemd
/// gives a device 90 s).
const MOUNT_TIMEOUT: Duration = Duration::from_secs(120);

/// The exit status of the format script when the disk is not blank.
const NOT_BLANK: i32 = 3;

/// Checks the device's first and last MiB for zeros, then formats it. `$1`: the device,
/// `$2`: the filesystem's UUID.
const FORMAT_SCRIPT: &str = r#"set -eu
dev=$1 uuid=$2
[ -b "$dev" ] || { echo "$dev is not a block device"; exit 4; }
sectors=$(blockdev --getsz "$dev")
[ "$sectors" -ge 131072 ] || { echo "$dev is smaller than 64 MiB; not touched"; exit 3; }
zeros() { cmp -s -n 1048576 - /dev/zero; }
dd if="$dev" bs=512 count=2048 status=none | zeros || { echo "$dev: its first MiB holds data; not touched"; exit 3; }
dd if="$dev" bs=512 skip=$((sectors - 2048)) count=2048 status=none | zeros || { echo "$dev: its last MiB holds data; not touched"; exit 3; }
echo "$dev is blank: making an ext4 filesystem labelled pimesh-data"
exec mkfs.ext4 -F -q -L pimesh-data -U "$uuid" "$dev"
"#;

/// Why a step failed.
#[derive(Debug)]
pub enum PrepareError {
    /// systemd could not be asked.
    Bus { unit: String, source: zbus::Error },
    /// The unit ran and failed.
    Failed {
        unit: String,
        result: String,
        detail: String,
    },
    /// The disk is not blank after all (the zero check).
    NotBlank { device: String },
    /// No answer in time; the unit was stopped.
    Timeout { unit: String, after: Duration },
    /// K3s runs (from the SD card, started by an earlier run in this boot).
    K3sRunning { unit: &'static str },
}

impl fmt::Display for PrepareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrepareError::Bus { unit, source } => {
                write!(f, "cannot ask systemd over D-Bus about {unit}: {source}")
            }
            PrepareError::Failed {
                unit,
                result,
                detail,
            } => write!(
                f,
                "{unit} failed ({result}{detail}); `journalctl -u {unit}` says why"
            ),
            PrepareError::NotBlank { device } => write!(
                f,
                "{device} has data after all (its first or last MiB is not zeros); not touched"
            ),
            PrepareError::Timeout { unit, after } => {
                write!(f, "{unit} did not finish within {}s; stopped", after.as_secs())
            }
            PrepareError::K3sRunning { unit } => write!(
                f,
                "{unit} already runs from the SD card in this boot; the disk is mounted at the next boot"
            ),
        }
    }
}

impl std::error::Error for PrepareError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PrepareError::Bus { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The mount unit's name for `dir` (systemd's path escaping: `/var/lib/rancher` is
/// `var-lib-rancher.mount`).
pub fn mount_unit_name(dir: &Path) -> String {
    let path = dir.to_string_lossy();
    let trimmed = path.trim_matches('/');
    let mut name = String::new();
    for (i, byte) in trimmed.bytes().enumerate() {
        match byte {
            b'/' => name.push('-'),
            b'.' if i == 0 => name.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || b == b':' || b == b'_' || b == b'.' => {
                name.push(char::from(b))
            }
            b => name.push_str(&format!("\\x{b:02x}")),
        }
    }
    if name.is_empty() {
        name.push('-');
    }
    name + ".mount"
}

/// A new random (version 4) UUID for the filesystem, so that the mount names this disk
/// and no other.
pub fn new_uuid() -> String {
    let mut bytes = [0u8; 16];
    for byte in &mut bytes {
        *byte = fastrand::u8(..);
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The running K3s unit, if one runs.
pub async fn k3s_running(systemd: &Systemd) -> Result<Option<&'static str>, PrepareError> {
    for unit in [K3S_SERVER, K3S_AGENT] {
        let state = systemd
            .loaded_unit(unit)
            .await
            .map_err(|source| PrepareError::Bus {
                unit: unit.to_owned(),
                source,
            })?;
        if let Some((_, state)) = state {
            if matches!(
                state.active_state.as_str(),
                "active" | "activating" | "reloading" | "deactivating"
            ) {
                return Ok(Some(unit));
            }
        }
    }
    Ok(None)
}

/// Formats the blank `device` with a `pimesh-data` ext4 filesystem of UUID `uuid`, after
/// the zero check (see the module doc).
pub async fn format(systemd: &Systemd, device: &str, uuid: &str) -> Result<(), PrepareError> {
    let exec = vec![(
        "/bin/sh".to_owned(),
        vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            FORMAT_SCRIPT.to_owned(),
            "pimesh-datastore-mkfs".to_owned(),
            device.to_owned(),
            uuid.to_owned(),
        ],
        false,
    )];
    let properties = vec![
        (
            "Description",
            Value::from("Pimesh: a pimesh-data filesystem on a blank disk for K3s's data"),
        ),
        ("Type", Value::from("oneshot")),
        ("ExecStart", Value::from(exec)),
        ("TimeoutStartUSec", Value::from(micros(MKFS_TIMEOUT))),
    ];
    info!(device, uuid, "formatting a blank disk for K3s's data");
    match run(systemd, MKFS_UNIT, properties, MKFS_TIMEOUT).await {
        Ok(()) => Ok(()),
        Err(PrepareError::Failed { unit, result, .. }) => {
            let status = systemd
                .loaded_unit(MKFS_UNIT)
                .await
                .ok()
                .flatten()
                .map(|(_, state)| state.exec_main_status);
            forget(systemd, MKFS_UNIT).await;
            if status == Some(NOT_BLANK) {
                return Err(PrepareError::NotBlank {
                    device: device.to_owned(),
                });
            }
            Err(PrepareError::Failed {
                unit,
                result,
                detail: status.map_or(String::new(), |status| format!(", exit status {status}")),
            })
        }
        Err(err) => Err(err),
    }
}

/// Mounts the filesystem of UUID `uuid` on `dir` with `noatime`.
pub async fn mount(systemd: &Systemd, uuid: &str, dir: &Path) -> Result<(), PrepareError> {
    let unit = mount_unit_name(dir);
    let what = format!("/dev/disk/by-uuid/{uuid}");
    let properties = vec![
        (
            "Description",
            Value::from("Pimesh: K3s's data on its own disk"),
        ),
        ("What", Value::from(what.clone())),
        ("Where", Value::from(dir.to_string_lossy().into_owned())),
        ("Type", Value::from("ext4")),
        ("Options", Value::from("noatime")),
        (
            "Before",
            Value::from(vec![K3S_SERVER.to_owned(), K3S_AGENT.to_owned()]),
        ),
    ];
    info!(what, dir = %dir.display(), "mounting K3s's data disk");
    let result = run(systemd, &unit, properties, MOUNT_TIMEOUT).await;
    if matches!(result, Err(PrepareError::Failed { .. })) {
        forget(systemd, &unit).await;
    }
    result
}

/// Starts the transient `unit` and waits up to `timeout` for its start job; a unit that
/// does not finish in time is stopped.
async fn run(
    systemd: &Systemd,
    unit: &str,
    properties: Vec<(&str, Value<'_>)>,
    timeout: Duration,
) -> Result<(), PrepareError> {
    let bus = |source| PrepareError::Bus {
        unit: unit.to_owned(),
        source,
    };
    // A unit left failed by an earlier run of this boot would refuse the new one.
    forget(systemd, unit).await;
    let mut removed = systemd.manager().receive_job_removed().await.map_err(bus)?;
    let job = systemd
        .manager()
        .start_transient_unit(unit, "replace", &properties, &[])
        .await
        .map_err(bus)?;
    let wait = async {
        while let Some(signal) = removed.next().await {
            let Ok(args) = signal.args() else {
                continue;
            };
            if args.job().as_str() == job.as_str() {
                return Some(args.result().to_string());
            }
        }
        None
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(Some(result)) if result == "done" => Ok(()),
        Ok(Some(result)) => Err(PrepareError::Failed {
            unit: unit.to_owned(),
            result,
            detail: String::new(),
        }),
        Ok(None) => Err(PrepareError::Bus {
            unit: unit.to_owned(),
            source: zbus::Error::Failure("the connection to systemd ended".into()),
        }),
        Err(_) => {
            if let Err(err) = systemd.manager().stop_unit(unit, "replace").await {
                warn!(unit, %err, "cannot stop a unit that took too long");
            }
            Err(PrepareError::Timeout {
                unit: unit.to_owned(),
                after: timeout,
            })
        }
    }
}

/// Clears a failed transient unit so that systemd unloads it (an error means there was
/// none).
async fn forget(systemd: &Systemd, unit: &str) {
    let _ = systemd.manager().reset_failed_unit(unit).await;
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_units_are_named_as_systemd_escapes_paths() {
        assert_eq!(
            mount_unit_name(Path::new("/var/lib/rancher")),
            "var-lib-rancher.mount"
        );
        assert_eq!(
            mount_unit_name(Path::new("/srv/k3s-data/")),
            "srv-k3s\\x2ddata.mount"
        );
    }

    #[test]
    fn uuids_are_random_version_4() {
        let uuid = new_uuid();
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4");
        assert!("89ab".contains(&uuid[19..20]), "{uuid}");
        assert_ne!(uuid, new_uuid());
    }

    #[test]
    fn the_format_script_checks_both_ends_before_mkfs() {
        let check = FORMAT_SCRIPT.find("first MiB").expect("first");
        let end = FORMAT_SCRIPT.find("last MiB").expect("last");
        let mkfs = FORMAT_SCRIPT.find("exec mkfs.ext4").expect("mkfs");
        assert!(check < mkfs && end < mkfs);
        assert!(FORMAT_SCRIPT.contains("-L pimesh-data"));
        assert_eq!(super::super::disks::LABEL, "pimesh-data");
    }
}
