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

#[test]
fn config_validate_and_convert_read_the_routes_folder() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/cluster.example.toml");
    let run = pimeshctl(&["config", "validate", example.to_str().expect("utf-8")]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let out = text(&run.stdout);
    assert!(
        out.contains("routes/fleetman-webapp.yaml: 1 route(s)"),
        "{out}"
    );
    assert!(
        out.contains("route webapp-api of fleetman-webapp: GET /api/vehicles* -> fleetman-position-tracker 1"),
        "{out}"
    );

    // Both forms print, and each reads back as the same routes.
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = pimeshctl(&[
        "config",
        "convert",
        example.to_str().expect("utf-8"),
        "--to",
        "yaml",
    ]);
    assert!(yaml.status.success(), "{}", text(&yaml.stderr));
    let toml_form = pimeshctl(&[
        "config",
        "convert",
        example.to_str().expect("utf-8"),
        "--to",
        "toml",
    ]);
    assert!(toml_form.status.success(), "{}", text(&toml_form.stderr));
    let cluster = std::fs::read_to_string(&example).expect("example");
    let folder = dir.path().join("from-toml");
    std::fs::create_dir(&folder).expect("mkdir");
    std::fs::write(
        folder.join("cluster.toml"),
        format!("{cluster}\n{}", text(&toml_form.stdout)),
    )
    .expect("write");
    let run = pimeshctl(&[
        "config",
        "validate",
        folder.join("cluster.toml").to_str().expect("utf-8"),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let folder = dir.path().join("from-yaml");
    std::fs::create_dir_all(folder.join("routes")).expect("mkdir");
    std::fs::write(folder.join("cluster.toml"), &cluster).expect("write");
    std::fs::write(folder.join("routes/all.yaml"), text(&yaml.stdout)).expect("write");
    let again = pimeshctl(&[
        "config",
        "convert",
        folder.join("cluster.toml").to_str().expect("utf-8"),
        "--to",
        "toml",
    ]);
    assert_eq!(text(&again.stdout), text(&toml_form.stdout));

    // A broken route file is named with its line and YAML field.
    let bad = text(&yaml.stdout).replace("name: fleetman-position-tracker", "name: ghost");
    std::fs::write(folder.join("routes/all.yaml"), &bad).expect("write");
    let run = pimeshctl(&[
        "config",
        "validate",
        folder.join("cluster.toml").to_str().expect("utf-8"),
    ]);
    assert!(!run.status.success());
    let err = text(&run.stderr);
    let line = bad
        .lines()
        .position(|l| l.contains("ghost"))
        .expect("ghost")
        + 1;
    assert!(
        err.contains(&format!("routes/all.yaml:{line}"))
            && err.contains("spec.rules[0].backendRefs[0].name")
            && err.contains("ghost"),
        "{err}"
    );
}

/// A small disk image laid out like Pimesh's: an MBR, a FAT32 partition at 4 MiB.
/// The boot partition's place in a test image, in 512-byte sectors.
const BOOT_START: u32 = 8192;
const BOOT_SECTORS: u32 = 80 * 2048; // 80 MiB: large enough for FAT32

/// Runs `program` with `args`, failing the test with its output when it fails.
fn tool(program: &str, args: &[&str]) {
    let run = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program}: {err} (image/host-deps.sh installs it)"));
    assert!(
        run.status.success(),
        "{program} {args:?}: {}{}",
        text(&run.stdout),
        text(&run.stderr)
    );
}

/// A raw image as `make image` lays it out: an MBR whose partition 1 is FAT32 made by
/// mkfs.vfat, holding the seed template and, with `trust_folder`, an empty
/// `pimesh-trust/` made by mtools.
fn make_image_with(path: &Path, trust_folder: bool) {
    let boot = path.with_extension("boot");
    let boot_arg = boot.to_str().expect("utf-8");
    let kib = (BOOT_SECTORS / 2).to_string();
    tool(
        "mkfs.vfat",
        &["-C", "-F", "32", "-n", "PIMESH-BOOT", boot_arg, &kib],
    );
    if trust_folder {
        tool("mmd", &["-i", boot_arg, "::/pimesh-trust"]);
    }
    let template = path.with_extension("template");
    std::fs::write(&template, "# template\n").expect("template");
    tool(
        "mcopy",
        &[
            "-i",
            boot_arg,
            template.to_str().expect("utf-8"),
            "::/pimesh.toml",
        ],
    );
    let partition = std::fs::read(&boot).expect("boot partition");
    std::fs::remove_file(&boot).expect("remove");

    const SECTOR: u32 = 512;
    let file = std::fs::File::create(path).expect("create");
    file.set_len(u64::from(BOOT_START + BOOT_SECTORS + 2048) * u64::from(SECTOR))
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
        starting_lba: BOOT_START,
        sectors: BOOT_SECTORS,
    };
    mbr.write_into(&mut file).expect("write mbr");
    use std::io::{Seek as _, SeekFrom};
    file.seek(SeekFrom::Start(u64::from(BOOT_START) * u64::from(SECTOR)))
        .expect("seek");
    file.write_all(&partition)
        .expect("write the boot partition");
}

