//! pimeshctl against a real central server: publish signed revisions, read and judge the
//! fleet, name the cause of a failure to reach the server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::process::Output;

use pimesh_test_support::central::{site_folder, Central, CentralSite, SigningKey};
use pimesh_test_support::{text, Binary, Site};

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
        "--site-dir",
        site_dir.to_str().expect("utf-8"),
    ]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert!(
        text(&status.stdout).contains("site depot-7: newest revision 2"),
        "{}",
        text(&status.stdout)
    );

    // A dry run says what would go and uploads nothing.
    std::fs::write(
        &cluster,
        "site = \"depot-7\"\n[services.web]\nport = 8082\nnodes = [\"pi-a\"]\n",
    )
    .expect("cluster");
    let dry = common(&["--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert!(
        text(&dry.stdout).contains("would publish revision 3 of site depot-7 (apply, "),
        "{}",
        text(&dry.stdout)
    );
    let ca_path = ca.to_str().expect("utf-8");
    let site_path = site_dir.to_str().expect("utf-8");
    let after = pimeshctl(&[
        "status",
        "--central",
        &central,
        "--central-ca",
        ca_path,
        "--site-dir",
        site_path,
    ]);
    assert!(
        text(&after.stdout).contains("newest revision 2"),
        "{}",
        text(&after.stdout)
    );

    // `check` with the site folder: the server checks revisions with its key.
    let check = |folder: &str| {
        pimeshctl(&[
            "check",
            "--central",
            &central,
            "--central-ca",
            ca_path,
            "--site-dir",
            folder,
        ])
    };
    let good = check(site_path);
    let out = text(&good.stdout);
    assert_eq!(good.status.code(), Some(0), "{out}{}", text(&good.stderr));
    assert!(
        out.contains("√ the central server https://localhost:"),
        "{out}"
    );
    assert!(
        out.contains("√ this machine's clock agrees with the server's"),
        "{out}"
    );
    assert!(out.contains("√ site depot-7 is served"), "{out}");
    assert!(
        out.contains("√ the server checks site depot-7's revisions with the key of"),
        "{out}"
    );
    assert!(
        out.contains("√ site depot-7: no node has reported yet"),
        "{out}"
    );
    assert!(out.ends_with("all checks passed\n"), "{out}");
    // Another folder of the same site name holds another key: every publish would fail.
    let other = dir.path().join("other");
    let init = pimeshctl(&[
        "site",
        "init",
        "depot-7",
        "--out",
        other.to_str().expect("utf-8"),
    ]);
    assert!(init.status.success());
    let bad = check(other.to_str().expect("utf-8"));
    let out = text(&bad.stdout);
    assert_eq!(bad.status.code(), Some(3), "{out}");
    assert!(
        out.contains(
            "× the server checks site depot-7's revisions and operator with another key than \
             the one of"
        ),
        "{out}"
    );
    assert!(
        out.contains("every publish from here would be refused"),
        "{out}"
    );
}

/// pimeshctl with the central server given by `PIMESH_CENTRAL`/`PIMESH_CENTRAL_CA`.
fn pimeshctl_at(central: &Central, args: &[&str]) -> Output {
    ctl_of(central, None, args)
}

/// [`pimeshctl_at`] as the operator of the site folder `folder` (`PIMESH_SITE_DIR`).
fn pimeshctl_as(central: &Central, folder: &std::path::Path, args: &[&str]) -> Output {
    ctl_of(central, Some(folder), args)
}

fn ctl_of(central: &Central, folder: Option<&std::path::Path>, args: &[&str]) -> Output {
    let mut command = Binary::Ctl.command();
    command
        .args(args)
        .env(
            "PIMESH_CENTRAL",
            format!("https://localhost:{}", central.addr.port()),
        )
        .env("PIMESH_CENTRAL_CA", &central.server_cert);
    match folder {
        Some(folder) => command.env("PIMESH_SITE_DIR", folder),
        None => command.env_remove("PIMESH_SITE_DIR"),
    };
    command.output().expect("pimeshctl runs")
}

