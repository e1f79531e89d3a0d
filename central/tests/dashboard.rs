//! The dashboard in headless Chromium against the central server binary over real TLS:
//! the operator opens a session with the site key, the page shows what the nodes
//! reported and the rollout, escapes what they sent, and follows a new revision live.
//!
//! Chromium is Debian's `chromium` package (`image/host-deps.sh` installs it); without it
//! this test fails, naming the package.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pimesh_demo::browser::{Browser, Page};
use pimesh_revision::path;
use pimesh_schema::DnsLabel;
use pimesh_test_support::central::{Central, OperatedSite, SigningKey};
use serde_json::{json, Value};

/// Generous: a debug server and Chromium sharing two cores.
const DEADLINE: Duration = Duration::from_secs(120);

fn publish(central: &Central, site: &OperatedSite, number: u64, config: &str) {
    let status = central
        .client(None)
        .put(central.url(&path::revisions(site.name())))
        .body(site.key.revision(site.name(), number, config))
        .send()
        .expect("publish")
        .status();
    assert_eq!(status, 201);
}

/// Certificate dates as a node reports them: its own certificate expiring in `days`, the
/// issuer in 200 days, the anchor in ten years.
fn expiring_in(days: u64) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    json!({"node": now + days * 86_400 + 3_600, "issuer": now + 200 * 86_400, "anchor": now + 3_650 * 86_400})
}

/// `node` of `site` takes what it is offered after `after` and reports `state` about it,
/// with the report fields of `extra` (an object: `certificates`, `traffic`).
fn node_takes(
    central: &Central,
    site: &OperatedSite,
    node: &str,
    after: u64,
    state: &str,
    detail: &str,
    extra: Value,
) {
    let http = central.client(Some(&site.site.node_identity_pem(node)));
    let url = central.url(&format!(
        "{}?after={after}&wait=5",
        path::config(site.name())
    ));
    let offered = http.get(url).send().expect("poll");
    assert_eq!(offered.status(), 200, "{node} is offered a revision");
    let revision = serde_json::from_str::<Value>(&offered.text().expect("body")).expect("json")
        ["revision"]
        .as_u64()
        .expect("number");
    let running = if state == "applied" { revision } else { after };
    let mut report =
        json!({"revision": running, "state": state, "detail": detail, "about": revision});
    if let (Some(report), Some(extra)) = (report.as_object_mut(), extra.as_object()) {
        report.extend(extra.clone());
    }
    let status = http
        .post(central.url(&path::reports(site.name())))
        .body(report.to_string())
        .send()
        .expect("report")
        .status();
    assert_eq!(status, 200);
}

fn session(
    central: &Central,
    site: &OperatedSite,
    key: &SigningKey,
) -> reqwest::blocking::Response {
    let path = format!(
        "{}?ttl=600",
        path::site(site.name(), path::SiteResource::Sessions)
    );
    let authorization = site.authorization_with(key, "POST", &path);
    central
        .client(None)
        .post(central.url(&path))
        .header("authorization", authorization)
        .send()
        .expect("session")
}

