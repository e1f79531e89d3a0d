//! The demo end to end on one machine: two real proxies (nodes `a` and `b`), every part of
//! the demo as a process placed on node `b`, each calling the others through proxy `a`'s
//! outbound port (so every call crosses a → mTLS → b), and the web page driven in
//! headless Chromium over the DevTools protocol: vehicles move, the staff split shows its
//! 10 % of errors, the mesh panel shows the proxy's numbers, and a fault injected by
//! rewriting the site config appears on the page.
//!
//! Chromium is Debian's `chromium` package (`image/host-deps.sh` installs it); without it
//! this test fails, naming the package.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use pimesh_demo::browser::{chromium, Browser};
use pimesh_test_support::http::get_text;
use pimesh_test_support::proxy::{mesh, Mesh};
use pimesh_test_support::{free_port, replace, Binary, Daemon, Site};
use serde_json::json;

/// Generous: the proxies and the parts are debug builds sharing two cores with Chromium.
const DEADLINE: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(200);
/// Staff calls per second the page makes (its `staff_hz`).
const STAFF_HZ: u32 = 100;
/// Staff calls counted before the error share is read: Binomial(2000, 0.1) has a standard
/// deviation of 0.67 points, so ± 3 points is 4.5 of them.
const STAFF_CALLS: f64 = 2000.0;

struct Ports {
    queue: u16,
    queue_local: u16,
    tracker: u16,
    gateway: u16,
    staff: u16,
    injector: u16,
    webapp: u16,
}

impl Ports {
    fn free() -> Ports {
        Ports {
            queue: free_port(),
            queue_local: free_port(),
            tracker: free_port(),
            gateway: free_port(),
            staff: free_port(),
            injector: free_port(),
            webapp: free_port(),
        }
    }

