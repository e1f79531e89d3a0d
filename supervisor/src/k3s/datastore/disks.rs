//! Which disk may hold K3s's data: the whole disks the kernel lists, what udev found on
//! them, and the choice between adopting, formatting and leaving them alone. Pure: it
//! reads a root folder (`/` on a node, a fake tree in the tests) and the mount table text.
//!
//! Invariants:
//! - a candidate is a whole disk under `/sys/block` that is NVMe (`nvme<N>n<M>`) or sits
//!   on USB (its resolved `device` path goes through `/usb`), writable, of non-zero size,
//!   and not in use: neither it nor any of its partitions is mounted (so never the disk
//!   holding `/` or `/boot/firmware`);
//! - only two kinds of candidates are ever used: one carrying an ext4 filesystem labelled
//!   [`LABEL`] (adopted: made by an earlier boot) and one on which udev found no partition
//!   table, no partition and no filesystem (formatted, after the zero check of its first
//!   and last MiB that [`super::prepare`] runs in the privileged step). Every other disk is
//!   named in [`Decision::left_alone`] and never written;
//! - NVMe is preferred over USB, then the first by name; a labelled disk is preferred over
//!   a blank one (it holds the data).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use pimesh_schema::DatastoreChoice;

/// The label of the filesystem that holds K3s's data on its own disk.
pub const LABEL: &str = "pimesh-data";

/// A block device's number, `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevNo {
    pub major: u32,
    pub minor: u32,
}

impl DevNo {
    /// Parses `259:0` (a sysfs `dev` file, a mountinfo field).
    pub fn parse(text: &str) -> Option<DevNo> {
        let (major, minor) = text.trim().split_once(':')?;
        Some(DevNo {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }

    /// Splits a `st_dev` as glibc encodes it.
    pub fn from_st_dev(dev: u64) -> DevNo {
        DevNo {
            major: (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32,
            minor: (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32,
        }
    }
}

impl fmt::Display for DevNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub devno: DevNo,
    /// The folder of the filesystem mounted: `/` for a filesystem mounted whole, a
    /// sub-folder for a bind mount (as systemd makes for a sandbox's `ReadWritePaths=`).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// The mounts of a `mountinfo` text (lines it cannot read are skipped).
pub fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let mut after = after.split(' ');
            Some(Mount {
                devno: DevNo::parse(fields.get(2)?)?,
                root: PathBuf::from(unescape(fields.get(3)?)),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fstype: after.next()?.to_owned(),
                source: unescape(after.next()?),
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The filesystem mounted whole on `dir` itself, if any; a bind of a folder of another
/// filesystem (the supervisor's own sandbox makes one on `/var/lib/rancher`) is not one.
pub fn mounted_at<'a>(mounts: &'a [Mount], dir: &Path) -> Option<&'a Mount> {
    mounts
        .iter()
        .rev()
        .find(|mount| mount.mount_point == dir && mount.root == Path::new("/"))
}

/// How a candidate disk is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bus {
    Nvme,
    Usb,
}

impl Bus {
    pub fn as_str(self) -> &'static str {
        match self {
            Bus::Nvme => "NVMe",
            Bus::Usb => "USB",
        }
    }
}

/// What udev found on a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// No partition table, no partition, no filesystem signature.
    Blank,
    /// An ext4 filesystem labelled [`LABEL`], with its UUID.
    Prepared { uuid: String },
    /// Anything else, in words (`an ntfs filesystem labelled "backup"`).
    Data(String),
    /// udev has no record of the disk (yet).
    Unprobed,
}

/// A candidate disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The kernel's name (`nvme0n1`, `sda`).
    pub name: String,
    pub devno: DevNo,
    pub bus: Bus,
    pub size_bytes: u64,
    pub contents: Contents,
}

impl Disk {
    /// `/dev/<name>`.
    pub fn device(&self) -> String {
        format!("/dev/{}", self.name)
    }
}

/// The disks found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// NVMe and USB disks that are writable, not empty and not in use.
    pub disks: Vec<Disk>,
    /// Why each other NVMe or USB disk is not a candidate.
    pub skipped: Vec<String>,
}

