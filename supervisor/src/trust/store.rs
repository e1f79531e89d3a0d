//! The trust folder as generations, swapped whole.
//!
//! ```text
//! /var/lib/pimesh/trust      -> trust.d/<n>   (a relative symlink: what every reader opens)
//! /var/lib/pimesh/trust.d/<n>/               (one complete generation, 0755)
//!     anchor.pem        the bundle: one or more anchors (0644)
//!     issuer.pem        the issuer, signed by an anchor of the bundle (0644)
//!     issuer.key        its key (0600, owned by `pimesh-control` when that user exists)
//!     anchor.key        the current anchor's key, until exported (0600, root)
//!     anchor.next.pem   during an anchor rotation: the new anchor (0644)
//!     anchor.next.key   during an anchor rotation: its key (0600, root)
//!     join.json         the join tokens the site accepts, as SHA-256 digests (0644:
//!                       the digest of a token's random secret reveals nothing usable)
//!     k3s-token         the site's K3s token (0600, owned by `pimesh-control` like the
//!                       issuer key: the replicas hand it to joining nodes)
//! ```
//!
//! Invariants, each holding across a power cut at any instant:
//! - a folder `trust.d/<n>` (a decimal name) is complete: it is assembled as
//!   `trust.d/<n>.new` (files fsynced, modes and owners set, folder fsynced) and renamed;
//! - `trust` always names a complete generation, or is missing only between the migration
//!   of a plain folder and the creation of the link (a start then links the highest
//!   generation); it changes by one `rename` of a new symlink over it, then the state folder
//!   is fsynced, so a reader sees the old generation or the new one, never a mix;
//! - a generation newer than the linked one is an unfinished change: a start removes it;
//! - only the linked generation and the one before it are kept, and only the linked one
//!   holds anchor keys (an exported or retired anchor key does not linger in an old one).

#[cfg(test)]
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use tracing::{debug, info, warn};

use crate::file_error::FileError;
use crate::paths::NodePaths;

pub const ANCHOR_BUNDLE: &str = "anchor.pem";
pub const ANCHOR_KEY: &str = "anchor.key";
pub const ISSUER_CERT: &str = "issuer.pem";
pub const ISSUER_KEY: &str = "issuer.key";
pub const NEXT_ANCHOR_CERT: &str = "anchor.next.pem";
pub const NEXT_ANCHOR_KEY: &str = "anchor.next.key";
/// `{"tokens": [{"sha256", "expires"?}]}` (`pimesh_join::AcceptedTokens`), read by the
/// control replicas.
pub const JOIN_TOKENS: &str = "join.json";
/// The site's K3s token (`crate::k3s::token`), read by the control replicas.
pub const K3S_TOKEN: &str = "k3s-token";

/// Whether `name` is a file the control replicas' user must own (it holds a secret they
/// use).
fn owned_by_control(name: &str) -> bool {
    name == ISSUER_KEY || name == K3S_TOKEN
}

/// The fixed system user of the control replicas, which must read the issuer key.
pub const CONTROL_USER: &str = "pimesh-control";

const DIR_MODE: u32 = 0o755;
const CERT_MODE: u32 = 0o644;
const KEY_MODE: u32 = 0o600;

/// Why the trust folder could not be read or changed. Each names the path concerned.
#[derive(Debug)]
pub enum StoreError {
    /// A file-system call failed: `action` is what it was to do to `path`.
    Io(FileError),
    /// A file that every generation holds could not be read.
    Unreadable {
        path: PathBuf,
        name: &'static str,
        source: io::Error,
    },
    /// `link` names something other than a generation.
    NotAGeneration { link: PathBuf, target: PathBuf },
    /// `link` is a plain file.
    NotALink { link: PathBuf },
    /// The trust lock could not be taken.
    Lock { path: PathBuf, source: Errno },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Io(err) => err.fmt(f),
            StoreError::Unreadable { path, name, source } => write!(
                f,
                "cannot read {} (a trust folder holds {name}): {source}",
                path.display()
            ),
            StoreError::NotAGeneration { link, target } => write!(
                f,
                "{} points to {}: expected trust.d/<generation number>",
                link.display(),
                target.display()
            ),
            StoreError::NotALink { link } => write!(
                f,
                "{} is a file: expected a link to trust.d/<n> or a folder",
                link.display()
            ),
            StoreError::Lock { path, source } => {
                write!(f, "cannot lock {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io(FileError { source, .. }) | StoreError::Unreadable { source, .. } => {
                Some(source)
            }
            StoreError::Lock { source, .. } => Some(source),
            StoreError::NotAGeneration { .. } | StoreError::NotALink { .. } => None,
        }
    }
}

