//! Command-line options. The defaults are a node's real paths; tests point them elsewhere.

use std::net::SocketAddr;
use std::path::PathBuf;

pub const USAGE: &str = "\
usage: pimesh-supervisor [options]
  --seed PATH          the seed file (default /boot/firmware/pimesh.toml)
  --status-addr ADDR   where the status API listens (default 127.0.0.1:4200)
  --etc-dir PATH       active configuration (default /etc/pimesh)
  --state-dir PATH     keys, revisions, reports (default /var/lib/pimesh)
  --manifest PATH      the image manifest (default /usr/share/pimesh/manifest.json)
  --k3s-bin PATH       where K3s is installed (default /usr/local/bin/k3s)
  --run-dir PATH       runtime files for other units, e.g. proxy.env (default /run/pimesh)
  --supervisor-config PATH
                       the units to keep running and how (default /etc/pimesh/supervisor.toml)
  --no-node-setup      do not set the hostname or SSH keys (for running off a node)
  --export-anchor-key  print the site anchor's private key (kept in the state folder on
                       the init node) and exit
  --remove-anchor-key  with --export-anchor-key: then delete it from the node";

/// Where the supervisor finds and keeps things on the node.
#[derive(Debug, Clone)]
pub struct Paths {
    pub etc_dir: PathBuf,
    pub state_dir: PathBuf,
    pub manifest: PathBuf,
    pub k3s_bin: PathBuf,
    /// Runtime files for other units (`proxy.env`).
    pub run_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub seed_path: PathBuf,
    pub supervisor_config: PathBuf,
    pub status_addr: SocketAddr,
    pub paths: Paths,
    pub node_setup: bool,
    pub help: bool,
    /// `Some(remove)`: export the anchor key instead of running.
    pub export_anchor_key: Option<bool>,
}

impl Options {
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
        let mut options = Options {
            seed_path: PathBuf::from("/boot/firmware/pimesh.toml"),
            supervisor_config: PathBuf::from(pimesh_schema::supervisor::DEFAULT_PATH),
            status_addr: SocketAddr::from(([127, 0, 0, 1], 4200)),
            paths: Paths {
                etc_dir: PathBuf::from("/etc/pimesh"),
                state_dir: PathBuf::from("/var/lib/pimesh"),
                manifest: PathBuf::from("/usr/share/pimesh/manifest.json"),
                k3s_bin: PathBuf::from("/usr/local/bin/k3s"),
                run_dir: PathBuf::from("/run/pimesh"),
            },
            node_setup: true,
            help: false,
            export_anchor_key: None,
        };
        let mut remove_anchor_key = false;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--seed" => options.seed_path = value("--seed")?.into(),
                "--supervisor-config" => {
                    options.supervisor_config = value("--supervisor-config")?.into();
                }
                "--status-addr" => {
                    let text = value("--status-addr")?;
                    options.status_addr = text.parse().map_err(|err| {
                        format!("--status-addr: expected IP:PORT, found {text:?} ({err})")
                    })?;
                }
                "--etc-dir" => options.paths.etc_dir = value("--etc-dir")?.into(),
                "--state-dir" => options.paths.state_dir = value("--state-dir")?.into(),
                "--manifest" => options.paths.manifest = value("--manifest")?.into(),
                "--k3s-bin" => options.paths.k3s_bin = value("--k3s-bin")?.into(),
                "--run-dir" => options.paths.run_dir = value("--run-dir")?.into(),
                "--no-node-setup" => options.node_setup = false,
                "--export-anchor-key" => options.export_anchor_key = Some(false),
                "--remove-anchor-key" => remove_anchor_key = true,
                "-h" | "--help" => options.help = true,
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        match (options.export_anchor_key, remove_anchor_key) {
            (Some(_), remove) => options.export_anchor_key = Some(remove),
            (None, true) => return Err("--remove-anchor-key needs --export-anchor-key".into()),
            (None, false) => {}
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        Options::from_args(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn defaults_are_the_node_paths() {
        let options = parse(&[]).expect("defaults");
        assert_eq!(
            options.seed_path,
            PathBuf::from("/boot/firmware/pimesh.toml")
        );
        assert_eq!(options.status_addr.to_string(), "127.0.0.1:4200");
        assert!(options.node_setup);
        assert_eq!(
            options.supervisor_config,
            PathBuf::from("/etc/pimesh/supervisor.toml")
        );
        let options = parse(&["--supervisor-config", "/tmp/s.toml"]).expect("flag");
        assert_eq!(options.supervisor_config, PathBuf::from("/tmp/s.toml"));
    }

    #[test]
    fn bad_options_are_named() {
        assert!(parse(&["--status-addr", "nowhere"])
            .unwrap_err()
            .contains("--status-addr"));
        assert!(parse(&["--seed"]).unwrap_err().contains("--seed"));
        assert!(parse(&["--frobnicate"])
            .unwrap_err()
            .contains("--frobnicate"));
    }
}
