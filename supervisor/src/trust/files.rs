//! The trust folder as the rest of the supervisor uses it: provisioning at the first start
//! of the `init` node, the periodic check, and the issuer for signing.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use pimesh_identity::{anchor_sha256_hex, Authority, TrustRoot};
use pimesh_schema::{DnsLabel, Role, Seed};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use tracing::{info, warn};

use super::error::TrustError;
use super::store::{
    TrustState, TrustStore, ANCHOR_BUNDLE, ANCHOR_KEY, ISSUER_CERT, ISSUER_KEY, K3S_TOKEN,
    NEXT_ANCHOR_KEY,
};
use super::{freshness, lifecycle};
use crate::credential::{check_pin, CredentialFiles, SELF_ENROLLED_LIFETIME};
use crate::paths::NodePaths;
use crate::status::{StatusHandle, TrustReport};

/// The trust folder as its readers see it (`dir` is the `trust` link), and the store of
/// generations behind it.
pub struct TrustFiles {
    pub dir: PathBuf,
    pub store: TrustStore,
}

impl TrustFiles {
    /// The node's trust folder; `issuer.key` is given to `pimesh-control` when it exists.
    pub fn on_node(paths: &NodePaths) -> TrustFiles {
        TrustFiles::with_store(TrustStore::on_node(paths))
    }

    pub fn with_store(store: TrustStore) -> TrustFiles {
        TrustFiles {
            dir: store.link(),
            store,
        }
    }

    /// The site's K3s token in the trust folder (`crate::k3s::token`).
    pub fn k3s_token_file(&self) -> PathBuf {
        self.dir.join(K3S_TOKEN)
    }

    /// Whether this node holds the site's issuer key: a server node, which runs the
    /// control replicas.
    pub fn holds_issuer(&self) -> bool {
        self.dir.join(ISSUER_KEY).exists()
    }

    /// Whether this node follows the site's trust rather than making it: it holds the
    /// issuer (handed over when it joined as a server) and no anchor key, so it can neither
    /// rotate the issuer nor change the bundle, and takes those changes from the holder.
    pub fn follows_site(&self) -> bool {
        self.holds_issuer()
            && !self.anchor_key().exists()
            && !self.dir.join(NEXT_ANCHOR_KEY).exists()
    }

