//! The command line: `pimesh-control --replica N [--listen IP:PORT] [--trust-dir PATH]
//! [--config PATH] [--site NAME] [--heartbeat-ttl SECS] [--leaf-lifetime SECS]`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pimesh_identity::LEAF_LIFETIME;
use pimesh_schema::DnsLabel;

pub const USAGE: &str = "\
usage: pimesh-control --replica N [--listen IP:PORT] [--trust-dir PATH] [--config PATH] [--site NAME]
                      [--heartbeat-ttl SECS] [--leaf-lifetime SECS]
  --replica N         this replica's number, 1..=64
  --listen IP:PORT    the replica's one port (default 0.0.0.0:8085+N): the identity and
                      discovery APIs over mutual TLS, and /live and /ready in plain HTTP
  --trust-dir PATH    anchor.pem (the trust bundle), issuer.pem, issuer.key
                      (default /var/lib/pimesh/trust)
  --config PATH       the site config (default /etc/pimesh/cluster.toml); a missing file
                      places no service; SIGHUP or a change (polled every 2 s) reloads it
                      and the trust folder
  --site NAME         the site, when no site config says it yet; must match the config's
  --heartbeat-ttl SECS  how long a node's heartbeat keeps it in discovery (default 30)
  --leaf-lifetime SECS  how long the leaves this replica signs live (default 86400, 24 h;
                      shorter for tests and benchmarks of renewal)";

/// Replica numbers are small: the ports 8086.. must stay below other well-known ones.
pub const MAX_REPLICA: u16 = 64;
/// Replica N's port is `BASE_PORT + N` (the design's contract).
pub use pimesh_schema::supervisor::CONTROL_BASE_PORT as BASE_PORT;

/// What the replica was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run(Options),
    /// `--help`: print [`USAGE`] and exit 0.
    Help,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// 1..=[`MAX_REPLICA`].
    pub replica: u16,
    /// Default `0.0.0.0:(BASE_PORT + replica)`.
    pub listen: SocketAddr,
    pub trust_dir: PathBuf,
    pub config: PathBuf,
    pub site: Option<DnsLabel>,
    /// How long a heartbeat lasts; at least a second.
    pub heartbeat_ttl: Duration,
    /// How long a signed leaf lives: at least 1 s, default [`LEAF_LIFETIME`].
    pub leaf_lifetime: Duration,
}

/// `--heartbeat-ttl` unless given: three of the proxies' 10 s heartbeat intervals.
pub const DEFAULT_HEARTBEAT_TTL: Duration = Duration::from_secs(30);

/// Where replica `replica` listens unless told otherwise: every address, port
/// `BASE_PORT + replica`.
pub fn default_listen(replica: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], BASE_PORT + replica))
}