impl Scan {
    /// Whether a candidate has no udev record yet (the caller looks again shortly).
    pub fn unprobed(&self) -> bool {
        self.disks
            .iter()
            .any(|disk| disk.contents == Contents::Unprobed)
    }
}

/// Lists the candidate disks under `root` (`root/sys/block`, udev's records in
/// `root/run/udev/data`), given the mounts of the node.
pub fn scan(root: &Path, mounts: &[Mount]) -> Scan {
    let mut found = Scan::default();
    let Ok(entries) = std::fs::read_dir(root.join("sys/block")) else {
        return found;
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names {
        let dir = root.join("sys/block").join(&name);
        let bus = if is_nvme_namespace(&name) {
            Bus::Nvme
        } else if std::fs::canonicalize(dir.join("device"))
            .is_ok_and(|device| device.to_string_lossy().contains("/usb"))
        {
            Bus::Usb
        } else {
            continue;
        };
        let device = format!("/dev/{name}");
        let Some(devno) = read_trimmed(&dir.join("dev")).and_then(|text| DevNo::parse(&text))
        else {
            found
                .skipped
                .push(format!("{device}: no device number in sysfs; not touched"));
            continue;
        };
        let partitions = partitions(&dir);
        let in_use: Vec<String> = mounts
            .iter()
            .filter(|mount| {
                mount.devno == devno
                    || partitions.values().any(|part| *part == mount.devno)
                    || mount.source == device
                    || partitions
                        .keys()
                        .any(|part| mount.source == format!("/dev/{part}"))
            })
            .map(|mount| mount.mount_point.display().to_string())
            .collect();
        if !in_use.is_empty() {
            found.skipped.push(format!(
                "{device} is in use (mounted at {}); not touched",
                in_use.join(", ")
            ));
            continue;
        }
        if read_trimmed(&dir.join("ro")).as_deref() == Some("1") {
            found
                .skipped
                .push(format!("{device} is read-only; not touched"));
            continue;
        }
        let size_bytes = read_trimmed(&dir.join("size"))
            .and_then(|sectors| sectors.parse::<u64>().ok())
            .map_or(0, |sectors| sectors.saturating_mul(512));
        if size_bytes == 0 {
            found
                .skipped
                .push(format!("{device} has no medium (size 0); not touched"));
            continue;
        }
        let contents = if partitions.is_empty() {
            udev_record(root, devno).map_or(Contents::Unprobed, |record| contents(&record))
        } else {
            let names: Vec<&str> = partitions.keys().map(String::as_str).collect();
            Contents::Data(format!("partitions ({})", names.join(", ")))
        };
        found.disks.push(Disk {
            name,
            devno,
            bus,
            size_bytes,
            contents,
        });
    }
    found
}

/// `nvme<N>n<M>`: an NVMe namespace (not a controller, not a partition, not the hidden
/// per-path `nvme<N>c<C>n<M>`).
fn is_nvme_namespace(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("nvme") else {
        return false;
    };
    let Some((controller, namespace)) = rest.split_once('n') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(controller) && digits(namespace)
}

/// The disk's partitions (sub-folders with a `partition` file) and their numbers.
fn partitions(disk_dir: &Path) -> BTreeMap<String, DevNo> {
    let Ok(entries) = std::fs::read_dir(disk_dir) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| entry.path().join("partition").exists())
        .filter_map(|entry| {
            let devno = read_trimmed(&entry.path().join("dev")).and_then(|t| DevNo::parse(&t))?;
            Some((entry.file_name().into_string().ok()?, devno))
        })
        .collect()
}

fn read_trimmed(file: &Path) -> Option<String> {
    std::fs::read_to_string(file)
        .ok()
        .map(|text| text.trim().to_owned())
}

/// udev's record of a block device (`run/udev/data/b<major>:<minor>`): its `E:` properties.
pub fn udev_record(root: &Path, devno: DevNo) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(root.join(format!("run/udev/data/b{devno}"))).ok()?;
    Some(
        text.lines()
            .filter_map(|line| line.strip_prefix("E:"))
            .filter_map(|property| property.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect(),
    )
}

