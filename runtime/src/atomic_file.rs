//! Replacing a file so that a power cut at any instant leaves the old or the new content,
//! never a torn file: write a temporary file beside it, fsync, rename over, fsync the folder.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// Atomically replaces `path` with `contents`, created with permission bits `mode`. Creates
/// the parent folder (mode 0755) when missing. Returns `Ok(false)` without writing when the
/// file already has exactly these contents and mode.
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<bool> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(current) = fs::read(path) {
        let current_mode = fs::metadata(path)?.permissions().mode() & 0o7777;
        if current == contents && current_mode == mode {
            return Ok(false);
        }
    }
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent folder"))?;
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let temp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        // `mode` above is filtered by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map(|()| true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn replaces_contents_and_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/keys");
        assert!(replace(&path, b"one\n", 0o600).expect("first write"));
        assert!(
            !replace(&path, b"one\n", 0o600).expect("same"),
            "unchanged content is not rewritten"
        );
        assert!(replace(&path, b"two\n", 0o644).expect("second write"));
        assert_eq!(fs::read(&path).expect("read"), b"two\n");
        assert_eq!(
            fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o644
        );
        let names: Vec<_> = fs::read_dir(dir.path().join("sub"))
            .expect("list")
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .expect("entries");
        assert_eq!(names, vec![std::ffi::OsString::from("keys")]);
    }
}
