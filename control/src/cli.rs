//! The command line: `pimesh-control --replica N [--listen IP:PORT] [--trust-dir PATH]
//! [--config PATH] [--site NAME] [--node NAME] [--state-dir PATH] [--heartbeat-ttl SECS]
//! [--leaf-lifetime SECS] [--kubeconfig PATH]`, parsed by clap with the conventions of `pimesh_runtime::cli`.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory as _, Parser};
use pimesh_identity::LEAF_LIFETIME;
use pimesh_runtime::cli::{usage_error, NonEmptyPath};
use pimesh_schema::DnsLabel;

/// Replica numbers are small: the ports 8086.. must stay below other well-known ones.
pub const MAX_REPLICA: u16 = 64;
/// Replica N's port is `BASE_PORT + N` (the design's contract).
pub use pimesh_schema::supervisor::CONTROL_BASE_PORT as BASE_PORT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// 1..=[`MAX_REPLICA`].
    pub replica: u16,
    /// Default `0.0.0.0:(BASE_PORT + replica)`.
    pub listen: SocketAddr,
    pub trust_dir: PathBuf,
    pub config: PathBuf,
    pub site: Option<DnsLabel>,
    /// `--node`: the node this replica runs on (a server node, counted as one of the
    /// site's servers when joins are placed); `None`: not counted.
    pub node: Option<DnsLabel>,
    /// `--state-dir`: the node-local folder all replicas of the node share (join grants
    /// `servers.json`, join records `joins.jsonl`, the lock guarding both).
    pub state_dir: PathBuf,
    /// How long a heartbeat lasts; at least a second.
    pub heartbeat_ttl: Duration,
    /// Joins are answered `unavailable` until the replica has run this long.
    pub join_warmup: Duration,
    /// How long a signed leaf lives: at least 1 s, default [`LEAF_LIFETIME`].
    pub leaf_lifetime: Duration,
    /// `--kubeconfig`: where the replica reads meshed Kubernetes Services; `None`: it
    /// carries none.
    pub kubeconfig: Option<PathBuf>,
}

/// `--heartbeat-ttl` unless given: three of the proxies' 10 s heartbeat intervals.
pub const DEFAULT_HEARTBEAT_TTL: Duration = Duration::from_secs(30);

/// Where replica `replica` listens unless told otherwise: every address, port
/// `BASE_PORT + replica`.
pub fn default_listen(replica: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], BASE_PORT + replica))
}

/// Control replica N of a server node: signs proxy identities and serves discovery.
#[derive(Debug, Parser)]
#[command(name = "pimesh-control", args_override_self = true)]
struct Cli {
    /// This replica's number, 1..=64 [required]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=(MAX_REPLICA as i64)))]
    replica: Option<u16>,
    /// The replica's one port (default 0.0.0.0:8085+N): the identity and discovery APIs
    /// over mutual TLS, and /live and /ready in plain HTTP
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<SocketAddr>,
    /// anchor.pem (the trust bundle), issuer.pem, issuer.key
    #[arg(long, value_name = "PATH", value_parser = NonEmptyPath, default_value = "/var/lib/pimesh/trust")]
    trust_dir: PathBuf,
    /// The site config; a missing file places no service; SIGHUP or a change (polled every
    /// 2 s) reloads it and the trust folder
    #[arg(long, value_name = "PATH", value_parser = NonEmptyPath, default_value = "/etc/pimesh/cluster.toml")]
    config: PathBuf,
    /// The site, when no site config says it yet; must match the config's
    #[arg(long, value_name = "NAME", value_parser = parse_site)]
    site: Option<DnsLabel>,
    /// The node this replica runs on: counted as one of the site's server nodes when a
    /// join is placed (server or agent)
    #[arg(long, value_name = "NAME", value_parser = parse_site)]
    node: Option<DnsLabel>,
    /// Node-local state shared by the node's replicas: servers.json (server grants),
    /// joins.jsonl (the last 200 join attempts)
    #[arg(long, value_name = "PATH", value_parser = NonEmptyPath, default_value = "/var/lib/pimesh-control")]
    state_dir: PathBuf,
    /// How long a node's heartbeat keeps it in discovery, in seconds
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_HEARTBEAT_TTL.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400))]
    heartbeat_ttl: u64,
    /// Answer joins only once the replica has run this long, in seconds: on a server node
    /// that joined the site, long enough to have heard every live node (so that it places
    /// a join knowing the site's servers); 0 on the site's first server
    #[arg(long, value_name = "SECS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    join_warmup: u64,
    /// How long the leaves this replica signs live, in seconds (24 h by default; shorter
    /// for tests and benchmarks of renewal)
    #[arg(long, value_name = "SECS", default_value_t = LEAF_LIFETIME.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    leaf_lifetime: u64,
    /// A kubeconfig of this node's K3s: the replica carries the Services of namespaces
    /// labelled pimesh.dev/mesh=enabled into discovery (polled; a missing file is no K3s)
    #[arg(long, value_name = "PATH", value_parser = NonEmptyPath)]
    kubeconfig: Option<PathBuf>,
}

