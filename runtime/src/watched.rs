//! A value loaded from files and loaded again when they change: the site config, the node
//! identity, a replica's trust folder.
//!
//! A [`Watched`] knows the files its value is read from and the last value that loaded; the
//! daemon says how to load (a function of the value in use, so that a load can keep parts of
//! it) and when: at start, on each [`Trigger`] from [`Triggers`] (SIGHUP at once; every
//! [`POLL_EVERY`] a look at the files' metadata, reloading only when it changed), or at any
//! time it chooses. Readers hold a `watch` receiver of [`Current`]: the value in use with
//! the problem of the last attempt, replaced whole after every attempt.
//!
//! Invariants:
//! - a failed load never replaces the value in use ([`Load::Failed`] keeps it; only the
//!   problem is published); a partial one ([`Load::Partly`]) is the loader's own blend of
//!   new and kept parts, published with its problem;
//! - the files' [`Fingerprint`]s are taken just before each attempt, so a change that races
//!   with a load is seen by the next poll;
//! - a problem is logged as a warning once, when it differs from the last one logged; the
//!   same problem again (each retry, each SIGHUP with the same bad file) is logged at debug
//!   level only, until a load succeeds.

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tracing::{debug, warn};

/// How often [`Triggers`] asks for a look at the files.
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// What identifies one version of a file cheaply, without reading it: a change of any part
/// means "reload". Follows symlinks, so a retargeted link counts as a change.
///
/// Blind spot, accepted: an in-place rewrite of the same length within one tick of the file
/// system's clock keeps (mtime, size, inode); SIGHUP covers it, and writers that replace by
/// rename (a new inode) are always seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fingerprint {
    Missing,
    /// `stat` failed for another reason than absence.
    Unreadable(io::ErrorKind),
    File {
        dev: u64,
        ino: u64,
        len: u64,
        mtime: i64,
        mtime_nsec: i64,
    },
}

pub fn fingerprint(file: &Path) -> Fingerprint {
    match std::fs::metadata(file) {
        Ok(meta) => Fingerprint::File {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        },
        Err(err) if err.kind() == io::ErrorKind::NotFound => Fingerprint::Missing,
        Err(err) => Fingerprint::Unreadable(err.kind()),
    }
}

/// What one load attempt gave.
#[derive(Debug)]
pub enum Load<T, E> {
    /// Everything loaded: this is the value in use from now on.
    Loaded(T),
    /// Some parts loaded and others kept their version from the value in use: the blend is
    /// in use from now on, and the attempt counts as failed (logged, retried).
    Partly(T, E),
    /// Nothing loaded: the value in use stays.
    Failed(E),
}

impl<T, E> From<Result<T, E>> for Load<T, E> {
    fn from(result: Result<T, E>) -> Load<T, E> {
        match result {
            Ok(value) => Load::Loaded(value),
            Err(problem) => Load::Failed(problem),
        }
    }
}

/// How an attempt ended, for the caller's own logs and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Loaded,
    Partly,
    Failed,
}

/// One attempt that [`Watched::poll`] or [`Watched::on`] made, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// `"file change"`, `"retry"` or `"SIGHUP"`.
    pub trigger: &'static str,
    pub outcome: Outcome,
}

/// What readers see.
#[derive(Debug, Clone)]
pub struct Current<T, E> {
    /// The value in use: the last that loaded (in full or in part), or the initial one.
    pub value: T,
    /// Why the last attempt failed, in full or in part; `None` when it loaded in full (or
    /// before the first attempt).
    pub problem: Option<E>,
}

/// The files a value is read from, the value in use and its readers; see the module
/// documentation.
pub struct Watched<T, E> {
    what: &'static str,
    files: Vec<PathBuf>,
    /// The files as they were just before the last attempt; `None` before the first.
    seen: Option<Vec<Fingerprint>>,
    retry_failures: bool,
    loaded_once: bool,
    sender: watch::Sender<Current<T, E>>,
    /// The problem last logged as a warning; cleared by a full load.
    last_warned: Option<String>,
}

impl<T, E: fmt::Display> Watched<T, E> {
    /// `what` names the value in logs ("site config"); `files` are those whose change means
    /// reload; `initial` is in use until a load succeeds. Nothing is loaded yet.
    pub fn new(what: &'static str, files: Vec<PathBuf>, initial: T) -> Watched<T, E> {
        let (sender, _) = watch::channel(Current {
            value: initial,
            problem: None,
        });
        Watched {
            what,
            files,
            seen: None,
            retry_failures: false,
            loaded_once: false,
            sender,
            last_warned: None,
        }
    }