    /// The [`freshness::Rank`] of the linked generation.
    pub fn rank(&self) -> Result<freshness::Rank, TrustError> {
        let dir = std::fs::canonicalize(&self.dir).map_err(TrustError::io("resolve", &self.dir))?;
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(TrustError::io("read", &path))
        };
        freshness::rank(&read(ISSUER_CERT)?, &read(ANCHOR_BUNDLE)?, &dir)
    }

    pub fn anchor_key(&self) -> PathBuf {
        self.dir.join(ANCHOR_KEY)
    }

    /// The issuer, when the node holds one. Read from one generation (the link resolved
    /// once), so the key and certificate always belong together.
    pub fn issuer(&self) -> Result<Option<Authority>, TrustError> {
        let dir = match std::fs::canonicalize(&self.dir) {
            Ok(dir) => dir,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(TrustError::io("resolve", &self.dir)(err)),
        };
        let cert = dir.join(ISSUER_CERT);
        let key = dir.join(ISSUER_KEY);
        if !cert.exists() || !key.exists() {
            return Ok(None);
        }
        let read =
            |path: &Path| std::fs::read_to_string(path).map_err(TrustError::io("read", path));
        Authority::from_pem(&read(&cert)?, &read(&key)?)
            .map(Some)
            .map_err(TrustError::authority(&cert))
    }

    /// On a node that holds the site's issuer (the `init` node): signs the node's own
    /// request, so it needs no enrollment by hand. Does nothing when the certificate is
    /// there or the node has no issuer.
    pub fn self_enroll(
        &self,
        credential: &CredentialFiles,
        site: &DnsLabel,
        node: &DnsLabel,
    ) -> Result<(), TrustError> {
        if credential.has_certificate() {
            return Ok(());
        }
        let Some(issuer) = self.issuer()? else {
            return Ok(());
        };
        let request = credential.signing_request()?;
        let chain = issuer
            .sign_node_chain(
                &request,
                site,
                node,
                SystemTime::now(),
                SELF_ENROLLED_LIFETIME,
            )
            .map_err(TrustError::SignNode)?;
        credential.install_chain(&chain)?;
        info!(%site, %node, "node certificate signed by the node's own site issuer");
        Ok(())
    }

    /// Before any unit starts: makes the node's key (the proxy's) and its signing request
    /// when there are none, and on a node holding the site issuer signs the node's own
    /// certificate, so that the proxy has a credential from its first start and can ask
    /// the replicas for its leaf. On other nodes the operator signs the request (`pimeshctl
    /// node sign`), the proxy takes the certificate up when it appears, and trusts the site
    /// anchor the card brought in `boot_trust_dir` (checked against the join token's pin).
    pub fn prepare_node_credential(
        &self,
        credential: &CredentialFiles,
        seed: &Seed,
        node: &DnsLabel,
        boot_trust_dir: &Path,
    ) -> Result<(), TrustError> {
        credential.ensure_request(&seed.site, node)?;
        if self.holds_issuer() {
            self.self_enroll(credential, &seed.site, node)
        } else {
            credential.import_anchor(boot_trust_dir, seed)?;
            Ok(())
        }
    }

    /// Runs [`TrustFiles::check`] every [`CHECK_EVERY`], for the life of the supervisor,
    /// and shows each report in the status.
    pub async fn keep_checking(
        self,
        site: DnsLabel,
        credential: CredentialFiles,
        status: StatusHandle,
    ) {
        let mut every = tokio::time::interval(CHECK_EVERY);
        loop {
            every.tick().await;
            let mut report = self.check(&site, &credential);
            status.update(|status| {
                // How the root came to be stays what the start found.
                report.source = status.trust.source.or(report.source);
                status.trust = report;
            });
        }
    }

    fn report(&self, source: &'static str) -> TrustReport {
        let anchor = std::fs::read(self.dir.join(ANCHOR_BUNDLE))
            .ok()
            .and_then(|pem| CertificateDer::from_pem_slice(&pem).ok());
        let (issuer, warning, error) = match lifecycle::issuer_report(&self.store) {
            Ok((issuer, warning)) => (Some(issuer), warning, None),
            Err(err) => (None, None, Some(err.to_string())),
        };
        // Loud only when it is urgent: a node without its anchor key is the recommended
        // state, and its note stays in the report.
        match (&warning, &issuer) {
            (Some(warning), Some(issuer)) if issuer.days_left < lifecycle::WARN_DAYS => {
                warn!("{warning}")
            }
            (Some(warning), _) => info!("{warning}"),
            (None, _) => {}
        }
        TrustReport {
            present: anchor.is_some(),
            source: Some(source),
            anchor_sha256: anchor.map(|der| anchor_sha256_hex(&der)),
            anchor_key_on_node: self.anchor_key().exists(),
            issuer,
            warning,
            error,
        }
    }

    /// The periodic check (at start and every [`CHECK_EVERY`]): rotates the issuer when one
    /// third of its life is left and the anchor key is here, keeps the node's credential
    /// signed by the current issuer, and reports. `site` is the seed's.
    pub fn check(&self, site: &DnsLabel, credential: &CredentialFiles) -> TrustReport {
        if let Err(err) = self.store.recover() {
            warn!(%err, "cannot bring the trust folder to a consistent state");
        }
        if let Err(err) = lifecycle::maintain(&self.store, site, credential, SystemTime::now()) {
            warn!(%err, "trust maintenance failed");
        }
        self.report("existing")
    }

    /// Provisions the trust root from the seed (see the module doc), importing it from
    /// `boot_trust_dir` when the operator put one there. Never fails: what went wrong is in
    /// the report.
    pub fn provision(&self, seed: Option<&Seed>, boot_trust_dir: &Path) -> TrustReport {
        let lock = match self.store.lock() {
            Ok(lock) => lock,
            Err(err) => {
                return TrustReport {
                    error: Some(err.to_string()),
                    ..TrustReport::default()
                }
            }
        };
        let report = self.provision_locked(seed, boot_trust_dir);
        drop(lock);
        report
    }

    fn provision_locked(&self, seed: Option<&Seed>, boot_trust_dir: &Path) -> TrustReport {
        if let Err(err) = self.store.recover_locked() {
            warn!(%err, "cannot bring the trust folder to a consistent state");
            return TrustReport {
                error: Some(err.to_string()),
                ..TrustReport::default()
            };
        }
        if self.dir.join(ISSUER_KEY).exists() && self.dir.join(ANCHOR_BUNDLE).exists() {
            if let Some(seed) = seed.filter(|seed| seed.role == Role::Init) {
                self.accept_seed_token(seed);
            }
            return self.report("existing");
        }
        let Some(seed) = seed.filter(|seed| seed.role == Role::Init) else {
            return TrustReport::default();
        };
        let result = if boot_trust_dir.join(ISSUER_KEY).exists() {
            self.import(seed, boot_trust_dir).map(|()| "imported")
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
                    error: Some(err.to_string()),
                    ..TrustReport::default()
                }
            }
        }
    }

    fn generate(&self, seed: &Seed) -> Result<(), TrustError> {
        if let Some(token) = &seed.join_token {
            return Err(TrustError::PinnedRootMissing {
                pinned: token.anchor_sha256_hex(),
            });
        }
        let root = TrustRoot::generate(&seed.site, SystemTime::now())
            .map_err(TrustError::generate("generate the site trust root"))?;
        self.install(&TrustState {
            anchor_bundle: root.anchor.cert_pem().to_owned(),
            issuer_cert: root.issuer.cert_pem().to_owned(),
            issuer_key: root.issuer.key_pem(),
            anchor_key: Some(root.anchor.key_pem()),
            next_anchor_cert: None,
            next_anchor_key: None,
            join_tokens: join_tokens_of(seed),
            k3s_token: new_k3s_token(),
        })
    }

    fn import(&self, seed: &Seed, from: &Path) -> Result<(), TrustError> {
        let read = |name: &str| {
            let path = from.join(name);
            std::fs::read_to_string(&path).map_err(TrustError::io("read", &path))
        };
        let anchor_pem = read(ANCHOR_BUNDLE)?;
        let issuer_pem = read(ISSUER_CERT)?;
        let issuer_key = read(ISSUER_KEY)?;
        let anchor = CertificateDer::from_pem_slice(anchor_pem.as_bytes()).map_err(|source| {
            TrustError::NotPem {
                path: from.join(ANCHOR_BUNDLE),
                expected: "a PEM certificate",
                source,
            }
        })?;
        Authority::from_pem(&issuer_pem, &issuer_key)
            .map_err(TrustError::authority(&from.join(ISSUER_CERT)))?;
        check_pin(&anchor, seed, &from.join(ANCHOR_BUNDLE)).map_err(TrustError::Pin)?;
        let anchor_key = std::fs::read_to_string(from.join(ANCHOR_KEY)).ok();
        self.install(&TrustState {
            anchor_bundle: anchor_pem,
            issuer_cert: issuer_pem,
            issuer_key,
            anchor_key,
            next_anchor_cert: None,
            next_anchor_key: None,
            join_tokens: join_tokens_of(seed),
            k3s_token: new_k3s_token(),
        })?;
        // The keys have a safe home now; the boot partition is readable by anyone who
        // holds the card. (Deleting from FAT does not scrub the blocks.)
        for name in [ISSUER_KEY, ANCHOR_KEY] {
            let path = from.join(name);
            if path.exists() {
                if let Err(err) = std::fs::remove_file(&path) {
                    warn!(file = %path.display(), %err, "cannot remove an imported key from the boot partition");
                }
            }
        }
        Ok(())
    }

    /// On the init node of a root made before join tokens (or the K3s token) were kept:
    /// adds the seed's token and a new K3s token to the trust folder (a new generation),
    /// so that other nodes can join. A failure is
    /// logged; joins are then refused until the next start.
    fn accept_seed_token(&self, seed: &Seed) {
        let result =
            self.store
                .current()
                .map_err(TrustError::from)
                .and_then(|current| match current {
                    Some((_, state))
                        if (state.join_tokens.is_none() && seed.join_token.is_some())
                            || state.k3s_token.is_none() =>
                    {
                        let n = self.store.commit(&TrustState {
                            join_tokens: state.join_tokens.clone().or_else(|| join_tokens_of(seed)),
                            k3s_token: state.k3s_token.clone().or_else(new_k3s_token),
                            ..state
                        })?;
                        info!(
                            generation = n,
                            "the seed's join token and a K3s token are now kept for this site"
                        );
                        Ok(())
                    }
                    _ => Ok(()),
                });
        if let Err(err) = result {
            warn!(%err, "cannot record the seed's join token in the trust folder");
        }
    }

    /// On a server node that joined: makes the site issuer handed over by a replica
    /// (`pimesh_join::IssuerHandover`) this node's trust folder, as a new generation. The
    /// node holds no anchor key (those stay on the init node or offline).
    pub fn install_handover(
        &self,
        handover: &pimesh_join::IssuerHandover,
    ) -> Result<u64, TrustError> {
        Authority::from_pem(&handover.issuer_cert, &handover.issuer_key)
            .map_err(TrustError::authority(Path::new("the issuer handed over")))?;
        let tokens =
            serde_json::to_string_pretty(&serde_json::json!({ "tokens": handover.tokens }))
                .unwrap_or_default();
        let _lock = self.store.lock()?;
        let n = self.store.commit(&TrustState {
            anchor_bundle: handover.anchors.clone(),
            issuer_cert: handover.issuer_cert.clone(),
            issuer_key: handover.issuer_key.clone(),
            anchor_key: None,
            next_anchor_cert: None,
            next_anchor_key: None,
            join_tokens: Some(tokens),
            k3s_token: handover
                .k3s_token
                .as_ref()
                .map(|token| format!("{token}\n")),
        })?;
        info!(
            generation = n,
            "site issuer received: this node is a server of its site"
        );
        Ok(n)
    }

    /// Makes `state` the first generation and links it.
    fn install(&self, state: &TrustState) -> Result<(), TrustError> {
        self.store.commit(state)?;
        Ok(())
    }
}

