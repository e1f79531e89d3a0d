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
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use nix::sys::signal::Signal;
use pimesh_test_support::http::get_text;
use pimesh_test_support::proxy::{mesh, Mesh};
use pimesh_test_support::{free_port, replace, Binary, Daemon, Site};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

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

/// Chromium, headless, with its DevTools port; killed when dropped.
struct Browser {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("chromium"))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "this test drives the page in headless Chromium, and `chromium` is not on PATH: \
                 install Debian's `chromium` package (`apt-get install -y chromium`; \
                 image/host-deps.sh installs it), or set CHROMIUM to its path"
            )
        })
}

impl Browser {
    async fn launch(log: &Path) -> Browser {
        let program = chromium();
        let profile = tempfile::tempdir().expect("a profile folder");
        let log_file = std::fs::File::create(log).expect("chromium log");
        let child = Command::new(&program)
            .args([
                "--headless=new",
                "--remote-debugging-port=0",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--metrics-recording-only",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", program.display()));
        let mut browser = Browser {
            child,
            port: 0,
            _profile: profile,
        };
        // Chromium writes the port it chose into the profile once it listens.
        let active = browser._profile.path().join("DevToolsActivePort");
        let started = tokio::time::Instant::now();
        browser.port = loop {
            if let Some(port) = std::fs::read_to_string(&active)
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse().ok())
            {
                break port;
            }
            if let Ok(Some(status)) = browser.child.try_wait() {
                panic!(
                    "chromium exited ({status}) before opening its DevTools port; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < DEADLINE,
                "chromium opened no DevTools port; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            tokio::time::sleep(POLL).await;
        };
        browser
    }

    /// The DevTools connection of the browser's first page.
    async fn page(&self) -> Page {
        let devtools = local(self.port);
        let started = tokio::time::Instant::now();
        let url = loop {
            if let Ok((200, body)) = get_text(devtools, "/json/list").await {
                let targets: Value = serde_json::from_str(&body).expect("/json/list is JSON");
                if let Some(url) = targets.as_array().and_then(|targets| {
                    targets
                        .iter()
                        .find(|t| t["type"] == "page")
                        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                }) {
                    break url.to_owned();
                }
            }
            assert!(
                started.elapsed() < DEADLINE,
                "chromium shows no page target"
            );
            tokio::time::sleep(POLL).await;
        };
        let stream = TcpStream::connect(devtools).await.expect("DevTools port");
        let (socket, _) = tokio_tungstenite::client_async(url.as_str(), stream)
            .await
            .unwrap_or_else(|err| panic!("DevTools WebSocket {url}: {err}"));
        Page { socket, next: 0 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal DevTools-protocol client for one page.
struct Page {
    socket: WebSocketStream<TcpStream>,
    next: u64,
}

impl Page {
    /// Sends `method` and returns its result, skipping the events that arrive meanwhile.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let request = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::text(request.to_string()))
            .await
            .unwrap_or_else(|err| panic!("DevTools {method}: {err}"));
        let answer = tokio::time::timeout(DEADLINE, async {
            loop {
                let message = self
                    .socket
                    .next()
                    .await
                    .unwrap_or_else(|| panic!("DevTools closed during {method}"))
                    .unwrap_or_else(|err| panic!("DevTools {method}: {err}"));
                let Message::Text(text) = message else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
                if value["id"] == id {
                    break value;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools gave no answer to {method}"));
        assert!(
            answer.get("error").is_none(),
            "DevTools {method}: {}",
            answer["error"]
        );
        answer["result"].clone()
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression}: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// The `data-value` of element `id` as a number; `None` when it is absent or empty.
    async fn value(&mut self, id: &str) -> Option<f64> {
        let expression = format!(
            "(() => {{ const e = document.getElementById({}); return e ? e.getAttribute('data-value') : null; }})()",
            json!(id)
        );
        self.eval(&expression).await.as_str()?.parse().ok()
    }

    /// The page's visible text, for failure messages.
    async fn text(&mut self) -> String {
        self.eval("document.body ? document.body.innerText : ''")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn screenshot(&mut self, file: &Path) {
        let result = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(result["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        std::fs::create_dir_all(file.parent().expect("a folder")).expect("screenshot folder");
        std::fs::write(file, png).unwrap_or_else(|err| panic!("{}: {err}", file.display()));
        eprintln!("screenshot: {}", file.display());
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
                $page.screenshot(&screenshots().join("failed.png")).await;
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
    let chromium_path = chromium(); // fail first, and clearly, without Chromium
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

    let browser = Browser::launch(&logs.path().join("chromium.log")).await;
    let mut page = browser.page().await;
    page.call("Page.enable", json!({})).await;
    let url = format!("http://{}/?staff_hz={STAFF_HZ}", local(ports.webapp));
    page.call("Page.navigate", json!({ "url": url })).await;

    // The page loads, and the simulator's eight vehicles arrive through queue and tracker.
    wait_for!("the page loading", page, parts, {
        let title = page.eval("document.title").await;
        (title == "Fleetman on Pimesh").then_some(())
    });
    wait_for!("eight vehicles on the map", page, parts, {
        let count = page
            .eval("document.querySelectorAll('[data-vehicle]').length")
            .await;
        (count.as_u64() >= Some(8)).then_some(())
    });
    eprintln!("using {}", chromium_path.display());

    // A vehicle moves: its position changes between two reads, as feed messages arrive.
    let position = "(() => { const v = document.querySelector('[data-vehicle=\"truck-01\"]'); \
                    return v ? v.getAttribute('data-lat') + ',' + v.getAttribute('data-lon') : null; })()";
    let first = page.eval(position).await;
    assert!(first.is_string(), "truck-01 is on the map: {first}");
    let feed_before = page
        .eval("Number(document.getElementById('feed-messages').textContent)")
        .await
        .as_f64()
        .unwrap_or(0.0);
    wait_for!("truck-01 moving", page, parts, {
        let now = page.eval(position).await;
        (now.is_string() && now != first).then_some(())
    });
    wait_for!("the live feed carrying messages", page, parts, {
        let now = page
            .eval("Number(document.getElementById('feed-messages').textContent)")
            .await
            .as_f64()
            .unwrap_or(0.0);
        (now >= feed_before + 3.0).then_some(())
    });
    let hops = page
        .eval("document.getElementById('feed-mode').textContent")
        .await;
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
            .filter(|calls| *calls >= STAFF_CALLS)
    });
    let ok = page.value("staff-ok").await.expect("#staff-ok");
    let errors = page.value("staff-errors").await.expect("#staff-errors");
    let share = page
        .value("staff-error-share")
        .await
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
            .filter(|rate| *rate < 1.0)
    });
    assert!(
        (0.8..1.0).contains(&staff_success),
        "staff success rate {staff_success}"
    );
    let to_injector = wait_for!("the split count for error-injector", page, parts, {
        page.value("split-fleetman-staff-service-error-injector")
            .await
            .filter(|count| *count > 0.0)
    });
    let to_stable = page
        .value("split-fleetman-staff-service-fleetman-staff-service-stable")
        .await
        .expect("the stable backend's split count");
    assert!(
        to_stable > to_injector * 4.0,
        "{to_stable} vs {to_injector}"
    );
    let tracker_before = page.value("mesh-fleetman-position-tracker-success").await;
    assert_eq!(
        tracker_before,
        Some(1.0),
        "the tracker answers everything before the fault\n{}",
        page.text().await
    );
    page.screenshot(&screenshots().join("fleetman.png")).await;

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
            .filter(|rate| *rate < 0.95)
    });
    let aborted = wait_for!("the fault count on the mesh panel", page, parts, {
        page.value("fault-fleetman-position-tracker-abort")
            .await
            .filter(|count| *count > 0.0)
    });
    eprintln!("with the fault: tracker success {tracker_success}, {aborted} aborted in the window");
    page.screenshot(&screenshots().join("fleetman-fault.png"))
        .await;

    // Every part stops cleanly on SIGTERM, the browser's WebSocket still open.
    parts.stop();
    drop(browser);
}
