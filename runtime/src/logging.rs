//! Structured logs: to the journal when systemd started us with output to the journal,
//! to stderr otherwise.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. The level comes from `RUST_LOG` (default `info`). When
/// one is installed already, it stays.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    // systemd sets JOURNAL_STREAM when stdout/stderr go to the journal.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            let _ = registry.with(journald).try_init();
            return;
        }
    }
    let _ = registry
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .try_init();
}