/// A new K3s token for the trust folder, one line; `None` (logged) without randomness.
fn new_k3s_token() -> Option<String> {
    let token = crate::k3s::token::K3sToken::generate();
    if token.is_none() {
        warn!("no randomness for a K3s token: K3s will not be configured on this site");
    }
    token.map(|token| format!("{}\n", token.expose()))
}

/// `join.json` for the seed's join token: its secret's digest, without expiry.
fn join_tokens_of(seed: &Seed) -> Option<String> {
    let token = seed.join_token.as_ref()?;
    let accepted = pimesh_join::AcceptedTokens(vec![pimesh_join::AcceptedToken::for_secret(
        token.secret(),
        None,
    )]);
    serde_json::to_string_pretty(&serde_json::json!({ "tokens": accepted })).ok()
}

/// How often the running supervisor checks the issuer.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn init_seed() -> Seed {
        Seed::parse(
            Path::new("/boot/firmware/pimesh.toml"),
            "site = \"depot-7\"\nrole = \"init\"\n",
        )
        .expect("seed")
    }

    #[test]
    fn a_generated_root_is_the_first_generation_behind_the_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = TrustFiles::with_store(TrustStore::new(dir.path(), None));
        let report = files.provision(Some(&init_seed()), &dir.path().join("boot/pimesh-trust"));
        assert_eq!((report.present, report.source), (true, Some("generated")));
        assert!(report.anchor_key_on_node);
        let issuer = report.issuer.expect("issuer report");
        assert!(issuer.days_left > 300, "{issuer:?}");
        assert_eq!(issuer.signed_by, report.anchor_sha256);
        assert_eq!(report.warning, None);
        assert_eq!(
            std::fs::read_link(dir.path().join("trust")).expect("link"),
            Path::new("trust.d/1")
        );
        let mode = |name: &str| {
            std::fs::metadata(dir.path().join("trust").join(name))
                .expect(name)
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!((mode("issuer.key"), mode("anchor.key")), (0o600, 0o600));
        assert_eq!((mode("issuer.pem"), mode("anchor.pem")), (0o644, 0o644));
        assert!(files.issuer().expect("issuer").is_some());

        let again = files.provision(Some(&init_seed()), &dir.path().join("boot/pimesh-trust"));
        assert_eq!(again.source, Some("existing"));
        assert_eq!(files.store.generations().expect("list"), vec![1]);
    }

    #[test]
    fn an_older_supervisors_plain_folder_is_kept_and_linked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = TrustRoot::generate(&init_seed().site, SystemTime::now()).expect("root");
        let plain = dir.path().join("trust");
        std::fs::create_dir(&plain).expect("mkdir");
        std::fs::write(plain.join("anchor.pem"), root.anchor.cert_pem()).expect("write");
        std::fs::write(plain.join("issuer.pem"), root.issuer.cert_pem()).expect("write");
        std::fs::write(plain.join("issuer.key"), root.issuer.key_pem()).expect("write");
        let files = TrustFiles::with_store(TrustStore::new(dir.path(), None));
        let report = files.provision(Some(&init_seed()), &dir.path().join("boot/pimesh-trust"));
        assert_eq!((report.present, report.source), (true, Some("existing")));
        assert_eq!(
            report.anchor_sha256,
            Some(anchor_sha256_hex(root.anchor.cert_der()))
        );
        assert!(std::fs::symlink_metadata(&plain)
            .expect("link")
            .file_type()
            .is_symlink());
        // Without the anchor key the node cannot rotate the issuer, and says so.
        let warning = report.warning.expect("warning");
        assert!(warning.contains("anchor key not on node"), "{warning}");
    }
}