/// What one generation holds. `None` fields are files the generation does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustState {
    /// `anchor.pem`: PEM certificates, one or more.
    pub anchor_bundle: String,
    pub issuer_cert: String,
    pub issuer_key: String,
    pub anchor_key: Option<String>,
    pub next_anchor_cert: Option<String>,
    pub next_anchor_key: Option<String>,
    /// `join.json`: the join tokens the site accepts.
    pub join_tokens: Option<String>,
    /// `k3s-token`: the site's K3s token.
    pub k3s_token: Option<String>,
}

impl TrustState {
    /// The files of this state with their modes, in the order they are written.
    fn files(&self) -> Vec<(&'static str, &str, u32)> {
        let mut files = vec![
            (ANCHOR_BUNDLE, self.anchor_bundle.as_str(), CERT_MODE),
            (ISSUER_CERT, self.issuer_cert.as_str(), CERT_MODE),
            (ISSUER_KEY, self.issuer_key.as_str(), KEY_MODE),
        ];
        let optional = [
            (ANCHOR_KEY, &self.anchor_key, KEY_MODE),
            (NEXT_ANCHOR_CERT, &self.next_anchor_cert, CERT_MODE),
            (NEXT_ANCHOR_KEY, &self.next_anchor_key, KEY_MODE),
            (JOIN_TOKENS, &self.join_tokens, CERT_MODE),
            (K3S_TOKEN, &self.k3s_token, KEY_MODE),
        ];
        for (name, contents, mode) in optional {
            if let Some(contents) = contents {
                files.push((name, contents.as_str(), mode));
            }
        }
        files
    }

    /// Reads a generation folder (or the plain folder of an older supervisor).
    pub fn read(dir: &Path) -> Result<TrustState, StoreError> {
        let required = |name: &'static str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|source| StoreError::Unreadable {
                path,
                name,
                source,
            })
        };
        let optional = |name: &str| {
            let path = dir.join(name);
            match fs::read_to_string(&path) {
                Ok(text) => Ok(Some(text)),
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(fail("read", &path, source)),
            }
        };
        Ok(TrustState {
            anchor_bundle: required(ANCHOR_BUNDLE)?,
            issuer_cert: required(ISSUER_CERT)?,
            issuer_key: required(ISSUER_KEY)?,
            anchor_key: optional(ANCHOR_KEY)?,
            next_anchor_cert: optional(NEXT_ANCHOR_CERT)?,
            next_anchor_key: optional(NEXT_ANCHOR_KEY)?,
            join_tokens: optional(JOIN_TOKENS)?,
            k3s_token: optional(K3S_TOKEN)?,
        })
    }
}

/// Who owns `issuer.key`: the control replicas' user when it exists on the node, else the
/// supervisor's own user (root on a node). Anchor keys always stay the supervisor's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyOwner {
    pub uid: u32,
    pub gid: u32,
}

impl KeyOwner {
    /// `pimesh-control`'s IDs, or `None` when the user does not exist (a dev host) or the
    /// user database cannot be read (logged).
    pub fn control_user() -> Option<KeyOwner> {
        match nix::unistd::User::from_name(CONTROL_USER) {
            Ok(Some(user)) => Some(KeyOwner {
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            }),
            Ok(None) => {
                debug!(
                    user = CONTROL_USER,
                    "no such user; issuer.key stays the supervisor's"
                );
                None
            }
            Err(err) => {
                warn!(user = CONTROL_USER, %err, "cannot look up the user; issuer.key stays the supervisor's");
                None
            }
        }
    }
}

/// Held while the trust folder is changed; see [`TrustStore::lock`].
pub struct TrustLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

/// The generations under a state folder. See the module doc for the layout and invariants.
#[derive(Debug, Clone)]
pub struct TrustStore {
    state_dir: PathBuf,
    issuer_key_owner: Option<KeyOwner>,
}

