//! Reading the site config (`cluster.toml`) and the checks the proxy makes beyond the
//! schema: whether this node can actually run it.

use std::io;
use std::path::Path;

use pimesh_schema::cluster::ClusterConfig;
use pimesh_schema::kube_services::KubeMesh;
use pimesh_schema::ConfigError;
use tracing::info;

/// Each proxied connection holds two descriptors: the client's socket and the backend's.
pub const DESCRIPTORS_PER_CONNECTION: u64 = 2;
/// Descriptors kept free for everything else: the admin port's connections (at most 64,
/// `admin::MAX_CONNECTIONS`), and 64 for listeners, control connections, logs and files.
pub const SPARE_DESCRIPTORS: u64 = 128;

/// A site config the proxy accepted.
///
/// Invariant: `config` was decoded from exactly the bytes whose SHA-256 is `sha256`, and
/// passed both the schema and [`check_runnable`] when it was loaded.
#[derive(Debug, Clone)]
pub struct SiteConfig {
    pub sha256: [u8; 32],
    pub config: ClusterConfig,
    /// The meshed Kubernetes Services and their routes, which discovery carries beside
    /// the config; none from a file. Not part of `sha256`, which is the config's alone.
    pub kube: KubeMesh,
}

impl SiteConfig {
    pub fn sha256_hex(&self) -> String {
        hex(&self.sha256)
    }
}

/// The hex SHA-256 of `bytes`.
pub fn sha256_hex_of(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads and checks the site config at `file`.
///
/// `Ok(None)` when there is no file at that path (not yet delivered: the proxy runs with
/// no routes). Every other failure, including a dangling symlink or an unreadable file,
/// is an `Err` naming the file and, when the fault belongs to one, the key.
pub fn load(file: &Path) -> Result<Option<SiteConfig>, ConfigError> {
    match std::fs::symlink_metadata(file) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(ConfigError::file(file, format!("cannot inspect: {err}"))),
        Ok(_) => {}
    }
    // At most MAX_SEED_BYTES and UTF-8; the returned text is the file's bytes unchanged.
    let text = pimesh_schema::seed::read_small(file)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(digest.as_ref());
    let config = ClusterConfig::parse(file, &text)?;
    check_runnable(file, &config)?;
    Ok(Some(SiteConfig {
        sha256,
        config,
        kube: KubeMesh::default(),
    }))
}

/// The checks the schema cannot make because they depend on this node and process.
///
/// Open files: `proxy.max_connections` connections need
/// `DESCRIPTORS_PER_CONNECTION * max_connections + SPARE_DESCRIPTORS` descriptors. When the
/// soft `RLIMIT_NOFILE` is lower, it is raised (up to the hard limit, which an unprivileged
/// process cannot exceed); when even the hard limit is too low, the config is refused.
/// A raised limit is never lowered again.
pub fn check_runnable(file: &Path, config: &ClusterConfig) -> Result<(), ConfigError> {
    let max_connections = config.proxy.max_connections;
    let need = descriptors_needed(max_connections);
    let refuse =
        |message: String| ConfigError::at_key(file, "", None, "proxy.max_connections", message);
    let limits = open_file_limits()
        .map_err(|err| refuse(format!("cannot read this process's open-file limit: {err}")))?;
    match plan(need, limits) {
        Plan::Fits => Ok(()),
        Plan::Raise { to } => {
            raise_soft_limit(to, limits.hard).map_err(|err| {
                refuse(format!(
                    "{max_connections} connections need {need} open files, above the soft \
                     limit {soft}, and raising it to {to} failed: {err}",
                    soft = limits.soft
                ))
            })?;
            info!(from = limits.soft, to, "raised the open-file soft limit");
            Ok(())
        }
        Plan::Refuse => Err(refuse(format!(
            "{max_connections} connections need {need} open files \
             ({DESCRIPTORS_PER_CONNECTION} per connection plus {SPARE_DESCRIPTORS} spare), \
             above this process's open-file limit {hard} (soft {soft}); lower \
             proxy.max_connections or raise LimitNOFILE= of pimesh-proxy.service",
            hard = limits.hard,
            soft = limits.soft
        ))),
    }
}

