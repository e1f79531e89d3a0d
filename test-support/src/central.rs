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
        let state = format!("state_dir = \"{}\"\n", dir.join("state").display());
        Central::start_with(dir, &state, settings, sites)
    }

    /// [`Central::start`] as a replica on the PostgreSQL database of `connect` (a libpq
    /// connection string), with no state folder.
    ///
    /// # Panics
    /// When the files cannot be written or the server does not come up.
    pub fn start_on_postgres(
        dir: &Path,
        connect: &str,
        settings: &str,
        sites: &[CentralSite<'_>],
    ) -> Central {
        let storage = format!("{settings}[postgres]\nconnect = \"{connect}\"\n");
        Central::start_with(dir, "", &storage, sites)
    }

    /// [`Central::start_on_postgres`] over TLS: the database server's certificate must
    /// chain to the CA in the file `ca`.
    ///
    /// # Panics
    /// When the files cannot be written or the server does not come up.
    pub fn start_on_postgres_over_tls(
        dir: &Path,
        connect: &str,
        ca: &Path,
        settings: &str,
        sites: &[CentralSite<'_>],
    ) -> Central {
        let storage = format!(
            "{settings}[postgres]\nconnect = \"{connect}\"\nca = \"{}\"\n",
            ca.display()
        );
        Central::start_with(dir, "", &storage, sites)
    }

    /// Starts a server whose config holds `storage` lines, then `settings` (which may end
    /// with tables), then `sites`.
    fn start_with(dir: &Path, storage: &str, settings: &str, sites: &[CentralSite<'_>]) -> Central {
        let server = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a server certificate");
        let server_cert = dir.join("server.pem");
        let server_key = dir.join("server.key");
        std::fs::write(&server_cert, server.cert.pem()).expect("server.pem");
        std::fs::write(&server_key, server.signing_key.serialize_pem()).expect("server.key");
        let addr = free_addr();
        let mut config = format!(
            "listen = \"{addr}\"\n{storage}tls_cert = \"{}\"\ntls_key = \"{}\"\n{settings}",
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

/// One replica of the central server as a node reaches it.
struct NodeEndpoint {
    http: reqwest::blocking::Client,
    config: String,
    reports: String,
}

/// A node of a site speaking the protocol of the supervisor's OTA client (long-polls
/// with its node certificate, reports), to one central server or to several replicas:
/// it stays with the replica that answers and moves to the next one when a request gets
/// no answer, as the supervisor does with the seed's list of central URLs.
pub struct FleetNode {
    pub name: String,
    replicas: Vec<NodeEndpoint>,
    current: std::sync::atomic::AtomicUsize,
}

impl FleetNode {
    /// Node `name` of `site`, at `central`.
    pub fn new(central: &Central, site: &OperatedSite, name: &str) -> FleetNode {
        FleetNode::of_replicas(&[central], site, name)
    }

    /// Node `name` of `site`, trying `replicas` in turn, the first one first.
    pub fn of_replicas(replicas: &[&Central], site: &OperatedSite, name: &str) -> FleetNode {
        let identity = site.site.node_identity_pem(name);
        FleetNode {
            name: name.to_owned(),
            replicas: replicas
                .iter()
                .map(|central| NodeEndpoint {
                    http: central.client(Some(&identity)),
                    config: central.url(&pimesh_revision::path::config(site.name())),
                    reports: central.url(&pimesh_revision::path::reports(site.name())),
                })
                .collect(),
            current: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The index of the replica the node talks to now.
    pub fn replica(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The node's HTTPS client for the replica it talks to now.
    pub fn http(&self) -> &reqwest::blocking::Client {
        &self.replicas[self.replica()].http
    }

    /// `send` to the replica of the moment, then to the next ones while none answers.
    fn exchange(
        &self,
        what: &str,
        send: impl Fn(&NodeEndpoint) -> reqwest::Result<reqwest::blocking::Response>,
    ) -> reqwest::blocking::Response {
        let count = self.replicas.len();
        let mut errors = Vec::new();
        for step in 0..count {
            let index = (self.replica() + step) % count;
            match send(&self.replicas[index]) {
                Ok(response) => {
                    self.current
                        .store(index, std::sync::atomic::Ordering::SeqCst);
                    return response;
                }
                Err(err) => errors.push(format!("replica {index}: {err}")),
            }
        }
        panic!("{}: {what}: no replica answered: {errors:?}", self.name)
    }

    /// The revision offered after `after` within `wait` seconds, if any.
    pub fn poll(&self, after: u64, wait: u64) -> Option<u64> {
        let response = self.exchange("long-poll", |replica| {
            replica
                .http
                .get(format!("{}?after={after}&wait={wait}", replica.config))
                .send()
        });
        match response.status().as_u16() {
            204 => None,
            200 => {
                let body: serde_json::Value =
                    serde_json::from_slice(&response.bytes().expect("the revision"))
                        .expect("a revision");
                Some(body["revision"].as_u64().expect("a revision number"))
            }
            other => panic!("{}: long-poll answered {other}", self.name),
        }
    }

    /// A report about revision `about` (`revision` when applied, the next one else), the
    /// node running `revision` after it.
    pub fn report(&self, revision: u64, state: &str, detail: &str) {
        let about = if state == "applied" {
            revision
        } else {
            revision + 1
        };
        let body = serde_json::json!({
            "revision": revision, "state": state, "detail": detail, "about": about,
        })
        .to_string();
        let response = self.exchange("report", |replica| {
            replica
                .http
                .post(&replica.reports)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
        });
        assert_eq!(response.status(), 200, "{} report", self.name);
    }
}

/// A site's operator at one central server: publishes revisions and signs its requests
/// with `key` (the site's own, or another to play an intruder).
pub struct SiteOperator<'a> {
    pub http: reqwest::blocking::Client,
    pub central: &'a Central,
    pub site: &'a OperatedSite,
    pub key: &'a SigningKey,
}

impl<'a> SiteOperator<'a> {
    /// The site's own operator at `central`.
    pub fn new(central: &'a Central, site: &'a OperatedSite) -> SiteOperator<'a> {
        SiteOperator {
            http: central.client(None),
            central,
            site,
            key: &site.key,
        }
    }

    /// Publishes revision `number` of `config`: the status and the server's answer.
    pub fn try_publish(&self, number: u64, config: &str) -> (u16, String) {
        let response = self
            .http
            .put(
                self.central
                    .url(&pimesh_revision::path::revisions(self.site.name())),
            )
            .body(self.key.revision(self.site.name(), number, config))
            .send()
            .expect("publish");
        (
            response.status().as_u16(),
            response.text().unwrap_or_default(),
        )
    }

    /// Publishes revision `number` of `config`, which must be stored.
    pub fn publish(&self, number: u64, config: &str) {
        let (status, body) = self.try_publish(number, config);
        assert_eq!(status, 201, "publish {number}: {body}");
    }

    /// The `authorization` header of `method path`, signed with the operator's key.
    pub fn signed(&self, method: &str, path: &str) -> String {
        self.site.authorization_with(self.key, method, path)
    }

    /// The site's rollouts, newest first.
    pub fn rollouts(&self) -> Vec<pimesh_revision::Rollout> {
        let path = pimesh_revision::path::rollouts(self.site.name());
        let response = self
            .http
            .get(self.central.url(&path))
            .header("authorization", self.signed("GET", &path))
            .send()
            .expect("rollouts");
        assert_eq!(response.status(), 200);
        serde_json::from_slice(&response.bytes().expect("rollouts")).expect("rollouts")
    }

    /// The rollout of `revision`.
    pub fn rollout(&self, revision: u64) -> pimesh_revision::Rollout {
        self.rollouts()
            .into_iter()
            .find(|rollout| rollout.revision == revision)
            .unwrap_or_else(|| panic!("no rollout of revision {revision}"))
    }

    /// Sends `command` about the rollout of `revision`: the status and the answer.
    pub fn command(
        &self,
        revision: u64,
        command: pimesh_revision::rollout::Command,
    ) -> (u16, String) {
        let path = pimesh_revision::path::rollout_command(self.site.name(), revision, command);
        let response = self
            .http
            .post(self.central.url(&path))
            .header("authorization", self.signed("POST", &path))
            .send()
            .expect("command");
        (
            response.status().as_u16(),
            response.text().unwrap_or_default(),
        )
    }

    /// Waits (generously) until the rollout of `revision` satisfies `done`.
    pub fn wait_for(
        &self,
        revision: u64,
        what: &str,
        done: impl Fn(&pimesh_revision::Rollout) -> bool,
    ) -> pimesh_revision::Rollout {
        let deadline = std::time::Instant::now() + 2 * crate::wait::DEADLINE;
        loop {
            let rollout = self.rollout(revision);
            if done(&rollout) {
                return rollout;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: {rollout:#?}");
            std::thread::sleep(crate::wait::POLL);
        }
    }
}
