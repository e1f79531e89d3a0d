//! What Pimesh's integration tests and benchmarks share, so that each crate's tests say
//! what they check and not how to set it up.
//!
//! - [`ports`]: free loopback ports, below the kernel's ephemeral range.
//! - [`wait`]: waiting for a condition with a generous deadline, never a fixed sleep.
//! - [`binary`]: the workspace's binaries, from `CARGO_BIN_EXE_*` or built on demand.
//! - [`daemon`]: a binary as a child process with its log, killed when dropped.
//! - [`pki`]: a site's trust root, node credentials, identity and trust folders.
//! - [`tls`], [`http`]: clients for the daemons' mTLS and plain HTTP ports.
//! - [`join`]: a joining node's client (pinned anchor, no client certificate) and `join.json`.
//! - [`backends`]: HTTP, TCP echo and span-collector servers in the test process.
//! - [`proxy`], [`control`], [`central`]: the daemons as fixtures.
//! - [`control_plane`]: a site's control plane: trust folder, site config, N replicas.
//! - [`relay`]: a TCP relay that can swallow connections, as a dead or hung server does.
//! - [`files`]: files changed as the supervisor changes them.
//! - [`postgres`]: a real PostgreSQL server in a temporary folder, on a Unix socket only.
//!
//! Every fixture panics with a message naming what failed (and the daemon's log): a
//! fixture that cannot set up fails the test that asked for it.

// Fixtures panic by design: a test that cannot set up has failed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

pub mod backends;
pub mod binary;
pub mod central;
pub mod control;
pub mod control_plane;
pub mod daemon;
pub mod files;
pub mod http;
pub mod join;
pub mod pki;
pub mod ports;
pub mod postgres;
pub mod proxy;
pub mod relay;
pub mod tls;
pub mod wait;

pub use binary::{text, Binary};
pub use daemon::Daemon;
pub use files::{path_str, replace, temp_dir};
pub use pki::{label, Credential, PemCredential, Site, DAY};
pub use ports::{free_addr, free_port};
pub use wait::{wait_until, wait_until_blocking, DEADLINE};
