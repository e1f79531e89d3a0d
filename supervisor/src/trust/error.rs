//! Why something the trust root was asked to do did not happen: a step that does not fit
//! where the root stands ([`Refusal`], nothing changed), or a file that could not be used
//! ([`TrustError`], each naming the file and what was expected of it).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::SystemTime;

use pimesh_identity::{IdentityError, IssueError, LEAF_LIFETIME};

use super::store::StoreError;
use crate::credential::{CredentialError, PinMismatch};
use crate::file_error::FileError;

/// Why the trust root could not be provisioned, read, changed or used.
#[derive(Debug)]
pub enum TrustError {
    /// The step does not fit where the trust root stands; nothing changed.
    Refused(Refusal),
    /// The trust folder could not be read or changed.
    Store(StoreError),
    /// The node's own credential could not be read, signed or written.
    Credential(CredentialError),
    /// A file outside the store (on the boot partition, an exported key, the resolved
    /// trust folder) could not be used: `action` says how.
    Io(FileError),
    /// A file is not the PEM it should be: `expected` says what it should hold.
    NotPem {
        path: PathBuf,
        expected: &'static str,
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate bundle holds no certificate.
    NoCertificates { path: PathBuf },
    /// A certificate block in a bundle has no END line.
    UnterminatedCertificate { path: PathBuf },
    /// A certificate, or a certificate with its key, is not a usable authority.
    Authority {
        path: PathBuf,
        source: IdentityError,
    },
    /// A new anchor or issuer could not be made: `what` says which.
    Generate {
        what: &'static str,
        source: IdentityError,
    },
    /// The issuer refused to sign the node's own request.
    SignNode(IssueError),
    /// The anchor on the boot partition is not the one the seed's join token pins.
    Pin(PinMismatch),
    /// The seed's join token pins an anchor, and the boot partition brought no root.
    PinnedRootMissing { pinned: String },
    /// The node holds no trust root.
    NoRoot { link: PathBuf },
    /// `anchor.next.pem` is not in the bundle.
    NextNotInBundle { next: PathBuf, bundle: PathBuf },
    /// One of `anchor.next.pem` and `anchor.next.key` exists without the other.
    HalfNextAnchor { cert: PathBuf, key: PathBuf },
    /// A switched or begun rotation's generation lost its next anchor.
    NoNextAnchor { dir: PathBuf },
    /// The seed, which names the site, is not usable.
    UnusableSeed { seed: PathBuf, summary: String },
    /// `trust status` could not be encoded.
    Encode(serde_json::Error),
}

/// A lifecycle step refused because of where the trust root stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The key of the anchor that signed the issuer (`issuer_cert`) is not in `dir`.
    AnchorKeyNotOnNode { issuer_cert: PathBuf, dir: PathBuf },
    /// `trust anchor begin` while a rotation is under way (`next` exists).
    RotationUnderWay { next: PathBuf },
    /// `trust anchor switch` with no rotation begun.
    SwitchWithoutBegin,
    /// `trust anchor finish` with no rotation begun.
    FinishWithoutBegin,
    /// `trust anchor switch` a second time.
    AlreadySwitched,
    /// `trust anchor finish` before the switch.
    FinishBeforeSwitch,
    /// `trust anchor finish` within a leaf's lifetime of the switch, without `--force`.
    FinishTooSoon { safe_from: SystemTime },
    /// `trust export-anchor-key` during a rotation.
    ExportDuringRotation,
    /// `trust export-anchor-key` with no anchor key (`key`) on the node.
    AnchorKeyExported { key: PathBuf },
    /// `trust export-anchor-key FILE` where FILE exists.
    ExportTargetExists { file: PathBuf },
    /// `trust import-anchor-key` while `key` exists.
    AnchorKeyPresent { key: PathBuf },
    /// `trust import-anchor-key FILE` with a key of no anchor in `bundle`.
    KeyMatchesNoAnchor { file: PathBuf, bundle: PathBuf },
    /// `trust import-anchor-key FILE` with the next anchor's key.
    NextAnchorKey { file: PathBuf },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::AnchorKeyNotOnNode { issuer_cert, dir } => write!(
                f,
                "anchor key not on node: the key of the anchor that signed {} is not in {}; \
                 rotate the issuer with pimeshctl, or import the key first \
                 (pimesh-supervisor trust import-anchor-key FILE)",
                issuer_cert.display(),
                dir.display()
            ),
            Refusal::RotationUnderWay { next } => write!(
                f,
                "an anchor rotation is already under way ({} exists): continue with \
                 `trust anchor switch` or `trust anchor finish`",
                next.display()
            ),
            Refusal::SwitchWithoutBegin => f.write_str(
                "no anchor rotation under way: run `pimesh-supervisor trust anchor begin` first",
            ),
            Refusal::FinishWithoutBegin => f.write_str(
                "no anchor rotation under way: `trust anchor finish` ends one that \
                 `trust anchor begin` started",
            ),
            Refusal::AlreadySwitched => f.write_str(
                "already switched: the issuer is signed by the new anchor; \
                 run `pimesh-supervisor trust anchor finish`",
            ),
            Refusal::FinishBeforeSwitch => f.write_str(
                "the issuer is still signed by the old anchor: run \
                 `pimesh-supervisor trust anchor switch` first",
            ),
            Refusal::FinishTooSoon { safe_from } => write!(
                f,
                "the switch was less than {} h ago: leaves signed by the old issuer may still be in \
                 use and would stop verifying; finish after {} or pass --force",
                LEAF_LIFETIME.as_secs() / 3600,
                humantime::format_rfc3339_seconds(*safe_from)
            ),
            Refusal::ExportDuringRotation => f.write_str(
                "an anchor rotation is under way: finish it (`trust anchor switch`, `trust anchor finish`) \
                 before exporting the anchor key",
            ),
            Refusal::AnchorKeyExported { key } => write!(
                f,
                "no anchor key on this node ({} is absent): it was exported already",
                key.display()
            ),
            Refusal::ExportTargetExists { file } => {
                write!(f, "{} exists: refusing to overwrite it", file.display())
            }
            Refusal::AnchorKeyPresent { key } => write!(
                f,
                "{} exists: this node already holds its anchor key",
                key.display()
            ),
            Refusal::KeyMatchesNoAnchor { file, bundle } => write!(
                f,
                "{}: expected the PEM private key of an anchor in {}; it matches none",
                file.display(),
                bundle.display()
            ),
            Refusal::NextAnchorKey { file } => write!(
                f,
                "{}: this is the key of the next anchor, already on the node",
                file.display()
            ),
        }
    }
}

