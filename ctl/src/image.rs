use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;

use pimesh_schema::Seed;

/// The seed's name on the boot partition.
const SEED_NAME: &str = "pimesh.toml";
/// Where a node finds the site's anchor (and an init node the issuer) on the boot partition.
const TRUST_DIR: &str = "pimesh-trust";
const TRUST_FILES: [&str; 3] = ["anchor.pem", "issuer.pem", "issuer.key"];
/// MBR partition types of FAT file systems.
const FAT_TYPES: [u8; 4] = [0x0b, 0x0c, 0x0e, 0x06];

/// Validates `seed` and writes it as `pimesh.toml` into the first (FAT) partition of the
/// raw image `image`, through the FAT structures in the file: no mount, no root.
///
/// With `trust` (a site folder from `pimeshctl site init`), also writes into the image's
/// `pimesh-trust/` folder what the node imports at first boot: for an `init` node the site's
/// anchor and issuer (bring your own anchor: the one the central server knows; the node
/// moves the keys off the boot partition), for a joining node the anchor alone (whom its
/// proxy trusts; checked against the join token's pin).
pub fn configure(image: &Path, seed: &Path, trust: Option<&Path>) -> Result<(), crate::Failure> {
    let parsed = Seed::load(seed).map_err(|err| format!("refusing an invalid seed: {err}"))?;
    let mut trust_files = Vec::new();
    if let Some(site_dir) = trust {
        let names: &[&str] = if parsed.role == pimesh_schema::Role::Init {
            &TRUST_FILES
        } else {
            &TRUST_FILES[..1]
        };
        for name in names.iter().copied() {
            let path = site_dir.join(name);
            let bytes = std::fs::read(&path)
                .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
            trust_files.push((name, bytes));
        }
    }
    let text =
        std::fs::read(seed).map_err(|err| format!("cannot read {}: {err}", seed.display()))?;
    if image.extension().is_some_and(|ext| ext == "xz") {
        return Err(format!(
            "{} is compressed: run `xz -dk {}` and configure the .img",
            image.display(),
            image.display()
        )
        .into());
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|err| format!("cannot open {}: {err}", image.display()))?;
    let mbr = mbrman::MBR::read_from(&mut file, 512)
        .map_err(|err| format!("{}: no MBR partition table: {err}", image.display()))?;
    let boot = &mbr[1];
    if !FAT_TYPES.contains(&boot.sys) || boot.sectors == 0 {
        return Err(format!(
            "{}: partition 1 is not a FAT boot partition (type {:#04x})",
            image.display(),
            boot.sys
        )
        .into());
    }
    let start = u64::from(boot.starting_lba) * 512;
    let end = start + u64::from(boot.sectors) * 512;
    let slice = fscommon::StreamSlice::new(&mut file, start, end).map_err(|err| {
        format!(
            "{}: partition 1 lies outside the file: {err}",
            image.display()
        )
    })?;
    let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).map_err(|err| {
        format!(
            "{}: partition 1 is not a readable FAT file system: {err}",
            image.display()
        )
    })?;
    {
        let mut target = fs
            .root_dir()
            .create_file(SEED_NAME)
            .map_err(|err| format!("cannot create {SEED_NAME} in the boot partition: {err}"))?;
        target
            .truncate()
            .and_then(|()| target.write_all(&text))
            .and_then(|()| target.flush())
            .map_err(|err| format!("cannot write {SEED_NAME} in the boot partition: {err}"))?;
    }
    if !trust_files.is_empty() {
        let root = fs.root_dir();
        let joining = trust_files.len() < TRUST_FILES.len();
        // The folder comes with the image (`make image` makes it with mtools): the FAT
        // crate writes long-name entries for a new folder's `.` and `..`, which
        // `fsck.vfat` reports as malformed and a repair may mangle, keys and all. Files
        // written into an existing folder are clean.
        let dir = root.open_dir(TRUST_DIR).map_err(|_| {
            format!(
                "{}: the boot partition has no {TRUST_DIR}/ folder (images from `make image` \
                 have one); make it with mtools: mmd -i '{}@@{start}' ::/{TRUST_DIR}",
                image.display(),
                image.display()
            )
        })?;
        for (name, bytes) in &trust_files {
            let mut target = dir
                .create_file(name)
                .map_err(|err| format!("cannot create {TRUST_DIR}/{name}: {err}"))?;
            target
                .truncate()
                .and_then(|()| target.write_all(bytes))
                .and_then(|()| target.flush())
                .map_err(|err| format!("cannot write {TRUST_DIR}/{name}: {err}"))?;
        }
        if joining {
            // An image configured before for an init node must not keep the issuer.
            for name in &TRUST_FILES[1..] {
                if dir.remove(name).is_ok() {
                    println!("removed {TRUST_DIR}/{name}: a joining node gets the anchor alone");
                }
            }
        }
    }
    fs.unmount()
        .map_err(|err| format!("cannot finish writing the boot partition: {err}"))?;
    file.sync_all()
        .map_err(|err| format!("cannot flush {}: {err}", image.display()))?;
    println!(
        "{}: wrote {} ({} bytes; site {}, role {}) to the boot partition",
        image.display(),
        SEED_NAME,
        text.len(),
        parsed.site,
        parsed.role.as_str()
    );
    Ok(())
}
