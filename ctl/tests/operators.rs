//! People's own operator keys (`pimeshctl operator keygen`, `PIMESH_OPERATOR` and
//! `PIMESH_OPERATOR_KEY`) against a real central server that lists them with roles: a
//! reader reads and cannot steer, an operator steers, nobody else gets in, and a person
//! without the site key cannot publish.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::path::{Path, PathBuf};
use std::process::Output;

use pimesh_test_support::central::{site_folder, Central, CentralSite, SigningKey};
use pimesh_test_support::{text, Binary, Site};

const STAGED: &str = "site = \"depot-7\"\n[rollout]\ncanary = [\"pi-a\"]\nwaves = [100]\n";

struct Fixture {
    dir: tempfile::TempDir,
    central: Central,
    /// The site folder `pimeshctl site init` made (with the site key).
    folder: PathBuf,
    /// A person's site folder: its `site-name` alone.
    bare: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let site = Site::new("depot-7");
        let key = SigningKey::generate();
        let anchor = dir.path().join("anchor.pem");
        std::fs::write(&anchor, site.root.anchor.cert_pem()).expect("anchor");
        let central = Central::start(
            dir.path(),
            "long_poll_max = \"30s\"\n",
            &[CentralSite {
                name: "depot-7",
                anchor: &anchor,
                public_key: &key.public_key,
            }],
        );
        let folder = site_folder(dir.path(), "depot-7", &key);
        let bare = dir.path().join("bare");
        std::fs::create_dir_all(&bare).expect("bare folder");
        std::fs::write(bare.join("site-name"), "depot-7\n").expect("site-name");
        Fixture {
            dir,
            central,
            folder,
            bare,
        }
    }

    /// `pimeshctl args`, as `person` (name, key file) when given, with `site_dir`.
    fn ctl(&self, person: Option<(&str, &Path)>, site_dir: &Path, args: &[&str]) -> Output {
        let mut command = Binary::Ctl.command();
        command
            .args(args)
            .env(
                "PIMESH_CENTRAL",
                format!("https://localhost:{}", self.central.addr.port()),
            )
            .env("PIMESH_CENTRAL_CA", &self.central.server_cert)
            .env("PIMESH_SITE_DIR", site_dir)
            .env("PIMESH_CONFIG", self.dir.path().join("no-contexts.toml"))
            .env_remove("PIMESH_OPERATOR")
            .env_remove("PIMESH_OPERATOR_KEY");
        if let Some((name, key)) = person {
            command
                .env("PIMESH_OPERATOR", name)
                .env("PIMESH_OPERATOR_KEY", key);
        }
        command.output().expect("pimeshctl runs")
    }

    /// A key for `name` with `role`; returns the key file and the central.toml entry.
    fn keygen(&self, name: &str, role: &str) -> (PathBuf, String) {
        let key = self.dir.path().join(format!("{name}.pk8"));
        let out = self.ctl(
            None,
            &self.folder,
            &[
                "operator",
                "keygen",
                name,
                "--site",
                "depot-7",
                "--role",
                role,
                "--out",
                key.to_str().expect("utf-8"),
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let printed = text(&out.stdout);
        let entry: String = printed
            .lines()
            .skip_while(|line| !line.starts_with("[[sites.operators]]"))
            .take(4)
            .map(|line| format!("{}\n", line.split("  #").next().unwrap_or(line).trim_end()))
            .collect();
        assert!(entry.contains(&format!("name = \"{name}\"")), "{printed}");
        (key, entry)
    }
}

#[test]
fn a_reader_reads_an_operator_steers_and_nobody_else_gets_in() {
    let mut f = Fixture::new();
    let (alice, alice_entry) = f.keygen("alice", "reader");
    let (bob, bob_entry) = f.keygen("bob", "operator");
    let (carol, _) = f.keygen("carol", "operator");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&alice).expect("key").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "a person's key is a secret");
    // The site's entry is the last table of central.toml: the people go under it.
    let mut config = std::fs::read_to_string(&f.central.config).expect("central.toml");
    config.push_str(&alice_entry);
    config.push_str(&bob_entry);
    std::fs::write(&f.central.config, config).expect("central.toml");
    f.central.kill_and_restart();

    let cluster = f.dir.path().join("cluster.toml");
    std::fs::write(&cluster, STAGED).expect("cluster.toml");
    let cluster = cluster.to_str().expect("utf-8");
    let out = f.ctl(None, &f.folder, &["config", "publish", cluster]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // alice reads the site with her key and a site folder of its name alone...
    let as_alice = Some(("alice", alice.as_path()));
    let out = f.ctl(as_alice, &f.bare, &["rollout", "history", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("\"revision\": 1"),
        "{}",
        text(&out.stdout)
    );
    let out = f.ctl(as_alice, &f.bare, &["dashboard"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // ...and cannot steer it, nor publish.
    let out = f.ctl(as_alice, &f.bare, &["rollout", "pause"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr)
            .contains("alice is a reader of site depot-7: this needs the operator role"),
        "{}",
        text(&out.stderr)
    );
    let out = f.ctl(as_alice, &f.bare, &["config", "publish", cluster]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("publishing needs the site key"),
        "{}",
        text(&out.stderr)
    );

    // bob steers.
    let as_bob = Some(("bob", bob.as_path()));
    let out = f.ctl(as_bob, &f.bare, &["rollout", "pause"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = f.ctl(as_bob, &f.bare, &["rollout", "status", "-o", "json"]);
    assert!(
        text(&out.stdout).contains("\"paused\""),
        "{}",
        text(&out.stdout)
    );

    // carol's key is not listed; alice's key cannot pass for bob.
    let out = f.ctl(
        Some(("carol", carol.as_path())),
        &f.bare,
        &["rollout", "history"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("carol is not an operator of site depot-7"),
        "{}",
        text(&out.stderr)
    );
    let out = f.ctl(
        Some(("bob", alice.as_path())),
        &f.bare,
        &["rollout", "resume"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not verify"),
        "{}",
        text(&out.stderr)
    );
    // A name without a key (or the reverse) is an error of the caller's.
    let mut half = Binary::Ctl.command();
    let out = half
        .args(["rollout", "history"])
        .env("PIMESH_SITE_DIR", &f.bare)
        .env(
            "PIMESH_CENTRAL",
            format!("https://localhost:{}", f.central.addr.port()),
        )
        .env("PIMESH_CENTRAL_CA", &f.central.server_cert)
        .env("PIMESH_CONFIG", f.dir.path().join("no-contexts.toml"))
        .env("PIMESH_OPERATOR", "alice")
        .env_remove("PIMESH_OPERATOR_KEY")
        .output()
        .expect("pimeshctl runs");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("go together"),
        "{}",
        text(&out.stderr)
    );
}