impl fmt::Display for TrustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustError::Refused(refusal) => refusal.fmt(f),
            TrustError::Store(err) => err.fmt(f),
            TrustError::Credential(err) => err.fmt(f),
            TrustError::Io(err) => err.fmt(f),
            TrustError::NotPem {
                path,
                expected,
                source,
            } => write!(f, "{}: expected {expected}: {source}", path.display()),
            TrustError::NoCertificates { path } => write!(
                f,
                "{}: expected PEM certificates, found none",
                path.display()
            ),
            TrustError::UnterminatedCertificate { path } => write!(
                f,
                "{}: a certificate block has no END line",
                path.display()
            ),
            TrustError::Authority { path, source } => write!(f, "{}: {source}", path.display()),
            TrustError::Generate { what, source } => write!(f, "cannot {what}: {source}"),
            TrustError::SignNode(err) => write!(f, "cannot sign the node's own request: {err}"),
            TrustError::Pin(mismatch) => mismatch.fmt(f),
            TrustError::PinnedRootMissing { pinned } => write!(
                f,
                "the seed's join token pins anchor {pinned} but the boot partition has no pimesh-trust/ \
                 with that anchor and its issuer (pimeshctl image configure --trust SITE_DIR)"
            ),
            TrustError::NoRoot { link } => write!(
                f,
                "no trust root at {}: only the site's init node holds one",
                link.display()
            ),
            TrustError::NextNotInBundle { next, bundle } => write!(
                f,
                "{} is not in {}: the rotation's state is broken",
                next.display(),
                bundle.display()
            ),
            TrustError::HalfNextAnchor { cert, key } => write!(
                f,
                "{} and {} must exist together",
                cert.display(),
                key.display()
            ),
            TrustError::NoNextAnchor { dir } => write!(f, "{}: no next anchor", dir.display()),
            TrustError::UnusableSeed { seed, summary } => write!(
                f,
                "the site's name comes from the seed {}, which is not usable: {summary}",
                seed.display()
            ),
            TrustError::Encode(err) => write!(f, "cannot show the status: {err}"),
        }
    }
}

impl std::error::Error for TrustError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TrustError::Refused(_)
            | TrustError::NoCertificates { .. }
            | TrustError::UnterminatedCertificate { .. }
            | TrustError::PinnedRootMissing { .. }
            | TrustError::NoRoot { .. }
            | TrustError::NextNotInBundle { .. }
            | TrustError::HalfNextAnchor { .. }
            | TrustError::NoNextAnchor { .. }
            | TrustError::UnusableSeed { .. } => None,
            TrustError::Store(err) => Some(err),
            TrustError::Credential(err) => Some(err),
            TrustError::Io(err) => Some(&err.source),
            TrustError::NotPem { source, .. } => Some(source),
            TrustError::Authority { source, .. } | TrustError::Generate { source, .. } => {
                Some(source)
            }
            TrustError::SignNode(err) => Some(err),
            TrustError::Pin(mismatch) => Some(mismatch),
            TrustError::Encode(err) => Some(err),
        }
    }
}

impl std::error::Error for Refusal {}

impl From<Refusal> for TrustError {
    fn from(refusal: Refusal) -> Self {
        TrustError::Refused(refusal)
    }
}

impl From<StoreError> for TrustError {
    fn from(err: StoreError) -> Self {
        TrustError::Store(err)
    }
}

impl From<CredentialError> for TrustError {
    fn from(err: CredentialError) -> Self {
        TrustError::Credential(err)
    }
}

impl TrustError {
    /// What to map an I/O error on `path` to, for `map_err`.
    pub fn io<'p>(
        action: &'static str,
        path: &'p std::path::Path,
    ) -> impl FnOnce(io::Error) -> Self + 'p {
        let on = FileError::on(action, path);
        move |source| TrustError::Io(on(source))
    }

    /// What to map a certificate or authority error of `path` to, for `map_err`.
    pub fn authority(path: &std::path::Path) -> impl FnOnce(IdentityError) -> Self {
        let path = path.to_path_buf();
        move |source| TrustError::Authority { path, source }
    }

    /// What to map a failure to make `what` to, for `map_err`.
    pub fn generate(what: &'static str) -> impl FnOnce(IdentityError) -> Self {
        move |source| TrustError::Generate { what, source }
    }
}
