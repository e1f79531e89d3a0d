//! pimeshctl against a real central server: publish signed revisions, read the fleet.

use std::process::Output;

use pimesh_test_support::central::{Central, CentralSite};
use pimesh_test_support::{text, Binary};

/// Runs pimeshctl with `args`.
fn pimeshctl(args: &[&str]) -> Output {
    Binary::Ctl.output(args)
}

#[test]
fn publish_signs_and_uploads_and_status_shows_the_fleet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site_dir = dir.path().join("depot-7");
    let init = pimeshctl(&[
        "site",
        "init",
        "depot-7",
        "--out",
        site_dir.to_str().expect("utf-8"),
    ]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    let public_key = text(&init.stdout)
        .lines()
        .find_map(|l| {
            l.split("public_key = \"")
                .nth(1)
                .map(|k| k.trim_end_matches('"').to_owned())
        })
        .expect("public key printed");

    let anchor = site_dir.join("anchor.pem");
    let server = Central::start(
        dir.path(),
        "",
        &[CentralSite {
            name: "depot-7",
            anchor: &anchor,
            public_key: &public_key,
        }],
    );
    let ca = &server.server_cert;
    let central = format!("https://localhost:{}", server.addr.port());
    let cluster = dir.path().join("cluster.toml");
    let common = |extra: &[&str]| -> Output {
        let mut args = vec![
            "config",
            "publish",
            cluster.to_str().expect("utf-8"),
            "--site-dir",
            site_dir.to_str().expect("utf-8"),
            "--central",
            &central,
            "--central-ca",
            ca.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        pimeshctl(&args)
    };
    // `localhost` must resolve to the test server: it does on every Debian machine.
    std::fs::write(
        &cluster,
        "site = \"depot-7\"\n[services.web]\nport = 8080\nnodes = [\"pi-a\"]\n",
    )
    .expect("cluster");
    let first = common(&[]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(text(&first.stdout).contains("published revision 1 of site depot-7"));
    std::fs::write(
        &cluster,
        "site = \"depot-7\"\n[services.web]\nport = 8081\nnodes = [\"pi-a\"]\n",
    )
    .expect("cluster");
    let second = common(&[]);
    assert!(
        text(&second.stdout).contains("published revision 2"),
        "{}",
        text(&second.stderr)
    );

    let replay = common(&["--revision", "1"]);
    assert!(!replay.status.success());
    assert!(
        text(&replay.stderr).contains("not newer"),
        "{}",
        text(&replay.stderr)
    );
    std::fs::write(
        &cluster,
        "site = \"depot-7\"\n[services.web]\nnodes = [\"pi-a\"]\n",
    )
    .expect("cluster");
    let invalid = common(&[]);
    assert!(!invalid.status.success());
    assert!(
        text(&invalid.stderr).contains(&format!("{}:3:", cluster.display())),
        "{}",
        text(&invalid.stderr)
    );

    let status = pimeshctl(&[
        "status",
        "--central",
        &central,
        "--central-ca",
        ca.to_str().expect("utf-8"),
    ]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert!(
        text(&status.stdout).contains("site depot-7: newest revision 2"),
        "{}",
        text(&status.stdout)
    );
}