/// A joining node's seed at `seed`, with the join token of the site folder `site`.
fn write_join_seed(seed: &Path, site: &Path) {
    let token = std::fs::read_to_string(site.join("join-token")).expect("token");
    std::fs::write(
        seed,
        format!(
            "site = \"depot-7\"\nrole = \"join\"\njoin_token = \"{}\"\n",
            token.trim()
        ),
    )
    .expect("seed");
}

/// `pimeshctl site init depot-7` into `dir`: the site folder.
fn site_init(dir: &Path) -> std::path::PathBuf {
    let site = dir.join("depot-7");
    let run = pimeshctl(&[
        "site",
        "init",
        "depot-7",
        "--out",
        site.to_str().expect("utf-8"),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    site
}

fn make_image(path: &Path) {
    make_image_with(path, true);
}

/// Asserts that `fsck.vfat -n` finds the boot partition of `image` clean (what Windows'
/// "scan and fix" or `fsck -a` would otherwise repair, mangling files).
fn assert_fsck_clean(image: &Path) {
    let bytes = std::fs::read(image).expect("image");
    let start = usize::try_from(BOOT_START * 512).expect("small");
    let end = start + usize::try_from(BOOT_SECTORS * 512).expect("small");
    let boot = image.with_extension("fsck");
    std::fs::write(&boot, &bytes[start..end]).expect("boot partition");
    let run = std::process::Command::new("fsck.vfat")
        .arg("-n")
        .arg(&boot)
        .output()
        .expect("fsck.vfat (image/host-deps.sh installs dosfstools)");
    let _ = std::fs::remove_file(&boot);
    let report = format!("{}{}", text(&run.stdout), text(&run.stderr));
    assert!(run.status.success(), "fsck.vfat -n: {report}");
    assert!(
        !report.to_lowercase().contains("error") && !report.contains("Long filename"),
        "fsck.vfat -n: {report}"
    );
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
    let slice = fscommon::StreamSlice::new(
        &mut file,
        u64::from(BOOT_START) * 512,
        u64::from(BOOT_START + BOOT_SECTORS) * 512,
    )
    .expect("slice");
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
    let site = site_init(dir.path());
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
    let said = text(&run.stdout);
    assert!(
        said.contains("wrote pimesh-trust/issuer.key (a private key"),
        "every file written is said, the private key as one: {said}"
    );
    assert!(said.contains("wrote pimesh-trust/anchor.pem"), "{said}");
    assert_fsck_clean(&image);
    for name in ["anchor.pem", "issuer.pem", "issuer.key"] {
        let expected = std::fs::read_to_string(site.join(name)).expect("site file");
        assert_eq!(
            read_boot_file(&image, &format!("pimesh-trust/{name}")),
            expected
        );
    }

    // A joining node takes the anchor alone; the init node's issuer leaves the image.
    write_join_seed(&seed, &site);
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
    assert_fsck_clean(&image);
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

#[test]
fn an_image_without_the_trust_folder_is_refused_with_the_command_that_makes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("other.img");
    make_image_with(&image, false);
    let site = site_init(dir.path());
    let seed = dir.path().join("seed.toml");
    std::fs::write(&seed, "site = \"depot-7\"\nrole = \"init\"\n").expect("seed");
    let run = pimeshctl(&[
        "image",
        "configure",
        image.to_str().expect("utf-8"),
        "--seed",
        seed.to_str().expect("utf-8"),
        "--trust",
        site.to_str().expect("utf-8"),
    ]);
    assert!(!run.status.success());
    let stderr = text(&run.stderr);
    assert!(
        stderr.contains("no pimesh-trust/ folder") && stderr.contains("mmd -i"),
        "{stderr}"
    );
    assert!(read_boot_file_opt(&image, "pimesh-trust/anchor.pem").is_none());
    assert_fsck_clean(&image);
}

#[test]
fn image_configure_refuses_a_seed_and_a_site_folder_that_disagree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("pimesh.img");
    make_image(&image);
    let site = site_init(dir.path());
    let other = dir.path().join("other");
    let run = pimeshctl(&[
        "site",
        "init",
        "depot-7",
        "--out",
        other.to_str().expect("utf-8"),
    ]);
    assert!(run.status.success());
    let seed = dir.path().join("seed.toml");
    let configure = |folder: &Path| {
        pimeshctl(&[
            "image",
            "configure",
            image.to_str().expect("utf-8"),
            "--seed",
            seed.to_str().expect("utf-8"),
            "--trust",
            folder.to_str().expect("utf-8"),
        ])
    };
    // Another site's name.
    std::fs::write(&seed, "site = \"depot-8\"\nrole = \"init\"\n").expect("seed");
    let run = configure(&site);
    assert!(!run.status.success());
    assert!(
        text(&run.stderr).contains("is for site depot-8, the site folder"),
        "{}",
        text(&run.stderr)
    );
    // The token of one folder with the trust of another.
    write_join_seed(&seed, &site);
    let run = configure(&other);
    assert!(!run.status.success());
    assert!(
        text(&run.stderr).contains("join_token pins the anchor"),
        "{}",
        text(&run.stderr)
    );
    assert!(
        read_boot_file_opt(&image, "pimesh-trust/anchor.pem").is_none(),
        "nothing written when refused"
    );
    assert!(
        configure(&site).status.success(),
        "the matching folder is taken"
    );
}

#[test]
fn config_validate_reports_every_error_and_notes_what_is_likely_not_meant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("cluster.toml");
    std::fs::write(
        &file,
        "site = \"depot\"\n[proxy]\nzipkin_url = \"zipkin:9411\"\nmax_connections = 0\n\
         [services.web]\nport = 4140\nnodes = [\"a\"]\n[services.api]\nnodes = [\"b\"]\n",
    )
    .expect("cluster");
    let run = pimeshctl(&["config", "validate", file.to_str().expect("utf-8")]);
    assert!(!run.status.success());
    let err = text(&run.stderr);
    for key in [
        "proxy.max_connections",
        "proxy.zipkin_url",
        "services.api.nodes",
        "services.web.port",
    ] {
        assert!(err.contains(&format!("key `{key}`")), "{key}: {err}");
    }
    assert!(err.contains("cluster.toml: 4 errors"), "{err}");
    assert!(err.contains("the proxy's outbound port"), "{err}");

    std::fs::write(
        &file,
        "site = \"depot\"\n[nodes.a]\naddress = \"10.0.0.1\"\n\
         [services.web]\nport = 8080\nnodes = [\"a\"]\n\
         [services.web-alias]\nport = 8080\nnodes = [\"a\", \"c\"]\n",
    )
    .expect("cluster");
    let run = pimeshctl(&["config", "validate", file.to_str().expect("utf-8")]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let out = text(&run.stdout);
    assert!(
        out.contains("note: port 8080 of node a serves web and web-alias"),
        "{out}"
    );
    assert!(
        out.contains("note: service web-alias is placed on c, which [nodes] does not list"),
        "{out}"
    );
}

#[test]
fn a_seed_is_validated_on_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = dir.path().join("pimesh.toml");
    std::fs::write(&seed, "site = \"depot-7\"\nrole = \"init\"\n").expect("seed");
    let run = pimeshctl(&["seed", "validate", seed.to_str().expect("utf-8")]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(
        text(&run.stdout).contains("valid seed of site depot-7: role init"),
        "{}",
        text(&run.stdout)
    );
    std::fs::write(&seed, "site = \"depot-7\"\nrole = \"server\"\n").expect("seed");
    let run = pimeshctl(&["seed", "validate", seed.to_str().expect("utf-8")]);
    assert!(!run.status.success());
    let err = text(&run.stderr);
    assert!(err.contains("pimesh.toml:2"), "file and line: {err}");
}