/// Waits until `expression` is true in the page.
async fn until(page: &mut Page, what: &str, expression: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if page.eval(expression).await.ok() == Some(Value::Bool(true)) {
            return;
        }
        if Instant::now() > deadline {
            panic!("{what}: the page shows\n{}", page.text().await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn the_dashboard_shows_the_site_escapes_what_nodes_sent_and_follows_a_rollout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = OperatedSite::new(dir.path(), "depot-7");
    let other = OperatedSite::new(dir.path(), "depot-8");
    let central = Central::start(
        dir.path(),
        "long_poll_max = \"30s\"\n",
        &[site.central_site(), other.central_site()],
    );
    publish(&central, &site, 1, "site = \"depot-7\"\n");
    node_takes(
        &central,
        &site,
        "pi-a",
        0,
        "applied",
        "",
        json!({
            "certificates": expiring_in(60),
            // What pi-a's proxy carried: a healthy service, one failing, and a service
            // name with HTML in it.
            "traffic": {"window_s": 60, "services": [
                {"service": "api", "requests": 120, "answered": 120, "failures": 0,
                 "p50_us": 2500, "p99_us": 48000},
                {"service": "<b>staff</b>", "requests": 30, "answered": 30, "failures": 6}
            ]}
        }),
    );
    for node in ["pi-b", "pi-c"] {
        node_takes(&central, &site, node, 0, "applied", "", json!({}));
    }
    publish(
        &central,
        &site,
        2,
        "site = \"depot-7\"\n[rollout]\ncanary = [\"pi-c\"]\nwaves = [100]\nrelease = \"2026.12-a\"\n",
    );
    let hostile = "revision 2: <img src=x onerror=\"document.title='pwned'\"> unhealthy";
    node_takes(
        &central,
        &site,
        "pi-c",
        1,
        "rolled-back",
        hostile,
        json!({"certificates": expiring_in(3)}),
    );

    // Only the site's operator opens a session, and a session opens its own site only.
    assert_eq!(session(&central, &site, &other.key).status(), 403);
    let opened = session(&central, &site, &site.key);
    assert_eq!(opened.status(), 201);
    let token = opened.json::<Value>().expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let overview = |site_name: &DnsLabel, token: Option<&str>| {
        let mut request = central
            .client(None)
            .get(central.url(&path::site(site_name, path::SiteResource::Overview)));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        request.send().expect("overview").status().as_u16()
    };
    assert_eq!(overview(site.name(), Some(&token)), 200);
    assert_eq!(overview(site.name(), None), 401);
    assert_eq!(overview(other.name(), Some(&token)), 403, "another site");
    assert_eq!(overview(site.name(), Some("0123")), 403);

    // Multi-threaded, so that the blocking clients may run inside it (`block_in_place`).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&shots).expect("screenshots folder");
    runtime.block_on(async {
        let browser = Browser::launch(&shots.join("chromium.log"), DEADLINE)
            .await
            .expect("chromium");
        let mut page = browser.page().await.expect("page");
        page.call(
            "Security.setIgnoreCertificateErrors",
            json!({ "ignore": true }),
        )
        .await
        .expect("the test server's self-signed certificate");
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1000, "height": 760, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await
        .expect("viewport");
        let url = central.url(&format!("/dashboard#site=depot-7&token={token}"));
        let started = Instant::now();
        page.call("Page.navigate", json!({ "url": url }))
            .await
            .expect("navigate");
        until(
            &mut page,
            "the three nodes",
            "document.querySelectorAll('#nodes tbody tr').length === 3",
        )
        .await;
        eprintln!(
            "FIGURES dashboard_first_render_ms={}",
            started.elapsed().as_millis()
        );

        let summary = page.text_of("summary").await.expect("summary");
        assert_eq!(summary.as_deref(), Some("0/3 on revision 2, 1 failed"));
        assert_eq!(
            page.text_of("rollout-state")
                .await
                .expect("state")
                .as_deref(),
            Some("halted")
        );
        assert_eq!(
            page.text_of("rollout-revision")
                .await
                .expect("revision")
                .as_deref(),
            Some("of revision 2, release 2026.12-a")
        );
        let detail = page
            .eval("document.querySelector('tr[data-node=\"pi-c\"] td.detail').textContent")
            .await
            .expect("detail");
        assert_eq!(detail, json!(hostile), "shown as text");
        assert_eq!(
            page.eval("document.querySelectorAll('img').length")
                .await
                .expect("imgs"),
            json!(0)
        );
        assert_eq!(
            page.eval("document.title").await.expect("title"),
            json!("Pimesh")
        );
        assert_eq!(
            page.eval("location.href.includes('token')")
                .await
                .expect("href"),
            json!(false),
            "the token leaves the address bar"
        );
        // Certificate dates: the first to expire, red within a week, each in the title.
        let certificate = |node: &str, what: &str| {
            format!("document.querySelector('tr[data-node=\"{node}\"] td:nth-child(5)').{what}")
        };
        for (node, text, class) in [
            ("pi-a", "node in 60 d", "good"),
            ("pi-b", "", ""),
            ("pi-c", "node in 3 d", "bad"),
        ] {
            let shown = page
                .eval(&certificate(node, "textContent"))
                .await
                .expect("cell");
            assert_eq!(shown, json!(text), "{node}");
            let shown = page
                .eval(&certificate(node, "className"))
                .await
                .expect("class");
            assert_eq!(shown, json!(class), "{node}");
        }
        let title = page
            .eval(&certificate("pi-c", "title"))
            .await
            .expect("title");
        let title = title.as_str().unwrap_or_default();
        assert!(
            title.starts_with("node: 20")
                && title.contains(", issuer: 20")
                && title.contains(", anchor: 20"),
            "{title}"
        );
        // Mesh traffic: one line per service, the failing one marks the cell.
        let traffic = |what: &str| {
            format!(
                "Array.from(document.querySelectorAll('tr[data-node=\"pi-a\"] td.traffic div'), d => d.{what})"
            )
        };
        assert_eq!(
            page.eval(&traffic("textContent")).await.expect("traffic"),
            json!([
                "api · 2.00 rps · 100.0 % ok · p50 2.5 ms · p99 48 ms",
                "<b>staff</b> · 0.50 rps · 80.0 % ok"
            ]),
            "shown as text"
        );
        assert_eq!(
            page.eval("document.querySelectorAll('b').length")
                .await
                .expect("bold"),
            json!(0)
        );
        assert_eq!(
            page.eval("document.querySelector('tr[data-node=\"pi-a\"] td.traffic').className")
                .await
                .expect("class"),
            json!("traffic bad")
        );
        assert_eq!(
            page.eval("document.querySelector('tr[data-node=\"pi-b\"] td:nth-child(6)').textContent")
                .await
                .expect("no traffic"),
            json!("")
        );
        page.screenshot(&shots.join("halted.png"))
            .await
            .expect("screenshot");

        // A fix goes out; the page follows without a reload.
        tokio::task::block_in_place(|| {
            publish(&central, &site, 3, "site = \"depot-7\"\n");
            for (node, days) in [("pi-a", 60), ("pi-b", 45), ("pi-c", 20)] {
                let mut extra = json!({"certificates": expiring_in(days)});
                if node == "pi-a" {
                    extra["traffic"] = json!({"window_s": 300, "services": [
                        {"service": "api", "requests": 1500, "answered": 1500, "failures": 3,
                         "p50_us": 2100, "p99_us": 31000},
                        {"service": "staff", "requests": 600, "answered": 600, "failures": 0,
                         "p50_us": 800, "p95_us": 2000, "p99_us": 4400}
                    ]});
                }
                node_takes(&central, &site, node, 1, "applied", "", extra);
            }
        });
        until(
            &mut page,
            "every node on revision 3",
            "document.getElementById('summary').textContent === '3/3 on revision 3'",
        )
        .await;
        until(
            &mut page,
            "the rollout of revision 3 complete",
            "document.getElementById('rollout-state').textContent === 'complete'",
        )
        .await;
        let history = page
            .eval("document.querySelector('#history tbody').innerText")
            .await
            .expect("history");
        let history = history.as_str().unwrap_or_default();
        assert!(history.contains("2\thalted"), "{history}");
        page.screenshot(&shots.join("dashboard.png"))
            .await
            .expect("screenshot");
    });
}
