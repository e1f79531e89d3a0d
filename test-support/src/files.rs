//! Files as the daemons' inputs change on a node.

use std::path::Path;

/// Writes `text` to `file` atomically (a temporary file renamed over it), as the
/// supervisor does: a new inode every time.
///
/// # Panics
/// When the file cannot be written.
pub fn replace(file: &Path, text: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|err| panic!("{}: {err}", tmp.display()));
    std::fs::rename(&tmp, file).unwrap_or_else(|err| panic!("{}: {err}", file.display()));
}

/// `path` as UTF-8 text, for command lines.
///
/// # Panics
/// When `path` is not UTF-8.
pub fn path_str(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
        .to_owned()
}

/// A new temporary folder and its path.
///
/// # Panics
/// When no folder can be made.
pub fn temp_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_owned();
    (dir, path)
}
