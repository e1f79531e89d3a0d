//! A daemon of the workspace as a child process of the test.
//!
//! The process gets none of the variables systemd would pass a unit (so it neither
//! notifies a manager nor logs to a journal), writes its log to a file that failure
//! messages quote, and is killed when the [`Daemon`] is dropped, also when a test fails.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::binary::Binary;
use crate::wait::{DEADLINE, POLL};

/// What systemd sets for a unit; a daemon under test must see none of it.
const UNIT_ENVIRONMENT: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "CREDENTIALS_DIRECTORY",
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "LISTEN_FDS",
    "LISTEN_PID",
];

/// A running daemon, killed (SIGKILL) and reaped when dropped.
pub struct Daemon {
    child: Child,
    name: String,
    log: PathBuf,
    /// Holds the log when the caller gave no folder for it.
    _log_dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// `binary` with the unit environment removed, stdin and stdout on /dev/null and
    /// `RUST_LOG` set to `rust_log`.
    pub fn command(binary: Binary, rust_log: &str) -> Command {
        let mut command = binary.command();
        for name in UNIT_ENVIRONMENT {
            command.env_remove(name);
        }
        command
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        command
    }

    /// Starts `command` with its stderr appended to `log`, or written to a file of a
    /// temporary folder of its own when `log` is `None`.
    ///
    /// # Panics
    /// When the log file cannot be made or the process cannot start.
    pub fn spawn(name: &str, mut command: Command, log: Option<&Path>) -> Daemon {
        let (log, log_dir) = match log {
            Some(log) => (log.to_path_buf(), None),
            None => {
                let dir = tempfile::tempdir().expect("a folder for the log");
                (dir.path().join(format!("{name}.log")), Some(dir))
            }
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|err| panic!("{}: {err}", log.display()));
        let child = command
            .stderr(file)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {name} ({command:?}): {err}"));
        Daemon {
            child,
            name: name.to_owned(),
            log,
            _log_dir: log_dir,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The descriptors the process holds open now (`/proc/<pid>/fd`).
    ///
    /// # Panics
    /// When the process is gone.
    pub fn open_descriptors(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.pid());
        std::fs::read_dir(&dir)
            .unwrap_or_else(|err| panic!("{}: {dir}: {err}", self.name))
            .count()
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// # Panics
    /// When the signal cannot be sent.
    pub fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.child.id()).expect("a pid fits i32");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .unwrap_or_else(|err| panic!("{signal} to {}: {err}", self.name));
    }

    /// The exit status when the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit.
    ///
    /// # Panics
    /// At [`DEADLINE`], with the log.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {DEADLINE:?}; log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(POLL);
        }
    }

    /// `kill -9` and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Polls `done` until it holds.
    ///
    /// # Panics
    /// When the process exits first, or at [`DEADLINE`]; both with the log.
    pub async fn wait_until<F, Fut>(&mut self, what: &str, mut done: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !done().await {
            self.assert_waiting(what, DEADLINE, tokio::time::Instant::now() < deadline);
            tokio::time::sleep(POLL).await;
        }
    }

    /// [`Daemon::wait_until`] for tests without an async runtime.
    ///
    /// # Panics
    /// When the process exits first, or at [`DEADLINE`]; both with the log.
    pub fn wait_until_blocking(&mut self, what: &str, done: impl FnMut() -> bool) {
        self.wait_until_blocking_for(what, DEADLINE, done);
    }

    /// [`Daemon::wait_until_blocking`] with a deadline of its own, for what the daemon
    /// does on a period of its own (a check every few seconds) rather than at once.
    ///
    /// # Panics
    /// When the process exits first, or at `limit`; both with the log.
    pub fn wait_until_blocking_for(
        &mut self,
        what: &str,
        limit: Duration,
        mut done: impl FnMut() -> bool,
    ) {
        let deadline = Instant::now() + limit;
        while !done() {
            self.assert_waiting(what, limit, Instant::now() < deadline);
            std::thread::sleep(POLL);
        }
    }

    fn assert_waiting(&mut self, what: &str, limit: Duration, in_time: bool) {
        if let Some(status) = self.exited() {
            panic!(
                "{} exited ({status}) before {what}; log:\n{}",
                self.name,
                self.log_text()
            );
        }
        assert!(
            in_time,
            "{}: not in time ({limit:?}): {what}; log:\n{}",
            self.name,
            self.log_text()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A test failing because its daemon died says so, with the daemon's last words.
        if std::thread::panicking() {
            if let Some(status) = self.exited() {
                eprintln!(
                    "{} had exited ({status}) when the test failed; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
        }
        self.kill();
    }
}
