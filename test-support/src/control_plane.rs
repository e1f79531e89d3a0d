//! A site's control plane on 127.0.0.1: a temporary folder holding the site's trust
//! folder and site config, replicas reading them, and the arguments that point a proxy at
//! those replicas. Changing either input as the supervisor does (atomic renames, then
//! SIGHUP) is one call each.

use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use pimesh_identity::Authority;

use crate::control::{Replica, ReplicaOptions};
use crate::files::replace;
use crate::pki::Site;

/// The control plane of `site`; its replicas are killed when it is dropped.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub site: Site,
    /// The trust folder the replicas read (`anchor.pem`, `issuer.pem`, `issuer.key`).
    pub trust: PathBuf,
    /// The site config the replicas read.
    pub config: PathBuf,
    pub replicas: Vec<Replica>,
}

impl ControlPlane {
    /// Writes the trust folder of `site` and `config` as the site config; starts no
    /// replica yet.
    ///
    /// # Panics
    /// When the files cannot be written.
    pub fn new(site: Site, config: &str) -> ControlPlane {
        let dir = tempfile::tempdir().expect("temp dir");
        let trust = dir.path().join("trust");
        let config_path = dir.path().join("cluster.toml");
        let plane = ControlPlane {
            trust,
            config: config_path,
            site,
            dir,
            replicas: Vec::new(),
        };
        plane.rotate_trust(&[&plane.site.root.anchor], &plane.site.root.issuer);
        replace(&plane.config, config);
        plane
    }

    /// The temporary folder: logs, identity and state folders of the test go here too.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Replica `number` reading this control plane's inputs, logging to
    /// `replica-<number>.log` in [`ControlPlane::path`].
    pub fn replica(&self, number: u16) -> ReplicaOptions {
        Replica::options(number)
            .trust_dir(&self.trust)
            .config(&self.config)
            .log(&self.path().join(format!("replica-{number}.log")))
    }

    /// Starts replicas 1 to `count`, each made by `options` from [`ControlPlane::replica`],
    /// and waits until each is ready.
    pub async fn start_replicas(
        &mut self,
        count: u16,
        options: impl Fn(ReplicaOptions) -> ReplicaOptions,
    ) {
        for number in 1..=count {
            let replica = options(self.replica(number)).start().await;
            self.replicas.push(replica);
        }
    }

    /// The replicas' addresses as a proxy's `--control` takes them.
    pub fn control_list(&self) -> String {
        self.replicas
            .iter()
            .map(|replica| replica.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `--control <replicas> --state-dir <dir>/<state>-state`: the arguments of a proxy
    /// that enrolls with and watches these replicas.
    pub fn proxy_args(&self, state: &str) -> Vec<String> {
        vec![
            "--control".to_owned(),
            self.control_list(),
            "--state-dir".to_owned(),
            self.path()
                .join(format!("{state}-state"))
                .to_string_lossy()
                .into_owned(),
        ]
    }

    /// Replaces the trust folder as the supervisor does (each file by an atomic rename):
    /// `anchors` as the bundle, `issuer` as the signing issuer.
    pub fn rotate_trust(&self, anchors: &[&Authority], issuer: &Authority) {
        let bundle: String = anchors.iter().map(|anchor| anchor.cert_pem()).collect();
        std::fs::create_dir_all(&self.trust).expect("trust dir");
        replace(&self.trust.join("issuer.key"), &issuer.key_pem());
        replace(&self.trust.join("issuer.pem"), issuer.cert_pem());
        replace(&self.trust.join("anchor.pem"), &bundle);
    }

    /// Replaces the site config (atomic rename); the replicas notice on SIGHUP or by
    /// polling.
    pub fn write_config(&self, text: &str) {
        replace(&self.config, text);
    }

    /// SIGHUP to every replica: reload trust folder and site config now.
    pub fn hangup_replicas(&self) {
        for replica in &self.replicas {
            replica.signal(Signal::SIGHUP);
        }
    }
}
