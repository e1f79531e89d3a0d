//! pimeshctl as an operator runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use pimesh_identity::anchor_sha256;
use pimesh_schema::{JoinToken, Seed};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

use pimesh_test_support::{text, Binary};

/// Runs pimeshctl with `args`.
fn pimeshctl(args: &[&str]) -> std::process::Output {
    Binary::Ctl.output(args)
}

#[test]
fn site_init_writes_private_keys_and_a_token_pinning_the_anchor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("depot-7");
    let run = pimeshctl(&[
        "site",
        "init",
        "depot-7",
        "--central-url",
        "https://central.example:8443",
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    for (name, mode) in [
        ("anchor.pem", 0o644),
        ("anchor.key", 0o600),
        ("issuer.pem", 0o644),
        ("issuer.key", 0o600),
        ("signing.pk8", 0o600),
        ("join-token", 0o600),
    ] {
        let meta = std::fs::metadata(out.join(name)).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
    }
    assert_eq!(
        std::fs::metadata(&out).expect("dir").permissions().mode() & 0o777,
        0o700
    );

    // The printed seed values are a valid seed once a role is added, and the token pins
    // the anchor that was written.
    let printed = text(&run.stdout);
    let seed_lines: String = printed
        .lines()
        .skip_while(|l| !l.starts_with("site ="))
        .map(|l| format!("{l}\n"))
        .collect();
    let seed = Seed::parse(Path::new("printed"), &seed_lines)
        .unwrap_or_else(|err| panic!("{err}\n{printed}"));
    let token: &JoinToken = seed.join_token.as_ref().expect("token");
    let anchor = CertificateDer::from_pem_file(out.join("anchor.pem")).expect("anchor pem");
    assert_eq!(token.anchor_sha256(), &anchor_sha256(&anchor));
    assert!(seed.central.is_some());

    let again = pimeshctl(&[
        "site",
        "init",
        "depot-7",
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(!again.status.success(), "a site is never overwritten");
    assert!(text(&again.stderr).contains("exists"));
    let bad = pimeshctl(&[
        "site",
        "init",
        "Depot 7",
        "--out",
        dir.path().join("x").to_str().expect("utf-8"),
    ]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("site name"));
}

#[test]
fn config_validate_accepts_the_example_and_locates_errors() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/cluster.example.toml");
    let run = pimeshctl(&["config", "validate", example.to_str().expect("utf-8")]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(text(&run.stdout).contains("fleetman-staff-service: no endpoints; split to fleetman-staff-service-stable 90, error-injector 10"));

    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("cluster.toml");
    std::fs::write(
        &broken,
        "site = \"s\"\n[services.a]\nsplit = [{ service = \"ghost\", weight = 1 }]\n",
    )
    .expect("write");
    let run = pimeshctl(&["config", "validate", broken.to_str().expect("utf-8")]);
    assert!(!run.status.success());
    let err = text(&run.stderr);
    assert!(
        err.contains(&format!("{}:3:", broken.display()))
            && err.contains("services.a.split[0].service"),
        "{err}"
    );
}

/// A small disk image laid out like Pimesh's: an MBR, a FAT32 partition at 4 MiB.
fn make_image(path: &Path) {
    const SECTOR: u32 = 512;
    let boot_start = 8192u32;
    let boot_sectors = 80 * 2048u32; // 80 MiB: large enough for FAT32
    let file = std::fs::File::create(path).expect("create");
    file.set_len(u64::from(boot_start + boot_sectors + 2048) * u64::from(SECTOR))
        .expect("size");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut mbr = mbrman::MBR::new_from(&mut file, SECTOR, [0x65, 0x6d, 0x69, 0x50]).expect("mbr");
    mbr[1] = mbrman::MBRPartitionEntry {
        boot: mbrman::BOOT_ACTIVE,
        first_chs: mbrman::CHS::empty(),
        sys: 0x0c,
        last_chs: mbrman::CHS::empty(),
        starting_lba: boot_start,
        sectors: boot_sectors,
    };
    mbr.write_into(&mut file).expect("write mbr");
    let start = u64::from(boot_start) * u64::from(SECTOR);
    let end = start + u64::from(boot_sectors) * u64::from(SECTOR);
    let mut slice = fscommon::StreamSlice::new(&mut file, start, end).expect("slice");
    fatfs::format_volume(
        &mut slice,
        fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat32),
    )
    .expect("format");
    let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).expect("fs");
    fs.root_dir()
        .create_file("pimesh.toml")
        .expect("template")
        .write_all(b"# template\n")
        .expect("write");
    fs.unmount().expect("unmount");
}

fn read_seed(path: &Path) -> String {
    read_boot_file(path, "pimesh.toml")
}

fn read_boot_file(path: &Path, name: &str) -> String {
    read_boot_file_opt(path, name).unwrap_or_else(|| panic!("{name} is not in the boot partition"))
}

fn read_boot_file_opt(path: &Path, name: &str) -> Option<String> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let slice =
        fscommon::StreamSlice::new(&mut file, 8192 * 512, (8192 + 80 * 2048) * 512).expect("slice");
    let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).expect("fs");
    let mut contents = String::new();
    let mut file = fs.root_dir().open_file(name).ok()?;
    file.read_to_string(&mut contents).expect("read");
    Some(contents)
}

