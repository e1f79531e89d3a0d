//! `pimeshctl rollout` and `config diff` against a real central server, with nodes that
//! long-poll and report over mTLS as the supervisor's OTA client does.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use pimesh_test_support::central::{site_folder, Central, CentralSite, SigningKey};
use pimesh_test_support::{text, Binary, Site};

struct Fixture {
    _dir: tempfile::TempDir,
    central: Central,
    site: Site,
    folder: std::path::PathBuf,
    cluster: std::path::PathBuf,
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
        let cluster = dir.path().join("cluster.toml");
        Fixture {
            _dir: dir,
            central,
            site,
            folder,
            cluster,
        }
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = Binary::Ctl.command();
        command
            .args(args)
            .env(
                "PIMESH_CENTRAL",
                format!("https://localhost:{}", self.central.addr.port()),
            )
            .env("PIMESH_CENTRAL_CA", &self.central.server_cert)
            .env("PIMESH_SITE_DIR", &self.folder)
            .env("PIMESH_CONFIG", self.folder.join("no-contexts.toml"));
        command
    }

    fn ctl(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("pimeshctl runs")
    }

    fn publish(&self, config: &str) -> Output {
        std::fs::write(&self.cluster, config).expect("cluster.toml");
        let cluster = self.cluster.to_str().expect("utf-8").to_owned();
        self.ctl(&["config", "publish", &cluster])
    }

    fn node(&self, name: &str) -> reqwest::blocking::Client {
        self.central
            .client(Some(&self.site.node_identity_pem(name)))
    }

    /// `node` long-polls after `after`: the revision it is offered within `wait` s.
    fn poll(&self, node: &str, after: u64, wait: u64) -> Option<u64> {
        let url = self.central.url(&format!(
            "/v1/sites/depot-7/config?after={after}&wait={wait}"
        ));
        let response = self.node(node).get(url).send().expect("poll");
        (response.status() == 200).then(|| {
            serde_json::from_str::<serde_json::Value>(&response.text().expect("body"))
                .expect("json")["revision"]
                .as_u64()
                .expect("number")
        })
    }

    fn report(&self, node: &str, revision: u64, state: &str) {
        let url = self.central.url("/v1/sites/depot-7/reports");
        // As the supervisor reports: `about` names the revision applied or gone back from.
        let about = if state == "applied" {
            revision
        } else {
            revision + 1
        };
        let body = format!(
            r#"{{"revision":{revision},"state":"{state}","detail":"revision {about}: unhealthy","about":{about}}}"#
        );
        let status = self
            .node(node)
            .post(url)
            .body(body)
            .send()
            .expect("report")
            .status();
        assert_eq!(status, 200);
    }
}

const PLAIN: &str = "site = \"depot-7\"\n";
const CANARY: &str = "site = \"depot-7\"\n[rollout]\ncanary = [\"pi-c\"]\nwaves = [100]\n";

