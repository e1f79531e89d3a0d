//! One failed file-system step on one path: the error every part of the supervisor that
//! reads or writes the node's files reports when the file system says no.
//!
//! Invariant: the message always names the step and the path ("cannot read
//! /var/lib/pimesh/…: Permission denied"), so a journal line alone says which file to
//! look at and what was being done to it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// `action` ("read", "create", "rename", …) on `path` failed with `source`.
#[derive(Debug)]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

impl FileError {
    /// The `map_err` adapter for `action` on `path`; the path is copied only on failure.
    pub fn on<'p>(
        action: &'static str,
        path: &'p Path,
    ) -> impl FnOnce(io::Error) -> FileError + 'p {
        move |source| FileError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot {} {}: {}",
            self.action,
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_step_the_path_and_the_cause() {
        let err = FileError::on("read", Path::new("/var/lib/pimesh/x"))(io::Error::from(
            io::ErrorKind::PermissionDenied,
        ));
        assert_eq!(
            err.to_string(),
            "cannot read /var/lib/pimesh/x: permission denied"
        );
        assert_eq!(err.source.kind(), io::ErrorKind::PermissionDenied);
    }
}