/// What udev's properties say is on a whole disk.
fn contents(record: &BTreeMap<String, String>) -> Contents {
    let get = |key: &str| {
        record
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    match (get("ID_FS_TYPE"), get("ID_FS_LABEL"), get("ID_FS_UUID")) {
        (Some("ext4"), Some(LABEL), Some(uuid)) => Contents::Prepared {
            uuid: uuid.to_owned(),
        },
        (Some(fstype), label, _) => Contents::Data(match label {
            Some(label) => format!("a {fstype} filesystem labelled {label:?}"),
            None => format!("a {fstype} filesystem"),
        }),
        (None, _, _) => match get("ID_PART_TABLE_TYPE") {
            Some(table) => Contents::Data(format!("a {table} partition table")),
            None => Contents::Blank,
        },
    }
}

/// What the node knows when it chooses.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The seed's `[k3s] datastore`; `None` without a valid seed.
    pub choice: Option<DatastoreChoice>,
    pub scan: &'a Scan,
    /// The mount on K3s's data folder, when there is one already.
    pub mounted: Option<&'a Mount>,
    /// K3s's data is on the SD card already (`k3s/server/db` or `k3s/agent` there).
    pub k3s_data_on_sd_card: bool,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The folder is a mount already (an earlier run of the supervisor in this boot, or
    /// the operator's fstab): kept as it is.
    Mounted,
    /// K3s's data stays on the SD card, for this reason.
    SdCard { note: String },
    /// Mount this disk's `pimesh-data` filesystem.
    Adopt { disk: Disk, because: String },
    /// Make a `pimesh-data` filesystem on this blank disk, then mount it.
    Format { disk: Disk, because: String },
}

/// The plan, and the disks left alone and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub plan: Plan,
    pub left_alone: Vec<String>,
}