    /// The services, all on node `b`, as `configs/cluster.example.toml` names them.
    fn services(&self) -> String {
        let service = |name: &str, port: u16, extra: &str| {
            format!("[services.{name}]\nport = {port}\nnodes = [\"b\"]\n{extra}\n")
        };
        [
            service(
                "fleetman-queue",
                self.queue,
                &format!("protocol = \"tcp\"\nlocal_port = {}", self.queue_local),
            ),
            service("fleetman-position-tracker", self.tracker, ""),
            service("fleetman-api-gateway", self.gateway, ""),
            "[services.fleetman-staff-service]\nsplit = [\n  \
             { service = \"fleetman-staff-service-stable\", weight = 90 },\n  \
             { service = \"error-injector\", weight = 10 },\n]\n"
                .to_owned(),
            service("fleetman-staff-service-stable", self.staff, ""),
            service("error-injector", self.injector, ""),
            service("fleetman-webapp", self.webapp, ""),
        ]
        .concat()
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The demo's parts as processes, logging into `dir`.
struct Parts {
    daemons: Vec<Daemon>,
}

impl Parts {
    fn start(dir: &Path, m: &Mesh, ports: &Ports) -> Parts {
        let mesh_url = format!("http://{}", m.a.outbound);
        let queue_local = local(ports.queue_local).to_string();
        let listen = |port: u16| local(port).to_string();
        let parts: Vec<(&str, Vec<String>)> = vec![
            ("queue", vec!["--listen".into(), listen(ports.queue)]),
            (
                "tracker",
                vec![
                    "--listen".into(),
                    listen(ports.tracker),
                    "--queue".into(),
                    queue_local.clone(),
                ],
            ),
            (
                "api-gateway",
                vec![
                    "--listen".into(),
                    listen(ports.gateway),
                    "--mesh".into(),
                    mesh_url.clone(),
                ],
            ),
            ("staff", vec!["--listen".into(), listen(ports.staff)]),
            ("injector", vec!["--listen".into(), listen(ports.injector)]),
            (
                "webapp",
                vec![
                    "--listen".into(),
                    listen(ports.webapp),
                    "--mesh".into(),
                    mesh_url,
                    "--proxy-admin".into(),
                    format!("http://{}/metrics", m.a.admin),
                ],
            ),
            ("simulator", vec!["--queue".into(), queue_local]),
        ];
        let daemons = parts
            .into_iter()
            .map(|(part, args)| {
                let mut command = Daemon::command(Binary::Demo, "info,pimesh_demo=debug");
                command.arg(part).args(args);
                Daemon::spawn(part, command, Some(&dir.join(format!("{part}.log"))))
            })
            .collect();
        Parts { daemons }
    }

    /// The end of every part's log, for failure messages.
    fn logs(&self) -> String {
        self.daemons
            .iter()
            .map(|daemon| {
                let text = daemon.log_text();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                format!("--- {} ---\n{tail}\n", daemon.name())
            })
            .collect()
    }

    /// SIGTERM to each; each must exit 0 within the deadline.
    fn stop(mut self) {
        for daemon in &self.daemons {
            daemon.signal(Signal::SIGTERM);
        }
        for daemon in &mut self.daemons {
            let status = daemon.wait_exit();
            assert!(
                status.success(),
                "{} exited {status} on SIGTERM; log:\n{}",
                daemon.name(),
                daemon.log_text()
            );
        }
    }
}

/// Where screenshots go: `target/demo-screenshots/`.
fn screenshots() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target folder")
        .join("demo-screenshots")
}

/// Polls `check` (which reads the page) until it returns `Some`, failing at [`DEADLINE`]
/// with the page's text and the parts' logs.
macro_rules! wait_for {
    ($what:expr, $page:expr, $parts:expr, $check:expr) => {{
        let started = tokio::time::Instant::now();
        loop {
            if let Some(found) = $check {
                break found;
            }
            if started.elapsed() > DEADLINE {
                let text = $page.text().await;
                $page
                    .screenshot(&screenshots().join("failed.png"))
                    .await
                    .unwrap();
                panic!(
                    "{} did not happen within {DEADLINE:?}\npage:\n{text}\nlogs:\n{}",
                    $what,
                    $parts.logs()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }};
}

#[tokio::test]
async fn the_page_shows_moving_vehicles_the_split_and_an_injected_fault() {
    let chromium_path = chromium().unwrap(); // fail first, and clearly, without Chromium
    let site = Site::new("depot");
    let ports = Ports::free();
    let services = ports.services();
    let m = mesh(&site, &services).await;
    let logs = tempfile::tempdir().expect("log folder");
    let parts = Parts::start(logs.path(), &m, &ports);
    for (what, port) in [
        ("tracker", ports.tracker),
        ("api-gateway", ports.gateway),
        ("staff", ports.staff),
        ("injector", ports.injector),
        ("webapp", ports.webapp),
    ] {
        let started = tokio::time::Instant::now();
        while !matches!(get_text(local(port), "/healthz").await, Ok((200, _))) {
            assert!(
                started.elapsed() < DEADLINE,
                "{what} does not answer /healthz\n{}",
                parts.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    let browser = Browser::launch(&logs.path().join("chromium.log"), DEADLINE)
        .await
        .unwrap();
    let mut page = browser.page().await.unwrap();
    page.call("Page.enable", json!({})).await.unwrap();
    let url = format!("http://{}/?staff_hz={STAFF_HZ}", local(ports.webapp));
    page.call("Page.navigate", json!({ "url": url }))
        .await
        .unwrap();

    // The page loads, and the simulator's eight vehicles arrive through queue and tracker.
    wait_for!("the page loading", page, parts, {
        let title = page.eval("document.title").await.unwrap();
        (title == "Fleetman on Pimesh").then_some(())
    });
    wait_for!("eight vehicles on the map", page, parts, {
        let count = page
            .eval("document.querySelectorAll('[data-vehicle]').length")
            .await
            .unwrap();
        (count.as_u64() >= Some(8)).then_some(())
    });
    eprintln!("using {}", chromium_path.display());

    // A vehicle moves: its position changes between two reads, as feed messages arrive.
    let position = "(() => { const v = document.querySelector('[data-vehicle=\"truck-01\"]'); \
                    return v ? v.getAttribute('data-lat') + ',' + v.getAttribute('data-lon') : null; })()";
    let first = page.eval(position).await.unwrap();
    assert!(first.is_string(), "truck-01 is on the map: {first}");
    let feed_before = page
        .eval("Number(document.getElementById('feed-messages').textContent)")
        .await
        .unwrap()
        .as_f64()
        .unwrap_or(0.0);
    wait_for!("truck-01 moving", page, parts, {
        let now = page.eval(position).await.unwrap();
        (now.is_string() && now != first).then_some(())
    });
    wait_for!("the live feed carrying messages", page, parts, {
        let now = page
            .eval("Number(document.getElementById('feed-messages').textContent)")
            .await
            .unwrap()
            .as_f64()
            .unwrap_or(0.0);
        (now >= feed_before + 3.0).then_some(())
    });
    let hops = page
        .eval("document.getElementById('feed-mode').textContent")
        .await
        .unwrap();
    // Both relays carry the feed as WebSockets through the mesh (an Upgrade crossing
    // proxy a -> mTLS -> proxy b), not by their polling fallback.
    let hops = hops.as_str().unwrap_or_default().to_owned();
    assert!(
        hops.matches(": websocket").count() == 2 && !hops.contains("polling"),
        "feed hops: {hops}"
    );

    // The staff panel: ≥ 2000 calls through the 90/10 split; 10 % ± 3 points are errors.
    wait_for!(format!("{STAFF_CALLS} staff calls"), page, parts, {
        page.value("staff-calls")
            .await
            .unwrap()
            .filter(|calls| *calls >= STAFF_CALLS)
    });
    let ok = page.value("staff-ok").await.unwrap().expect("#staff-ok");
    let errors = page
        .value("staff-errors")
        .await
        .unwrap()
        .expect("#staff-errors");
    let share = page
        .value("staff-error-share")
        .await
        .unwrap()
        .expect("#staff-error-share");
    assert!(
        (share - errors / (ok + errors)).abs() < 0.01,
        "the share shown ({share}) is errors / calls ({errors} / {})",
        ok + errors
    );
    assert!(
        (0.07..=0.13).contains(&share),
        "error share {share} of {} calls is not 10 % ± 3 points\npage:\n{}",
        ok + errors,
        page.text().await
    );

    // The mesh panel: the proxy's numbers for the staff service and its split.
    let staff_success = wait_for!("the staff service's success rate", page, parts, {
        page.value("mesh-fleetman-staff-service-success")
            .await
            .unwrap()
            .filter(|rate| *rate < 1.0)
    });
    assert!(
        (0.8..1.0).contains(&staff_success),
        "staff success rate {staff_success}"
    );
    let to_injector = wait_for!("the split count for error-injector", page, parts, {
        page.value("split-fleetman-staff-service-error-injector")
            .await
            .unwrap()
            .filter(|count| *count > 0.0)
    });
    let to_stable = page
        .value("split-fleetman-staff-service-fleetman-staff-service-stable")
        .await
        .unwrap()
        .expect("the stable backend's split count");
    assert!(
        to_stable > to_injector * 4.0,
        "{to_stable} vs {to_injector}"
    );
    let tracker_before = page
        .value("mesh-fleetman-position-tracker-success")
        .await
        .unwrap();
    assert_eq!(
        tracker_before,
        Some(1.0),
        "the tracker answers everything before the fault\n{}",
        page.text().await
    );
    page.screenshot(&screenshots().join("fleetman.png"))
        .await
        .unwrap();

    // A fault injected by rewriting the site config the proxies watch.
    let config = std::fs::read_to_string(&m.config).expect("site config");
    let tracker = format!(
        "[services.fleetman-position-tracker]\nport = {}\n",
        ports.tracker
    );
    assert!(config.contains(&tracker), "{config}");
    replace(
        &m.config,
        &config.replace(
            &tracker,
            &format!("{tracker}fault = {{ abort = {{ status = 503, percent = 50.0 }} }}\n"),
        ),
    );
    let tracker_success = wait_for!("the injected fault on the mesh panel", page, parts, {
        page.value("mesh-fleetman-position-tracker-success")
            .await
            .unwrap()
            .filter(|rate| *rate < 0.95)
    });
    let aborted = wait_for!("the fault count on the mesh panel", page, parts, {
        page.value("fault-fleetman-position-tracker-abort")
            .await
            .unwrap()
            .filter(|count| *count > 0.0)
    });
    eprintln!("with the fault: tracker success {tracker_success}, {aborted} aborted in the window");
    page.screenshot(&screenshots().join("fleetman-fault.png"))
        .await
        .unwrap();

    // Every part stops cleanly on SIGTERM, the browser's WebSocket still open.
    parts.stop();
    drop(browser);
}
