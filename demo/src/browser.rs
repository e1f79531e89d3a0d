//! Headless Chromium driven over the DevTools protocol (CDP), just enough to check the
//! demo's page: launch it, open its page's DevTools WebSocket, evaluate JavaScript, read
//! elements' `data-value`, take screenshots. Used by `pimesh-demo page-check` and by the
//! page's end-to-end test.
//!
//! Chromium is Debian's `chromium` package (`image/host-deps.sh` installs it), or the
//! binary `$CHROMIUM` names. It runs with a profile of its own in a temporary folder and
//! every background fetch turned off; what it loads is what the page asks for.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const POLL: Duration = Duration::from_millis(200);
/// The largest answer read from the DevTools HTTP endpoint.
const MAX_LIST: usize = 1 << 20;

/// The Chromium binary: `$CHROMIUM`, or `chromium` on `PATH`.
///
/// # Errors
/// When there is none; the message names the Debian package.
pub fn chromium() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Ok(PathBuf::from(path));
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("chromium"))
                .find(|candidate| candidate.is_file())
        })
        .ok_or_else(|| {
            "the page is driven in headless Chromium, and `chromium` is not on PATH: \
             install Debian's `chromium` package (`apt-get install -y chromium`; \
             image/host-deps.sh installs it), or set CHROMIUM to its path"
                .to_owned()
        })
}