    /// Makes [`Watched::poll`] also load again, with the files unchanged, while the last
    /// attempt failed (in full or in part): for inputs written one file at a time, where
    /// one attempt may see a mix.
    pub fn retrying_failures(mut self) -> Watched<T, E> {
        self.retry_failures = true;
        self
    }

    pub fn subscribe(&self) -> watch::Receiver<Current<T, E>> {
        self.sender.subscribe()
    }

    /// The value in use and the last attempt's problem, borrowed: hold it briefly (a
    /// reload waits for it).
    pub fn current(&self) -> watch::Ref<'_, Current<T, E>> {
        self.sender.borrow()
    }

    /// Whether the last attempt failed, in full or in part.
    pub fn failing(&self) -> bool {
        self.sender.borrow().problem.is_some()
    }

    /// Loads now (`trigger` says why, for the logs): at start, on SIGHUP, on request.
    pub fn reload(&mut self, trigger: &str, load: impl FnOnce(&T) -> Load<T, E>) -> Outcome {
        self.attempt(trigger, self.fingerprints(), load)
    }

    /// Loads when a file changed since the last attempt or, with
    /// [`Watched::retrying_failures`], when the last attempt failed; `None` when neither.
    pub fn poll(&mut self, load: impl FnOnce(&T) -> Load<T, E>) -> Option<Attempt> {
        let now = self.fingerprints();
        let trigger = if self.seen.as_ref() != Some(&now) {
            "file change"
        } else if self.retry_failures && self.failing() {
            "retry"
        } else {
            return None;
        };
        let outcome = self.attempt(trigger, now, load);
        Some(Attempt { trigger, outcome })
    }

    /// What to do on `trigger`: load at once on SIGHUP, [`Watched::poll`] on a poll.
    pub fn on(&mut self, trigger: Trigger, load: impl FnOnce(&T) -> Load<T, E>) -> Option<Attempt> {
        match trigger {
            Trigger::Hangup => Some(Attempt {
                trigger: "SIGHUP",
                outcome: self.reload("SIGHUP", load),
            }),
            Trigger::Poll => self.poll(load),
        }
    }

    /// Replaces the value in use outside a load (a renewed certificate made from it); the
    /// problem of the last attempt stays.
    pub fn update(&mut self, value: T) {
        self.sender.send_modify(|current| current.value = value);
    }

    fn fingerprints(&self) -> Vec<Fingerprint> {
        self.files.iter().map(|file| fingerprint(file)).collect()
    }

    fn attempt(
        &mut self,
        trigger: &str,
        seen: Vec<Fingerprint>,
        load: impl FnOnce(&T) -> Load<T, E>,
    ) -> Outcome {
        self.seen = Some(seen);
        let loaded = load(&self.sender.borrow().value);
        match loaded {
            Load::Loaded(value) => {
                self.loaded_once = true;
                self.last_warned = None;
                self.sender.send_replace(Current {
                    value,
                    problem: None,
                });
                Outcome::Loaded
            }
            Load::Partly(value, problem) => {
                self.loaded_once = true;
                self.warn(trigger, &problem, "loaded in part");
                self.sender.send_replace(Current {
                    value,
                    problem: Some(problem),
                });
                Outcome::Partly
            }
            Load::Failed(problem) => {
                let consequence = if self.loaded_once {
                    "refused; keeping the one in use"
                } else {
                    "not loaded; none in use yet"
                };
                self.warn(trigger, &problem, consequence);
                self.sender
                    .send_modify(|current| current.problem = Some(problem));
                Outcome::Failed
            }
        }
    }

    fn warn(&mut self, trigger: &str, problem: &E, consequence: &str) {
        let text = problem.to_string();
        if self.last_warned.as_deref() == Some(text.as_str()) {
            debug!(trigger, "{} {consequence} (as before): {text}", self.what);
        } else {
            warn!(trigger, "{} {consequence}: {text}", self.what);
            self.last_warned = Some(text);
        }
    }
}

/// When a daemon's watched values are looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP: load at once.
    Hangup,
    /// [`POLL_EVERY`] has passed: load what changed.
    Poll,
}

