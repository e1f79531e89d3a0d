//! The on-disk queue of one exporter: encoded batches its collector did not take yet, one
//! file each, sent again oldest first.
//!
//! A batch is the exact request body (Zipkin JSON or OTLP protobuf) in a file named
//! `<seq>-<spans>.spans` (`seq`: 20 digits, increasing; `spans`: how many spans it holds,
//! so that a file whose content is lost can still be counted). The file is a header
//! (magic, span count, body length, SHA-256 of the body) and the body.
//!
//! Invariants:
//! - A file is written atomically (`pimesh_runtime::atomic_file`: temporary file, fsync,
//!   rename, fsync of the folder): after a power cut a batch file is whole or absent.
//!   Temporaries left by a cut are removed at [`DiskQueue::open`].
//! - The files' total size never exceeds `max_bytes`: room is made (oldest first) before
//!   a batch is written, and a batch larger than the bound is not kept at all.
//! - A file that does not read back as it was written (header, length, digest, name) is
//!   removed and reported, never sent and never a panic.
//! - One process at a time: the folder is held with an exclusive `flock` on `lock`, so
//!   two proxies pointed at one folder never send a batch twice.
//!
//! Every method does blocking file I/O: call them from a blocking thread.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use ring::digest::{digest, SHA256};

/// The first bytes of every batch file (and its format version).
const MAGIC: &[u8; 14] = b"PIMESH-SPANS1\n";
const DIGEST_LEN: usize = 32;
const HEADER_LEN: usize = MAGIC.len() + 8 + 8 + DIGEST_LEN;
const SUFFIX: &str = ".spans";

/// One batch file, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    seq: u64,
    spans: u64,
    /// The file's size on disk (header included).
    size: u64,
}

impl Entry {
    fn name(&self) -> String {
        format!("{:020}-{}{SUFFIX}", self.seq, self.spans)
    }
}

/// What [`DiskQueue::open`] found and cleared.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Opened {
    /// Batch files whose name could not be read (removed; their spans are unknown).
    pub corrupt_files: u64,
}

/// What [`DiskQueue::push`] did.
#[derive(Debug, Default)]
pub(super) struct Pushed {
    /// The batch is on disk.
    pub kept: bool,
    /// Spans of older batches removed to make room.
    pub evicted_spans: u64,
    /// Why the batch is not on disk although it fits.
    pub error: Option<io::Error>,
}

/// The oldest batch, as [`DiskQueue::oldest`] read it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Oldest {
    Batch {
        body: Vec<u8>,
        spans: u64,
    },
    /// Unreadable or not as written: already removed; `spans` from its name.
    Corrupt {
        spans: u64,
        reason: String,
    },
}

/// One exporter's queue folder, held by this process.
#[derive(Debug)]
pub(super) struct DiskQueue {
    dir: PathBuf,
    max_bytes: u64,
    /// Oldest first.
    entries: VecDeque<Entry>,
    bytes: u64,
    next_seq: u64,
    _lock: Flock<File>,
}