#[test]
fn an_operator_follows_diffs_halts_and_undoes_a_rollout() {
    let site = Fixture::new();
    assert!(site.publish(PLAIN).status.success());
    for node in ["pi-a", "pi-b", "pi-c"] {
        assert_eq!(site.poll(node, 0, 5), Some(1));
        site.report(node, 1, "applied");
    }

    // What would change, before publishing it.
    std::fs::write(&site.cluster, CANARY).expect("cluster.toml");
    let cluster = site.cluster.to_str().expect("utf-8").to_owned();
    let diff = site.ctl(&["config", "diff", &cluster]);
    assert_eq!(diff.status.code(), Some(3), "{}", text(&diff.stderr));
    let out = text(&diff.stdout);
    assert!(out.starts_with("--- revision 1 (central)\n+++ "), "{out}");
    assert!(out.contains("+[rollout]\n+canary = [\"pi-c\"]\n"), "{out}");

    let published = site.publish(CANARY);
    assert!(published.status.success(), "{}", text(&published.stderr));
    let status = site.ctl(&["rollout", "status"]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
    let out = text(&status.stdout);
    assert!(
        out.starts_with("site depot-7 · revision 2 · running\n"),
        "{out}"
    );
    assert!(
        out.contains("canary       1       0      0       0  [--------------------] 0/1"),
        "{out}"
    );
    assert!(out.contains("100%         -  not started"), "{out}");
    assert!(out.contains("wave canary waits for pi-c"), "{out}");

    // The canary rolls it back: halted, and said so in the exit code.
    assert_eq!(site.poll("pi-a", 1, 1), None);
    assert_eq!(site.poll("pi-c", 1, 5), Some(2));
    site.report("pi-c", 1, "rolled-back");
    let halted = site.ctl(&["rollout", "status", "-o", "json"]);
    assert_eq!(halted.status.code(), Some(3), "{}", text(&halted.stderr));
    let json: serde_json::Value = serde_json::from_str(&text(&halted.stdout)).expect("json");
    assert_eq!(json["state"], "halted");
    assert_eq!(json["failed"]["pi-c"], "rolled-back: revision 2: unhealthy");
    let history = site.ctl(&["rollout", "history"]);
    let out = text(&history.stdout);
    assert!(
        out.contains("\n2         halted     canary,100% (1/2)"),
        "{out}"
    );
    assert!(out.contains("\n1         complete   100% (1/1)"), "{out}");

    // Undo: revision 1's configuration again, as revision 3, to every node.
    let undo = site.ctl(&["rollout", "undo"]);
    assert!(undo.status.success(), "{}", text(&undo.stderr));
    assert!(
        text(&undo.stdout)
            .contains("published revision 3 of site depot-7: the configuration of revision 1"),
        "{}",
        text(&undo.stdout)
    );
    std::fs::write(&site.cluster, PLAIN).expect("cluster.toml");
    let same = site.ctl(&["config", "diff", &cluster]);
    assert_eq!(same.status.code(), Some(0), "{}", text(&same.stderr));
    assert!(text(&same.stdout).contains("is what revision 3 (central) holds"));

    // Watching revision 3 until every node took it.
    let mut watch = site
        .command(&["rollout", "status", "--watch"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("watch");
    for node in ["pi-a", "pi-b", "pi-c"] {
        assert_eq!(site.poll(node, 2, 5), Some(3), "{node}");
        site.report(node, 3, "applied");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(status) = watch.try_wait().expect("wait") {
            break status.code();
        }
        assert!(Instant::now() < deadline, "--watch never ends");
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = watch.wait_with_output().expect("output");
    assert_eq!(code, Some(0));
    assert!(
        text(&out.stdout).contains("revision 3 · complete"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn pause_and_abort_answer_with_the_new_state_and_another_sites_key_is_refused() {
    let site = Fixture::new();
    assert!(site.publish(PLAIN).status.success());
    assert!(site.publish(CANARY).status.success());
    let paused = site.ctl(&["rollout", "pause"]);
    assert!(paused.status.success(), "{}", text(&paused.stderr));
    assert_eq!(
        text(&paused.stdout),
        "rollout of revision 2 of site depot-7: paused\n"
    );
    let again = site.ctl(&["rollout", "pause"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("is paused: it cannot be paused"),
        "{}",
        text(&again.stderr)
    );
    let aborted = site.ctl(&["rollout", "abort", "--revision", "2"]);
    assert_eq!(
        text(&aborted.stdout),
        "rollout of revision 2 of site depot-7: aborted\n"
    );
    assert_eq!(site.ctl(&["rollout", "status"]).status.code(), Some(3));

    // The dashboard's URL carries a session token that reads this site's overview.
    let dashboard = site.ctl(&["dashboard", "--for", "10m"]);
    assert!(dashboard.status.success(), "{}", text(&dashboard.stderr));
    let url = text(&dashboard.stdout).trim().to_owned();
    let prefix = format!(
        "https://localhost:{}/dashboard#site=depot-7&token=",
        site.central.addr.port()
    );
    let token = url.strip_prefix(&prefix).unwrap_or_else(|| panic!("{url}"));
    assert!(
        text(&dashboard.stderr).contains("until"),
        "{}",
        text(&dashboard.stderr)
    );
    let overview = site
        .central
        .client(None)
        .get(site.central.url("/v1/sites/depot-7/overview"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .expect("overview");
    assert_eq!(overview.status(), 200);
    let view: serde_json::Value =
        serde_json::from_str(&overview.text().expect("body")).expect("json");
    assert_eq!(view["rollouts"][0]["state"], "aborted");

    let stranger = SigningKey::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = site_folder(dir.path(), "depot-7", &stranger);
    let refused = site
        .command(&["rollout", "history"])
        .env("PIMESH_SITE_DIR", &folder)
        .output()
        .expect("runs");
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("403 Forbidden: the operator signature does not verify"),
        "{}",
        text(&refused.stderr)
    );
}
