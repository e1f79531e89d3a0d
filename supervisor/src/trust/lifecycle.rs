//! The trust root's life after provisioning: issuer rotation, anchor rotation through an
//! overlapping bundle, and moving the anchor key off the node and back.
//!
//! Every step reads the linked generation, computes the next one and commits it whole
//! ([`TrustStore::commit`]); nothing is kept in memory between steps. Where an anchor
//! rotation stands is read from the files:
//!
//! | phase | `anchor.pem` | `anchor.next.*` | `issuer.pem` signed by |
//! |---|---|---|---|
//! | steady | `[A]` | absent | A |
//! | begun (`trust anchor begin`) | `[A, B]` | B | A |
//! | switched (`trust anchor switch`) | `[A, B]` | B | B |
//! | steady again (`trust anchor finish`) | `[B]` | absent | B |
//!
//! Invariants: `anchor.next.pem` and `anchor.next.key` exist together and the next anchor
//! is in the bundle; `anchor.key`, when present, belongs to an anchor of the bundle other
//! than the next one; the issuer is signed by an anchor of the bundle.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::{Duration, SystemTime};

use pimesh_identity::{anchor_sha256_hex, cert_validity, issued_by, Authority, LEAF_LIFETIME};
use pimesh_schema::DnsLabel;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tracing::{info, warn};

use super::error::{Refusal, TrustError};
use super::store::{
    TrustState, TrustStore, ANCHOR_BUNDLE, ANCHOR_KEY, ISSUER_CERT, NEXT_ANCHOR_CERT,
    NEXT_ANCHOR_KEY,
};
use crate::credential::CredentialFiles;
use crate::status::IssuerInfo;

/// Below this many days of issuer life left, the supervisor warns on every check.
pub const WARN_DAYS: i64 = 30;

const DAY: u64 = 24 * 3600;

/// Where an anchor rotation stands (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Steady,
    Begun,
    Switched,
}

/// One anchor of the bundle, as `trust status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AnchorInfo {
    pub sha256: String,
    pub not_after: String,
    /// `current`, or `next` for the anchor an unfinished rotation brings in.
    pub role: &'static str,
}

/// `pimesh-supervisor trust status`.
#[derive(Debug, Clone, Serialize)]
pub struct TrustStatus {
    pub generation: u64,
    pub dir: String,
    pub anchors: Vec<AnchorInfo>,
    pub issuer: IssuerInfo,
    pub phase: Phase,
    /// Whether the key of the anchor that signed the issuer is on this node: needed to
    /// rotate the issuer.
    pub signing_key_on_node: bool,
    /// `anchor.key`: the current anchor's key.
    pub anchor_key_on_node: bool,
    pub next_anchor_key_on_node: bool,
}

/// A trust root as read from its generation, with its certificates parsed.
struct Root {
    generation: u64,
    dir: std::path::PathBuf,
    state: TrustState,
    /// The bundle's anchors: PEM text of each and its DER.
    anchors: Vec<(String, CertificateDer<'static>)>,
    issuer: CertificateDer<'static>,
    next: Option<CertificateDer<'static>>,
}

/// The PEM certificate blocks of `text`, each with its DER.
fn pem_certificates(
    text: &str,
    file: &Path,
) -> Result<Vec<(String, CertificateDer<'static>)>, TrustError> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(end) = rest[start..].find(END) else {
            return Err(TrustError::UnterminatedCertificate {
                path: file.to_path_buf(),
            });
        };
        let block = format!("{}\n", &rest[start..start + end + END.len()]);
        let der = CertificateDer::from_pem_slice(block.as_bytes()).map_err(|source| {
            TrustError::NotPem {
                path: file.to_path_buf(),
                expected: "PEM certificates",
                source,
            }
        })?;
        out.push((block, der));
        rest = &rest[start + end + END.len()..];
    }
    if out.is_empty() {
        return Err(TrustError::NoCertificates {
            path: file.to_path_buf(),
        });
    }
    Ok(out)
}