impl DiskQueue {
    /// Opens (creating it, mode 0700) and locks `dir`, removes temporaries and batch files
    /// whose name cannot be read, and takes up the batches a previous process left (sent
    /// before anything newer). When they exceed `max_bytes` the oldest are removed at the
    /// next [`DiskQueue::push`]. Err when the folder cannot be made, read or locked (held
    /// by another process).
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<(DiskQueue, Opened)> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("lock"))?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("held by another process ({errno})"),
                )
            })?;
        let mut opened = Opened::default();
        let mut entries = Vec::new();
        for item in fs::read_dir(dir)? {
            let item = item?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.contains(".tmp-") {
                // A write cut short (atomic_file's temporary): never a batch.
                let _ = fs::remove_file(item.path());
                continue;
            }
            if !name.ends_with(SUFFIX) {
                continue;
            }
            match (parse_name(&name), item.metadata()) {
                (Some((seq, spans)), Ok(meta)) if meta.is_file() => entries.push(Entry {
                    seq,
                    spans,
                    size: meta.len(),
                }),
                _ => {
                    let _ = fs::remove_file(item.path());
                    opened.corrupt_files += 1;
                }
            }
        }
        entries.sort_by_key(|entry| entry.seq);
        let next_seq = entries.last().map_or(0, |entry| entry.seq + 1);
        let bytes = entries.iter().map(|entry| entry.size).sum();
        Ok((
            DiskQueue {
                dir: dir.to_owned(),
                max_bytes,
                entries: entries.into(),
                bytes,
                next_seq,
                _lock: lock,
            },
            opened,
        ))
    }

    /// Batches on disk.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Spans on disk.
    pub fn spans(&self) -> u64 {
        self.entries.iter().map(|entry| entry.spans).sum()
    }

    /// The files' total size.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes `body` (holding `spans` spans) as the newest batch, first removing the
    /// oldest batches while the bound would be passed. A body that cannot fit even in an
    /// empty queue is not kept (nothing is removed for it); nor is one whose file cannot
    /// be written (`error`; what was removed for it stays removed and is reported).
    pub fn push(&mut self, body: &[u8], spans: u64) -> Pushed {
        let size = (HEADER_LEN + body.len()) as u64;
        if size > self.max_bytes {
            return Pushed::default();
        }
        let mut pushed = Pushed {
            evicted_spans: self.make_room(size),
            ..Pushed::default()
        };
        let entry = Entry {
            seq: self.next_seq,
            spans,
            size,
        };
        self.next_seq += 1;
        let mut contents = Vec::with_capacity(HEADER_LEN + body.len());
        contents.extend_from_slice(MAGIC);
        contents.extend_from_slice(&spans.to_le_bytes());
        contents.extend_from_slice(&(body.len() as u64).to_le_bytes());
        contents.extend_from_slice(digest(&SHA256, body).as_ref());
        contents.extend_from_slice(body);
        let path = self.dir.join(entry.name());
        match pimesh_runtime::atomic_file::replace(&path, &contents, 0o600) {
            Ok(_) => {
                self.bytes += size;
                self.entries.push_back(entry);
                pushed.kept = true;
            }
            Err(err) => pushed.error = Some(err),
        }
        pushed
    }

    /// Removes the oldest batches until `size` more bytes fit; the spans removed.
    fn make_room(&mut self, size: u64) -> u64 {
        let mut evicted = 0;
        while self.bytes + size > self.max_bytes {
            let Some(oldest) = self.entries.pop_front() else {
                break;
            };
            let _ = fs::remove_file(self.dir.join(oldest.name()));
            self.bytes = self.bytes.saturating_sub(oldest.size);
            evicted += oldest.spans;
        }
        evicted
    }

    /// Reads the oldest batch (it stays queued until [`DiskQueue::remove_oldest`]). A
    /// batch that does not read back as written is removed and returned as
    /// [`Oldest::Corrupt`]. `None` when the queue is empty.
    pub fn oldest(&mut self) -> Option<Oldest> {
        let entry = *self.entries.front()?;
        let path = self.dir.join(entry.name());
        match fs::read(&path)
            .map_err(|err| err.to_string())
            .and_then(|contents| check(&contents, entry.spans).map(|()| contents))
        {
            Ok(mut contents) => Some(Oldest::Batch {
                body: contents.split_off(HEADER_LEN),
                spans: entry.spans,
            }),
            Err(reason) => {
                self.remove_oldest();
                Some(Oldest::Corrupt {
                    spans: entry.spans,
                    reason: format!("{}: {reason}", path.display()),
                })
            }
        }
    }

    /// Removes the oldest batch (sent, refused or unreadable).
    pub fn remove_oldest(&mut self) {
        if let Some(oldest) = self.entries.pop_front() {
            let _ = fs::remove_file(self.dir.join(oldest.name()));
            self.bytes = self.bytes.saturating_sub(oldest.size);
        }
    }
}

/// `<seq>-<spans>.spans` → (seq, spans).
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(SUFFIX)?;
    let (seq, spans) = stem.split_once('-')?;
    if seq.len() != 20 || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if spans.is_empty() || !spans.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((seq.parse().ok()?, spans.parse().ok()?))
}