fn parse_site(text: &str) -> Result<DnsLabel, pimesh_schema::NameError> {
    DnsLabel::try_from(text.to_owned())
}

/// Parses the arguments, program name first. An `Err` is clap's message: the caller exits
/// with it (`clap::Error::exit`: 2 for a usage error, 0 after `--help`). Paths need not be
/// UTF-8.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Options, clap::Error> {
    let cli = Cli::try_parse_from(args)?;
    let replica = cli
        .replica
        .ok_or_else(|| usage_error(&mut Cli::command(), "--replica is required"))?;
    Ok(Options {
        replica,
        listen: cli.listen.unwrap_or_else(|| default_listen(replica)),
        trust_dir: cli.trust_dir,
        config: cli.config,
        site: cli.site,
        node: cli.node,
        state_dir: cli.state_dir,
        heartbeat_ttl: Duration::from_secs(cli.heartbeat_ttl),
        join_warmup: Duration::from_secs(cli.join_warmup),
        leaf_lifetime: Duration::from_secs(cli.leaf_lifetime),
        kubeconfig: cli.kubeconfig,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Options, clap::Error> {
        parse(
            std::iter::once("pimesh-control")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    fn options(args: &[&str]) -> Options {
        match run(args) {
            Ok(options) => options,
            Err(err) => panic!("{args:?}: {err}"),
        }
    }

    #[test]
    fn the_replica_number_picks_the_port_and_paths_default_to_the_node() {
        let one = options(&["--replica", "1"]);
        assert_eq!(one.listen.to_string(), "0.0.0.0:8086");
        assert_eq!(one.trust_dir, PathBuf::from("/var/lib/pimesh/trust"));
        assert_eq!(one.config, PathBuf::from("/etc/pimesh/cluster.toml"));
        assert_eq!(one.site, None);
        assert_eq!(one.node, None);
        assert_eq!(one.state_dir, PathBuf::from("/var/lib/pimesh-control"));
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
            "--node",
            "pi-a",
            "--state-dir=/tmp/s",
        ]);
        assert_eq!(given.node.as_ref().map(DnsLabel::as_str), Some("pi-a"));
        assert_eq!(given.state_dir, PathBuf::from("/tmp/s"));
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
        let err = |args: &[&str]| {
            let err = run(args).expect_err("refused");
            assert_eq!(err.exit_code(), 2, "{err}");
            err.to_string()
        };
        assert!(err(&[]).contains("--replica is required"));
        assert!(err(&["--replica"]).contains("a value is required"));
        assert!(err(&["--replica", "0"]).contains("1..=64"));
        assert!(err(&["--replica", "x"]).contains("'x'"));
        assert!(err(&["--frob"]).contains("--frob"));
        assert!(err(&["--replica", "1", "--listen", "localhost"]).contains("--listen"));
        assert!(err(&["--replica", "1", "--config", ""]).contains("empty"));
        assert!(err(&["--replica", "1", "--site", "Not A Label"]).contains("--site"));
        assert!(err(&["--replica", "1", "--node", "Pi A"]).contains("--node"));
        assert!(err(&["--replica", "1", "--state-dir", ""]).contains("empty"));
        assert!(err(&["--replica", "1", "--heartbeat-ttl", "0"]).contains("--heartbeat-ttl"));
        assert!(err(&["--replica", "1", "--leaf-lifetime", "0"]).contains("--leaf-lifetime"));
        assert!(err(&["--replica", "1", "--leaf-lifetime", "1h"]).contains("'1h'"));
        let help = run(&["--help"]).expect_err("help is not a run");
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        assert_eq!(help.exit_code(), 0);
    }
}