fn one_certificate(text: &str, file: &Path) -> Result<CertificateDer<'static>, TrustError> {
    CertificateDer::from_pem_slice(text.as_bytes()).map_err(|source| TrustError::NotPem {
        path: file.to_path_buf(),
        expected: "a PEM certificate",
        source,
    })
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn days_between(from: SystemTime, to: SystemTime) -> i64 {
    match to.duration_since(from) {
        Ok(ahead) => i64::try_from(ahead.as_secs() / DAY).unwrap_or(i64::MAX),
        Err(behind) => -i64::try_from(behind.duration().as_secs() / DAY).unwrap_or(i64::MAX),
    }
}

impl Root {
    fn load(store: &TrustStore) -> Result<Root, TrustError> {
        let Some((generation, state)) = store.current()? else {
            return Err(TrustError::NoRoot { link: store.link() });
        };
        let dir = store.generation_dir(generation);
        let anchors = pem_certificates(&state.anchor_bundle, &dir.join(ANCHOR_BUNDLE))?;
        let issuer = one_certificate(&state.issuer_cert, &dir.join(ISSUER_CERT))?;
        let next = match (&state.next_anchor_cert, &state.next_anchor_key) {
            (None, None) => None,
            (Some(cert), Some(_)) => {
                let path = dir.join(NEXT_ANCHOR_CERT);
                let next = one_certificate(cert, &path)?;
                if !anchors.iter().any(|(_, der)| der == &next) {
                    return Err(TrustError::NextNotInBundle {
                        next: path,
                        bundle: dir.join(ANCHOR_BUNDLE),
                    });
                }
                Some(next)
            }
            _ => {
                return Err(TrustError::HalfNextAnchor {
                    cert: dir.join(NEXT_ANCHOR_CERT),
                    key: dir.join(NEXT_ANCHOR_KEY),
                })
            }
        };
        Ok(Root {
            generation,
            dir,
            state,
            anchors,
            issuer,
            next,
        })
    }

    fn phase(&self) -> Phase {
        match &self.next {
            None => Phase::Steady,
            Some(next) if issued_by(&self.issuer, next) => Phase::Switched,
            Some(_) => Phase::Begun,
        }
    }

    /// The bundle anchor that signed the issuer.
    fn signer(&self) -> Option<&(String, CertificateDer<'static>)> {
        self.anchors
            .iter()
            .find(|(_, der)| issued_by(&self.issuer, der))
    }

    /// The anchor that signed the issuer as an authority, when its key is on the node.
    fn signing_anchor(&self) -> Option<Authority> {
        let (pem, _) = self.signer()?;
        [&self.state.anchor_key, &self.state.next_anchor_key]
            .into_iter()
            .flatten()
            .find_map(|key| Authority::from_pem(pem, key).ok())
    }

    fn issuer_info(&self) -> Result<IssuerInfo, TrustError> {
        let (not_before, not_after) = cert_validity(&self.issuer)
            .map_err(TrustError::authority(&self.dir.join(ISSUER_CERT)))?;
        Ok(IssuerInfo {
            not_after: rfc3339(not_after),
            days_left: days_between(SystemTime::now(), not_after),
            rotate_from: rfc3339(rotate_from(not_before, not_after)),
            signed_by: self.signer().map(|(_, der)| anchor_sha256_hex(der)),
        })
    }
}

