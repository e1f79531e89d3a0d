use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// Creates `path` with mode 0600 (0644 when `public`) and writes `contents`, refusing to
/// overwrite an existing file: site keys are made once.
pub fn create(path: &Path, contents: &[u8], public: bool) -> Result<(), crate::Failure> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if public { 0o644 } else { 0o600 })
        .open(path)
        .map_err(|err| format!("cannot create {}: {err}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    Ok(())
}

/// Replaces `path` atomically with `contents` (mode as [`create`]): the new contents go
/// into `<path>.new` through [`create`], are synced, and are renamed over `path`; the
/// folder is synced after. A reader sees the old file or the new one, never a mix; a
/// `<path>.new` left by an interrupted run is removed first.
pub fn replace(path: &Path, contents: &[u8], public: bool) -> Result<(), crate::Failure> {
    let mut staged = path.as_os_str().to_owned();
    staged.push(".new");
    let staged = std::path::PathBuf::from(staged);
    match std::fs::remove_file(&staged) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(format!("cannot remove {}: {err}", staged.display()).into()),
    }
    create(&staged, contents, public)?;
    std::fs::rename(&staged, path).map_err(|err| {
        format!(
            "cannot rename {} to {}: {err}",
            staged.display(),
            path.display()
        )
    })?;
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::File::open(folder)
        .and_then(|dir| dir.sync_all())
        .map_err(|err| format!("cannot sync {}: {err}", folder.display()))?;
    Ok(())
}
