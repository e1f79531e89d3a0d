//! A real PostgreSQL server from Debian's packages (`postgresql`), in a temporary folder
//! of its own, reachable over a Unix socket in that folder and, when started with
//! [`Postgres::start_with_tls`], over TLS only on a TCP port of 127.0.0.1 (plaintext on
//! TCP refused); stopped when dropped. Run as the `postgres` user when the test runs as
//! root, as the server refuses root.

use std::os::unix::fs::{chown, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::Signal;

use crate::daemon::Daemon;
use crate::wait::wait_until_blocking;

/// The port in the socket's name (`.s.PGSQL.<port>`) of a server without TCP.
const PORT: u16 = 5432;

/// A server's TLS on TCP: the CA that signed its certificate (for `127.0.0.1` and
/// `localhost`), and its port on 127.0.0.1.
pub struct ServerTls {
    pub ca_pem: String,
    pub port: u16,
}

pub struct Postgres {
    server: Option<Daemon>,
    tls: Option<ServerTls>,
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
        Postgres::make(false)
    }

    /// [`Postgres::start`], and TLS (only) on a TCP port of 127.0.0.1 with a certificate
    /// of a CA of its own ([`Postgres::tls`]).
    ///
    /// # Panics
    /// As [`Postgres::start`].
    pub fn start_with_tls() -> Postgres {
        Postgres::make(true)
    }

    fn make(tls: bool) -> Postgres {
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
        let tls = tls.then(|| {
            let data = dir.path().join("data");
            let ca_pem = write_server_certificate(&data, owner);
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\n\
                 hostssl all all 127.0.0.1/32 trust\n\
                 hostnossl all all 127.0.0.1/32 reject\n",
            )
            .expect("pg_hba.conf");
            ServerTls {
                ca_pem,
                port: crate::free_port(),
            }
        });
        let mut postgres = Postgres {
            server: None,
            tls,
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
            .args(["-p", &self.port().to_string()]);
        match &self.tls {
            Some(_) => command.args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "ssl=on",
                "-c",
                "ssl_cert_file=server.crt",
                "-c",
                "ssl_key_file=server.key",
            ]),
            None => command.args(["-c", "listen_addresses="]),
        };
        command
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

    fn port(&self) -> u16 {
        self.tls.as_ref().map_or(PORT, |tls| tls.port)
    }

    /// The libpq connection string of the server's `postgres` database, over its Unix
    /// socket.
    pub fn connect_string(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.path().display(),
            self.port()
        )
    }

    /// The server's TLS on TCP, when it was started with it.
    pub fn tls(&self) -> Option<&ServerTls> {
        self.tls.as_ref()
    }

    /// The libpq connection string of the server's `postgres` database over TCP (the
    /// server takes TLS only there).
    ///
    /// # Panics
    /// When the server was started without TLS.
    pub fn tcp_connect_string(&self) -> String {
        let tls = self.tls.as_ref().expect("a server started with TLS");
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            tls.port
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

/// A CA and a server certificate it signed (for `127.0.0.1` and `localhost`), written as
/// `server.crt` and `server.key` (0600, the server's own) in `data`; returns the CA's PEM.
fn write_server_certificate(data: &Path, owner: Option<(u32, u32)>) -> String {
    let ca_key = rcgen::KeyPair::generate().expect("a CA key");
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test database CA");
    let ca_cert = ca.self_signed(&ca_key).expect("the CA");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("a server key");
    let mut server =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("server parameters");
    server.subject_alt_names.push(rcgen::SanType::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    ));
    let cert = server
        .signed_by(&key, &issuer)
        .expect("the server certificate");
    for (name, text, mode) in [
        ("server.crt", cert.pem(), 0o644),
        ("server.key", key.serialize_pem(), 0o600),
    ] {
        let path = data.join(name);
        std::fs::write(&path, text).expect("a server certificate file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        if let Some((uid, gid)) = owner {
            chown(&path, Some(uid), Some(gid)).expect("chown");
        }
    }
    ca_cert.pem()
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