/// When an issuer valid from `not_before` to `not_after` has one third of its life left.
pub fn rotate_from(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_after
        .checked_sub(lifetime / 3)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// `trust status`: what the linked generation holds.
pub fn status(store: &TrustStore) -> Result<TrustStatus, TrustError> {
    let root = Root::load(store)?;
    let mut anchors = Vec::new();
    for (_, der) in &root.anchors {
        let (_, not_after) =
            cert_validity(der).map_err(TrustError::authority(&root.dir.join(ANCHOR_BUNDLE)))?;
        anchors.push(AnchorInfo {
            sha256: anchor_sha256_hex(der),
            not_after: rfc3339(not_after),
            role: if root.next.as_ref() == Some(der) {
                "next"
            } else {
                "current"
            },
        });
    }
    Ok(TrustStatus {
        generation: root.generation,
        dir: root.dir.display().to_string(),
        anchors,
        issuer: root.issuer_info()?,
        phase: root.phase(),
        signing_key_on_node: root.signing_anchor().is_some(),
        anchor_key_on_node: root.state.anchor_key.is_some(),
        next_anchor_key_on_node: root.state.next_anchor_key.is_some(),
    })
}

/// The issuer's state for `/status`, with a warning when it needs the operator.
pub fn issuer_report(store: &TrustStore) -> Result<(IssuerInfo, Option<String>), TrustError> {
    let root = Root::load(store)?;
    let info = root.issuer_info()?;
    let warning = if root.signing_anchor().is_some() {
        (info.days_left < WARN_DAYS).then(|| {
            format!(
                "the issuer expires in {} days ({}) and could not be rotated: see the supervisor's log",
                info.days_left, info.not_after
            )
        })
    } else {
        let mut text = format!(
            "anchor key not on node: rotate with pimeshctl/the operator \
             (or `pimesh-supervisor trust import-anchor-key FILE` then `trust rotate-issuer`); \
             the issuer expires {} ({} days)",
            info.not_after, info.days_left
        );
        if info.days_left < WARN_DAYS {
            text = format!("URGENT: {text}");
        }
        Some(text)
    };
    Ok((info, warning))
}

/// `trust rotate-issuer`: a new issuer from the anchor that signed the current one (so
/// leaves of the old issuer and of the new verify under the same bundle). Returns the new
/// generation.
pub fn rotate_issuer(
    store: &TrustStore,
    site: &DnsLabel,
    now: SystemTime,
) -> Result<u64, TrustError> {
    let _lock = store.lock()?;
    rotate_issuer_locked(store, site, now)
}

fn rotate_issuer_locked(
    store: &TrustStore,
    site: &DnsLabel,
    now: SystemTime,
) -> Result<u64, TrustError> {
    let root = Root::load(store)?;
    let Some(anchor) = root.signing_anchor() else {
        return Err(Refusal::AnchorKeyNotOnNode {
            issuer_cert: root.dir.join(ISSUER_CERT),
            dir: root.dir,
        }
        .into());
    };
    let issuer = anchor
        .new_issuer(site, now)
        .map_err(TrustError::generate("make a new issuer"))?;
    let state = TrustState {
        issuer_cert: issuer.cert_pem().to_owned(),
        issuer_key: issuer.key_pem(),
        ..root.state.clone()
    };
    let n = store.commit(&state)?;
    info!(generation = n, not_after = %rfc3339(issuer.not_after()), "issuer rotated");
    Ok(n)
}

/// Whether the issuer is due for rotation at `now` (one third of its life left).
pub fn rotation_due(store: &TrustStore, now: SystemTime) -> Result<bool, TrustError> {
    let root = Root::load(store)?;
    let (not_before, not_after) =
        cert_validity(&root.issuer).map_err(TrustError::authority(&root.dir.join(ISSUER_CERT)))?;
    Ok(now >= rotate_from(not_before, not_after))
}

/// `trust anchor begin`: a new anchor joins the bundle; the issuer stays.
pub fn anchor_begin(
    store: &TrustStore,
    site: &DnsLabel,
    now: SystemTime,
) -> Result<String, TrustError> {
    let _lock = store.lock()?;
    let root = Root::load(store)?;
    if root.phase() != Phase::Steady {
        return Err(Refusal::RotationUnderWay {
            next: root.dir.join(NEXT_ANCHOR_CERT),
        }
        .into());
    }
    let next =
        Authority::new_anchor(site, now).map_err(TrustError::generate("make a new anchor"))?;
    let mut bundle = root.state.anchor_bundle.clone();
    if !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(next.cert_pem());
    let state = TrustState {
        anchor_bundle: bundle,
        next_anchor_cert: Some(next.cert_pem().to_owned()),
        next_anchor_key: Some(next.key_pem()),
        ..root.state.clone()
    };
    let n = store.commit(&state)?;
    let sha = anchor_sha256_hex(next.cert_der());
    info!(generation = n, next_anchor = %sha, "anchor rotation begun");
    Ok(format!(
        "anchor rotation begun: the bundle now holds the old and the new anchor ({sha}).\n\
         Next: let every node and the central server learn the new bundle, then run \
         `pimesh-supervisor trust anchor switch`."
    ))
}

/// `trust anchor switch`: a new issuer signed by the new anchor becomes the issuer; the
/// bundle keeps both anchors. Re-signs the node's own credential with it.
pub fn anchor_switch(
    store: &TrustStore,
    site: &DnsLabel,
    credential: &CredentialFiles,
    now: SystemTime,
) -> Result<String, TrustError> {
    let _lock = store.lock()?;
    let root = Root::load(store)?;
    match root.phase() {
        Phase::Steady => return Err(Refusal::SwitchWithoutBegin.into()),
        Phase::Switched => return Err(Refusal::AlreadySwitched.into()),
        Phase::Begun => {}
    }
    let (Some(cert), Some(key)) = (&root.state.next_anchor_cert, &root.state.next_anchor_key)
    else {
        return Err(TrustError::NoNextAnchor { dir: root.dir });
    };
    let next = Authority::from_pem(cert, key)
        .map_err(TrustError::authority(&root.dir.join(NEXT_ANCHOR_KEY)))?;
    let issuer = next
        .new_issuer(site, now)
        .map_err(TrustError::generate("make the new issuer"))?;
    let state = TrustState {
        issuer_cert: issuer.cert_pem().to_owned(),
        issuer_key: issuer.key_pem(),
        ..root.state.clone()
    };
    let n = store.commit(&state)?;
    info!(generation = n, "issuer switched to the new anchor");
    let resigned = credential.renew_from(&issuer, now)?;
    Ok(format!(
        "switched: the issuer is now signed by the new anchor{}.\n\
         Leaves of the old issuer keep verifying while both anchors are in the bundle. \
         Re-sign node credentials made by hand on other nodes (pimeshctl node sign), wait \
         until the old leaves have expired ({} h), then run `pimesh-supervisor trust anchor finish`.",
        if resigned {
            "; this node's credential is re-signed by it"
        } else {
            ""
        },
        LEAF_LIFETIME.as_secs() / 3600
    ))
}

/// `trust anchor finish`: the bundle keeps only the new anchor, whose key becomes
/// `anchor.key`; the old anchor's key leaves the node. Refused within [`LEAF_LIFETIME`] of
/// the switch unless `force`: leaves of the old issuer would stop verifying.
///
/// The node's own credential is re-signed by the current issuer first when it chains to
/// the old anchor — before the swap, so that a cut leaves a credential valid under the old
/// bundle and the new one alike.
pub fn anchor_finish(
    store: &TrustStore,
    credential: &CredentialFiles,
    now: SystemTime,
    force: bool,
) -> Result<String, TrustError> {
    let _lock = store.lock()?;
    let root = Root::load(store)?;
    match root.phase() {
        Phase::Steady => return Err(Refusal::FinishWithoutBegin.into()),
        Phase::Begun => return Err(Refusal::FinishBeforeSwitch.into()),
        Phase::Switched => {}
    }
    let (not_before, _) =
        cert_validity(&root.issuer).map_err(TrustError::authority(&root.dir.join(ISSUER_CERT)))?;
    // The issuer is backdated a few minutes; leaves of the old one live at most a leaf's
    // lifetime after the switch.
    let safe_from = not_before + LEAF_LIFETIME + Duration::from_secs(10 * 60);
    if now < safe_from && !force {
        return Err(Refusal::FinishTooSoon { safe_from }.into());
    }
    let (Some(cert), Some(key)) = (&root.state.next_anchor_cert, &root.state.next_anchor_key)
    else {
        return Err(TrustError::NoNextAnchor { dir: root.dir });
    };
    let issuer = Authority::from_pem(&root.state.issuer_cert, &root.state.issuer_key)
        .map_err(TrustError::authority(&root.dir.join(ISSUER_CERT)))?;
    let resigned = credential.renew_from(&issuer, now)?;
    let had_old_key = root.state.anchor_key.is_some();
    let state = TrustState {
        anchor_bundle: cert.clone(),
        issuer_cert: root.state.issuer_cert.clone(),
        issuer_key: root.state.issuer_key.clone(),
        anchor_key: Some(key.clone()),
        next_anchor_cert: None,
        next_anchor_key: None,
        join_tokens: root.state.join_tokens.clone(),
        k3s_token: root.state.k3s_token.clone(),
    };
    let n = store.commit(&state)?;
    info!(generation = n, "anchor rotation finished");
    Ok(format!(
        "finished: the bundle holds only the new anchor {}; {}{}",
        anchor_sha256_hex(&one_certificate(cert, &root.dir.join(NEXT_ANCHOR_CERT))?),
        if had_old_key {
            "the old anchor's key is deleted from the node"
        } else {
            "the old anchor's key was not on the node (its offline copy is now obsolete)"
        },
        if resigned {
            "; this node's credential was re-signed by the current issuer"
        } else {
            ""
        }
    ))
}

/// `trust export-anchor-key FILE`: writes `anchor.key` to `file` (mode 0600, fsynced),
/// then removes it from the node. Refuses when `file` exists and during an anchor
/// rotation (finish it first: the node then holds one anchor key).
pub fn export_anchor_key(store: &TrustStore, file: &Path) -> Result<String, TrustError> {
    let _lock = store.lock()?;
    let root = Root::load(store)?;
    if root.phase() != Phase::Steady {
        return Err(Refusal::ExportDuringRotation.into());
    }
    let Some(key) = &root.state.anchor_key else {
        return Err(Refusal::AnchorKeyExported {
            key: root.dir.join(ANCHOR_KEY),
        }
        .into());
    };
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::AlreadyExists => Refusal::ExportTargetExists {
                file: file.to_path_buf(),
            }
            .into(),
            _ => TrustError::io("create", file)(err),
        })?;
    out.set_permissions(fs::Permissions::from_mode(0o600))
        .and_then(|()| out.write_all(key.as_bytes()))
        .and_then(|()| out.sync_all())
        .map_err(TrustError::io("write", file))?;
    let parent = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(TrustError::io("fsync the folder", parent))?;
    let state = TrustState {
        anchor_key: None,
        ..root.state.clone()
    };
    let n = store.commit(&state)?;
    warn!(generation = n, file = %file.display(), "anchor key exported and removed from the node");
    Ok(format!(
        "anchor key written to {} and removed from the node: keep it offline",
        file.display()
    ))
}