/// SIGHUP and the poll clock, for a daemon's main loop.
#[derive(Debug)]
pub struct Triggers {
    hangup: Option<Signal>,
    poll: tokio::time::Interval,
}

impl Triggers {
    /// Installs the SIGHUP handler now (its default action ends the process: install it
    /// before anything could send one) and starts the poll clock, whose first tick comes
    /// [`POLL_EVERY`] from now.
    pub fn install() -> io::Result<Triggers> {
        let hangup = signal(SignalKind::hangup())?;
        let start = tokio::time::Instant::now() + POLL_EVERY;
        let mut poll = tokio::time::interval_at(start, POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Triggers {
            hangup: Some(hangup),
            poll,
        })
    }

    /// The next trigger.
    pub async fn next(&mut self) -> Trigger {
        let hangup = async {
            match &mut self.hangup {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = hangup => match received {
                Some(()) => Trigger::Hangup,
                None => {
                    // The signal driver is gone: only the clock is left.
                    self.hangup = None;
                    Trigger::Poll
                }
            },
            _ = self.poll.tick() => Trigger::Poll,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Reads a number from `file`: the value; anything else is refused.
    fn load_number(file: &Path) -> Load<u32, String> {
        let text = std::fs::read_to_string(file).map_err(|err| format!("cannot read: {err}"));
        text.and_then(|text| {
            text.trim()
                .parse()
                .map_err(|_| format!("not a number: {:?}", text.trim()))
        })
        .into()
    }

    /// Replaces `file` by rename, as the supervisor does: a new inode every time.
    fn replace(file: &Path, text: &str) {
        let temp = file.with_extension("tmp");
        std::fs::write(&temp, text).expect("write");
        std::fs::rename(&temp, file).expect("rename");
    }

    #[test]
    fn a_refused_file_keeps_the_last_good_value_until_a_good_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("n");
        let mut watched = Watched::new("number", vec![file.clone()], 0);
        let current = watched.subscribe();

        assert_eq!(
            watched.reload("start", |_| load_number(&file)),
            Outcome::Failed
        );
        assert_eq!(current.borrow().value, 0, "the initial value stays");
        assert!(current
            .borrow()
            .problem
            .as_deref()
            .is_some_and(|p| p.contains("cannot read")));

        replace(&file, "7\n");
        assert_eq!(
            watched.reload("test", |_| load_number(&file)),
            Outcome::Loaded
        );
        assert_eq!(current.borrow().value, 7);
        assert!(current.borrow().problem.is_none());

        replace(&file, "seven\n");
        assert_eq!(
            watched.reload("test", |_| load_number(&file)),
            Outcome::Failed
        );
        assert_eq!(current.borrow().value, 7, "the last good value stays");
        assert!(current
            .borrow()
            .problem
            .as_deref()
            .is_some_and(|p| p.contains("seven")));

        replace(&file, "8\n");
        watched.reload("test", |_| load_number(&file));
        assert_eq!(current.borrow().value, 8);
        assert!(current.borrow().problem.is_none());
    }

    #[test]
    fn a_poll_loads_only_what_changed_since_the_last_attempt() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        replace(&a, "1");
        let mut watched: Watched<u32, String> = Watched::new("sum", vec![a.clone(), b.clone()], 0);
        let loads = std::cell::Cell::new(0);
        let sum = |_: &u32| {
            loads.set(loads.get() + 1);
            let read = |f: &Path| {
                std::fs::read_to_string(f)
                    .ok()
                    .and_then(|t| t.parse::<u32>().ok())
            };
            Load::Loaded(read(&a).unwrap_or(0) + read(&b).unwrap_or(0))
        };
        let first = watched.poll(sum);
        assert_eq!(
            first.map(|a| a.trigger),
            Some("file change"),
            "never looked at yet"
        );
        assert!(watched.poll(sum).is_none(), "nothing changed");
        assert_eq!(loads.get(), 1);

        replace(&b, "2");
        assert_eq!(
            watched.poll(sum),
            Some(Attempt {
                trigger: "file change",
                outcome: Outcome::Loaded
            })
        );
        assert_eq!(watched.subscribe().borrow().value, 3);
        std::fs::remove_file(&a).expect("rm");
        assert!(watched.poll(sum).is_some(), "a removed file is a change");
        assert_eq!(watched.subscribe().borrow().value, 2);
        assert!(watched.poll(sum).is_none());
        assert_eq!(loads.get(), 3);
    }

    #[test]
    fn a_partial_load_is_in_use_and_retried_until_it_loads_in_full() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("n");
        replace(&file, "1");
        let mut watched: Watched<(u32, u32), String> =
            Watched::new("pair", vec![file.clone()], (0, 0)).retrying_failures();
        let mut second_part_ready = false;
        let load = |previous: &(u32, u32), ready: bool| {
            let first = match load_number(&file) {
                Load::Loaded(n) => n,
                _ => previous.0,
            };
            if ready {
                Load::Loaded((first, 2))
            } else {
                Load::Partly((first, previous.1), "second part missing".to_owned())
            }
        };
        let outcome = watched.reload("start", |p| load(p, second_part_ready));
        assert_eq!(outcome, Outcome::Partly);
        assert_eq!(watched.subscribe().borrow().value, (1, 0));
        assert!(watched.failing());

        // Files unchanged, but the last attempt failed: the poll tries again.
        let retry = watched.poll(|p| load(p, second_part_ready));
        assert_eq!(retry.map(|a| a.trigger), Some("retry"));
        second_part_ready = true;
        let retry = watched.poll(|p| load(p, second_part_ready));
        assert_eq!(
            retry,
            Some(Attempt {
                trigger: "retry",
                outcome: Outcome::Loaded
            })
        );
        assert_eq!(watched.subscribe().borrow().value, (1, 2));
        assert!(
            watched.poll(|p| load(p, second_part_ready)).is_none(),
            "loaded in full"
        );
    }

