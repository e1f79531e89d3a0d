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
