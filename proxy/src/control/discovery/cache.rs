//! The last good discovery document on disk, `<state-dir>/discovery.json`, so that a
//! proxy started while every control replica is down serves what the site last said.
//!
//! Invariant: the file holds exactly one document line as a replica sent it, and only one
//! that this proxy accepted; it is replaced atomically (temporary file, fsync, rename,
//! fsync of the folder), so a power cut leaves the old or the new document.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::document::{Document, DocumentError};

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

/// Why the cached document cannot be used; shown as one line naming the file.
#[derive(Debug)]
pub enum CacheError {
    Inspect {
        file: PathBuf,
        err: io::Error,
    },
    TooLarge {
        file: PathBuf,
        len: u64,
    },
    Read {
        file: PathBuf,
        err: io::Error,
    },
    /// The file holds no discovery document (the error names the file).
    Document(DocumentError),
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::Inspect { file, err } => {
                write!(f, "{}: cannot inspect: {err}", file.display())
            }
            CacheError::TooLarge { file, len } => write!(
                f,
                "{}: expected at most {MAX_BYTES} bytes, found {len}",
                file.display()
            ),
            CacheError::Read { file, err } => write!(f, "{}: cannot read: {err}", file.display()),
            CacheError::Document(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for CacheError {}

/// Reads the cached document. `Ok(None)` when there is none; an `Err` names the file.
pub fn load(file: &Path) -> Result<Option<Cached>, CacheError> {
    let meta = match std::fs::metadata(file) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(CacheError::Inspect {
                file: file.to_path_buf(),
                err,
            })
        }
    };
    if meta.len() > MAX_BYTES {
        return Err(CacheError::TooLarge {
            file: file.to_path_buf(),
            len: meta.len(),
        });
    }
    let raw = std::fs::read(file).map_err(|err| CacheError::Read {
        file: file.to_path_buf(),
        err,
    })?;
    let document =
        Document::parse(&file.display().to_string(), &raw).map_err(CacheError::Document)?;
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
        let err = load(&file).expect_err("broken").to_string();
        assert!(err.contains("discovery.json"), "{err}");
    }
}
