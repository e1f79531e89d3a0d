//! The command line: `pimesh-proxy [--admin-addr IP:PORT] [--config PATH] ...`, parsed by
//! clap with the conventions of `pimesh_runtime::cli`.
//!
//! Invariant of the parsed [`Options`]: `server_replicas` is empty unless `role` is
//! [`Role::Server`] (a node runs replicas only as a server).

use std::ffi::OsString;
use std::fmt;
use std::net::{AddrParseError, IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use pimesh_runtime::cli::NonEmptyPath;

/// `--state-dir` when neither the flag nor `$STATE_DIRECTORY` says.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pimesh-proxy";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub admin_addr: SocketAddr,
    pub config: PathBuf,
    /// `None`: the default places (see `--help`).
    pub identity_dir: Option<PathBuf>,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub local_ip: IpAddr,
    /// The control replicas, in the order given; empty: no replicas (the node credential
    /// is the identity, as before they existed).
    pub control: Vec<SocketAddr>,
    pub state_dir: PathBuf,
    /// `--role`: what the site made this node, told to the replicas in heartbeats;
    /// `None`: not told (a node from before the join protocol).
    pub role: Option<Role>,
    /// `--server-replicas`: the ports of this node's own control replicas, heartbeated
    /// with `role = "server"`; empty unless `role` is `Some(Role::Server)`.
    pub server_replicas: Vec<u16>,
}

/// What the site made this node (the join protocol's placement).
pub use pimesh_join::Role;

impl Default for Options {
    fn default() -> Self {
        Options {
            admin_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 4191)),
            config: PathBuf::from("/etc/pimesh/cluster.toml"),
            identity_dir: None,
            inbound_addr: SocketAddr::from(([0, 0, 0, 0], 4143)),
            outbound_addr: SocketAddr::from(([0, 0, 0, 0], 4140)),
            local_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            control: Vec::new(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            role: None,
            server_replicas: Vec::new(),
        }
    }
}

/// The node's mesh proxy.
#[derive(Debug, Parser)]
#[command(name = "pimesh-proxy", args_override_self = true)]
struct Cli {
    /// /live, /ready, /config, /metrics; loopback unless said otherwise (a LAN scraper
    /// is opted in with 0.0.0.0:4191: the admin port has no authentication)
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:4191")]
    admin_addr: SocketAddr,
    /// The site config; a missing file means no site config yet, and SIGHUP or a change
    /// reloads it
    #[arg(long, value_name = "PATH", value_parser = NonEmptyPath, default_value = "/etc/pimesh/cluster.toml")]
    config: PathBuf,
    /// node.pem (leaf and issuer), node.key, anchor.pem (default: the unit's credentials
    /// directory, else the supervisor's files under /var/lib/pimesh); reloaded on SIGHUP
    /// and on change
    #[arg(long, value_name = "DIR", value_parser = NonEmptyPath)]
    identity_dir: Option<PathBuf>,
    /// mTLS from other nodes' proxies
    #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:4143")]
    inbound_addr: SocketAddr,
    /// The HTTP proxy port for local apps, and the target of iptables redirects (from this
    /// node's processes and from its pods' bridge): on another address than loopback only
    /// redirected connections are served
    #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:4140")]
    outbound_addr: SocketAddr,
    /// Where services' local ports listen
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    local_ip: IpAddr,
    /// The site's control replicas (IP:PORT each); with them the proxy gets its workload
    /// identity from them, authenticating with the node credential, and renews it
    /// (default: none, the node credential alone is the identity); the replicas of the
    /// server nodes the discovery stream lists are added to these (at most 64 in all)
    #[arg(long, value_name = "ADDR[,ADDR...]", value_parser = parse_replicas)]
    control: Option<Replicas>,
    /// Where the proxy keeps what it learnt (identity/: the last leaf, its key and the
    /// trust bundle) (default $STATE_DIRECTORY, else /var/lib/pimesh-proxy)
    #[arg(long, value_name = "PATH", value_parser = NonEmptyPath)]
    state_dir: Option<PathBuf>,
    /// What the site made this node, `server` or `agent`, sent to the replicas in every
    /// heartbeat (default: not sent)
    #[arg(long, value_name = "ROLE", value_parser = parse_role)]
    role: Option<Role>,
    /// With `--role server`: the ports of this node's own control replicas, sent in
    /// heartbeats so that every proxy of the site learns them from discovery and fails
    /// over to them too
    #[arg(long, value_name = "PORT[,PORT...]", value_parser = parse_ports)]
    server_replicas: Option<Ports>,
}

