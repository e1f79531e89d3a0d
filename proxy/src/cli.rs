//! The command line: `pimesh-proxy [--admin-addr IP:PORT] [--config PATH] ...`.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

pub const USAGE: &str = "\
usage: pimesh-proxy [--admin-addr IP:PORT] [--config PATH] [--identity-dir DIR]
                    [--inbound-addr IP:PORT] [--outbound-addr IP:PORT] [--local-ip IP]
                    [--control ADDR[,ADDR...]] [--state-dir PATH]
  --admin-addr IP:PORT     /live, /ready, /config, /metrics (default 0.0.0.0:4191)
  --config PATH            the site config (default /etc/pimesh/cluster.toml); a missing
                           file means no site config yet, and SIGHUP or a change reloads it
  --identity-dir DIR       node.pem (leaf and issuer), node.key, anchor.pem (default: the
                           unit's credentials directory, else the supervisor's files under
                           /var/lib/pimesh); reloaded on SIGHUP and on change
  --inbound-addr IP:PORT   mTLS from other nodes' proxies (default 0.0.0.0:4143)
  --outbound-addr IP:PORT  the HTTP proxy port for local apps and iptables redirects
                           (default 127.0.0.1:4140)
  --local-ip IP            where services' local ports listen (default 127.0.0.1)
  --control ADDR[,ADDR...] the site's control replicas (IP:PORT each); with them the proxy
                           gets its workload identity from them, authenticating with the
                           node credential, and renews it (default: none, the node
                           credential alone is the identity)
  --state-dir PATH         where the proxy keeps what it learnt (identity/: the last leaf,
                           its key and the trust bundle) (default $STATE_DIRECTORY, else
                           /var/lib/pimesh-proxy)";

/// `--state-dir` when neither the flag nor `$STATE_DIRECTORY` says.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pimesh-proxy";

/// What the proxy was asked to do.
// Made once per process: the size of `Run` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run(Options),
    /// `--help`: print [`USAGE`] and exit 0.
    Help,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub admin_addr: SocketAddr,
    pub config: PathBuf,
    /// `None`: the default places (see [`USAGE`]).
    pub identity_dir: Option<PathBuf>,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub local_ip: IpAddr,
    /// The control replicas, in the order given; empty: no replicas (the node credential
    /// is the identity, as before they existed).
    pub control: Vec<SocketAddr>,
    pub state_dir: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            admin_addr: SocketAddr::from(([0, 0, 0, 0], 4191)),
            config: PathBuf::from("/etc/pimesh/cluster.toml"),
            identity_dir: None,
            inbound_addr: SocketAddr::from(([0, 0, 0, 0], 4143)),
            outbound_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 4140)),
            local_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            control: Vec::new(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }
}

/// Parses the arguments after the program name. An `Err` is a one-line message for
/// stderr; the caller adds [`USAGE`] and exits 2. Paths need not be UTF-8.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    parse_with(args, std::env::var_os("STATE_DIRECTORY"))
}