/// Parses the arguments after the program name. An `Err` is a one-line message for
/// stderr; the caller adds [`USAGE`] and exits 2. Paths need not be UTF-8.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut replica = None;
    let mut listen = None;
    let mut trust_dir = PathBuf::from("/var/lib/pimesh/trust");
    let mut config = PathBuf::from("/etc/pimesh/cluster.toml");
    let mut site = None;
    let mut heartbeat_ttl = DEFAULT_HEARTBEAT_TTL;
    let mut leaf_lifetime = LEAF_LIFETIME;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(flag) = arg.to_str() else {
            return Err(format!("unknown option {arg:?}"));
        };
        // `--flag=value` and `--flag value` both work.
        let (flag, inline) = match flag.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(OsString::from(value))),
            _ => (flag, None),
        };
        let mut value = |flag: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag {
            "-h" | "--help" => return Ok(Command::Help),
            "--replica" => {
                let value = value(flag)?;
                let text = value.to_string_lossy();
                let number = text
                    .parse::<u16>()
                    .ok()
                    .filter(|n| (1..=MAX_REPLICA).contains(n))
                    .ok_or_else(|| {
                        format!("--replica: expected a number in 1..={MAX_REPLICA}, found {text:?}")
                    })?;
                replica = Some(number);
            }
            "--listen" => {
                let value = value(flag)?;
                let text = value.to_string_lossy();
                listen = Some(text.parse().map_err(|err| {
                    format!("--listen: expected IP:PORT, found {text:?} ({err})")
                })?);
            }
            "--trust-dir" | "--config" => {
                let value = value(flag)?;
                if value.is_empty() {
                    return Err(format!("{flag}: expected a path, found an empty string"));
                }
                if flag == "--config" {
                    config = PathBuf::from(value);
                } else {
                    trust_dir = PathBuf::from(value);
                }
            }
            "--site" => {
                let value = value(flag)?;
                let text = value.to_string_lossy().into_owned();
                site = Some(DnsLabel::try_from(text).map_err(|err| format!("--site: {err}"))?);
            }
            "--heartbeat-ttl" => {
                let value = value(flag)?;
                let text = value.to_string_lossy();
                let seconds = text
                    .parse::<u64>()
                    .ok()
                    .filter(|s| (1..=86_400).contains(s));
                heartbeat_ttl = seconds.map(Duration::from_secs).ok_or_else(|| {
                    format!("--heartbeat-ttl: expected seconds in 1..=86400, found {text:?}")
                })?;
            }
            "--leaf-lifetime" => {
                let value = value(flag)?;
                let text = value.to_string_lossy();
                let secs = text
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s >= 1)
                    .ok_or_else(|| {
                        format!(
                            "--leaf-lifetime: expected a number of seconds >= 1, found {text:?}"
                        )
                    })?;
                leaf_lifetime = Duration::from_secs(secs);
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    let replica = replica.ok_or("--replica is required")?;
    Ok(Command::Run(Options {
        replica,
        listen: listen.unwrap_or_else(|| default_listen(replica)),
        trust_dir,
        config,
        site,
        heartbeat_ttl,
        leaf_lifetime,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from))
    }

    fn options(args: &[&str]) -> Options {
        match run(args) {
            Ok(Command::Run(options)) => options,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn the_replica_number_picks_the_port_and_paths_default_to_the_node() {
        let one = options(&["--replica", "1"]);
        assert_eq!(one.listen.to_string(), "0.0.0.0:8086");
        assert_eq!(one.trust_dir, PathBuf::from("/var/lib/pimesh/trust"));
        assert_eq!(one.config, PathBuf::from("/etc/pimesh/cluster.toml"));
        assert_eq!(one.site, None);
        assert_eq!(one.heartbeat_ttl, Duration::from_secs(30));
        assert_eq!(one.leaf_lifetime, LEAF_LIFETIME);
        assert_eq!(options(&["--replica=3"]).listen.to_string(), "0.0.0.0:8088");
    }

    #[test]
    fn every_flag_in_both_spellings() {
        let given = options(&[
            "--listen",
            "127.0.0.1:9000",
            "--trust-dir=/tmp/t",
            "--config",
            "/tmp/c.toml",
            "--site=depot-7",
            "--leaf-lifetime",
            "6",
            "--replica",
            "2",
            "--heartbeat-ttl=5",
        ]);
        assert_eq!(given.heartbeat_ttl, Duration::from_secs(5));
        assert_eq!(given.replica, 2);
        assert_eq!(given.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(given.trust_dir, PathBuf::from("/tmp/t"));
        assert_eq!(given.config, PathBuf::from("/tmp/c.toml"));
        assert_eq!(given.site.as_ref().map(DnsLabel::as_str), Some("depot-7"));
        assert_eq!(given.leaf_lifetime, Duration::from_secs(6));
    }

    #[test]
    fn bad_arguments_are_named() {
        let err = |args: &[&str]| run(args).expect_err("refused");
        assert!(err(&[]).contains("--replica is required"));
        assert!(err(&["--replica"]).contains("needs a value"));
        assert!(err(&["--replica", "0"]).contains("1..=64"));
        assert!(err(&["--replica", "x"]).contains("\"x\""));
        assert!(err(&["--frob"]).contains("--frob"));
        assert!(err(&["--replica", "1", "--listen", "localhost"]).contains("--listen"));
        assert!(err(&["--replica", "1", "--config", ""]).contains("empty"));
        assert!(err(&["--replica", "1", "--site", "Not A Label"]).contains("--site"));
        assert!(err(&["--replica", "1", "--heartbeat-ttl", "0"]).contains("--heartbeat-ttl"));
        assert!(err(&["--replica", "1", "--leaf-lifetime", "0"]).contains("--leaf-lifetime"));
        assert!(err(&["--replica", "1", "--leaf-lifetime", "1h"]).contains("\"1h\""));
        assert_eq!(run(&["--help"]), Ok(Command::Help));
    }
}
