//! `pimesh-central` as a process, with a self-signed server certificate for `localhost`,
//! and the Ed25519 key an operator signs a site's revisions with.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use pimesh_revision::{Mode, Revision};
use pimesh_schema::DnsLabel;
use ring::signature::KeyPair as _;

use crate::binary::Binary;
use crate::daemon::Daemon;
use crate::ports::free_addr;

/// A site's revision signing key, as `pimeshctl site init` makes one.
pub struct SigningKey {
    /// The Ed25519 key pair, PKCS#8.
    pub pkcs8: Vec<u8>,
    /// `ed25519:<base64 public key>`, as the central server's and the seed's config read it.
    pub public_key: String,
}

impl SigningKey {
    /// # Panics
    /// When no key can be made.
    pub fn generate() -> SigningKey {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .expect("an Ed25519 key")
            .as_ref()
            .to_vec();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8).expect("a key pair");
        let public_key = format!(
            "ed25519:{}",
            base64::engine::general_purpose::STANDARD.encode(pair.public_key().as_ref())
        );
        SigningKey { pkcs8, public_key }
    }

    /// Revision `number` of `site` with `config`, applied (not tried), signed: the JSON
    /// document an operator publishes.
    ///
    /// # Panics
    /// When signing fails.
    pub fn revision(&self, site: &DnsLabel, number: u64, config: &str) -> Vec<u8> {
        Revision {
            site: site.clone(),
            revision: number,
            mode: Mode::Apply,
            config: config.to_owned(),
        }
        .sign(&self.pkcs8)
        .expect("a signed revision")
        .to_json()
    }
}

/// A site as the central server's config names it.
pub struct CentralSite<'a> {
    pub name: &'a str,
    /// The site's anchor certificate (PEM file): node certificates must chain to it.
    pub anchor: &'a Path,
    /// The site's revision key, `ed25519:<base64>`.
    pub public_key: &'a str,
}

/// A `pimesh-central` process on a free port of 127.0.0.1, killed when dropped.
pub struct Central {
    pub daemon: Daemon,
    pub addr: SocketAddr,
    /// Its config file.
    pub config: PathBuf,
    /// Its self-signed server certificate for `localhost` (PEM), and that file.
    pub server_pem: Vec<u8>,
    pub server_cert: PathBuf,
}

impl Central {
    /// Writes a server certificate and key and `central.toml` (state in `dir/state`,
    /// `settings` as more top-level lines, then `sites`) into `dir`, starts the server and
    /// waits until it accepts connections.
    ///
    /// # Panics
    /// When the files cannot be written or the server does not come up.
    pub fn start(dir: &Path, settings: &str, sites: &[CentralSite<'_>]) -> Central {
        let server = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a server certificate");
        let server_cert = dir.join("server.pem");
        let server_key = dir.join("server.key");
        std::fs::write(&server_cert, server.cert.pem()).expect("server.pem");
        std::fs::write(&server_key, server.signing_key.serialize_pem()).expect("server.key");
        let addr = free_addr();
        let mut config = format!(
            "listen = \"{addr}\"\nstate_dir = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{settings}",
            dir.join("state").display(),
            server_cert.display(),
            server_key.display()
        );
        for site in sites {
            config.push_str(&format!(
                "[[sites]]\nname = \"{}\"\nanchor = \"{}\"\npublic_key = \"{}\"\n",
                site.name,
                site.anchor.display(),
                site.public_key
            ));
        }
        let config_path = dir.join("central.toml");
        std::fs::write(&config_path, config).expect("central.toml");
        let mut central = Central {
            daemon: spawn(&config_path),
            addr,
            config: config_path,
            server_pem: server.cert.pem().into_bytes(),
            server_cert,
        };
        central.wait_listening();
        central
    }

    fn wait_listening(&mut self) {
        let addr = self.addr;
        self.daemon
            .wait_until_blocking("listening", || TcpStream::connect(addr).is_ok());
    }

    /// `kill -9`, then the same server started again on the same port and state.
    pub fn kill_and_restart(&mut self) {
        self.daemon.kill();
        self.daemon = spawn(&self.config);
        self.wait_listening();
    }

    /// `https://localhost:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }
}

fn spawn(config: &Path) -> Daemon {
    let mut command = Daemon::command(Binary::Central, "info");
    command.arg("--config").arg(config);
    let log = config.with_file_name("central.log");
    Daemon::spawn("pimesh-central", command, Some(&log))
}