#[test]
fn status_judges_the_fleet_in_every_output_and_says_it_in_its_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = Site::new("depot-7");
    let key = SigningKey::generate();
    let anchor = dir.path().join("anchor.pem");
    std::fs::write(&anchor, site.root.anchor.cert_pem()).expect("anchor");
    let central = Central::start(
        dir.path(),
        "",
        &[CentralSite {
            name: "depot-7",
            anchor: &anchor,
            public_key: &key.public_key,
        }],
    );
    let folder = site_folder(dir.path(), "depot-7", &key);
    // Nothing published, nobody reported: nothing is wrong.
    let empty = pimeshctl_as(&central, &folder, &["status"]);
    assert_eq!(empty.status.code(), Some(0), "{}", text(&empty.stderr));
    assert!(
        text(&empty.stdout).contains("site depot-7: newest revision none: no revision published"),
        "{}",
        text(&empty.stdout)
    );

    let operator = central.client(None);
    for number in [1, 2] {
        let config = format!(
            "site = \"depot-7\"\n[services.web]\nport = {}\nnodes = [\"pi-a\"]\n",
            8080 + number
        );
        let published = operator
            .put(central.url("/v1/sites/depot-7/revisions"))
            .body(key.revision(&site.name, number, &config))
            .send()
            .expect("publish");
        assert_eq!(published.status(), 201);
    }
    let report = |node: &str, body: &str| {
        let client = central.client(Some(&site.node_identity_pem(node)));
        let answer = client
            .post(central.url("/v1/sites/depot-7/reports"))
            .body(body.to_owned())
            .send()
            .expect("report");
        assert_eq!(answer.status(), 200, "{node}");
    };
    report("pi-a", r#"{"revision":2,"state":"applied","detail":""}"#);
    report(
        "pi-b",
        r#"{"revision":1,"state":"rolled-back","detail":"revision 2: unhealthy: web did not answer"}"#,
    );

    let table = pimeshctl_as(&central, &folder, &["status"]);
    assert_eq!(
        table.status.code(),
        Some(3),
        "a node rolled back: {}",
        text(&table.stderr)
    );
    let out = text(&table.stdout);
    assert!(
        out.contains("site depot-7: newest revision 2: 1/2 on revision 2, 1 rolled back"),
        "{out}"
    );
    assert!(out.contains("NODE") && out.contains("LAST REPORT"), "{out}");
    assert!(
        out.contains("revision 2: unhealthy: web did not answer"),
        "{out}"
    );

    let json = pimeshctl_as(&central, &folder, &["status", "-o", "json"]);
    assert_eq!(json.status.code(), Some(3));
    let parsed: serde_json::Value = serde_json::from_str(&text(&json.stdout)).expect("JSON");
    assert_eq!(parsed["healthy"], false);
    let depot = &parsed["sites"][0];
    assert_eq!(depot["newest_revision"], 2);
    assert_eq!(depot["counts"]["on_newest"], 1);
    assert_eq!(depot["counts"]["rolled_back"], 1);
    assert_eq!(depot["nodes"][1]["node"], "pi-b");
    assert_eq!(depot["nodes"][1]["healthy"], false);
    assert!(
        depot["nodes"][0]["last_report_age_seconds"]
            .as_u64()
            .is_some(),
        "{depot}"
    );

    let check = pimeshctl_as(&central, &folder, &["check"]);
    let out = text(&check.stdout);
    assert_eq!(check.status.code(), Some(3), "{out}");
    assert!(
        out.contains("√ depot-7/pi-a: applied revision 2 (last report "),
        "{out}"
    );
    assert!(
        out.contains("× depot-7/pi-b: rolled-back revision 1 (last report ")
            && out.contains("revision 2: unhealthy: web did not answer"),
        "{out}"
    );
    assert!(out.ends_with("some checks failed\n"), "{out}");

    let yaml = pimeshctl_as(&central, &folder, &["status", "--output", "yaml"]);
    let parsed: serde_json::Value = serde_yaml_ng::from_str(&text(&yaml.stdout)).expect("YAML");
    assert_eq!(
        parsed["sites"][0]["summary"],
        "1/2 on revision 2, 1 rolled back"
    );

    // pi-b takes revision 2 after all: the fleet is healthy again.
    report("pi-b", r#"{"revision":2,"state":"applied","detail":""}"#);
    let healthy = pimeshctl_as(&central, &folder, &["status"]);
    assert_eq!(healthy.status.code(), Some(0), "{}", text(&healthy.stdout));
    assert!(text(&healthy.stdout).contains("2/2 on revision 2"));

    let version = pimeshctl_at(&central, &["version"]);
    assert!(version.status.success(), "{}", text(&version.stderr));
    let out = text(&version.stdout);
    assert!(out.starts_with("pimeshctl 0."), "{out}");
    assert!(out.contains("pimesh-central 0."), "{out}");
}

#[test]
fn failures_to_reach_the_central_server_name_their_real_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let central = Central::start(dir.path(), "", &[]);
    let port = central.addr.port();
    let ca = central.server_cert.to_str().expect("utf-8").to_owned();
    let folder = site_folder(dir.path(), "depot-7", &SigningKey::generate());
    let status = |url: String, ca: Option<&str>| -> String {
        let mut args = vec![
            "status".to_owned(),
            "--site-dir".to_owned(),
            folder.to_str().expect("utf-8").to_owned(),
            "--central".to_owned(),
            url,
        ];
        if let Some(ca) = ca {
            args.extend(["--central-ca".to_owned(), ca.to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = pimeshctl(&args);
        assert_eq!(out.status.code(), Some(1));
        text(&out.stderr)
    };
    // Its certificate is self-signed: unknown without --central-ca.
    let err = status(format!("https://localhost:{port}"), None);
    assert!(err.contains("unknown CA"), "{err}");
    // Its certificate is for localhost, not 127.0.0.1.
    let err = status(format!("https://127.0.0.1:{port}"), Some(&ca));
    assert!(err.contains("name mismatch"), "{err}");
    let closed = pimesh_test_support::free_port();
    let err = status(format!("https://localhost:{closed}"), Some(&ca));
    assert!(err.contains("connection refused"), "{err}");
    // An error answer is shown with the server's reason.
    let err = status(format!("https://localhost:{port}/nowhere"), Some(&ca));
    assert!(err.contains("404 Not Found: no such resource"), "{err}");
}

#[test]
fn completion_scripts_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = pimeshctl(&["completion", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(
            script.contains("pimeshctl") && script.contains("status"),
            "{shell}: {script}"
        );
    }
}

#[test]
fn a_saved_context_stands_in_for_the_flags_and_the_command_line_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let central = Central::start(dir.path(), "", &[]);
    let config = dir.path().join("config/contexts.toml");
    let ctl = |args: &[&str]| -> Output {
        Binary::Ctl
            .command()
            .args(args)
            .env("PIMESH_CONFIG", &config)
            .env_remove("PIMESH_CENTRAL")
            .env_remove("PIMESH_CENTRAL_CA")
            .env_remove("PIMESH_SITE_DIR")
            .current_dir(dir.path())
            .output()
            .expect("pimeshctl runs")
    };
    let none = ctl(&["status"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(
        text(&none.stderr).contains("pimeshctl context add"),
        "{}",
        text(&none.stderr)
    );

    let url = format!("https://localhost:{}", central.addr.port());
    let added = ctl(&[
        "context",
        "add",
        "lab",
        "--central",
        &url,
        "--central-ca",
        "server.pem",
    ]);
    assert!(added.status.success(), "{}", text(&added.stderr));
    assert!(text(&added.stdout).contains("added context lab (current)"));
    // The relative CA path was saved absolute: it works from any folder.
    let saved = std::fs::read_to_string(&config).expect("saved");
    assert!(
        saved.contains(&central.server_cert.display().to_string()),
        "{saved}"
    );
    let version = ctl(&["version"]);
    assert_eq!(version.status.code(), Some(0), "{}", text(&version.stderr));
    assert!(
        text(&version.stdout).contains("pimesh-central"),
        "{}",
        text(&version.stdout)
    );

    // A second context; `use` switches, an unknown name is refused with the known ones.
    let other = ctl(&[
        "context",
        "add",
        "elsewhere",
        "--central",
        "https://localhost:1",
    ]);
    assert!(
        text(&other.stdout).starts_with("added context elsewhere in "),
        "{}",
        text(&other.stdout)
    );
    let unknown = ctl(&["context", "use", "nowhere"]);
    assert!(
        text(&unknown.stderr).contains("known: elsewhere, lab"),
        "{}",
        text(&unknown.stderr)
    );
    assert!(ctl(&["context", "use", "elsewhere"]).status.success());
    let listed = ctl(&["context", "list", "-o", "json"]);
    let parsed: serde_json::Value = serde_json::from_str(&text(&listed.stdout)).expect("JSON");
    assert_eq!(parsed["current"], "elsewhere");
    assert_eq!(parsed["contexts"]["lab"]["central"], url.as_str());
    let refused = ctl(&["version"]);
    assert!(
        text(&refused.stderr).contains("connection refused"),
        "{}",
        text(&refused.stderr)
    );
    // The command line wins over the context.
    let flagged = ctl(&["version", "--central", &url, "--central-ca", "server.pem"]);
    assert_eq!(flagged.status.code(), Some(0), "{}", text(&flagged.stderr));

    // A plain-HTTP central server is refused where it would be saved.
    let plain = ctl(&[
        "context",
        "add",
        "plain",
        "--central",
        "http://central.example",
    ]);
    assert!(!plain.status.success());
    assert!(
        text(&plain.stderr).contains("TLS only"),
        "{}",
        text(&plain.stderr)
    );
    let site = ctl(&[
        "site",
        "init",
        "depot-9",
        "--central-url",
        "http://central.example",
    ]);
    assert!(!site.status.success());
    assert!(
        text(&site.stderr).contains("--central-url"),
        "{}",
        text(&site.stderr)
    );
    assert!(!dir.path().join("depot-9").exists(), "nothing written");
}
