//! The node-local state folder (`--state-dir`, systemd's `StateDirectory=pimesh-control`)
//! that all replicas of a node share: `servers.json` (`grants`) and `joins.jsonl`
//! (`join_records`).
//!
//! Invariant: every change to a file of the folder happens while holding the exclusive
//! `flock` of its `lock` file ([`StateDir::locked`]), so replicas of one node never
//! interleave a read-modify-write; files are replaced atomically
//! (`pimesh_runtime::atomic_file`) or appended whole lines, so a reader without the lock
//! sees an old or a new version, never a torn one.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// The folder.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    pub fn new(path: PathBuf) -> StateDir {
        StateDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `change` with the folder's exclusive lock held (blocking until it is free),
    /// creating the folder when missing. The lock is released when `change` returns.
    pub fn locked<T>(&self, change: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
        std::fs::create_dir_all(&self.path)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o640)
            .open(self.path.join("lock"))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io::Error::from(errno))?;
        let result = change(&self.path);
        drop(lock);
        result
    }
}