/// `trust import-anchor-key FILE`: puts an exported anchor key back, after checking that it
/// belongs to an anchor of the bundle (not the next one: that key never leaves the node).
pub fn import_anchor_key(store: &TrustStore, file: &Path) -> Result<String, TrustError> {
    let key = fs::read_to_string(file).map_err(TrustError::io("read", file))?;
    let _lock = store.lock()?;
    let root = Root::load(store)?;
    if root.state.anchor_key.is_some() {
        return Err(Refusal::AnchorKeyPresent {
            key: root.dir.join(ANCHOR_KEY),
        }
        .into());
    }
    let matching = root
        .anchors
        .iter()
        .find(|(pem, _)| Authority::from_pem(pem, &key).is_ok());
    let Some((_, der)) = matching else {
        return Err(Refusal::KeyMatchesNoAnchor {
            file: file.to_path_buf(),
            bundle: root.dir.join(ANCHOR_BUNDLE),
        }
        .into());
    };
    if root.next.as_ref() == Some(der) {
        return Err(Refusal::NextAnchorKey {
            file: file.to_path_buf(),
        }
        .into());
    }
    let sha = anchor_sha256_hex(der);
    let state = TrustState {
        anchor_key: Some(key),
        ..root.state.clone()
    };
    let n = store.commit(&state)?;
    info!(generation = n, anchor = %sha, "anchor key imported");
    Ok(format!("anchor key of {sha} imported onto the node"))
}

