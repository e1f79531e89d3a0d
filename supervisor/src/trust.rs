//! The site's trust root on the node: `/var/lib/pimesh/trust/` holds the anchor
//! certificate (`anchor.pem`), the issuer that signs the site's leaves (`issuer.pem`,
//! `issuer.key`) and, until the operator exports it, the anchor's key (`anchor.key`).
//!
//! Only a node with role `init` provisions it, once: it imports the anchor and issuer that
//! the operator put on the boot partition (`pimesh-trust/`, written by `pimeshctl image
//! configure --trust`) — bring your own anchor, the same one the central server knows — or,
//! when there is none, generates a new root for the site. A join token in the seed pins the
//! anchor: a root whose anchor does not hash to the pinned value is refused.
//!
//! Invariant: the folder appears whole or not at all. It is assembled in `trust.new/`
//! (files fsynced, keys 0600) and renamed into place; a cut before the rename leaves no
//! trust folder and the next start begins again.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use pimesh_identity::{anchor_sha256, anchor_sha256_hex, Authority, TrustRoot};
use pimesh_schema::{Role, Seed};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tracing::{info, warn};

/// What `GET /status` shows about the trust root.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrustReport {
    pub present: bool,
    /// `generated`, `imported` (this start), or `existing`.
    pub source: Option<&'static str>,
    /// Hex SHA-256 of the anchor certificate (DER): what join tokens pin.
    pub anchor_sha256: Option<String>,
    /// Whether the anchor's private key is still on this node.
    pub anchor_key_on_node: bool,
    pub error: Option<String>,
}

pub struct TrustFiles {
    pub dir: PathBuf,
}

const CERT_MODE: u32 = 0o644;
const KEY_MODE: u32 = 0o600;

impl TrustFiles {
    pub fn new(state_dir: &Path) -> TrustFiles {
        TrustFiles {
            dir: state_dir.join("trust"),
        }
    }

    pub fn anchor_key(&self) -> PathBuf {
        self.dir.join("anchor.key")
    }