/// `--role`'s value that is neither `server` nor `agent`.
#[derive(Debug)]
struct RoleError(String);

impl fmt::Display for RoleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "expected server or agent, found {:?}", self.0)
    }
}

impl std::error::Error for RoleError {}

fn parse_role(text: &str) -> Result<Role, RoleError> {
    match text {
        "server" => Ok(Role::Server),
        "agent" => Ok(Role::Agent),
        other => Err(RoleError(other.to_owned())),
    }
}

/// `--server-replicas`' list, given as one comma-separated value.
#[derive(Debug, Clone)]
struct Ports(Vec<u16>);

/// An entry of `--server-replicas`' list that is not a port in 1..=65535.
#[derive(Debug)]
struct PortError(String);

impl fmt::Display for PortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "expected PORT[,PORT...] (each in 1..=65535), found {:?}",
            self.0
        )
    }
}

impl std::error::Error for PortError {}

fn parse_ports(text: &str) -> Result<Ports, PortError> {
    text.split(',')
        .map(|port| {
            port.trim()
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| PortError(port.to_owned()))
        })
        .collect::<Result<_, _>>()
        .map(Ports)
}

/// `--control`'s list, given as one comma-separated value.
#[derive(Debug, Clone)]
struct Replicas(Vec<SocketAddr>);

/// An entry of `--control`'s list that is not an address.
#[derive(Debug)]
struct ReplicaError {
    entry: String,
    err: AddrParseError,
}

impl fmt::Display for ReplicaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "expected IP:PORT[,IP:PORT...], found {:?} ({})",
            self.entry, self.err
        )
    }
}

impl std::error::Error for ReplicaError {}

fn parse_replicas(text: &str) -> Result<Replicas, ReplicaError> {
    text.split(',')
        .map(|addr| {
            addr.trim().parse().map_err(|err| ReplicaError {
                entry: addr.to_owned(),
                err,
            })
        })
        .collect::<Result<_, _>>()
        .map(Replicas)
}

/// Parses the arguments, program name first. An `Err` is clap's message: the caller exits
/// with it (`clap::Error::exit`: 2 for a usage error, 0 after `--help`). Paths need not be
/// UTF-8.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Options, clap::Error> {
    parse_with(args, std::env::var_os("STATE_DIRECTORY"))
}

