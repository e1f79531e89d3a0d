//! A real PostgreSQL server from Debian's packages (`postgresql`), in a temporary folder
//! of its own, reachable only over a Unix socket in that folder (no TCP listener at all),
//! stopped when dropped. Run as the `postgres` user when the test runs as root, as the
//! server refuses root.

use std::os::unix::fs::{chown, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;

use crate::daemon::Daemon;
use crate::wait::wait_until_blocking;

/// The port in the socket's name (`.s.PGSQL.<port>`); nothing listens on TCP.
const PORT: u16 = 5432;

pub struct Postgres {
    server: Option<Daemon>,
    /// Holds `data` and the socket; removed when dropped.
    dir: tempfile::TempDir,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
}

/// The newest `/usr/lib/postgresql/<version>/bin`.
fn server_binaries() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "PostgreSQL's server is not installed under {}: `make test` installs Debian's \
             postgresql package (tests/install-test-deps.sh)",
            root.display()
        )
    })
}

/// The uid and gid of the `postgres` user, when this process runs as root.
fn owner() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .expect("reading the user database")
        .expect("the postgres user (made by Debian's postgresql-common package)");
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

impl Postgres {
    /// Makes a database cluster and starts its server; returns once it takes connections.
    ///
    /// # Panics
    /// When PostgreSQL is missing, or `initdb` or the server fails (with its log).
    pub fn start() -> Postgres {
        let bin = server_binaries();
        let owner = owner();
        let dir = tempfile::Builder::new()
            .prefix("pimesh-pg-")
            .tempdir()
            .expect("a folder for PostgreSQL");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        if let Some((uid, gid)) = owner {
            chown(dir.path(), Some(uid), Some(gid)).expect("chown the PostgreSQL folder");
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("--pgdata")
            .arg(dir.path().join("data"))
            .args([
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .env("LC_ALL", "C.UTF-8");
        if let Some((uid, gid)) = owner {
            std::os::unix::process::CommandExt::uid(&mut initdb, uid);
            std::os::unix::process::CommandExt::gid(&mut initdb, gid);
        }
        let output = initdb.output().expect("running initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let mut postgres = Postgres {
            server: None,
            dir,
            bin,
            owner,
        };
        postgres.start_server();
        postgres
    }

    fn start_server(&mut self) {
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-k")
            .arg(self.dir.path())
            .args(["-p", &PORT.to_string()])
            .args(["-c", "listen_addresses="])
            .args(["-c", "fsync=off"])
            .args(["-c", "max_connections=100"])
            .env("LC_ALL", "C.UTF-8");
        if let Some((uid, gid)) = self.owner {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, gid);
        }
        let log = self.dir.path().join("postgres.log");
        let mut server = Daemon::spawn("postgres", command, Some(&log));
        let connect = self.connect_string();
        server.wait_until_blocking("PostgreSQL takes connections", || {
            postgres::Client::connect(&connect, postgres::NoTls).is_ok()
        });
        self.server = Some(server);
    }

    /// The libpq connection string of the server's `postgres` database.
    pub fn connect_string(&self) -> String {
        format!(
            "host={} port={PORT} user=postgres dbname=postgres",
            self.dir.path().display()
        )
    }

    /// A client of the server's `postgres` database.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.connect_string(), postgres::NoTls)
            .expect("a PostgreSQL connection")
    }

    /// Stops the server (a fast shutdown: clients are disconnected).
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.signal(Signal::SIGINT);
            server.wait_exit();
        }
    }

    /// Starts the stopped server again on the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.start_server();
        let connect = self.connect_string();
        wait_until_blocking("PostgreSQL is back", || {
            postgres::Client::connect(&connect, postgres::NoTls).is_ok()
        });
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