/// [`parse`] with `$STATE_DIRECTORY` given (systemd's `StateDirectory=`): the default of
/// `--state-dir` when set and not empty.
fn parse_with(
    args: impl IntoIterator<Item = OsString>,
    state_directory: Option<OsString>,
) -> Result<Command, String> {
    let mut options = Options::default();
    if let Some(dir) = state_directory.filter(|dir| !dir.is_empty()) {
        options.state_dir = PathBuf::from(dir);
    }
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(flag) = arg.to_str() else {
            return Err(format!("unexpected argument {arg:?}"));
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
                .ok_or_else(|| format!("{flag}: missing value"))
        };
        let socket_addr = |flag: &str, value: OsString| -> Result<SocketAddr, String> {
            let text = value.to_string_lossy();
            text.parse()
                .map_err(|err| format!("{flag}: expected IP:PORT, found {text:?} ({err})"))
        };
        match flag {
            "-h" | "--help" => return Ok(Command::Help),
            "--admin-addr" => options.admin_addr = socket_addr(flag, value(flag)?)?,
            "--inbound-addr" => options.inbound_addr = socket_addr(flag, value(flag)?)?,
            "--outbound-addr" => options.outbound_addr = socket_addr(flag, value(flag)?)?,
            "--local-ip" => {
                let value = value(flag)?;
                let text = value.to_string_lossy();
                options.local_ip = text
                    .parse()
                    .map_err(|err| format!("--local-ip: expected an IP, found {text:?} ({err})"))?;
            }
            "--identity-dir" => {
                let value = value(flag)?;
                if value.is_empty() {
                    return Err(
                        "--identity-dir: expected a directory, found an empty string".into(),
                    );
                }
                options.identity_dir = Some(PathBuf::from(value));
            }
            "--config" => {
                let value = value(flag)?;
                if value.is_empty() {
                    return Err("--config: expected a file path, found an empty string".into());
                }
                options.config = PathBuf::from(value);
            }
            "--control" => {
                let value = value(flag)?;
                let text = value.to_string_lossy();
                options.control = text
                    .split(',')
                    .map(|addr| {
                        addr.trim().parse().map_err(|err| {
                            format!(
                                "--control: expected IP:PORT[,IP:PORT...], found {addr:?} ({err})"
                            )
                        })
                    })
                    .collect::<Result<_, String>>()?;
            }
            "--state-dir" => {
                let value = value(flag)?;
                if value.is_empty() {
                    return Err("--state-dir: expected a directory, found an empty string".into());
                }
                options.state_dir = PathBuf::from(value);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Command::Run(options))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn run(args: &[&str]) -> Result<Command, String> {
        parse_with(args.iter().map(OsString::from), None)
    }

    #[test]
    fn defaults_are_the_node_paths() {
        assert_eq!(run(&[]), Ok(Command::Run(Options::default())));
        let options = Options::default();
        assert_eq!(options.admin_addr.to_string(), "0.0.0.0:4191");
        assert_eq!(options.config, PathBuf::from("/etc/pimesh/cluster.toml"));
    }

    #[test]
    fn both_flags_in_both_spellings() {
        let expected = Command::Run(Options {
            admin_addr: "127.0.0.1:9000".parse().expect("valid address"),
            config: PathBuf::from("/tmp/c.toml"),
            ..Options::default()
        });
        assert_eq!(
            run(&["--admin-addr", "127.0.0.1:9000", "--config", "/tmp/c.toml"]),
            Ok(expected.clone())
        );
        assert_eq!(
            run(&["--config=/tmp/c.toml", "--admin-addr=127.0.0.1:9000"]),
            Ok(expected)
        );
    }

    #[test]
    fn mesh_addresses_and_identity() {
        let Ok(Command::Run(options)) = run(&[
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
        let err = run(&["--local-ip", "x"]).expect_err("not an IP");
        assert!(err.contains("--local-ip"), "{err}");
    }

    #[test]
    fn control_replicas_and_the_state_dir() {
        let Ok(Command::Run(options)) = run(&[
            "--control",
            "127.0.0.1:8086,10.0.0.2:8087",
            "--state-dir=/tmp/s",
        ]) else {
            panic!("valid flags")
        };
        assert_eq!(options.control.len(), 2);
        assert_eq!(options.control[1].to_string(), "10.0.0.2:8087");
        assert_eq!(options.state_dir, PathBuf::from("/tmp/s"));
        let err = run(&["--control", "127.0.0.1:8086,replica-2"]).expect_err("not IP:PORT");
        assert!(
            err.contains("--control") && err.contains("replica-2"),
            "{err}"
        );
        let err = run(&["--state-dir", ""]).expect_err("empty");
        assert!(err.contains("--state-dir"), "{err}");

        let from_env = |env: Option<&str>| match parse_with(Vec::new(), env.map(OsString::from)) {
            Ok(Command::Run(options)) => options.state_dir,
            other => panic!("{other:?}"),
        };
        assert_eq!(from_env(None), PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(from_env(Some("")), PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(from_env(Some("/var/lib/x")), PathBuf::from("/var/lib/x"));
        let given = parse_with(
            [OsString::from("--state-dir"), OsString::from("/y")],
            Some(OsString::from("/var/lib/x")),
        );
        assert!(matches!(given, Ok(Command::Run(o)) if o.state_dir == Path::new("/y")));
    }

    #[test]
    fn bad_arguments_are_named() {
        let err = run(&["--admin-addr", "localhost"]).expect_err("not an IP:PORT");
        assert!(
            err.contains("--admin-addr") && err.contains("localhost"),
            "{err}"
        );
        let err = run(&["--config"]).expect_err("missing value");
        assert!(err.contains("--config: missing value"), "{err}");
        let err = run(&["--config", ""]).expect_err("empty path");
        assert!(err.contains("empty"), "{err}");
        let err = run(&["--verbose"]).expect_err("unknown flag");
        assert!(err.contains("--verbose"), "{err}");
        assert_eq!(run(&["--help"]), Ok(Command::Help));
    }
}