#[test]
fn image_configure_writes_a_valid_seed_into_the_boot_partition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("pimesh.img");
    make_image(&image);
    let seed = dir.path().join("seed.toml");
    let content = "site = \"depot-7\"\nrole = \"init\"\nnode = \"pi-a\"\n";
    std::fs::write(&seed, content).expect("seed");
    let run = pimeshctl(&[
        "image",
        "configure",
        image.to_str().expect("utf-8"),
        "--seed",
        seed.to_str().expect("utf-8"),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert_eq!(read_seed(&image), content);

    // An invalid seed is refused and the image keeps the last good one.
    std::fs::write(&seed, "site = \"depot-7\"\nrole = \"captain\"\n").expect("seed");
    let run = pimeshctl(&[
        "image",
        "configure",
        image.to_str().expect("utf-8"),
        "--seed",
        seed.to_str().expect("utf-8"),
    ]);
    assert!(!run.status.success());
    assert!(text(&run.stderr).contains(":2:"), "{}", text(&run.stderr));
    assert_eq!(read_seed(&image), content);

    let not_an_image = dir.path().join("empty.img");
    std::fs::write(&not_an_image, vec![0u8; 4096]).expect("write");
    std::fs::write(&seed, content).expect("seed");
    let run = pimeshctl(&[
        "image",
        "configure",
        not_an_image.to_str().expect("utf-8"),
        "--seed",
        seed.to_str().expect("utf-8"),
    ]);
    assert!(!run.status.success());
    assert!(
        text(&run.stderr).contains("partition"),
        "{}",
        text(&run.stderr)
    );
}

#[test]
fn image_configure_with_trust_puts_anchor_and_issuer_for_the_init_node_and_the_anchor_alone_for_a_joining_one(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("pimesh.img");
    make_image(&image);
    let site = dir.path().join("depot-7");
    let run = pimeshctl(&[
        "site",
        "init",
        "depot-7",
        "--out",
        site.to_str().expect("utf-8"),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let seed = dir.path().join("seed.toml");
    let image_arg = image.to_str().expect("utf-8");
    let seed_arg = seed.to_str().expect("utf-8");
    let site_arg = site.to_str().expect("utf-8");

    std::fs::write(&seed, "site = \"depot-7\"\nrole = \"init\"\n").expect("seed");
    let run = pimeshctl(&[
        "image",
        "configure",
        image_arg,
        "--seed",
        seed_arg,
        "--trust",
        site_arg,
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    for name in ["anchor.pem", "issuer.pem", "issuer.key"] {
        let expected = std::fs::read_to_string(site.join(name)).expect("site file");
        assert_eq!(
            read_boot_file(&image, &format!("pimesh-trust/{name}")),
            expected
        );
    }

    // A joining node takes the anchor alone; the init node's issuer leaves the image.
    let token = std::fs::read_to_string(site.join("join-token")).expect("token");
    std::fs::write(
        &seed,
        format!(
            "site = \"depot-7\"\nrole = \"join\"\njoin_token = \"{}\"\n",
            token.trim()
        ),
    )
    .expect("seed");
    let run = pimeshctl(&[
        "image",
        "configure",
        image_arg,
        "--seed",
        seed_arg,
        "--trust",
        site_arg,
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert_eq!(
        read_boot_file(&image, "pimesh-trust/anchor.pem"),
        std::fs::read_to_string(site.join("anchor.pem")).expect("anchor")
    );
    for key in ["issuer.pem", "issuer.key"] {
        assert!(
            read_boot_file_opt(&image, &format!("pimesh-trust/{key}")).is_none(),
            "a joining node gets the anchor alone, never {key}"
        );
    }
}
