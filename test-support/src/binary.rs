//! The workspace's binaries, for tests and benchmarks that run them as processes.
//!
//! A binary is found, in this order:
//! 1. through `CARGO_BIN_EXE_<name>`, which cargo sets when it builds and runs the
//!    integration tests and benchmarks of the binary's own package;
//! 2. in the build of the cargo command running the test, when that command builds it
//!    (`cargo test --workspace` builds every binary): the test runs the same command again,
//!    in the same folder and environment, with `--no-run --message-format=json`, which
//!    builds nothing new and lists the build's executables;
//! 3. else built on demand, once per process, by `cargo build -p <package> --bin <name>`
//!    in the test's own target folder and profile: so `cargo test -p pimesh-proxy` on a
//!    clean tree builds the `pimesh-control` its control-plane tests run.
//!
//! Each way yields the binary of the sources as they are, never one left behind by an
//! older build. Nested cargo commands get the environment of the cargo running the test,
//! not the test's own (cargo adds `CARGO_MANIFEST_DIR` and more for a test, and a build
//! script that watches one of them would be run again, and everything after it rebuilt).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

/// A binary of the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Binary {
    Supervisor,
    Proxy,
    Control,
    Central,
    Ctl,
    /// The stand-in for `k3s` (a test fixture, not K3s).
    K3sFixture,
    /// The demo app, every part of it (`demo/`).
    Demo,
}

impl Binary {
    /// The binary's name (its `[[bin]]` target).
    pub fn name(self) -> &'static str {
        match self {
            Binary::Supervisor => "pimesh-supervisor",
            Binary::Proxy => "pimesh-proxy",
            Binary::Control => "pimesh-control",
            Binary::Central => "pimesh-central",
            Binary::Ctl => "pimeshctl",
            Binary::K3sFixture => "k3s-fixture",
            Binary::Demo => "pimesh-demo",
        }
    }

    /// The package that builds it.
    pub fn package(self) -> &'static str {
        match self {
            Binary::Supervisor => "pimesh-supervisor",
            Binary::Proxy => "pimesh-proxy",
            Binary::Control => "pimesh-control",
            Binary::Central => "pimesh-central",
            Binary::Ctl => "pimesh-ctl",
            Binary::K3sFixture => "k3s-fixture",
            Binary::Demo => "pimesh-demo",
        }
    }

    /// The binary's path (see the module documentation for where it comes from).
    ///
    /// # Panics
    /// When it has to be built and the build fails; the message names the command.
    pub fn path(self) -> PathBuf {
        if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{}", self.name())) {
            return PathBuf::from(path);
        }
        static FOUND: OnceLock<Mutex<Vec<(Binary, PathBuf)>>> = OnceLock::new();
        // Held while looking: a second test asking for the same binary waits for the first.
        let mut found = FOUND
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, path)) = found.iter().find(|(binary, _)| *binary == self) {
            return path.clone();
        }
        let running = RunningCargo::of_this_process();
        let path = match running.as_ref().and_then(|cargo| self.in_build_of(cargo)) {
            Some(path) => path,
            None => self
                .build(running.as_ref())
                .unwrap_or_else(|err| panic!("{err}")),
        };
        found.push((self, path.clone()));
        path
    }

    /// A [`Command`] for the binary.
    pub fn command(self) -> Command {
        Command::new(self.path())
    }

    /// Runs the binary with `args` to the end: its exit status and output.
    ///
    /// # Panics
    /// When it cannot be started.
    pub fn output(self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("cannot run {}: {err}", self.name()))
    }

    /// The binary as built by `running` (a `cargo test` or `cargo bench`), when that
    /// command builds it.
    fn in_build_of(self, running: &RunningCargo) -> Option<PathBuf> {
        if !matches!(running.args.first()?.as_str(), "test" | "t" | "bench") {
            return None;
        }
        let output = running
            .command()
            .args(running.args.iter().take_while(|arg| *arg != "--"))
            .args(["--no-run", "--message-format=json"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        self.executable_in(&output.stdout)
    }

    /// `cargo build -p <package> --bin <name>` in the target folder and profile of the
    /// running executable; the path cargo reports for the binary.
    fn build(self, running: Option<&RunningCargo>) -> Result<PathBuf, String> {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or("test-support has no parent folder")?
            .join("Cargo.toml");
        let mut command = running.map_or_else(|| Command::new(cargo()), RunningCargo::command);
        command
            .args([
                "build",
                "--quiet",
                "--message-format=json-render-diagnostics",
            ])
            .arg("--manifest-path")
            .arg(&workspace)
            .args(["--package", self.package(), "--bin", self.name()])
            .stderr(Stdio::inherit());
        if let Some(layout) = std::env::current_exe()
            .ok()
            .and_then(|exe| TargetLayout::of(&exe))
        {
            command.arg("--target-dir").arg(&layout.target_dir);
            match layout.profile.as_str() {
                "debug" => {}
                "release" => {
                    command.arg("--release");
                }
                other => {
                    command.args(["--profile", other]);
                }
            }
        }
        let shown = format!("{command:?}");
        let output = command
            .output()
            .map_err(|err| format!("cannot run {shown}: {err}"))?;
        if !output.status.success() {
            return Err(format!(
                "{shown} failed ({}): {} is needed by this test",
                output.status,
                self.name()
            ));
        }
        self.executable_in(&output.stdout)
            .ok_or_else(|| format!("{shown} reported no executable for {}", self.name()))
    }

    /// The path of this binary (not its unit tests) among cargo's JSON messages.
    fn executable_in(self, messages: &[u8]) -> Option<PathBuf> {
        String::from_utf8_lossy(messages)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|message| {
                message["reason"] == "compiler-artifact"
                    && message["target"]["name"] == self.name()
                    && message["target"]["kind"] == serde_json::json!(["bin"])
                    && message["profile"]["test"] == false
            })
            .find_map(|message| message["executable"].as_str().map(PathBuf::from))
    }
}