fn fail(action: &'static str, path: &Path, source: io::Error) -> StoreError {
    StoreError::Io(FileError::on(action, path)(source))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|err| fail("fsync the folder", dir, err))
}

fn create_dir(dir: &Path) -> Result<(), StoreError> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(fail("create", dir, err)),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
        .map_err(|err| fail("set the mode of", dir, err))
}

fn remove_if_present(path: &Path) -> Result<bool, StoreError> {
    let result = match fs::symlink_metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(fail("inspect", path, err)),
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    result.map_err(|err| fail("remove", path, err))?;
    Ok(true)
}

impl TrustStore {
    pub fn new(state_dir: &Path, issuer_key_owner: Option<KeyOwner>) -> TrustStore {
        TrustStore {
            state_dir: state_dir.to_path_buf(),
            issuer_key_owner,
        }
    }

    /// The store of a node: `issuer.key` owned by `pimesh-control` when it exists.
    pub fn on_node(paths: &NodePaths) -> TrustStore {
        TrustStore::new(&paths.state_dir, KeyOwner::control_user())
    }

    /// `<state>/trust`: the link every reader opens.
    pub fn link(&self) -> PathBuf {
        self.state_dir.join("trust")
    }

    /// `<state>/trust.d`.
    pub fn generations_dir(&self) -> PathBuf {
        self.state_dir.join("trust.d")
    }

    pub fn generation_dir(&self, n: u64) -> PathBuf {
        self.generations_dir().join(n.to_string())
    }

