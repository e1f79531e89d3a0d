//! The last good discovery document on disk, `<state-dir>/discovery.json`, so that a
//! proxy started while every control replica is down serves what the site last said.
//!
//! Invariant: the file holds exactly one document line as a replica sent it, and only one
//! that this proxy accepted; it is replaced atomically (temporary file, fsync, rename,
//! fsync of the folder), so a power cut leaves the old or the new document.

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::document::Document;

/// The cache file in `state_dir`.
pub fn file(state_dir: &Path) -> PathBuf {
    state_dir.join("discovery.json")
}

/// Largest cache file read: a site config is at most a few hundred KiB.
const MAX_BYTES: u64 = 4 * 1024 * 1024;

/// A document read back from the cache, with when it was written.
#[derive(Debug)]
pub struct Cached {
    pub document: Document,
    pub raw: Vec<u8>,
    pub written: SystemTime,
}

/// Reads the cached document. `Ok(None)` when there is none; an `Err` names the file.
pub fn load(file: &Path) -> Result<Option<Cached>, String> {
    let meta = match std::fs::metadata(file) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(format!("{}: cannot inspect: {err}", file.display())),
    };
    if meta.len() > MAX_BYTES {
        return Err(format!(
            "{}: expected at most {MAX_BYTES} bytes, found {}",
            file.display(),
            meta.len()
        ));
    }
    let raw =
        std::fs::read(file).map_err(|err| format!("{}: cannot read: {err}", file.display()))?;
    let document = Document::parse(&file.display().to_string(), &raw)?;
    Ok(Some(Cached {
        document,
        raw,
        written: meta.modified().unwrap_or_else(|_| SystemTime::now()),
    }))
}

/// Replaces the cached document with `raw` (one document line), atomically, mode 0600.
pub fn store(file: &Path, raw: &[u8]) -> io::Result<()> {
    pimesh_runtime::atomic_file::replace(file, raw, 0o600).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_document_loads_back_and_garbage_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = file(&dir.path().join("state"));
        assert!(load(&file).expect("absent is fine").is_none());
        let line = br#"{"version":"v1","site":"lab","config":null,"nodes":{"a":"10.0.0.1:4143"}}"#;
        store(&file, line).expect("stored");
        let cached = load(&file).expect("valid").expect("present");
        assert_eq!(cached.document.version, "v1");
        assert_eq!(cached.raw, line);
        std::fs::write(&file, "{").expect("write");
        let err = load(&file).expect_err("broken");
        assert!(err.contains("discovery.json"), "{err}");
    }
}