/// Chromium, headless, with its DevTools port on 127.0.0.1; killed when dropped.
pub struct Browser {
    child: Child,
    port: u16,
    deadline: Duration,
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium (its stderr into `log`) and waits up to `deadline` for its
    /// DevTools port.
    ///
    /// # Errors
    /// When Chromium is missing, does not start, or opens no DevTools port in time.
    pub async fn launch(log: &Path, deadline: Duration) -> Result<Browser, String> {
        let program = chromium()?;
        let profile = tempfile::tempdir().map_err(|err| format!("a profile folder: {err}"))?;
        let log_file = std::fs::File::create(log)
            .map_err(|err| format!("chromium's log {}: {err}", log.display()))?;
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
                "--disable-domain-reliability",
                "--metrics-recording-only",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|err| format!("cannot start {}: {err}", program.display()))?;
        let mut browser = Browser {
            child,
            port: 0,
            deadline,
            profile,
        };
        let log_text = || std::fs::read_to_string(log).unwrap_or_default();
        // Chromium writes the port it chose into the profile once it listens.
        let active = browser.profile.path().join("DevToolsActivePort");
        let started = tokio::time::Instant::now();
        browser.port = loop {
            if let Some(port) = std::fs::read_to_string(&active)
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse().ok())
            {
                break port;
            }
            if let Ok(Some(status)) = browser.child.try_wait() {
                return Err(format!(
                    "chromium exited ({status}) before opening its DevTools port; log:\n{}",
                    log_text()
                ));
            }
            if started.elapsed() > deadline {
                return Err(format!(
                    "chromium opened no DevTools port within {deadline:?}; log:\n{}",
                    log_text()
                ));
            }
            tokio::time::sleep(POLL).await;
        };
        Ok(browser)
    }

    /// The DevTools connection of the browser's first page.
    ///
    /// # Errors
    /// When Chromium lists no page in time or its WebSocket does not open.
    pub async fn page(&self) -> Result<Page, String> {
        let started = tokio::time::Instant::now();
        let url = loop {
            if let Ok(body) = self.list().await {
                let targets: Value = serde_json::from_str(&body)
                    .map_err(|err| format!("DevTools /json/list is not JSON: {err}"))?;
                if let Some(url) = targets.as_array().and_then(|targets| {
                    targets
                        .iter()
                        .find(|t| t["type"] == "page")
                        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                }) {
                    break url.to_owned();
                }
            }
            if started.elapsed() > self.deadline {
                return Err(format!(
                    "chromium shows no page target within {:?}",
                    self.deadline
                ));
            }
            tokio::time::sleep(POLL).await;
        };
        let stream = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|err| format!("DevTools port {}: {err}", self.port))?;
        let (socket, _) = tokio_tungstenite::client_async(url.as_str(), stream)
            .await
            .map_err(|err| format!("DevTools WebSocket {url}: {err}"))?;
        Ok(Page {
            socket,
            next: 0,
            deadline: self.deadline,
        })
    }

    /// The body of DevTools' `GET /json/list`.
    async fn list(&self) -> Result<String, String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|err| err.to_string())?;
        stream
            .write_all(b"GET /json/list HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|err| err.to_string())?;
        // Chromium keeps the connection open: read the head, then Content-Length bytes.
        let read = async {
            let mut answer = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                let n = stream
                    .read(&mut chunk)
                    .await
                    .map_err(|err| err.to_string())?;
                if n == 0 {
                    return Err("closed before the answer was whole".to_owned());
                }
                answer.extend_from_slice(&chunk[..n]);
                if answer.len() > MAX_LIST {
                    return Err("answer too large".to_owned());
                }
                let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&answer[..end]).into_owned();
                if !head.starts_with("HTTP/1.1 200") {
                    return Err(head.lines().next().unwrap_or_default().to_owned());
                }
                let length = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .ok_or_else(|| "no Content-Length".to_owned())?;
                if answer.len() >= end + 4 + length {
                    let body = &answer[end + 4..end + 4 + length];
                    return Ok(String::from_utf8_lossy(body).into_owned());
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .map_err(|_| "no answer".to_owned())?
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal DevTools-protocol client for one page.
pub struct Page {
    socket: WebSocketStream<TcpStream>,
    next: u64,
    deadline: Duration,
}

impl Page {
    /// Sends `method` and returns its result, skipping the events that arrive meanwhile.
    ///
    /// # Errors
    /// When the DevTools connection fails, gives no answer in time, or answers an error.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next += 1;
        let id = self.next;
        let request = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::text(request.to_string()))
            .await
            .map_err(|err| format!("DevTools {method}: {err}"))?;
        let socket = &mut self.socket;
        let answer = tokio::time::timeout(self.deadline, async {
            loop {
                let message = socket
                    .next()
                    .await
                    .ok_or_else(|| format!("DevTools closed during {method}"))?
                    .map_err(|err| format!("DevTools {method}: {err}"))?;
                let Message::Text(text) = message else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text)
                    .map_err(|err| format!("DevTools sent no JSON: {err}"))?;
                if value["id"] == id {
                    break Ok::<Value, String>(value);
                }
            }
        })
        .await
        .map_err(|_| format!("DevTools gave no answer to {method}"))??;
        if let Some(error) = answer.get("error") {
            return Err(format!("DevTools {method}: {error}"));
        }
        Ok(answer["result"].clone())
    }

    /// The value of a JavaScript expression in the page.
    ///
    /// # Errors
    /// When the call fails or the expression throws.
    pub async fn eval(&mut self, expression: &str) -> Result<Value, String> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(format!("{expression}: {exception}"));
        }
        Ok(result["result"]["value"].clone())
    }

    /// The `data-value` of element `id` as a number; `None` when it is absent or empty.
    ///
    /// # Errors
    /// When the page cannot be read.
    pub async fn value(&mut self, id: &str) -> Result<Option<f64>, String> {
        let expression = format!(
            "(() => {{ const e = document.getElementById({}); return e ? e.getAttribute('data-value') : null; }})()",
            json!(id)
        );
        Ok(self
            .eval(&expression)
            .await?
            .as_str()
            .and_then(|text| text.parse().ok()))
    }

    /// The text of element `id`, `None` when it is absent.
    ///
    /// # Errors
    /// When the page cannot be read.
    pub async fn text_of(&mut self, id: &str) -> Result<Option<String>, String> {
        let expression = format!(
            "(() => {{ const e = document.getElementById({}); return e ? e.textContent : null; }})()",
            json!(id)
        );
        Ok(self.eval(&expression).await?.as_str().map(str::to_owned))
    }

    /// The page's visible text, for failure messages (empty when it cannot be read).
    pub async fn text(&mut self) -> String {
        self.eval("document.body ? document.body.innerText : ''")
            .await
            .ok()
            .and_then(|value| value.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// A PNG of the page into `file` (its folder made as needed).
    ///
    /// # Errors
    /// When the capture or the write fails.
    pub async fn screenshot(&mut self, file: &Path) -> Result<(), String> {
        let result = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(result["data"].as_str().unwrap_or_default())
            .map_err(|err| format!("the screenshot is not base64: {err}"))?;
        if let Some(folder) = file.parent() {
            std::fs::create_dir_all(folder)
                .map_err(|err| format!("{}: {err}", folder.display()))?;
        }
        std::fs::write(file, png).map_err(|err| format!("{}: {err}", file.display()))?;
        eprintln!("screenshot: {}", file.display());
        Ok(())
    }
}
