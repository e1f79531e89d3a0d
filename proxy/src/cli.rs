//! The command line: `pimesh-proxy [--admin-addr IP:PORT] [--config PATH] ...`.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

pub const USAGE: &str = "\
usage: pimesh-proxy [--admin-addr IP:PORT] [--config PATH] [--identity-dir DIR]
                    [--inbound-addr IP:PORT] [--outbound-addr IP:PORT] [--local-ip IP]
                    [--control IP:PORT[,IP:PORT...]] [--state-dir PATH]
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
  --control ADDRS          control replicas, IP:PORT separated by commas: the site config
                           and node addresses come from their discovery stream (cached
                           under --state-dir), the config file serves until one answers;
                           default none: the config file only
  --state-dir PATH         where the last discovery answer is kept (default
                           $STATE_DIRECTORY, else /var/lib/pimesh-proxy)";

/// What the proxy was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Boxed: the options are large next to `Help`.
    Run(Box<Options>),
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
    /// `--control`: empty for none (the config file only).
    pub control: Vec<SocketAddr>,
    /// `None`: [`default_state_dir`].
    pub state_dir: Option<PathBuf>,
}

/// `$STATE_DIRECTORY` (its first entry, as systemd's `StateDirectory=` sets it), else
/// `/var/lib/pimesh-proxy`.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .and_then(|dirs| {
            let dirs = dirs.to_string_lossy().into_owned();
            dirs.split(':')
                .find(|dir| !dir.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/var/lib/pimesh-proxy"))
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
            state_dir: None,
        }
    }
}

/// Parses the arguments after the program name. An `Err` is a one-line message for
/// stderr; the caller adds [`USAGE`] and exits 2. Paths need not be UTF-8.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut options = Options::default();
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
                    .collect::<Result<_, _>>()?;
            }
            "--state-dir" => {
                let value = value(flag)?;
                if value.is_empty() {
                    return Err("--state-dir: expected a directory, found an empty string".into());
                }
                options.state_dir = Some(PathBuf::from(value));
            }
            "--config" => {
                let value = value(flag)?;
                if value.is_empty() {
                    return Err("--config: expected a file path, found an empty string".into());
                }
                options.config = PathBuf::from(value);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Command::Run(Box::new(options)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn defaults_are_the_node_paths() {
        assert_eq!(run(&[]), Ok(Command::Run(Box::default())));
        let options = Options::default();
        assert_eq!(options.admin_addr.to_string(), "0.0.0.0:4191");
        assert_eq!(options.config, PathBuf::from("/etc/pimesh/cluster.toml"));
    }

    #[test]
    fn both_flags_in_both_spellings() {
        let expected = Command::Run(Box::new(Options {
            admin_addr: "127.0.0.1:9000".parse().expect("valid address"),
            config: PathBuf::from("/tmp/c.toml"),
            ..Options::default()
        }));
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
        assert!(options.control.is_empty());
        let err = run(&["--local-ip", "x"]).expect_err("not an IP");
        assert!(err.contains("--local-ip"), "{err}");
    }

    #[test]
    fn control_replicas_and_the_state_dir() {
        let Ok(Command::Run(options)) = run(&[
            "--control",
            "10.0.0.1:8086,10.0.0.2:8087",
            "--state-dir=/var/lib/x",
        ]) else {
            panic!("valid flags")
        };
        let control: Vec<String> = options.control.iter().map(ToString::to_string).collect();
        assert_eq!(control, ["10.0.0.1:8086", "10.0.0.2:8087"]);
        assert_eq!(options.state_dir, Some(PathBuf::from("/var/lib/x")));
        let err = run(&["--control", "10.0.0.1:8086,replica-2"]).expect_err("not IP:PORT");
        assert!(
            err.contains("--control") && err.contains("replica-2"),
            "{err}"
        );
        assert!(run(&["--state-dir", ""]).is_err());
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