/// The supervisor's periodic check: rotates the issuer when due (and the anchor key is
/// here), then keeps the node's own credential signed by the current issuer. Errors are
/// for the log; the caller reports the issuer with [`issuer_report`].
pub fn maintain(
    store: &TrustStore,
    site: &DnsLabel,
    credential: &CredentialFiles,
    now: SystemTime,
) -> Result<(), TrustError> {
    let _lock = store.lock()?;
    // Without the signing anchor's key the issuer is rotated elsewhere (where the key is;
    // a server node that joined takes it from there), and the report says so.
    if rotation_due(store, now)? && Root::load(store)?.signing_anchor().is_some() {
        match rotate_issuer_locked(store, site, now) {
            Ok(_) => {}
            Err(err) => warn!(%err, "the issuer is due for rotation but cannot be rotated here"),
        }
    }
    let root = Root::load(store)?;
    if !credential.chain().exists() {
        return Ok(());
    }
    let issuer = Authority::from_pem(&root.state.issuer_cert, &root.state.issuer_key)
        .map_err(TrustError::authority(&root.dir.join(ISSUER_CERT)))?;
    credential.renew_from(&issuer, now)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use pimesh_identity::{verify_leaf, LeafRequest, SpiffeId, TrustRoot, Usage};

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    /// An init node's state folder: a generated root and the node's own credential.
    struct Node {
        dir: tempfile::TempDir,
        store: TrustStore,
        site: DnsLabel,
        credential: CredentialFiles,
    }

    impl Node {
        fn new() -> Node {
            let dir = tempfile::tempdir().expect("tempdir");
            let site = label("depot-7");
            let store = TrustStore::new(dir.path(), None);
            let root = TrustRoot::generate(&site, SystemTime::now()).expect("root");
            store
                .commit(&TrustState {
                    anchor_bundle: root.anchor.cert_pem().to_owned(),
                    issuer_cert: root.issuer.cert_pem().to_owned(),
                    issuer_key: root.issuer.key_pem(),
                    anchor_key: Some(root.anchor.key_pem()),
                    next_anchor_cert: None,
                    next_anchor_key: None,
                    join_tokens: Some("{\"tokens\": []}".into()),
                    k3s_token: None,
                })
                .expect("commit");
            let credential = CredentialFiles::new(dir.path().join("identity"));
            let files = crate::trust::TrustFiles::with_store(store.clone());
            credential
                .ensure_request(&site, &label("pi-1"))
                .expect("request");
            files
                .self_enroll(&credential, &site, &label("pi-1"))
                .expect("enroll");
            Node {
                dir,
                store,
                site,
                credential,
            }
        }

        fn state(&self) -> TrustState {
            self.store.current().expect("read").expect("present").1
        }

        fn anchors(&self) -> Vec<CertificateDer<'static>> {
            CertificateDer::pem_slice_iter(self.state().anchor_bundle.as_bytes())
                .collect::<Result<_, _>>()
                .expect("bundle")
        }

        fn issuer(&self) -> Authority {
            let state = self.state();
            Authority::from_pem(&state.issuer_cert, &state.issuer_key).expect("issuer")
        }

        /// A proxy leaf from the current issuer: (leaf, issuer) as a proxy presents them.
        fn leaf(&self) -> (CertificateDer<'static>, CertificateDer<'static>) {
            let issuer = self.issuer();
            let id = SpiffeId::node(&self.site, &label("pi-2"));
            let request = LeafRequest::new(std::slice::from_ref(&id)).expect("request");
            let leaf = issuer
                .sign_leaf(
                    &request.csr,
                    &self.site,
                    &BTreeSet::from([id]),
                    SystemTime::now(),
                )
                .expect("leaf");
            (leaf.der, issuer.cert_der().clone())
        }

        fn verifies(
            &self,
            (leaf, issuer): &(CertificateDer<'static>, CertificateDer<'static>),
        ) -> bool {
            self.verifies_at(leaf, issuer, SystemTime::now())
        }

        fn verifies_at(
            &self,
            leaf: &CertificateDer<'_>,
            issuer: &CertificateDer<'_>,
            now: SystemTime,
        ) -> bool {
            verify_leaf(
                leaf,
                std::slice::from_ref(issuer),
                &self.anchors(),
                &self.site,
                Usage::Client,
                now,
            )
            .is_ok()
        }

        /// The node's own credential verifies under the bundle on disk.
        fn credential_verifies(&self, now: SystemTime) -> bool {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(
                &fs::read(self.credential.chain()).expect("node.pem"),
            )
            .collect::<Result<_, _>>()
            .expect("chain");
            self.verifies_at(&chain[0], &chain[1], now)
        }

        fn gens_holding(&self, name: &str) -> Vec<u64> {
            self.store
                .generations()
                .expect("list")
                .into_iter()
                .filter(|&n| self.store.generation_dir(n).join(name).exists())
                .collect()
        }
    }

    #[test]
    fn issuer_rotation_keeps_the_anchor_and_old_leaves_verify() {
        let node = Node::new();
        let before = status(&node.store).expect("status");
        let old_leaf = node.leaf();
        let old_issuer = node.state().issuer_cert;

        rotate_issuer(&node.store, &node.site, SystemTime::now()).expect("rotate");

        let after = status(&node.store).expect("status");
        assert_ne!(node.state().issuer_cert, old_issuer);
        assert_eq!(after.anchors.len(), 1);
        assert_eq!(after.anchors[0].sha256, before.anchors[0].sha256);
        assert_eq!(
            after.issuer.signed_by.as_deref(),
            Some(before.anchors[0].sha256.as_str())
        );
        assert!(
            node.verifies(&old_leaf),
            "a leaf of the old issuer still verifies"
        );
        assert!(
            node.verifies(&node.leaf()),
            "a leaf of the new issuer verifies"
        );
        assert_eq!(after.phase, Phase::Steady);
    }

    #[test]
    fn the_issuer_rotates_at_one_third_left_and_the_node_credential_follows() {
        let node = Node::new();
        let issuer = node.issuer();
        let (not_before, not_after) = cert_validity(issuer.cert_der()).expect("validity");
        let due = rotate_from(not_before, not_after);
        let early = due - Duration::from_secs(DAY);
        assert!(!rotation_due(&node.store, early).expect("due"));
        maintain(&node.store, &node.site, &node.credential, early).expect("maintain");
        assert_eq!(
            node.state().issuer_cert,
            issuer.cert_pem(),
            "not rotated early"
        );

        let later = due + Duration::from_secs(60);
        assert!(rotation_due(&node.store, later).expect("due"));
        maintain(&node.store, &node.site, &node.credential, later).expect("maintain");
        assert_ne!(
            node.state().issuer_cert,
            issuer.cert_pem(),
            "rotated when due"
        );
        let chain = fs::read_to_string(node.credential.chain()).expect("node.pem");
        assert!(
            chain.ends_with(&node.state().issuer_cert),
            "node.pem names the new issuer"
        );
        assert!(node.credential_verifies(later));
    }

    #[test]
    fn anchor_steps_change_the_bundle_in_order_and_refuse_out_of_order() {
        let node = Node::new();
        let now = SystemTime::now();
        let original = node.state();
        let old_anchor = status(&node.store).expect("status").anchors[0]
            .sha256
            .clone();

        let err = anchor_switch(&node.store, &node.site, &node.credential, now)
            .unwrap_err()
            .to_string();
        assert!(err.contains("trust anchor begin"), "{err}");
        let err = anchor_finish(&node.store, &node.credential, now, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no anchor rotation"), "{err}");

        anchor_begin(&node.store, &node.site, now).expect("begin");
        let begun = status(&node.store).expect("status");
        assert_eq!(begun.phase, Phase::Begun);
        assert_eq!(begun.anchors.len(), 2);
        assert_eq!(
            (begun.anchors[0].sha256.as_str(), begun.anchors[0].role),
            (old_anchor.as_str(), "current")
        );
        assert_eq!(begun.anchors[1].role, "next");
        let new_anchor = begun.anchors[1].sha256.clone();
        assert_eq!(
            node.state().issuer_cert,
            original.issuer_cert,
            "issuer unchanged"
        );
        assert_eq!(node.state().anchor_key, original.anchor_key);
        let err = anchor_begin(&node.store, &node.site, now)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already under way"), "{err}");
        let err = anchor_finish(&node.store, &node.credential, now, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("switch` first"), "{err}");
        let err = export_anchor_key(&node.store, &node.dir.path().join("a.key"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("rotation is under way"), "{err}");

        let old_leaf = node.leaf();
        anchor_switch(&node.store, &node.site, &node.credential, now).expect("switch");
        let switched = status(&node.store).expect("status");
        assert_eq!(switched.phase, Phase::Switched);
        assert_eq!(switched.anchors.len(), 2);
        assert_eq!(
            switched.issuer.signed_by.as_deref(),
            Some(new_anchor.as_str())
        );
        let err = anchor_switch(&node.store, &node.site, &node.credential, now)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already switched"), "{err}");
        assert!(
            node.verifies(&old_leaf),
            "old leaves verify while both anchors are there"
        );
        assert!(
            node.verifies(&node.leaf()),
            "a leaf signed after the switch verifies"
        );
        assert!(node.credential_verifies(now));

        let err = anchor_finish(&node.store, &node.credential, now, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--force"), "{err}");
        let later = now + LEAF_LIFETIME + Duration::from_secs(3600);
        anchor_finish(&node.store, &node.credential, later, false).expect("finish");
        let finished = status(&node.store).expect("status");
        assert_eq!(finished.phase, Phase::Steady);
        assert_eq!(finished.anchors.len(), 1);
        assert_eq!(finished.anchors[0].sha256, new_anchor);
        assert!(finished.anchor_key_on_node && !finished.next_anchor_key_on_node);
        assert!(
            finished.signing_key_on_node,
            "anchor.key is the new anchor's key"
        );
        // The old anchor's key is in no generation any more.
        let old_key = original.anchor_key.expect("old key");
        for n in node.store.generations().expect("list") {
            let key = fs::read_to_string(node.store.generation_dir(n).join(ANCHOR_KEY)).ok();
            assert_ne!(key.as_deref(), Some(old_key.as_str()), "generation {n}");
        }
        assert!(node.gens_holding(NEXT_ANCHOR_KEY).is_empty());
        assert!(
            !node.verifies(&old_leaf),
            "the old anchor is gone from the bundle"
        );
        assert!(node.credential_verifies(later));
        // And the issuer rotates under the new anchor.
        rotate_issuer(&node.store, &node.site, later).expect("rotate under the new anchor");
    }

    #[test]
    fn finish_re_signs_a_node_credential_that_chains_to_the_old_anchor() {
        let node = Node::new();
        let now = SystemTime::now();
        let old_chain = fs::read_to_string(node.credential.chain()).expect("node.pem");
        anchor_begin(&node.store, &node.site, now).expect("begin");
        anchor_switch(&node.store, &node.site, &node.credential, now).expect("switch");
        // As if the switch had been cut before the node credential was re-signed.
        pimesh_runtime::atomic_file::replace(&node.credential.chain(), old_chain.as_bytes(), 0o644)
            .expect("restore");
        let out = anchor_finish(&node.store, &node.credential, now, true).expect("finish");
        assert!(out.contains("re-signed"), "{out}");
        assert!(node.credential_verifies(now));
    }

    #[test]
    fn the_anchor_key_exports_to_a_0600_file_and_imports_back() {
        let node = Node::new();
        let original = node.state().anchor_key.expect("anchor key");
        let out = node.dir.path().join("offline/anchor.key");
        fs::create_dir(out.parent().expect("parent")).expect("mkdir");
        fs::write(&out, "something precious").expect("existing");
        let err = export_anchor_key(&node.store, &out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exists"), "{err}");
        assert_eq!(
            fs::read_to_string(&out).expect("kept"),
            "something precious"
        );
        fs::remove_file(&out).expect("rm");

        export_anchor_key(&node.store, &out).expect("export");
        assert_eq!(fs::read_to_string(&out).expect("exported"), original);
        assert_eq!(
            fs::metadata(&out).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert!(
            node.gens_holding(ANCHOR_KEY).is_empty(),
            "no generation keeps the key"
        );
        let err = rotate_issuer(&node.store, &node.site, SystemTime::now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("anchor key not on node"), "{err}");
        let (_, warning) = issuer_report(&node.store).expect("report");
        assert!(warning.expect("warning").contains("anchor key not on node"));

        let stranger = node.dir.path().join("stranger.key");
        fs::write(
            &stranger,
            Authority::new_anchor(&node.site, SystemTime::now())
                .expect("a")
                .key_pem(),
        )
        .expect("write");
        let err = import_anchor_key(&node.store, &stranger)
            .unwrap_err()
            .to_string();
        assert!(err.contains("matches none"), "{err}");

        import_anchor_key(&node.store, &out).expect("import");
        assert_eq!(node.state().anchor_key.as_deref(), Some(original.as_str()));
        let link = node.store.link().join(ANCHOR_KEY);
        assert_eq!(
            fs::metadata(&link).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        let err = import_anchor_key(&node.store, &out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already holds"), "{err}");
        rotate_issuer(&node.store, &node.site, SystemTime::now()).expect("rotate with it back");
        let (_, warning) = issuer_report(&node.store).expect("report");
        assert_eq!(warning, None);
    }
}