/// Chooses where K3s's data goes (see the module's invariants).
pub fn decide(inputs: &Inputs<'_>) -> Decision {
    let mut left_alone = inputs.scan.skipped.clone();
    let sd_card = |note: &str, left_alone: Vec<String>| Decision {
        plan: Plan::SdCard {
            note: note.to_owned(),
        },
        left_alone,
    };
    if inputs.mounted.is_some() {
        return Decision {
            plan: Plan::Mounted,
            left_alone: Vec::new(),
        };
    }
    match inputs.choice {
        None => return sd_card("no valid seed: no disk is touched", left_alone),
        Some(DatastoreChoice::SdCard) => {
            return sd_card(
                "the seed says [k3s] datastore = \"sd-card\": no disk is touched",
                Vec::new(),
            )
        }
        Some(DatastoreChoice::Auto) => {}
    }
    let mut prepared: Vec<&Disk> = Vec::new();
    let mut blank: Vec<&Disk> = Vec::new();
    for disk in &inputs.scan.disks {
        match &disk.contents {
            Contents::Prepared { .. } => prepared.push(disk),
            Contents::Blank => blank.push(disk),
            Contents::Data(what) => {
                left_alone.push(format!("{} has data ({what}); not touched", disk.device()))
            }
            Contents::Unprobed => left_alone.push(format!(
                "{}: udev has not probed it; not touched",
                disk.device()
            )),
        }
    }
    let order = |disk: &&Disk| (disk.bus, disk.name.clone());
    prepared.sort_by_key(order);
    blank.sort_by_key(order);
    if let Some((first, others)) = prepared.split_first() {
        for other in others {
            left_alone.push(format!(
                "{} is also labelled {LABEL}; only {} is used",
                other.device(),
                first.device()
            ));
        }
        for disk in &blank {
            left_alone.push(format!(
                "{} is blank; the datastore is on {} already",
                disk.device(),
                first.device()
            ));
        }
        return Decision {
            plan: Plan::Adopt {
                disk: (*first).clone(),
                because: format!(
                    "{} disk with the {LABEL} filesystem an earlier boot made",
                    first.bus.as_str()
                ),
            },
            left_alone,
        };
    }
    if inputs.k3s_data_on_sd_card {
        return sd_card(
            "K3s's data is on the SD card; a disk is used only before K3s's first start",
            left_alone,
        );
    }
    if let Some((first, others)) = blank.split_first() {
        for other in others {
            left_alone.push(format!(
                "{} is blank too; only {} is used",
                other.device(),
                first.device()
            ));
        }
        return Decision {
            plan: Plan::Format {
                disk: (*first).clone(),
                because: format!(
                    "blank {} disk ({} MiB): no partition table, no filesystem",
                    first.bus.as_str(),
                    first.size_bytes / (1024 * 1024)
                ),
            },
            left_alone,
        };
    }
    let note = if left_alone.is_empty() {
        "no USB or NVMe disk"
    } else {
        "no usable USB or NVMe disk"
    };
    sd_card(note, left_alone)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/sys` and `/run/udev` under a temp dir.
    struct Fake {
        dir: tempfile::TempDir,
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                dir: tempfile::tempdir().expect("tempdir"),
            }
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        /// A whole disk `name` whose device sits at `device` (under `sys/devices`).
        fn disk(&self, name: &str, devno: &str, sectors: u64, device: &str) -> PathBuf {
            let dir = self.root().join("sys/block").join(name);
            std::fs::create_dir_all(&dir).expect("mkdir");
            let target = self.root().join("sys/devices").join(device);
            std::fs::create_dir_all(&target).expect("mkdir");
            std::os::unix::fs::symlink(&target, dir.join("device")).expect("symlink");
            std::fs::write(dir.join("dev"), format!("{devno}\n")).expect("dev");
            std::fs::write(dir.join("size"), format!("{sectors}\n")).expect("size");
            std::fs::write(dir.join("ro"), "0\n").expect("ro");
            dir
        }

        fn udev(&self, devno: &str, properties: &[&str]) {
            let dir = self.root().join("run/udev/data");
            std::fs::create_dir_all(&dir).expect("mkdir");
            let text: String = properties.iter().map(|p| format!("E:{p}\n")).collect();
            std::fs::write(
                dir.join(format!("b{devno}")),
                format!("I:123\n{text}G:systemd\n"),
            )
            .expect("udev");
        }
    }

    const USB: &str = "platform/scb/fd500000.pcie/pci0000:00/0000:01:00.0/usb2/2-1/2-1:1.0/host0/target0:0:0/0:0:0:0";
    const MOUNTINFO: &str = "\
22 1 179:2 / / rw,noatime shared:1 - ext4 /dev/mmcblk0p2 rw\n\
25 22 179:1 / /boot/firmware rw,relatime shared:9 - vfat /dev/mmcblk0p1 rw\n\
30 22 0:25 / /run rw,nosuid shared:5 - tmpfs tmpfs rw\n";

    #[test]
    fn nvme_and_usb_disks_are_candidates_and_the_root_disk_and_others_are_not() {
        let fake = Fake::new();
        let sd = fake.disk(
            "mmcblk0",
            "179:0",
            62_333_952,
            "platform/emmc2bus/fe340000.mmc/mmc_host/mmc0/mmc0:aaaa",
        );
        for (part, devno) in [("mmcblk0p1", "179:1"), ("mmcblk0p2", "179:2")] {
            std::fs::create_dir_all(sd.join(part)).expect("mkdir");
            std::fs::write(sd.join(part).join("partition"), "1\n").expect("partition");
            std::fs::write(sd.join(part).join("dev"), devno).expect("dev");
        }
        fake.disk(
            "nvme0n1",
            "259:0",
            500_118_192,
            "pci0000:00/0000:01:00.0/nvme/nvme0",
        );
        fake.disk("sda", "8:0", 1_000_000, USB);
        fake.disk(
            "sdb",
            "8:16",
            1_000_000,
            "platform/sata/ata1/host1/target1:0:0/1:0:0:0",
        );
        fake.disk("loop0", "7:0", 1000, "virtual/loop0");
        fake.disk(
            "nvme1c1n1",
            "259:9",
            1000,
            "pci0000:00/0000:02:00.0/nvme/nvme1",
        );
        let ro = fake.disk("sdc", "8:32", 1_000_000, &USB.replace("2-1", "2-2"));
        std::fs::write(ro.join("ro"), "1\n").expect("ro");
        fake.disk("sdd", "8:48", 0, &USB.replace("2-1", "2-3"));
        fake.udev("259:0", &["ID_MODEL=QEMU NVMe Ctrl"]);
        fake.udev(
            "8:0",
            &["ID_FS_TYPE=ntfs", "ID_FS_LABEL=backup", "ID_FS_UUID=1234"],
        );

        let scan = scan(fake.root(), &mounts(MOUNTINFO));
        let names: Vec<(&str, Bus)> = scan
            .disks
            .iter()
            .map(|d| (d.name.as_str(), d.bus))
            .collect();
        assert_eq!(names, [("nvme0n1", Bus::Nvme), ("sda", Bus::Usb)]);
        assert_eq!(scan.disks[0].contents, Contents::Blank);
        assert_eq!(scan.disks[0].size_bytes, 500_118_192 * 512);
        assert_eq!(
            scan.disks[0].devno,
            DevNo {
                major: 259,
                minor: 0
            }
        );
        assert_eq!(
            scan.disks[1].contents,
            Contents::Data("a ntfs filesystem labelled \"backup\"".into())
        );
        assert_eq!(
            scan.skipped,
            [
                "/dev/sdc is read-only; not touched",
                "/dev/sdd has no medium (size 0); not touched"
            ]
        );

        // A USB SD card reader booted from: the root disk is never a candidate.
        let usb_root = MOUNTINFO
            .replace("179:2", "8:2")
            .replace("mmcblk0p2", "sda2");
        let part = fake.root().join("sys/block/sda/sda2");
        std::fs::create_dir_all(&part).expect("mkdir");
        std::fs::write(part.join("partition"), "2\n").expect("partition");
        std::fs::write(part.join("dev"), "8:2\n").expect("dev");
        let scan = super::scan(fake.root(), &mounts(&usb_root));
        assert_eq!(scan.disks.len(), 1, "{scan:?}");
        assert_eq!(
            scan.skipped[0],
            "/dev/sda is in use (mounted at /); not touched"
        );
    }

    #[test]
    fn partitions_and_a_missing_udev_record_count_as_not_blank() {
        let fake = Fake::new();
        let sda = fake.disk("sda", "8:0", 1_000_000, USB);
        std::fs::create_dir_all(sda.join("sda1")).expect("mkdir");
        std::fs::write(sda.join("sda1/partition"), "1\n").expect("partition");
        std::fs::write(sda.join("sda1/dev"), "8:1\n").expect("dev");
        fake.udev("8:0", &[]);
        fake.disk(
            "nvme0n1",
            "259:0",
            1000,
            "pci0000:00/0000:01:00.0/nvme/nvme0",
        );
        let scan = scan(fake.root(), &[]);
        assert!(scan.unprobed());
        let decision = decide(&Inputs {
            choice: Some(DatastoreChoice::Auto),
            scan: &scan,
            mounted: None,
            k3s_data_on_sd_card: false,
        });
        assert_eq!(
            decision.plan,
            Plan::SdCard {
                note: "no usable USB or NVMe disk".into()
            }
        );
        assert_eq!(
            decision.left_alone,
            [
                "/dev/nvme0n1: udev has not probed it; not touched",
                "/dev/sda has data (partitions (sda1)); not touched"
            ]
        );
    }

    fn disk(name: &str, bus: Bus, contents: Contents) -> Disk {
        Disk {
            name: name.into(),
            devno: DevNo { major: 8, minor: 0 },
            bus,
            size_bytes: 256 * 1024 * 1024,
            contents,
        }
    }

    fn decide_for(disks: Vec<Disk>, on_sd: bool) -> Decision {
        let scan = Scan {
            disks,
            skipped: Vec::new(),
        };
        decide(&Inputs {
            choice: Some(DatastoreChoice::Auto),
            scan: &scan,
            mounted: None,
            k3s_data_on_sd_card: on_sd,
        })
    }

    #[test]
    fn a_blank_disk_is_formatted_nvme_first_and_one_with_data_is_left_alone() {
        let decision = decide_for(
            vec![
                disk("sda", Bus::Usb, Contents::Blank),
                disk(
                    "sdb",
                    Bus::Usb,
                    Contents::Data("a dos partition table".into()),
                ),
                disk("nvme0n1", Bus::Nvme, Contents::Blank),
            ],
            false,
        );
        let Plan::Format {
            disk: chosen,
            because,
        } = decision.plan
        else {
            panic!("not formatted: {decision:?}");
        };
        assert_eq!(chosen.device(), "/dev/nvme0n1");
        assert!(
            because.starts_with("blank NVMe disk (256 MiB)"),
            "{because}"
        );
        assert_eq!(
            decision.left_alone,
            [
                "/dev/sdb has data (a dos partition table); not touched",
                "/dev/sda is blank too; only /dev/nvme0n1 is used"
            ]
        );

        // Two USB disks: the first by name.
        let decision = decide_for(
            vec![
                disk("sdb", Bus::Usb, Contents::Blank),
                disk("sda", Bus::Usb, Contents::Blank),
            ],
            false,
        );
        assert!(matches!(decision.plan, Plan::Format { disk, .. } if disk.name == "sda"));
    }

    #[test]
    fn a_labelled_disk_is_always_adopted_and_a_blank_one_only_before_k3s_first_start() {
        let prepared = Contents::Prepared {
            uuid: "0b6c3f0e-8f6e-4f5e-9f51-d6e3a7c1a001".into(),
        };
        for on_sd in [false, true] {
            let decision = decide_for(
                vec![
                    disk("nvme0n1", Bus::Nvme, Contents::Blank),
                    disk("sda", Bus::Usb, prepared.clone()),
                ],
                on_sd,
            );
            let Plan::Adopt {
                disk: chosen,
                because,
            } = decision.plan
            else {
                panic!("not adopted: {decision:?}");
            };
            assert_eq!(chosen.name, "sda");
            assert!(because.contains("pimesh-data"), "{because}");
        }
        let decision = decide_for(vec![disk("nvme0n1", Bus::Nvme, Contents::Blank)], true);
        assert_eq!(
            decision.plan,
            Plan::SdCard {
                note: "K3s's data is on the SD card; a disk is used only before K3s's first start"
                    .into()
            }
        );
    }

    #[test]
    fn the_seed_an_existing_mount_or_no_disk_keep_the_sd_card() {
        let scan = Scan {
            disks: vec![disk("nvme0n1", Bus::Nvme, Contents::Blank)],
            skipped: Vec::new(),
        };
        let mut inputs = Inputs {
            choice: Some(DatastoreChoice::SdCard),
            scan: &scan,
            mounted: None,
            k3s_data_on_sd_card: false,
        };
        assert!(matches!(decide(&inputs).plan, Plan::SdCard { note } if note.contains("sd-card")));
        inputs.choice = None;
        assert!(
            matches!(decide(&inputs).plan, Plan::SdCard { note } if note.contains("no valid seed"))
        );
        // The sandbox's own bind of the folder (ReadWritePaths=) is no mount of a disk.
        let sandbox = mounts(
            "22 1 254:2 / / ro,noatime - ext4 /dev/vda2 rw\n\
             50 22 254:2 /var/lib/rancher /var/lib/rancher rw,nosuid - ext4 /dev/vda2 rw\n",
        );
        assert_eq!(mounted_at(&sandbox, Path::new("/var/lib/rancher")), None);
        let all =
            mounts("40 22 259:0 / /var/lib/rancher rw,noatime shared:20 - ext4 /dev/nvme0n1 rw\n");
        inputs.mounted = mounted_at(&all, Path::new("/var/lib/rancher"));
        assert_eq!(decide(&inputs).plan, Plan::Mounted);
        assert_eq!(
            decide_for(Vec::new(), false).plan,
            Plan::SdCard {
                note: "no USB or NVMe disk".into()
            }
        );
    }

    #[test]
    fn mountinfo_and_device_numbers_are_read() {
        let all = mounts(
            "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 - ext3 /dev/root rw\nbroken\n",
        );
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].mount_point, Path::new("/mnt two"));
        assert_eq!(all[0].fstype, "ext3");
        assert_eq!(all[0].devno.to_string(), "98:0");
        // makedev(259, 0) and makedev(8, 17) as glibc encodes them.
        assert_eq!(
            DevNo::from_st_dev(0x1_0300),
            DevNo {
                major: 259,
                minor: 0
            }
        );
        assert_eq!(
            DevNo::from_st_dev(0x811),
            DevNo {
                major: 8,
                minor: 17
            }
        );
        assert!(is_nvme_namespace("nvme0n1") && is_nvme_namespace("nvme12n3"));
        assert!(!is_nvme_namespace("nvme0") && !is_nvme_namespace("nvme0n1p1"));
    }
}