/// The cargo command that started this process (its parent), as it was started.
struct RunningCargo {
    /// Its arguments after the program, the subcommand first.
    args: Vec<String>,
    cwd: PathBuf,
    env: Vec<(OsString, OsString)>,
}

impl RunningCargo {
    /// `None` when the parent process is not cargo.
    fn of_this_process() -> Option<RunningCargo> {
        use std::os::unix::ffi::OsStringExt as _;
        let proc = PathBuf::from(format!("/proc/{}", std::os::unix::process::parent_id()));
        let cmdline = std::fs::read(proc.join("cmdline")).ok()?;
        let mut argv: Vec<String> = cmdline
            .split(|byte| *byte == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        if argv.last().is_some_and(String::is_empty) {
            argv.pop();
        }
        let (program, args) = argv.split_first()?;
        if Path::new(program).file_name()? != "cargo" {
            return None;
        }
        let env = std::fs::read(proc.join("environ"))
            .ok()?
            .split(|byte| *byte == 0)
            .filter_map(|entry| {
                let at = entry.iter().position(|byte| *byte == b'=')?;
                Some((
                    OsString::from_vec(entry[..at].to_vec()),
                    OsString::from_vec(entry[at + 1..].to_vec()),
                ))
            })
            .collect();
        Some(RunningCargo {
            args: args.to_vec(),
            cwd: std::fs::read_link(proc.join("cwd")).ok()?,
            env,
        })
    }

    /// A cargo command in the folder and environment of the running one.
    fn command(&self) -> Command {
        let mut command = Command::new(cargo());
        command
            .current_dir(&self.cwd)
            .env_clear()
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null());
        command
    }
}

/// The cargo that runs the test (`CARGO`), or the one on the path.
fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Where cargo put the running executable: `<target>/<profile>/deps/<exe>` (tests,
/// benchmarks) or `<target>/<profile>/examples/<exe>`. The target folder is the one
/// holding cargo's `CACHEDIR.TAG`.
struct TargetLayout {
    target_dir: PathBuf,
    profile: String,
}

impl TargetLayout {
    fn of(exe: &Path) -> Option<TargetLayout> {
        let profile_dir = exe.parent()?.parent()?;
        let target_dir = profile_dir.parent()?;
        if !target_dir.join("CACHEDIR.TAG").is_file() {
            return None;
        }
        Some(TargetLayout {
            target_dir: target_dir.to_path_buf(),
            profile: profile_dir.file_name()?.to_str()?.to_owned(),
        })
    }
}

/// A command's output as text, for assertions and failure messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
