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

usage: pimesh-supervisor trust COMMAND [--state-dir PATH] [--seed PATH] [--force]
  status                    the trust root as JSON: anchors, issuer, rotation phase
  rotate-issuer             a new issuer from the anchor that signed the current one
  anchor begin              a new anchor joins the bundle (old + new); the issuer stays
  anchor switch             a new issuer signed by the new anchor becomes the issuer
  anchor finish             the bundle keeps only the new anchor; the old anchor key is
                            deleted (--force: within 24 h of the switch)
  export-anchor-key FILE    write the anchor key to FILE (0600), then remove it from the node
  import-anchor-key FILE    put an exported anchor key back
  --state-dir defaults to /var/lib/pimesh; --seed (for the site's name) to
  /boot/firmware/pimesh.toml";

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
    /// A `trust` command to run instead of the daemon.
    pub trust: Option<TrustAction>,
}

/// `pimesh-supervisor trust ...`: one step of the trust root's lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustAction {
    Status,
    RotateIssuer,
    AnchorBegin,
    AnchorSwitch,
    AnchorFinish { force: bool },
    ExportAnchorKey(PathBuf),
    ImportAnchorKey(PathBuf),
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
            trust: None,
        };
        let mut args = args.into_iter().peekable();
        let mut trust_words = Vec::new();
        let mut force = false;
        if args.peek().map(String::as_str) == Some("trust") {
            args.next();
            while let Some(word) = args.next_if(|arg| !arg.starts_with('-')) {
                trust_words.push(word);
            }
            if trust_words.is_empty() {
                return Err("trust: expected a command (status, rotate-issuer, anchor begin|switch|finish, export-anchor-key FILE, import-anchor-key FILE)".into());
            }
        }
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
                "--force" if !trust_words.is_empty() => force = true,
                "-h" | "--help" => options.help = true,
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        if !trust_words.is_empty() {
            let words: Vec<&str> = trust_words.iter().map(String::as_str).collect();
            let action = match words.as_slice() {
                ["status"] => TrustAction::Status,
                ["rotate-issuer"] => TrustAction::RotateIssuer,
                ["anchor", "begin"] => TrustAction::AnchorBegin,
                ["anchor", "switch"] => TrustAction::AnchorSwitch,
                ["anchor", "finish"] => TrustAction::AnchorFinish { force },
                ["export-anchor-key", file] => TrustAction::ExportAnchorKey(file.into()),
                ["import-anchor-key", file] => TrustAction::ImportAnchorKey(file.into()),
                _ => {
                    return Err(format!(
                        "trust: unknown command {:?}; expected status, rotate-issuer, \
                         anchor begin|switch|finish, export-anchor-key FILE or import-anchor-key FILE",
                        words.join(" ")
                    ))
                }
            };
            if force && !matches!(action, TrustAction::AnchorFinish { .. }) {
                return Err("--force applies only to `trust anchor finish`".into());
            }
            options.trust = Some(action);
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
    fn trust_commands_parse_with_their_state_dir() {
        let options = parse(&[
            "trust",
            "anchor",
            "finish",
            "--state-dir",
            "/tmp/s",
            "--force",
        ])
        .expect("finish");
        assert_eq!(
            options.trust,
            Some(TrustAction::AnchorFinish { force: true })
        );
        assert_eq!(options.paths.state_dir, PathBuf::from("/tmp/s"));
        let options = parse(&["trust", "export-anchor-key", "/root/a.key"]).expect("export");
        assert_eq!(
            options.trust,
            Some(TrustAction::ExportAnchorKey(PathBuf::from("/root/a.key")))
        );
        assert_eq!(options.paths.state_dir, PathBuf::from("/var/lib/pimesh"));
        assert_eq!(
            parse(&["trust", "status"]).expect("status").trust,
            Some(TrustAction::Status)
        );
        assert!(parse(&["trust"])
            .unwrap_err()
            .contains("expected a command"));
        assert!(parse(&["trust", "anchor", "rewind"])
            .unwrap_err()
            .contains("anchor rewind"));
        assert!(parse(&["trust", "status", "--force"])
            .unwrap_err()
            .contains("--force"));
        assert!(parse(&["--force"]).unwrap_err().contains("--force"));
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