/// Descriptors `max_connections` proxied connections need, spare included. Never
/// overflows: at most `2 * u32::MAX + 64`.
pub fn descriptors_needed(max_connections: u32) -> u64 {
    DESCRIPTORS_PER_CONNECTION * u64::from(max_connections) + SPARE_DESCRIPTORS
}

/// `RLIMIT_NOFILE` of this process (`u64::MAX` stands for unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Fits,
    /// Raise the soft limit to `to` (exactly what is needed, at most the hard limit).
    Raise {
        to: u64,
    },
    Refuse,
}

fn plan(need: u64, limits: Limits) -> Plan {
    if need <= limits.soft {
        Plan::Fits
    } else if need <= limits.hard {
        Plan::Raise { to: need }
    } else {
        Plan::Refuse
    }
}

fn open_file_limits() -> nix::Result<Limits> {
    use nix::sys::resource::{getrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(Limits { soft, hard })
}

fn raise_soft_limit(to: u64, hard: u64) -> nix::Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(Resource::RLIMIT_NOFILE, to, hard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pimesh_runtime::watched::{fingerprint, Fingerprint};

    const VALID: &str = "site = \"lab\"\n[proxy]\nmax_connections = 100\n\
                         [services.web]\nport = 8080\nnodes = [\"pi-a\"]\n";

    #[test]
    fn the_descriptor_plan_raises_within_the_hard_limit_only() {
        let limits = Limits {
            soft: 1024,
            hard: 4096,
        };
        assert_eq!(plan(1024, limits), Plan::Fits);
        assert_eq!(plan(1025, limits), Plan::Raise { to: 1025 });
        assert_eq!(plan(4096, limits), Plan::Raise { to: 4096 });
        assert_eq!(plan(4097, limits), Plan::Refuse);
        let unlimited = Limits {
            soft: u64::MAX,
            hard: u64::MAX,
        };
        assert_eq!(plan(descriptors_needed(u32::MAX), unlimited), Plan::Fits);
        assert_eq!(descriptors_needed(10_000), 20_128);
    }

    #[test]
    fn a_missing_file_is_no_config_and_the_digest_is_of_the_exact_bytes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("cluster.toml");
        assert!(load(&file).expect("absent is fine").is_none());
        assert_eq!(fingerprint(&file), Fingerprint::Missing);
        std::fs::write(&file, VALID).expect("write");
        let loaded = load(&file).expect("valid").expect("present");
        let expected = ring::digest::digest(&ring::digest::SHA256, VALID.as_bytes());
        assert_eq!(&loaded.sha256[..], expected.as_ref());
        assert_eq!(loaded.sha256_hex().len(), 64);
        assert_eq!(loaded.config.services.len(), 1);
        assert!(matches!(fingerprint(&file), Fingerprint::File { .. }));
    }

    #[test]
    fn a_dangling_symlink_is_an_error_not_an_absent_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("cluster.toml");
        std::os::unix::fs::symlink(dir.path().join("nowhere.toml"), &file).expect("symlink");
        let err = load(&file).expect_err("dangling");
        assert!(err.to_string().contains("cluster.toml"), "{err}");
    }

    #[test]
    fn more_connections_than_any_open_file_limit_are_refused_by_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("cluster.toml");
        std::fs::write(&file, VALID.replace("= 100", "= 4000000000")).expect("write");
        let err = load(&file).expect_err("cannot fit");
        let text = err.to_string();
        assert_eq!(err.key.as_deref(), Some("proxy.max_connections"));
        assert!(
            text.contains("cluster.toml") && text.contains("4000000000"),
            "{text}"
        );
    }
}