/// Whether `contents` is a batch file of `spans` spans, whole and unchanged.
fn check(contents: &[u8], spans: u64) -> Result<(), String> {
    let Some((header, body)) = contents.split_at_checked(HEADER_LEN) else {
        return Err(format!("{} bytes, shorter than the header", contents.len()));
    };
    let (magic, rest) = header.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err("not a span batch (wrong magic)".into());
    }
    let (count, rest) = rest.split_at(8);
    let (length, expected_digest) = rest.split_at(8);
    let count = u64::from_le_bytes(count.try_into().map_err(|_| "header")?);
    let length = u64::from_le_bytes(length.try_into().map_err(|_| "header")?);
    if count != spans {
        return Err(format!("holds {count} spans, its name says {spans}"));
    }
    if length != body.len() as u64 {
        return Err(format!(
            "body of {} bytes, its header says {length}",
            body.len()
        ));
    }
    if digest(&SHA256, body).as_ref() != expected_digest {
        return Err("the body does not match its digest".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name != "lock")
            .collect();
        names.sort();
        names
    }

    fn dir_bytes(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name() != "lock")
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }

    fn batch(queue: &mut DiskQueue) -> Option<(Vec<u8>, u64)> {
        match queue.oldest()? {
            Oldest::Batch { body, spans } => Some((body, spans)),
            corrupt => panic!("{corrupt:?}"),
        }
    }

    #[test]
    fn batches_come_back_oldest_first_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut queue, opened) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(opened, Opened::default());
        assert!(queue.push(b"first", 2).kept);
        assert!(queue.push(b"second", 3).kept);
        assert_eq!((queue.len(), queue.spans()), (2, 5));
        assert_eq!(queue.bytes(), dir_bytes(dir.path()));
        assert_eq!(batch(&mut queue), Some((b"first".to_vec(), 2)));
        // Reading does not remove; a second process cannot take the folder meanwhile.
        assert_eq!(batch(&mut queue), Some((b"first".to_vec(), 2)));
        let err = DiskQueue::open(dir.path(), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("another process"), "{err}");
        drop(queue);

        // A temporary left by a power cut is removed, never read as a batch.
        fs::write(
            dir.path().join(".00000000000000000009-1.spans.tmp-42"),
            b"half",
        )
        .unwrap();
        let (mut queue, _) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(queue.len(), 2);
        assert_eq!(batch(&mut queue), Some((b"first".to_vec(), 2)));
        queue.remove_oldest();
        assert!(queue.push(b"third", 1).kept);
        assert_eq!(batch(&mut queue), Some((b"second".to_vec(), 3)));
        queue.remove_oldest();
        assert_eq!(batch(&mut queue), Some((b"third".to_vec(), 1)));
        queue.remove_oldest();
        assert!(queue.is_empty());
        assert_eq!(queue.oldest(), None);
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }

    #[test]
    fn the_bound_drops_the_oldest_and_is_never_passed() {
        let dir = tempfile::tempdir().unwrap();
        let body = [7u8; 100];
        let file = (HEADER_LEN + body.len()) as u64;
        let max = file * 3 + file / 2;
        let (mut queue, _) = DiskQueue::open(dir.path(), max).unwrap();
        let mut evicted = 0;
        for spans in 1..=10 {
            let pushed = queue.push(&body, spans);
            assert!(pushed.kept);
            evicted += pushed.evicted_spans;
            assert!(dir_bytes(dir.path()) <= max, "{}", dir_bytes(dir.path()));
        }
        // Three fit: 8, 9 and 10 remain, 1 to 7 were dropped oldest first.
        assert_eq!(evicted, (1..=7).sum::<u64>());
        assert_eq!(queue.spans(), 8 + 9 + 10);
        assert_eq!(batch(&mut queue).unwrap().1, 8);
        // A batch larger than the whole bound is not kept and removes nothing.
        let pushed = queue.push(&vec![0u8; max as usize], 99);
        assert!(!pushed.kept && pushed.evicted_spans == 0 && pushed.error.is_none());
        assert_eq!(queue.len(), 3);
    }

    #[test]
    fn corrupt_files_are_removed_and_reported_with_their_spans() {
        let dir = tempfile::tempdir().unwrap();
        let (mut queue, _) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        queue.push(b"one", 1);
        queue.push(b"two", 2);
        queue.push(b"three", 3);
        drop(queue);
        let files = names(dir.path());
        // The first flipped in its body, the second truncated; a stray name too.
        let first = dir.path().join(&files[0]);
        let mut contents = fs::read(&first).unwrap();
        *contents.last_mut().unwrap() ^= 1;
        fs::write(&first, contents).unwrap();
        fs::write(dir.path().join(&files[1]), b"PIMESH").unwrap();
        fs::write(dir.path().join("garbage.spans"), b"x").unwrap();
        fs::write(dir.path().join("README"), b"not ours").unwrap();

        let (mut queue, opened) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(opened.corrupt_files, 1, "garbage.spans");
        assert!(!dir.path().join("garbage.spans").exists());
        assert!(
            dir.path().join("README").exists(),
            "not a batch: left alone"
        );
        match queue.oldest().unwrap() {
            Oldest::Corrupt { spans, reason } => {
                assert_eq!(spans, 1);
                assert!(reason.contains("digest"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        match queue.oldest().unwrap() {
            Oldest::Corrupt { spans, reason } => {
                assert_eq!(spans, 2);
                assert!(reason.contains("shorter than the header"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(batch(&mut queue), Some((b"three".to_vec(), 3)));
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.bytes(), dir_bytes(dir.path()) - 8, "README");
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(parse_name("00000000000000000042-7.spans"), Some((42, 7)));
        for bad in [
            "42-7.spans",
            "00000000000000000042-.spans",
            "00000000000000000042-x.spans",
            "00000000000000000042-7.span",
            "0000000000000000004a-7.spans",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }
}
