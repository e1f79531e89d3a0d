//! Command-line options, parsed by clap with the conventions of `pimesh_runtime::cli`. The
//! defaults are a node's real paths; tests point them elsewhere.
//!
//! `pimesh-supervisor [options]` runs the daemon; `pimesh-supervisor trust COMMAND
//! [--state-dir PATH] [--seed PATH]` runs one step of the trust root's lifecycle instead.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::paths::{self, NodePaths};
use crate::trust::command::TrustAction;

#[derive(Debug, Clone)]
pub struct Options {
    pub status_addr: SocketAddr,
    pub paths: NodePaths,
    pub node_setup: bool,
    /// A `trust` command to run instead of the daemon.
    pub trust: Option<TrustAction>,
}

/// The daemon on every Pimesh node.
#[derive(Debug, Parser)]
#[command(name = "pimesh-supervisor", args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The seed file (for `trust`: where the site's name comes from)
    #[arg(
        long = "seed",
        value_name = "PATH",
        global = true,
        default_value = paths::SEED
    )]
    seed_path: PathBuf,
    /// Where the status API listens
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4200")]
    status_addr: SocketAddr,
    /// Active configuration
    #[arg(long, value_name = "PATH", default_value = paths::ETC_DIR)]
    etc_dir: PathBuf,
    /// Keys, revisions, reports
    #[arg(
        long,
        value_name = "PATH",
        global = true,
        default_value = paths::STATE_DIR
    )]
    state_dir: PathBuf,
    /// The image manifest
    #[arg(long, value_name = "PATH", default_value = paths::MANIFEST)]
    manifest: PathBuf,
    /// Where K3s is installed
    #[arg(long, value_name = "PATH", default_value = paths::K3S_BIN)]
    k3s_bin: PathBuf,
    /// K3s's configuration folder (config.yaml, the admin kubeconfig)
    #[arg(long, value_name = "PATH", default_value = paths::RANCHER_ETC)]
    rancher_etc: PathBuf,
    /// K3s's data folder (the kubelet's kubeconfig)
    #[arg(long, value_name = "PATH", default_value = paths::RANCHER_DATA)]
    rancher_data: PathBuf,
    /// Runtime files for other units, e.g. proxy.env
    #[arg(long, value_name = "PATH", default_value = paths::RUN_DIR)]
    run_dir: PathBuf,
    /// The units to keep running and how
    #[arg(long, value_name = "PATH", default_value = paths::SUPERVISOR_CONFIG)]
    supervisor_config: PathBuf,
    /// Do not set the hostname or SSH keys, nor announce or look for servers by mDNS
    /// (for running off a node: no multicast leaves the host)
    #[arg(long)]
    no_node_setup: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One step of the trust root's lifecycle
    #[command(arg_required_else_help = false)]
    Trust {
        #[command(subcommand)]
        command: TrustCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TrustCommand {
    /// The trust root as JSON: anchors, issuer, rotation phase
    Status,
    /// A new issuer from the anchor that signed the current one
    RotateIssuer,
    /// Anchor rotation, one step at a time
    #[command(arg_required_else_help = false)]
    Anchor {
        #[command(subcommand)]
        step: AnchorStep,
    },
    /// Write the anchor key to FILE (0600), then remove it from the node
    ExportAnchorKey {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Put an exported anchor key back
    ImportAnchorKey {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AnchorStep {
    /// A new anchor joins the bundle (old + new); the issuer stays
    Begin,
    /// A new issuer signed by the new anchor becomes the issuer
    Switch,
    /// The bundle keeps only the new anchor; the old anchor key is deleted
    Finish {
        /// Within 24 h of the switch too
        #[arg(long)]
        force: bool,
    },
}

impl Options {
    /// Parses the arguments, program name first. An `Err` is clap's message: the caller
    /// exits with it (`clap::Error::exit`: 2 for a usage error, 0 after `--help`).
    pub fn from_args(args: impl IntoIterator<Item = OsString>) -> Result<Options, clap::Error> {
        let cli = Cli::try_parse_from(args)?;
        let trust = cli.command.map(|Command::Trust { command }| match command {
            TrustCommand::Status => TrustAction::Status,
            TrustCommand::RotateIssuer => TrustAction::RotateIssuer,
            TrustCommand::Anchor { step } => match step {
                AnchorStep::Begin => TrustAction::AnchorBegin,
                AnchorStep::Switch => TrustAction::AnchorSwitch,
                AnchorStep::Finish { force } => TrustAction::AnchorFinish { force },
            },
            TrustCommand::ExportAnchorKey { file } => TrustAction::ExportAnchorKey(file),
            TrustCommand::ImportAnchorKey { file } => TrustAction::ImportAnchorKey(file),
        });
        Ok(Options {
            status_addr: cli.status_addr,
            paths: NodePaths {
                seed: cli.seed_path,
                supervisor_config: cli.supervisor_config,
                etc_dir: cli.etc_dir,
                state_dir: cli.state_dir,
                run_dir: cli.run_dir,
                manifest: cli.manifest,
                k3s_bin: cli.k3s_bin,
                rancher_etc: cli.rancher_etc,
                rancher_data: cli.rancher_data,
            },
            node_setup: !cli.no_node_setup,
            trust,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, clap::Error> {
        let argv = std::iter::once("pimesh-supervisor").chain(args.iter().copied());
        Options::from_args(argv.map(OsString::from))
    }

    /// The message of the usage error (exit status 2) that `args` are.
    fn refused(args: &[&str]) -> String {
        let err = parse(args).expect_err("a usage error");
        assert_eq!(err.exit_code(), 2, "{err}");
        err.to_string()
    }

    #[test]
    fn defaults_are_the_node_paths() {
        let options = parse(&[]).expect("defaults");
        assert_eq!(
            options.paths.seed,
            PathBuf::from("/boot/firmware/pimesh.toml")
        );
        assert_eq!(options.status_addr.to_string(), "127.0.0.1:4200");
        assert!(options.node_setup);
        assert_eq!(
            options.paths.supervisor_config,
            PathBuf::from("/etc/pimesh/supervisor.toml")
        );
        let options = parse(&["--supervisor-config", "/tmp/s.toml"]).expect("flag");
        assert_eq!(
            options.paths.supervisor_config,
            PathBuf::from("/tmp/s.toml")
        );
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
        let no_command = refused(&["trust"]);
        assert!(
            no_command.contains("requires a subcommand") && no_command.contains("rotate-issuer"),
            "{no_command}"
        );
        let unknown = refused(&["trust", "anchor", "rewind"]);
        assert!(
            unknown.contains("rewind") && unknown.contains("trust anchor"),
            "{unknown}"
        );
        assert!(refused(&["trust", "status", "--force"]).contains("--force"));
        assert!(refused(&["--force"]).contains("--force"));
    }

    #[test]
    fn bad_options_are_named() {
        assert!(refused(&["--status-addr", "nowhere"]).contains("--status-addr"));
        assert!(refused(&["--seed"]).contains("--seed"));
        assert!(refused(&["--frobnicate"]).contains("--frobnicate"));
    }
}
