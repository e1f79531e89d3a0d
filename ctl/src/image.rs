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
        agree(&parsed, seed, site_dir)?;
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
    let mut written = Vec::new();
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
            written.push(format!("{TRUST_DIR}/{name}{}", about(name)));
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
    for line in written {
        println!("{}: wrote {line}", image.display());
    }
    Ok(())
}

/// What a trust file written to the card is, for the operator's eyes.
fn about(name: &str) -> &'static str {
    match name {
        "issuer.key" => {
            " (a private key: the site issuer's; the node moves it off the boot partition at \
             first boot — keep the card safe until then)"
        }
        "issuer.pem" => " (the site issuer's certificate)",
        _ => " (the site's trust anchor)",
    }
}

/// Checks that the seed and the site folder `site_dir` are of one site: the same name, the
/// join token pinning the folder's anchor, the central key the folder's signing key.
fn agree(seed: &Seed, seed_path: &Path, site_dir: &Path) -> Result<(), crate::Failure> {
    let folder_site = crate::site::name_of(site_dir)?;
    if folder_site != seed.site {
        return Err(format!(
            "{} is for site {}, the site folder {} for site {}: a card must get its own site's trust",
            seed_path.display(),
            seed.site,
            site_dir.display(),
            folder_site
        )
        .into());
    }
    let anchor_path = site_dir.join("anchor.pem");
    let anchor_pem = std::fs::read(&anchor_path)
        .map_err(|err| format!("cannot read {}: {err}", anchor_path.display()))?;
    let anchor = pimesh_meshtls::pem::certificates(&anchor_pem)
        .ok()
        .and_then(|certs| certs.into_iter().next())
        .ok_or_else(|| format!("{}: expected a PEM certificate", anchor_path.display()))?;
    let anchor_hash = pimesh_identity::anchor_sha256_hex(&anchor);
    if let Some(token) = &seed.join_token {
        if token.anchor_sha256_hex() != anchor_hash {
            return Err(format!(
                "{}: join_token pins the anchor {}…, but {} is {}…: the token is of another \
                 site folder (or the folder's anchor was replaced)",
                seed_path.display(),
                &token.anchor_sha256_hex()[..16],
                anchor_path.display(),
                &anchor_hash[..16]
            )
            .into());
        }
    }
    if let Some(central) = &seed.central {
        let key = crate::site::public_key_of(site_dir)?;
        if central.public_key.to_string() != key {
            return Err(format!(
                "{}: central.public_key is {}, but the site folder's signing key is {key}: the \
                 node would refuse every revision published from {}",
                seed_path.display(),
                central.public_key,
                site_dir.display()
            )
            .into());
        }
    }
    Ok(())
}