    /// The complete generations on disk, lowest first.
    pub fn generations(&self) -> Result<Vec<u64>, StoreError> {
        let dir = self.generations_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(fail("list", &dir, err)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|err| fail("list", &dir, err))?;
            if let Some(n) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            {
                found.push(n);
            }
        }
        found.sort_unstable();
        Ok(found)
    }

    /// The generation the link names, `None` when there is no link.
    pub fn current_generation(&self) -> Result<Option<u64>, StoreError> {
        let link = self.link();
        let target = match fs::read_link(&link) {
            Ok(target) => target,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(fail("read the link", &link, err)),
        };
        target
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse::<u64>().ok())
            .map(Some)
            .ok_or(StoreError::NotAGeneration { link, target })
    }

    /// The linked generation and what it holds; `None` when there is no trust root yet.
    pub fn current(&self) -> Result<Option<(u64, TrustState)>, StoreError> {
        let Some(n) = self.current_generation()? else {
            return Ok(None);
        };
        Ok(Some((n, TrustState::read(&self.generation_dir(n))?)))
    }

    /// Takes `<state>/trust.lock` (an exclusive `flock`, waiting for it): every
    /// read-modify-write of the trust folder holds it, so that a `trust` command and the
    /// daemon's periodic check never build on the same generation or remove each other's
    /// staging. Released when the returned guard drops.
    pub fn lock(&self) -> Result<TrustLock, StoreError> {
        fs::create_dir_all(&self.state_dir).map_err(|err| fail("create", &self.state_dir, err))?;
        let path = self.state_dir.join("trust.lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|err| fail("open", &path, err))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map(TrustLock)
            .map_err(|(_, source)| StoreError::Lock { path, source })
    }

    /// [`TrustStore::recover`] under [`TrustStore::lock`].
    pub fn recover(&self) -> Result<Option<u64>, StoreError> {
        let _lock = self.lock()?;
        self.recover_locked()
    }

    /// Brings the folder to the invariants of the module doc after whatever happened before
    /// (an older supervisor's plain folder, a cut at any step): migrates, links, removes
    /// unfinished work, prunes, fixes modes and owners of the linked generation. Returns the
    /// linked generation, `None` when there is no trust root. Idempotent. The caller holds
    /// [`TrustStore::lock`].
    pub fn recover_locked(&self) -> Result<Option<u64>, StoreError> {
        let link = self.link();
        // An older supervisor assembled the folder here and renamed it whole.
        remove_if_present(&self.state_dir.join("trust.new"))?;
        remove_if_present(&self.temp_link())?;
        match fs::symlink_metadata(&link) {
            Ok(meta) if meta.file_type().is_symlink() => {}
            Ok(meta) if meta.is_dir() => self.migrate()?,
            Ok(_) => return Err(StoreError::NotALink { link }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                // A cut between migrating a plain folder and linking it.
                if let Some(&highest) = self.generations()?.last() {
                    info!(
                        generation = highest,
                        "trust link missing; linking the newest generation"
                    );
                    self.activate(highest)?;
                }
            }
            Err(err) => return Err(fail("inspect", &link, err)),
        }
        let Some(current) = self.current_generation()? else {
            return Ok(None);
        };
        let dir = self.generations_dir();
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.ends_with(".new") {
                    warn!(dir = %entry.path().display(), "removing an unfinished trust generation");
                    remove_if_present(&entry.path())?;
                }
            }
        }
        for n in self.generations()? {
            if n > current {
                warn!(
                    generation = n,
                    current,
                    "removing a trust generation that was never linked (a cut before its swap)"
                );
                remove_if_present(&self.generation_dir(n))?;
            }
        }
        self.fix_modes(&self.generation_dir(current))?;
        self.prune(current)?;
        Ok(Some(current))
    }

    /// Turns a plain `trust/` folder into the next generation, then links it.
    fn migrate(&self) -> Result<(), StoreError> {
        let link = self.link();
        let gens = self.generations_dir();
        create_dir(&gens)?;
        sync_dir(&self.state_dir)?;
        let n = self.generations()?.last().map_or(1, |n| n + 1);
        let target = self.generation_dir(n);
        fs::set_permissions(&link, fs::Permissions::from_mode(DIR_MODE))
            .map_err(|err| fail("set the mode of", &link, err))?;
        fs::rename(&link, &target).map_err(|err| fail("move", &link, err))?;
        sync_dir(&gens)?;
        sync_dir(&self.state_dir)?;
        info!(from = %link.display(), to = %target.display(), "trust folder migrated to a generation");
        self.fix_modes(&target)?;
        self.activate(n)
    }

    /// Sets the modes and owners that the module doc promises on a generation's files.
    fn fix_modes(&self, dir: &Path) -> Result<(), StoreError> {
        for (name, mode) in [
            (ANCHOR_BUNDLE, CERT_MODE),
            (ISSUER_CERT, CERT_MODE),
            (NEXT_ANCHOR_CERT, CERT_MODE),
            (ISSUER_KEY, KEY_MODE),
            (ANCHOR_KEY, KEY_MODE),
            (NEXT_ANCHOR_KEY, KEY_MODE),
            (K3S_TOKEN, KEY_MODE),
        ] {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(|err| fail("set the mode of", &path, err))?;
            if owned_by_control(name) {
                if let Some(owner) = self.issuer_key_owner {
                    std::os::unix::fs::chown(&path, Some(owner.uid), Some(owner.gid))
                        .map_err(|err| fail("give to the control user", &path, err))?;
                }
            }
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
            .map_err(|err| fail("set the mode of", dir, err))
    }

    /// Writes `state` as generation `current + 1` (complete, fsynced, renamed into place)
    /// without linking it: the first half of [`TrustStore::commit`]. Returns its number.
    pub fn build_generation(&self, state: &TrustState) -> Result<u64, StoreError> {
        let gens = self.generations_dir();
        let fresh = !gens.exists();
        // systemd makes the state folder on a node; a run off a node may not have it yet.
        fs::create_dir_all(&self.state_dir).map_err(|err| fail("create", &self.state_dir, err))?;
        create_dir(&gens)?;
        if fresh {
            sync_dir(&self.state_dir)?;
        }
        let current = self.current_generation()?.unwrap_or(0);
        let highest = self.generations()?.last().copied().unwrap_or(0);
        let n = current.max(highest) + 1;
        let staging = gens.join(format!("{n}.new"));
        remove_if_present(&staging)?;
        create_dir(&staging)?;
        for (name, contents, mode) in state.files() {
            let path = staging.join(name);
            let owner = if owned_by_control(name) {
                self.issuer_key_owner
            } else {
                None
            };
            write_new(&path, contents.as_bytes(), mode, owner)?;
        }
        sync_dir(&staging)?;
        let target = self.generation_dir(n);
        fs::rename(&staging, &target).map_err(|err| fail("rename into", &target, err))?;
        sync_dir(&gens)?;
        debug!(generation = n, dir = %target.display(), "trust generation built");
        Ok(n)
    }

    fn temp_link(&self) -> PathBuf {
        self.state_dir.join(".trust.link-new")
    }

    /// Points `trust` at generation `n` in one rename, then fsyncs the state folder: the
    /// second half of [`TrustStore::commit`].
    pub fn activate(&self, n: u64) -> Result<(), StoreError> {
        let temp = self.temp_link();
        remove_if_present(&temp)?;
        let target = Path::new("trust.d").join(n.to_string());
        std::os::unix::fs::symlink(&target, &temp)
            .map_err(|err| fail("create the link", &temp, err))?;
        fs::rename(&temp, self.link()).map_err(|err| fail("replace", &self.link(), err))?;
        sync_dir(&self.state_dir)?;
        info!(generation = n, link = %self.link().display(), "trust generation active");
        Ok(())
    }

    /// Keeps the linked generation and the one before it; removes anchor keys from the one
    /// before (only the linked generation holds them).
    fn prune(&self, current: u64) -> Result<(), StoreError> {
        let older: Vec<u64> = self
            .generations()?
            .into_iter()
            .filter(|&n| n < current)
            .collect();
        if let Some((&previous, rest)) = older.split_last() {
            for &n in rest {
                remove_if_present(&self.generation_dir(n))?;
                debug!(generation = n, "old trust generation removed");
            }
            let dir = self.generation_dir(previous);
            let mut removed = false;
            for name in [ANCHOR_KEY, NEXT_ANCHOR_KEY] {
                removed |= remove_if_present(&dir.join(name))?;
            }
            if removed {
                sync_dir(&dir)?;
            }
        }
        Ok(())
    }

    /// Makes `state` the trust folder: a new generation, built whole, then linked; older
    /// generations pruned. Returns the new generation's number.
    pub fn commit(&self, state: &TrustState) -> Result<u64, StoreError> {
        let n = self.build_generation(state)?;
        self.activate(n)?;
        self.prune(n)?;
        Ok(n)
    }
}