/// [`parse`] with `$STATE_DIRECTORY` given (systemd's `StateDirectory=`): the default of
/// `--state-dir` when set and not empty.
fn parse_with(
    args: impl IntoIterator<Item = OsString>,
    state_directory: Option<OsString>,
) -> Result<Options, clap::Error> {
    let cli = Cli::try_parse_from(args)?;
    let server_replicas = cli.server_replicas.map(|ports| ports.0).unwrap_or_default();
    if !server_replicas.is_empty() && cli.role != Some(Role::Server) {
        return Err(<Cli as clap::CommandFactory>::command().error(
            clap::error::ErrorKind::ArgumentConflict,
            "--server-replicas needs --role server: only a server node runs replicas",
        ));
    }
    let state_dir = cli
        .state_dir
        .or_else(|| {
            state_directory
                .filter(|dir| !dir.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    Ok(Options {
        admin_addr: cli.admin_addr,
        config: cli.config,
        identity_dir: cli.identity_dir,
        inbound_addr: cli.inbound_addr,
        outbound_addr: cli.outbound_addr,
        local_ip: cli.local_ip,
        control: cli.control.map(|replicas| replicas.0).unwrap_or_default(),
        state_dir,
        role: cli.role,
        server_replicas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("pimesh-proxy")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn run(args: &[&str]) -> Result<Options, clap::Error> {
        parse_with(argv(args), None)
    }

    fn refused(args: &[&str]) -> String {
        let err = run(args).expect_err("refused");
        assert_eq!(err.exit_code(), 2, "{err}");
        err.to_string()
    }

    #[test]
    fn defaults_are_the_node_paths() {
        assert_eq!(run(&[]).expect("defaults"), Options::default());
        let options = Options::default();
        assert_eq!(
            options.admin_addr.to_string(),
            "127.0.0.1:4191",
            "the admin port is not on the LAN unless the operator says so"
        );
        assert_eq!(options.config, PathBuf::from("/etc/pimesh/cluster.toml"));
    }

    #[test]
    fn both_flags_in_both_spellings() {
        let expected = Options {
            admin_addr: "127.0.0.1:9000".parse().expect("valid address"),
            config: PathBuf::from("/tmp/c.toml"),
            ..Options::default()
        };
        assert_eq!(
            run(&["--admin-addr", "127.0.0.1:9000", "--config", "/tmp/c.toml"]).expect("valid"),
            expected
        );
        assert_eq!(
            run(&["--config=/tmp/c.toml", "--admin-addr=127.0.0.1:9000"]).expect("valid"),
            expected
        );
    }

    #[test]
    fn mesh_addresses_and_identity() {
        let Ok(options) = run(&[
            "--identity-dir",
            "/run/id",
            "--inbound-addr=127.0.0.1:24143",
            "--outbound-addr",
            "127.0.0.2:24140",
            "--local-ip",
            "127.0.0.2",
        ]) else {
            panic!("valid flags")
        };
        assert_eq!(options.identity_dir, Some(PathBuf::from("/run/id")));
        assert_eq!(options.inbound_addr.port(), 24143);
        assert_eq!(options.outbound_addr.to_string(), "127.0.0.2:24140");
        assert_eq!(options.local_ip.to_string(), "127.0.0.2");
        let err = refused(&["--local-ip", "x"]);
        assert!(err.contains("--local-ip"), "{err}");
    }

    #[test]
    fn control_replicas_and_the_state_dir() {
        let Ok(options) = run(&[
            "--control",
            "127.0.0.1:8086,10.0.0.2:8087",
            "--state-dir=/tmp/s",
        ]) else {
            panic!("valid flags")
        };
        assert_eq!(options.control.len(), 2);
        assert_eq!(options.control[1].to_string(), "10.0.0.2:8087");
        assert_eq!(options.state_dir, PathBuf::from("/tmp/s"));
        let err = refused(&["--control", "127.0.0.1:8086,replica-2"]);
        assert!(
            err.contains("--control") && err.contains("replica-2"),
            "{err}"
        );
        let err = refused(&["--state-dir", ""]);
        assert!(err.contains("--state-dir"), "{err}");

        let from_env = |env: Option<&str>| match parse_with(argv(&[]), env.map(OsString::from)) {
            Ok(options) => options.state_dir,
            Err(err) => panic!("{err}"),
        };
        assert_eq!(from_env(None), PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(from_env(Some("")), PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(from_env(Some("/var/lib/x")), PathBuf::from("/var/lib/x"));
        let given = parse_with(
            argv(&["--state-dir", "/y"]),
            Some(OsString::from("/var/lib/x")),
        );
        assert!(matches!(given, Ok(o) if o.state_dir == Path::new("/y")));
    }

    #[test]
    fn role_and_server_replicas() {
        let Ok(options) = run(&["--role", "server", "--server-replicas", "8086, 8087,8088"]) else {
            panic!("valid flags")
        };
        assert_eq!(options.role, Some(Role::Server));
        assert_eq!(options.server_replicas, vec![8086, 8087, 8088]);
        let Ok(agent) = run(&["--role=agent"]) else {
            panic!("valid flags")
        };
        assert_eq!(agent.role, Some(Role::Agent));
        assert!(agent.server_replicas.is_empty());
        let err = refused(&["--role", "leader"]);
        assert!(err.contains("--role") && err.contains("leader"), "{err}");
        let err = refused(&["--role", "server", "--server-replicas", "8086,0"]);
        assert!(
            err.contains("--server-replicas") && err.contains("\"0\""),
            "{err}"
        );
        let err = refused(&["--role", "server", "--server-replicas", "8086,x"]);
        assert!(err.contains("\"x\""), "{err}");
        let err = refused(&["--role", "agent", "--server-replicas", "8086"]);
        assert!(err.contains("--role server"), "{err}");
        let err = refused(&["--server-replicas", "8086"]);
        assert!(err.contains("--role server"), "{err}");
    }

    #[test]
    fn bad_arguments_are_named() {
        let text = refused(&["--admin-addr", "localhost"]);
        assert!(
            text.contains("--admin-addr") && text.contains("localhost"),
            "{text}"
        );
        let text = refused(&["--config"]);
        assert!(
            text.contains("--config") && text.contains("a value is required"),
            "{text}"
        );
        let text = refused(&["--config", ""]);
        assert!(text.contains("empty"), "{text}");
        let text = refused(&["--verbose"]);
        assert!(text.contains("--verbose"), "{text}");
        let help = run(&["--help"]).expect_err("help is not a run");
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        assert_eq!(help.exit_code(), 0);
    }
}
