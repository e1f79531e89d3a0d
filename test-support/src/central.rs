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

/// A site as a central server's tests use it: its trust root (node identities), its anchor
/// in a file the server reads, and the operator's signing key.
pub struct OperatedSite {
    pub site: crate::Site,
    pub key: SigningKey,
    pub anchor: PathBuf,
}

impl OperatedSite {
    /// A new site `name`, its anchor written into `dir`.
    ///
    /// # Panics
    /// When the anchor cannot be written.
    pub fn new(dir: &Path, name: &str) -> OperatedSite {
        let site = crate::Site::new(name);
        let anchor = dir.join(format!("{name}-anchor.pem"));
        std::fs::write(&anchor, site.root.anchor.cert_pem()).expect("the site's anchor");
        OperatedSite {
            site,
            key: SigningKey::generate(),
            anchor,
        }
    }

    pub fn name(&self) -> &DnsLabel {
        &self.site.name
    }

    /// The site as the central server's config names it.
    pub fn central_site(&self) -> CentralSite<'_> {
        CentralSite {
            name: self.site.name.as_str(),
            anchor: &self.anchor,
            public_key: &self.key.public_key,
        }
    }

    /// Revision `number` with `config`, signed (see [`SigningKey::revision`]).
    pub fn revision(&self, number: u64, config: &str) -> Vec<u8> {
        self.key.revision(&self.site.name, number, config)
    }

    /// The `Authorization` header of an operator request `method path` signed now with
    /// `key` (the site's own, or another to be refused).
    ///
    /// # Panics
    /// When signing fails.
    pub fn authorization_with(&self, key: &SigningKey, method: &str, path: &str) -> String {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        pimesh_revision::operator::authorization(
            &key.pkcs8,
            &self.site.name,
            method,
            path,
            at_ms,
            b"",
        )
        .expect("a signed operator request")
    }

    /// [`OperatedSite::authorization_with`] the site's own key.
    pub fn authorization(&self, method: &str, path: &str) -> String {
        self.authorization_with(&self.key, method, path)
    }
}

/// A site folder (as `pimeshctl site init` makes one) as far as operator commands read
/// it: `site-name` and `signing.pk8` of `key`, in `dir/<site>-folder`.
///
/// # Panics
/// When the files cannot be written.
pub fn site_folder(dir: &Path, site: &str, key: &SigningKey) -> PathBuf {
    let folder = dir.join(format!("{site}-folder"));
    std::fs::create_dir_all(&folder).expect("the site folder");
    std::fs::write(folder.join("site-name"), format!("{site}\n")).expect("site-name");
    std::fs::write(folder.join("signing.pk8"), &key.pkcs8).expect("signing.pk8");
    folder
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

    /// A client of this server (which it reaches as `localhost`, trusting its certificate),
    /// presenting `identity` (PEM chain and key) when given; requests time out after 60 s.
    ///
    /// # Panics
    /// When the client cannot be built.
    pub fn client(&self, identity: Option<&[u8]>) -> reqwest::blocking::Client {
        let root = reqwest::Certificate::from_pem(&self.server_pem).expect("the server's cert");
        let mut builder = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .resolve("localhost", self.addr)
            .add_root_certificate(root)
            .timeout(std::time::Duration::from_secs(60));
        if let Some(pem) = identity {
            builder = builder.identity(reqwest::Identity::from_pem(pem).expect("an identity"));
        }
        builder.build().expect("a client")
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
