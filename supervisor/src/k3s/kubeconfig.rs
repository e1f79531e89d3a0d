//! The control replicas' kubeconfig: on a K3s server, a copy of K3s's admin kubeconfig
//! (`/etc/rancher/k3s/k3s.yaml`, 0600 root) in the replicas' state folder
//! (`/var/lib/pimesh-control/kubeconfig`), which they read the Kubernetes API with
//! (`pimesh-control --kubeconfig`).
//!
//! Invariants:
//! - the copy has K3s's bytes, mode 0600, and belongs to `pimesh-control` when that user
//!   exists (as the trust folder's `k3s-token`, [`KeyOwner::control_user`]); it is
//!   written atomically and only when its content differs, and its owner is set right
//!   after (a replica reading in between is refused once and reads again);
//! - it is checked every few seconds (K3s writes its kubeconfig only once it has started,
//!   and again when its certificates change), and while K3s has not written one the copy is
//!   left as it is;
//! - on a node that is not a K3s server there is no copy: [`remove`] deletes it.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use tracing::info;

use crate::file_error::FileError;
use crate::trust::store::KeyOwner;

/// The copy's mode: it holds the cluster's admin credentials.
pub const MODE: u32 = 0o600;

/// Where the copy stands after [`keep`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// K3s has not written its kubeconfig yet.
    Waiting,
    /// The copy is K3s's kubeconfig; `changed` when it was written now.
    Copied { changed: bool },
}

/// Makes `copy` a copy of `admin` owned by `owner` (see the module doc).
pub fn keep(admin: &Path, copy: &Path, owner: Option<KeyOwner>) -> Result<Kept, FileError> {
    let bytes = match fs::read(admin) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Kept::Waiting),
        Err(err) => return Err(FileError::on("read", admin)(err)),
    };
    let changed = pimesh_runtime::atomic_file::replace(copy, &bytes, MODE)
        .map_err(FileError::on("write", copy))?;
    if let Some(owner) = owner {
        let meta = fs::metadata(copy).map_err(FileError::on("inspect", copy))?;
        if (meta.uid(), meta.gid()) != (owner.uid, owner.gid) {
            std::os::unix::fs::chown(copy, Some(owner.uid), Some(owner.gid))
                .map_err(FileError::on("give to the control user", copy))?;
        }
    }
    if changed {
        info!(from = %admin.display(), to = %copy.display(), "the control replicas' kubeconfig follows K3s's");
    }
    Ok(Kept::Copied { changed })
}

/// Deletes `copy` when it is there; `Ok(true)` when it was.
pub fn remove(copy: &Path) -> Result<bool, FileError> {
    match fs::remove_file(copy) {
        Ok(()) => {
            info!(file = %copy.display(), "the control replicas' kubeconfig removed: this node is not a K3s server");
            Ok(true)
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(FileError::on("remove", copy)(err)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::paths::NodePaths;

    #[test]
    fn the_copy_follows_k3s_kubeconfig_and_goes_when_the_node_is_no_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = NodePaths::under(dir.path());
        let (admin, copy) = (paths.k3s_admin_kubeconfig(), paths.control_kubeconfig());
        assert_eq!(
            copy,
            dir.path().join("var/lib/pimesh-control/kubeconfig"),
            "in the replicas' state folder"
        );
        // Ownership changes need root: off it, the copy stays the test's own.
        let owner = nix::unistd::Uid::effective().is_root().then_some(KeyOwner {
            uid: 65534,
            gid: 65534,
        });

        assert_eq!(keep(&admin, &copy, owner).expect("waits"), Kept::Waiting);
        assert!(!copy.exists());

        fs::create_dir_all(admin.parent().expect("parent")).expect("mkdir");
        fs::write(&admin, "apiVersion: v1\nkind: Config\n").expect("admin");
        assert_eq!(
            keep(&admin, &copy, owner).expect("copied"),
            Kept::Copied { changed: true }
        );
        assert_eq!(
            fs::read_to_string(&copy).expect("copy"),
            "apiVersion: v1\nkind: Config\n"
        );
        let meta = fs::metadata(&copy).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        if let Some(owner) = owner {
            assert_eq!((meta.uid(), meta.gid()), (owner.uid, owner.gid));
        }
        assert_eq!(
            keep(&admin, &copy, owner).expect("same"),
            Kept::Copied { changed: false }
        );

        fs::write(&admin, "apiVersion: v1\nkind: Config\n# new certificates\n").expect("admin");
        assert_eq!(
            keep(&admin, &copy, owner).expect("again"),
            Kept::Copied { changed: true }
        );
        assert!(fs::read_to_string(&copy)
            .expect("copy")
            .contains("new certificates"));

        assert!(remove(&copy).expect("removed"));
        assert!(!copy.exists());
        assert!(!remove(&copy).expect("nothing to remove"));
    }
}
