//! The workspace's binaries, for tests and benchmarks that run them as processes.
//!
//! A test whose own package builds the binary finds it through `CARGO_BIN_EXE_<name>`,
//! which cargo sets when it builds and runs integration tests and benchmarks. Any other
//! binary is built on demand, once per process, by the cargo that runs the test, in the
//! test's own target folder and profile: so `cargo test -p pimesh-proxy` on a clean tree
//! builds the `pimesh-control` its control-plane tests run, and a binary found this way
//! is never one left behind by an older build.

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
        }
    }

    /// The binary's path: `CARGO_BIN_EXE_<name>` when set, else built now (once per
    /// process).
    ///
    /// # Panics
    /// When the build fails; the message names the command.
    pub fn path(self) -> PathBuf {
        if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{}", self.name())) {
            return PathBuf::from(path);
        }
        static BUILT: OnceLock<Mutex<Vec<(Binary, PathBuf)>>> = OnceLock::new();
        // Held through the build: a second test asking for the same binary waits for it.
        let mut built = BUILT
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, path)) = built.iter().find(|(binary, _)| *binary == self) {
            return path.clone();
        }
        let path = self.build().unwrap_or_else(|err| panic!("{err}"));
        built.push((self, path.clone()));
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

    /// `cargo build -p <package> --bin <name>` with the profile and target folder of the
    /// running executable; the path cargo reports for the binary.
    fn build(self) -> Result<PathBuf, String> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or("test-support has no parent folder")?
            .join("Cargo.toml");
        let mut command = Command::new(cargo);
        command
            .args([
                "build",
                "--quiet",
                "--message-format=json-render-diagnostics",
            ])
            .arg("--manifest-path")
            .arg(&workspace)
            .args(["--package", self.package(), "--bin", self.name()])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        let layout = std::env::current_exe()
            .ok()
            .and_then(|exe| TargetLayout::of(&exe));
        if let Some(layout) = &layout {
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
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|message| {
                message["reason"] == "compiler-artifact" && message["target"]["name"] == self.name()
            })
            .find_map(|message| message["executable"].as_str().map(PathBuf::from))
            .ok_or_else(|| format!("{shown} reported no executable for {}", self.name()))
    }
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
