//! How long the datastore's disk takes to make a write durable: etcd's heartbeat and
//! elections wait on exactly that (its WAL `fsync`s), and a worn SD card takes seconds.
//!
//! [`probe`] writes 4 KiB at the start of one file in the datastore folder and `fsync`s
//! it, timed; it blocks, so the caller runs it on a blocking thread and gives up waiting
//! after [`TIMEOUT`]. [`Window`] keeps the last hour's figures.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::file_error::FileError;

/// The probe's file, in the datastore folder (`/var/lib/rancher`); rewritten in place.
pub const FILE_NAME: &str = ".pimesh-fsync-probe";

/// How often the probe runs (besides once as soon as the datastore is settled). Each
/// probe costs the disk its 4 KiB and the filesystem's journal commit (about 8 KiB of
/// writes on ext4 as measured): every 10 minutes that is about 1.2 MB a day on the SD
/// card, where every minute was 12 MB — more than all the rest of Pimesh writes.
pub const EVERY: Duration = Duration::from_secs(600);

/// How long the caller waits for one probe.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// What the window remembers.
const HOUR: Duration = Duration::from_secs(3600);

/// Writes 4 KiB at the start of `file` (made 0600 if missing) and `fsync`s it; returns
/// how long the write and the `fsync` took together. Blocks.
///
/// A failure names the step and the file (whose name, [`FILE_NAME`], says it is the probe's).
pub fn probe(file: &Path) -> Result<Duration, FileError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut handle = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(file)
        .map_err(FileError::on("open", file))?;
    // Not all zeros, so that no filesystem can skip the block.
    let block = [0x5a_u8; 4096];
    let started = Instant::now();
    handle
        .write_all(&block)
        .map_err(FileError::on("write", file))?;
    handle.sync_all().map_err(FileError::on("fsync", file))?;
    Ok(started.elapsed())
}

/// The figures of the last hour.
#[derive(Debug, Default)]
pub struct Window {
    samples: VecDeque<(Instant, Duration)>,
}

impl Window {
    /// Adds the probe that ended at `at`, forgetting those more than an hour older.
    pub fn record(&mut self, at: Instant, took: Duration) {
        self.samples.push_back((at, took));
        while self
            .samples
            .front()
            .is_some_and(|(then, _)| at.saturating_duration_since(*then) > HOUR)
        {
            self.samples.pop_front();
        }
    }

    pub fn last(&self) -> Option<Duration> {
        self.samples.back().map(|(_, took)| *took)
    }

    /// The slowest probe of the last hour.
    pub fn max(&self) -> Option<Duration> {
        self.samples.iter().map(|(_, took)| *took).max()
    }
}

/// A duration in milliseconds, to the hundredth.
pub fn millis(took: Duration) -> f64 {
    (took.as_secs_f64() * 100_000.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_writes_and_syncs_one_block_and_the_window_keeps_an_hour() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(FILE_NAME);
        probe(&file).expect("probed");
        probe(&file).expect("probed again");
        assert_eq!(std::fs::metadata(&file).expect("file").len(), 4096);
        let err = probe(&dir.path().join("missing/probe")).expect_err("no folder");
        assert_eq!(err.action, "open");
        assert!(err.to_string().contains("missing/probe"), "{err}");

        let start = Instant::now();
        let mut window = Window::default();
        window.record(start, Duration::from_millis(900));
        window.record(start + Duration::from_secs(60), Duration::from_millis(3));
        assert_eq!(window.max(), Some(Duration::from_millis(900)));
        window.record(start + Duration::from_secs(3700), Duration::from_millis(5));
        assert_eq!(window.last(), Some(Duration::from_millis(5)));
        assert_eq!(window.max(), Some(Duration::from_millis(5)));
        assert_eq!(millis(Duration::from_micros(1234)), 1.23);
    }
}