/// Writes a new file with `mode` (and `owner`), fsynced. The folder is fresh staging, so
/// there is nothing to replace atomically.
fn write_new(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<KeyOwner>,
) -> Result<(), StoreError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|err| fail("create", path, err))?;
    // The mode above is filtered by the umask; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|err| fail("set the mode of", path, err))?;
    if let Some(owner) = owner {
        std::os::unix::fs::fchown(&file, Some(owner.uid), Some(owner.gid))
            .map_err(|err| fail("give to the control user", path, err))?;
    }
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|err| fail("write", path, err))
}

/// The names and permission bits of the files in `dir`: what a test checks.
#[cfg(test)]
pub fn modes(dir: &Path) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if let Ok(meta) = entry.metadata() {
                out.insert(
                    entry.file_name().to_string_lossy().into_owned(),
                    meta.permissions().mode() & 0o7777,
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(tag: &str) -> TrustState {
        TrustState {
            anchor_bundle: format!("anchor {tag}\n"),
            issuer_cert: format!("issuer {tag}\n"),
            issuer_key: format!("issuer key {tag}\n"),
            anchor_key: Some(format!("anchor key {tag}\n")),
            next_anchor_cert: None,
            next_anchor_key: None,
            join_tokens: None,
            k3s_token: None,
        }
    }

    /// What a reader of `<state>/trust/` sees.
    fn seen(dir: &Path) -> TrustState {
        TrustState::read(&dir.join("trust")).expect("the trust folder reads whole")
    }

    #[test]
    fn a_commit_swaps_the_link_and_keeps_two_generations_with_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TrustStore::new(dir.path(), None);
        assert_eq!(store.recover().expect("empty"), None);
        for (i, tag) in ["one", "two", "three"].into_iter().enumerate() {
            let n = store.commit(&state(tag)).expect("commit");
            assert_eq!(n, i as u64 + 1);
            assert_eq!(seen(dir.path()), state(tag));
        }
        assert_eq!(store.generations().expect("list"), vec![2, 3]);
        assert_eq!(
            fs::read_link(dir.path().join("trust")).expect("link"),
            Path::new("trust.d/3")
        );
        let modes = modes(&store.generation_dir(3));
        assert_eq!(modes["anchor.pem"], 0o644);
        assert_eq!(modes["issuer.pem"], 0o644);
        assert_eq!(modes["issuer.key"], 0o600);
        assert_eq!(modes["anchor.key"], 0o600);
        let dir_mode = fs::metadata(store.generation_dir(3))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o755);
        // Only the linked generation holds the anchor key.
        assert!(!store.generation_dir(2).join(ANCHOR_KEY).exists());
        assert!(store.generation_dir(2).join(ISSUER_KEY).exists());
    }

    #[test]
    fn a_cut_before_the_swap_leaves_the_old_state_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TrustStore::new(dir.path(), None);
        store.commit(&state("old")).expect("commit");
        // The cut: the new generation is built, the link not yet swapped.
        let n = store.build_generation(&state("new")).expect("build");
        assert_eq!(n, 2);
        // A staging folder half written, too.
        fs::create_dir_all(store.generations_dir().join("3.new")).expect("staging");
        fs::write(store.generations_dir().join("3.new/anchor.pem"), "torn").expect("torn");

        let after = TrustStore::new(dir.path(), None);
        assert_eq!(after.recover().expect("recover"), Some(1));
        assert_eq!(seen(dir.path()), state("old"));
        assert_eq!(after.generations().expect("list"), vec![1]);
        assert!(!after.generations_dir().join("3.new").exists());
        // The next change follows on cleanly.
        assert_eq!(after.commit(&state("again")).expect("commit"), 2);
        assert_eq!(seen(dir.path()), state("again"));
    }

    #[test]
    fn a_cut_after_the_swap_leaves_the_new_state_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TrustStore::new(dir.path(), None);
        store.commit(&state("old")).expect("commit");
        let n = store.build_generation(&state("new")).expect("build");
        store.activate(n).expect("swap");
        // The cut: before pruning (the old generation still holds its anchor key).
        assert!(store.generation_dir(1).join(ANCHOR_KEY).exists());

        let after = TrustStore::new(dir.path(), None);
        assert_eq!(after.recover().expect("recover"), Some(2));
        assert_eq!(seen(dir.path()), state("new"));
        assert!(!after.generation_dir(1).join(ANCHOR_KEY).exists());
    }

    #[test]
    fn a_plain_folder_migrates_and_a_cut_during_migration_relinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("trust");
        fs::create_dir(&plain).expect("plain");
        for (name, text) in [
            ("anchor.pem", "anchor old\n"),
            ("issuer.pem", "issuer old\n"),
            ("issuer.key", "issuer key old\n"),
            ("anchor.key", "anchor key old\n"),
        ] {
            fs::write(plain.join(name), text).expect("write");
        }
        fs::set_permissions(plain.join("issuer.key"), fs::Permissions::from_mode(0o640))
            .expect("mode");
        let store = TrustStore::new(dir.path(), None);
        assert_eq!(store.recover().expect("migrate"), Some(1));
        assert!(fs::symlink_metadata(&plain)
            .expect("link")
            .file_type()
            .is_symlink());
        assert_eq!(seen(dir.path()), state("old"));
        assert_eq!(modes(&store.generation_dir(1))["issuer.key"], 0o600);

        // A cut between the rename into trust.d/1 and the link.
        fs::remove_file(&plain).expect("unlink");
        let after = TrustStore::new(dir.path(), None);
        assert_eq!(after.recover().expect("relink"), Some(1));
        assert_eq!(seen(dir.path()), state("old"));
    }

    #[test]
    fn the_issuer_key_goes_to_the_given_owner() {
        // Whoever runs the test may give files to itself: the owner path is exercised
        // without needing the `pimesh-control` user or root.
        let dir = tempfile::tempdir().expect("tempdir");
        let me = KeyOwner {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        };
        let store = TrustStore::new(dir.path(), Some(me));
        store.commit(&state("one")).expect("commit");
        use std::os::unix::fs::MetadataExt as _;
        let meta = fs::metadata(dir.path().join("trust/issuer.key")).expect("meta");
        assert_eq!((meta.uid(), meta.gid()), (me.uid, me.gid));
        assert_eq!(meta.mode() & 0o777, 0o600);
    }
}