    #[test]
    fn an_update_replaces_the_value_and_keeps_the_problem() {
        let mut watched: Watched<u32, String> = Watched::new("n", Vec::new(), 1);
        watched.reload("start", |_| Load::Failed("broken".to_owned()));
        watched.update(5);
        let current = watched.subscribe();
        assert_eq!(current.borrow().value, 5);
        assert_eq!(current.borrow().problem.as_deref(), Some("broken"));
    }

    /// A log sink for one test: what the `fmt` layer wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn warnings_containing(&self, needle: &str) -> usize {
            let bytes = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter(|line| line.contains("WARN") && line.contains(needle))
                .count()
        }
    }

    #[test]
    fn each_distinct_problem_is_warned_about_once() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let dir = tempfile::tempdir().expect("temp dir");
            let file = dir.path().join("n");
            let mut watched = Watched::new("number", vec![file.clone()], 0).retrying_failures();
            replace(&file, "x");
            watched.reload("start", |_| load_number(&file));
            for _ in 0..3 {
                watched.poll(|_| load_number(&file));
                watched.reload("SIGHUP", |_| load_number(&file));
            }
            assert_eq!(captured.warnings_containing("\"x\""), 1);
            replace(&file, "y");
            watched.poll(|_| load_number(&file));
            watched.poll(|_| load_number(&file));
            assert_eq!(captured.warnings_containing("\"y\""), 1);
            // A success in between: the same problem again is news.
            replace(&file, "1");
            watched.poll(|_| load_number(&file));
            replace(&file, "y");
            watched.poll(|_| load_number(&file));
            assert_eq!(captured.warnings_containing("\"y\""), 2);
        });
    }

    #[test]
    fn fingerprints_tell_absent_present_and_replaced_files_apart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("f");
        assert_eq!(fingerprint(&file), Fingerprint::Missing);
        replace(&file, "one");
        let first = fingerprint(&file);
        assert!(
            matches!(first, Fingerprint::File { len: 3, .. }),
            "{first:?}"
        );
        replace(&file, "two");
        assert_ne!(fingerprint(&file), first, "a rename is a new inode");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).expect("symlink");
        assert_eq!(fingerprint(&link), Fingerprint::Missing, "a dangling link");
    }

    #[tokio::test]
    async fn sighup_is_a_trigger_and_does_not_end_the_process() {
        let mut triggers = Triggers::install().expect("install");
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).expect("raise");
        let trigger = tokio::time::timeout(Duration::from_secs(20), triggers.next())
            .await
            .expect("a trigger");
        assert_eq!(trigger, Trigger::Hangup);
        let trigger = tokio::time::timeout(POLL_EVERY * 10, triggers.next())
            .await
            .expect("the poll clock ticks");
        assert_eq!(trigger, Trigger::Poll);
    }
}