    /// The issuer, when the node holds one.
    pub fn issuer(&self) -> Result<Option<Authority>, String> {
        let cert = self.dir.join("issuer.pem");
        let key = self.dir.join("issuer.key");
        if !cert.exists() || !key.exists() {
            return Ok(None);
        }
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map_err(|err| format!("cannot read {}: {err}", path.display()))
        };
        Authority::from_pem(&read(&cert)?, &read(&key)?)
            .map(Some)
            .map_err(|err| format!("{}: {err}", cert.display()))
    }

    fn report(&self, source: &'static str) -> TrustReport {
        let anchor = std::fs::read(self.dir.join("anchor.pem"))
            .ok()
            .and_then(|pem| CertificateDer::from_pem_slice(&pem).ok());
        TrustReport {
            present: anchor.is_some(),
            source: Some(source),
            anchor_sha256: anchor.map(|der| anchor_sha256_hex(&der)),
            anchor_key_on_node: self.anchor_key().exists(),
            error: None,
        }
    }

    /// Provisions the trust root from the seed (see the module doc). Never fails: what
    /// went wrong is in the report.
    pub fn provision(&self, seed: Option<&Seed>, boot_dir: &Path) -> TrustReport {
        if self.dir.join("issuer.key").exists() && self.dir.join("anchor.pem").exists() {
            return self.report("existing");
        }
        let Some(seed) = seed.filter(|seed| seed.role == Role::Init) else {
            return TrustReport::default();
        };
        let import = boot_dir.join("pimesh-trust");
        let result = if import.join("issuer.key").exists() {
            self.import(seed, &import).map(|()| "imported")
        } else {
            self.generate(seed).map(|()| "generated")
        };
        match result {
            Ok(source) => {
                let report = self.report(source);
                info!(source, anchor = ?report.anchor_sha256, dir = %self.dir.display(), "site trust root provisioned");
                report
            }
            Err(err) => {
                warn!(%err, "cannot provision the site trust root");
                TrustReport {
                    error: Some(err),
                    ..TrustReport::default()
                }
            }
        }
    }

    fn generate(&self, seed: &Seed) -> Result<(), String> {
        if let Some(token) = &seed.join_token {
            return Err(format!(
                "the seed's join token pins anchor {} but the boot partition has no pimesh-trust/ \
                 with that anchor and its issuer (pimeshctl image configure --trust SITE_DIR)",
                token.anchor_sha256_hex()
            ));
        }
        let root = TrustRoot::generate(&seed.site, SystemTime::now())
            .map_err(|err| format!("cannot generate the site trust root: {err}"))?;
        self.install(&[
            ("anchor.pem", root.anchor.cert_pem().as_bytes(), CERT_MODE),
            ("anchor.key", root.anchor.key_pem().as_bytes(), KEY_MODE),
            ("issuer.pem", root.issuer.cert_pem().as_bytes(), CERT_MODE),
            ("issuer.key", root.issuer.key_pem().as_bytes(), KEY_MODE),
        ])
    }

    fn import(&self, seed: &Seed, from: &Path) -> Result<(), String> {
        let read = |name: &str| {
            let path = from.join(name);
            std::fs::read_to_string(&path)
                .map_err(|err| format!("cannot read {}: {err}", path.display()))
        };
        let anchor_pem = read("anchor.pem")?;
        let issuer_pem = read("issuer.pem")?;
        let issuer_key = read("issuer.key")?;
        let anchor = CertificateDer::from_pem_slice(anchor_pem.as_bytes()).map_err(|err| {
            format!(
                "{}: expected a PEM certificate: {err}",
                from.join("anchor.pem").display()
            )
        })?;
        Authority::from_pem(&issuer_pem, &issuer_key)
            .map_err(|err| format!("{}: {err}", from.join("issuer.pem").display()))?;
        if let Some(token) = &seed.join_token {
            if &anchor_sha256(&anchor) != token.anchor_sha256() {
                return Err(format!(
                    "{} has SHA-256 {}, but the seed's join token pins {}",
                    from.join("anchor.pem").display(),
                    anchor_sha256_hex(&anchor),
                    token.anchor_sha256_hex()
                ));
            }
        }
        let anchor_key = std::fs::read_to_string(from.join("anchor.key")).ok();
        let mut files = vec![
            ("anchor.pem", anchor_pem.as_bytes(), CERT_MODE),
            ("issuer.pem", issuer_pem.as_bytes(), CERT_MODE),
            ("issuer.key", issuer_key.as_bytes(), KEY_MODE),
        ];
        if let Some(key) = &anchor_key {
            files.push(("anchor.key", key.as_bytes(), KEY_MODE));
        }
        self.install(&files)?;
        // The keys have a safe home now; the boot partition is readable by anyone who
        // holds the card. (Deleting from FAT does not scrub the blocks.)
        for name in ["issuer.key", "anchor.key"] {
            let path = from.join(name);
            if path.exists() {
                if let Err(err) = std::fs::remove_file(&path) {
                    warn!(file = %path.display(), %err, "cannot remove an imported key from the boot partition");
                }
            }
        }
        Ok(())
    }

    /// Writes `files` into `trust.new/` and renames it to the trust folder.
    fn install(&self, files: &[(&str, &[u8], u32)]) -> Result<(), String> {
        let staging = self.dir.with_extension("new");
        let fail = |what: &str, path: &Path, err: std::io::Error| {
            format!("cannot {what} {}: {err}", path.display())
        };
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|err| fail("clear", &staging, err))?;
        }
        std::fs::create_dir_all(&staging).map_err(|err| fail("create", &staging, err))?;
        for (name, contents, mode) in files {
            pimesh_daemon::atomic_file::replace(&staging.join(name), contents, *mode)
                .map_err(|err| fail("write", &staging.join(name), err))?;
        }
        std::fs::rename(&staging, &self.dir).map_err(|err| fail("install", &self.dir, err))?;
        if let Some(parent) = self.dir.parent() {
            std::fs::File::open(parent)
                .and_then(|dir| dir.sync_all())
                .map_err(|err| fail("sync", parent, err))?;
        }
        Ok(())
    }
}

/// `--export-anchor-key`: prints the anchor's private key (to keep offline) and, with
/// `remove`, deletes it from the node — daily work needs only the issuer.
pub fn export_anchor_key(state_dir: &Path, remove: bool) -> Result<(), String> {
    let trust = TrustFiles::new(state_dir);
    let path = trust.anchor_key();
    let key = std::fs::read_to_string(&path)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    print!("{key}");
    if remove {
        std::fs::remove_file(&path)
            .map_err(|err| format!("cannot remove {}: {err}", path.display()))?;
        if let Some(dir) = path.parent() {
            let _ = std::fs::File::open(dir).and_then(|dir| dir.sync_all());
        }
        eprintln!("removed {}", path.display());
    }
    Ok(())
}
