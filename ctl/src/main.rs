//! `pimeshctl`: what an operator runs on a laptop to create a site, check its
//! configuration, prepare SD card images and watch the fleet.
//!
//! Exit codes: 0 success; 1 the command failed (the message says why); 2 the command line
//! is wrong (clap's); 3 `status` answered and the fleet is not healthy.

mod central;
mod central_url;
mod check;
mod config;
mod context;
mod image;
mod node;
mod output;
mod rollout;
mod secret_file;
mod site;
mod status;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

pub use output::OutputFormat;

#[derive(Parser)]
#[command(name = "pimeshctl", version, about = "Operate Pimesh sites")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create and inspect sites.
    Site {
        #[command(subcommand)]
        command: SiteCommand,
    },
    /// Check site configurations (cluster.toml).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Show the site's newest revision, how many nodes run it and what the others did;
    /// exits 3 when a node is not on the newest revision.
    Status {
        #[command(flatten)]
        central: CentralFlags,
        /// The site folder `pimeshctl site init` made: its key signs the request (the
        /// server shows a site to its operator only).
        #[arg(long, env = "PIMESH_SITE_DIR")]
        site_dir: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Check what the fleet relies on, as `linkerd check` does: the central server over
    /// TLS, the clocks, the site's key (with a site folder), every node's last report.
    /// Exits 3 when a check fails.
    Check {
        #[command(flatten)]
        central: CentralFlags,
        /// The site folder to check against the server (default: the current context's,
        /// else none).
        #[arg(long, env = "PIMESH_SITE_DIR")]
        site_dir: Option<PathBuf>,
    },
    /// Follow and steer the staged rollouts of the site's revisions (needs the site folder:
    /// its key signs the requests).
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
        #[command(flatten)]
        central: CentralFlags,
        /// The site folder `pimeshctl site init` made (holds site-name and signing.pk8).
        #[arg(long, env = "PIMESH_SITE_DIR", global = true)]
        site_dir: Option<PathBuf>,
    },
    /// Print the URL of the site's dashboard at the central server, with a session token
    /// (signed for with the site folder's key) that opens it for a while.
    Dashboard {
        #[command(flatten)]
        central: CentralFlags,
        /// The site folder `pimeshctl site init` made (holds site-name and signing.pk8).
        #[arg(long, env = "PIMESH_SITE_DIR")]
        site_dir: Option<PathBuf>,
        /// How long the session lasts (1m to 7d).
        #[arg(long = "for", value_parser = humantime::parse_duration, default_value = "12h")]
        ttl: std::time::Duration,
    },
    /// Check a node's seed (pimesh.toml) on its own.
    Seed {
        #[command(subcommand)]
        command: SeedCommand,
    },
    /// People's own keys for a site's operator requests.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Save and choose contexts (central server, its CA, site folder), as kubeconfig does.
    Context {
        #[command(subcommand)]
        command: ContextCommand,
    },
    /// Print a completion script for a shell, e.g.
    /// `pimeshctl completion bash > /etc/bash_completion.d/pimeshctl`.
    Completion { shell: clap_complete::Shell },
    /// Print this pimeshctl's version, and the central server's when one is given.
    Version {
        /// The central server (or PIMESH_CENTRAL).
        #[arg(long, env = "PIMESH_CENTRAL")]
        central: Option<String>,
        /// A PEM CA certificate to trust for it (or PIMESH_CENTRAL_CA).
        #[arg(long, env = "PIMESH_CENTRAL_CA")]
        central_ca: Option<PathBuf>,
    },
    /// Enroll nodes.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Prepare SD card images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
}

#[derive(Subcommand)]
enum SiteCommand {
    /// Create a site: its trust anchor and issuer, its configuration-signing key and its
    /// join token, written to a folder that stays with the operator.
    Init {
        /// The site's name (lowercase letters, digits, '-').
        site: String,
        /// The central server the site's nodes take their configuration from.
        #[arg(long)]
        central_url: Option<String>,
        /// Where to write the site's keys (default: ./<site>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The site's join token: rotate it, or show the `[join]` block of cluster.toml that
    /// accepts it.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a new join token for the cards flashed from now on (the previous one is kept as
    /// join-token.previous) and print the `[join]` block for the site's cluster.toml;
    /// publishing it makes every replica refuse the old token.
    Rotate {
        /// The site folder `pimeshctl site init` made (holds anchor.pem and join-token).
        #[arg(long, env = "PIMESH_SITE_DIR")]
        site_dir: Option<PathBuf>,
        /// Replicas refuse the new token after this long, e.g. 24h or 7d (default: never).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
    },
    /// Print the `[join]` block (without expiry) accepting the site folder's current token.
    Show {
        /// The site folder `pimeshctl site init` made (holds anchor.pem and join-token).
        #[arg(long, env = "PIMESH_SITE_DIR")]
        site_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a site configuration (cluster.toml and the route files of the routes/
    /// folder beside it); prints what it says, or the error with file, line and key.
    Validate { file: PathBuf },
    /// Print a site's routes (cluster.toml's [[routes]] and routes/*.yaml) in another
    /// form: Gateway API YAML (HTTPRoute, GRPCRoute) or cluster.toml's [[routes]] tables.
    Convert {
        file: PathBuf,
        #[arg(long, value_enum)]
        to: config::RouteForm,
    },
    /// Show how a site configuration differs from the newest revision the central server
    /// holds (a unified diff); exits 3 when they differ.
    Diff {
        file: PathBuf,
        /// The site folder `pimeshctl site init` made (its key signs the request).
        #[arg(long, env = "PIMESH_SITE_DIR")]
        site_dir: Option<PathBuf>,
        #[command(flatten)]
        central: CentralFlags,
    },
    /// Validate, sign offline with the site key, and upload a revision to the central
    /// server. The revision number is one above the newest the server holds unless given.
    Publish {
        file: PathBuf,
        /// The site folder `pimeshctl site init` made (holds signing.pk8).
        #[arg(long, env = "PIMESH_SITE_DIR")]
        site_dir: Option<PathBuf>,
        #[command(flatten)]
        central: CentralFlags,
        #[arg(long)]
        revision: Option<u64>,
        /// Nodes revert this revision unless it is confirmed within the window.
        #[arg(long = "try")]
        try_mode: bool,
        /// Validate and sign, say what would be published, upload nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// How to reach the central server, as given on the command line or in the environment.
#[derive(clap::Args)]
pub struct CentralFlags {
    /// The central server, e.g. https://central.example.net:8443 (default: the current
    /// context's).
    #[arg(long, env = "PIMESH_CENTRAL", global = true)]
    pub central: Option<String>,
    /// A PEM CA certificate to trust for the central server (default: the current
    /// context's, else the system's roots).
    #[arg(long, env = "PIMESH_CENTRAL_CA", global = true)]
    pub central_ca: Option<PathBuf>,
}

impl CentralFlags {
    /// The central server to talk to: the flags' (or environment's), else the current
    /// context's. The context's CA goes with the context's server only.
    pub fn resolve(self) -> Result<CentralArgs, Failure> {
        let context = context::current()?;
        let (central, from_context) = match self.central {
            Some(central) => (central, false),
            None => (
                context.central.clone().ok_or(
                    "no central server: give --central, set PIMESH_CENTRAL, or save one with \
                     `pimeshctl context add NAME --central URL`",
                )?,
                true,
            ),
        };
        let central_ca = self
            .central_ca
            .or_else(|| context.central_ca.filter(|_| from_context));
        Ok(CentralArgs {
            central,
            central_ca,
        })
    }
}

/// The site folder: `given` (flag or `PIMESH_SITE_DIR`), else the current context's.
fn resolve_site_dir(given: Option<PathBuf>) -> Result<PathBuf, Failure> {
    match given {
        Some(dir) => Ok(dir),
        None => context::current()?.site_dir.ok_or_else(|| {
            "no site folder: give --site-dir, set PIMESH_SITE_DIR, or save one with \
             `pimeshctl context add NAME --site-dir DIR`"
                .into()
        }),
    }
}

/// How to reach the central server, resolved.
pub struct CentralArgs {
    pub central: String,
    pub central_ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// The rollout of the newest revision (or --revision): each wave, its nodes, how many
    /// applied, failed or are offline; exits 3 when it halted or was aborted.
    Status {
        #[arg(long)]
        revision: Option<u64>,
        /// Print it again on every change until it completes, halts or is aborted.
        #[arg(short, long)]
        watch: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// The site's rollouts, newest first.
    History {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Start no further wave of the rollout (its started waves go on).
    Pause {
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Let a paused rollout go on.
    Resume {
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Stop the rollout: no node is offered its revision any more, and nodes running it on
    /// trial (published with `--try`) go back at once.
    Abort {
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Publish the configuration of the last revision whose rollout completed, as a new
    /// revision.
    Undo,
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Make a person's key (PKCS#8, 0600) and print the central server's entry for it.
    Keygen {
        /// The person's name (a DNS label), as their requests will carry it.
        name: String,
        /// The site the key is for.
        #[arg(long)]
        site: String,
        /// reader (read the site) or operator (also pause, resume, abort).
        #[arg(long, default_value = "reader")]
        role: String,
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum SeedCommand {
    /// Validate a seed; prints what it says, or the error with file, line and key.
    Validate { file: PathBuf },
}

#[derive(Subcommand)]
enum ContextCommand {
    /// Save a context (replacing one of the same name); the first saved becomes current.
    Add {
        name: String,
        /// The central server, e.g. https://central.example.net:8443
        #[arg(long)]
        central: Option<String>,
        /// A PEM CA certificate to trust for it.
        #[arg(long)]
        central_ca: Option<PathBuf>,
        /// The site folder `pimeshctl site init` made.
        #[arg(long)]
        site_dir: Option<PathBuf>,
    },
    /// Make a saved context the current one.
    Use { name: String },
    /// List the saved contexts (`*` marks the current one).
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Sign a node's certificate request (/var/lib/pimesh/identity/node.csr on the node)
    /// with the site's issuer; prints the certificate chain for the node's node.pem.
    Sign {
        /// The node's request (PEM).
        csr: PathBuf,
        /// The site folder `pimeshctl site init` made (holds issuer.pem and issuer.key).
        #[arg(long, env = "PIMESH_SITE_DIR")]
        site_dir: Option<PathBuf>,
        /// The node's name: the request must ask for exactly spiffe://<site>/node/<node>.
        #[arg(long)]
        node: String,
        /// How long the certificate is valid, in days (at most the issuer's remaining life).
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Write the chain here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Write a seed into an image's boot partition as pimesh.toml, without mounting it.
    Configure {
        /// A raw Pimesh image (decompress the .img.xz first).
        image: PathBuf,
        /// The seed to write; it is validated first.
        #[arg(long)]
        seed: PathBuf,
        /// Also write the site's anchor (from this site folder) for the node to import at
        /// first boot, and for the site's init node its issuer too.
        #[arg(long)]
        trust: Option<PathBuf>,
    },
}

/// Why a command failed: the message says what, naming the file, field or peer at fault.
/// Every command's error ends here and is printed once, after `pimeshctl: `.
pub type Failure = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Site {
            command:
                SiteCommand::Init {
                    site,
                    central_url,
                    out,
                },
        } => site::init(&site, central_url.as_deref(), out),
        Command::Site {
            command:
                SiteCommand::Token {
                    command:
                        TokenCommand::Rotate {
                            site_dir,
                            expires_in,
                        },
                },
        } => resolve_site_dir(site_dir).and_then(|dir| token::rotate(&dir, expires_in)),
        Command::Site {
            command:
                SiteCommand::Token {
                    command: TokenCommand::Show { site_dir },
                },
        } => resolve_site_dir(site_dir).and_then(|dir| token::show(&dir)),
        Command::Config {
            command: ConfigCommand::Validate { file },
        } => config::validate(&file),
        Command::Config {
            command: ConfigCommand::Convert { file, to },
        } => config::convert(&file, to),
        Command::Config {
            command:
                ConfigCommand::Publish {
                    file,
                    site_dir,
                    central,
                    revision,
                    try_mode,
                    dry_run,
                },
        } => resolve_site_dir(site_dir).and_then(|dir| {
            let publish = central::Publish {
                revision,
                try_mode,
                dry_run,
            };
            central::publish(&file, &dir, &central.resolve()?, publish)
        }),
        Command::Check { central, site_dir } => {
            let site_dir = match site_dir {
                Some(dir) => Some(dir),
                None => match context::current() {
                    Ok(context) => context.site_dir,
                    Err(message) => return failed(&message),
                },
            };
            return match central
                .resolve()
                .and_then(|central| check::check(&central, site_dir.as_deref()))
            {
                Ok(code) => ExitCode::from(code),
                Err(message) => failed(&message),
            };
        }
        Command::Rollout {
            command,
            central,
            site_dir,
        } => {
            return exit_code(resolve_site_dir(site_dir).and_then(|dir| {
                let args = central.resolve()?;
                let operator = central::Operator::open(&args, &dir)?;
                let done = |result: Result<(), Failure>| result.map(|()| 0);
                match command {
                    RolloutCommand::Status {
                        revision,
                        watch,
                        output,
                    } => rollout::status(&operator, revision, watch, output),
                    RolloutCommand::History { limit, output } => {
                        done(rollout::history(&operator, limit, output))
                    }
                    RolloutCommand::Pause { revision } => done(rollout::command(
                        &operator,
                        revision,
                        pimesh_revision::rollout::Command::Pause,
                    )),
                    RolloutCommand::Resume { revision } => done(rollout::command(
                        &operator,
                        revision,
                        pimesh_revision::rollout::Command::Resume,
                    )),
                    RolloutCommand::Abort { revision } => done(rollout::command(
                        &operator,
                        revision,
                        pimesh_revision::rollout::Command::Abort,
                    )),
                    RolloutCommand::Undo => done(rollout::undo(&operator)),
                }
            }));
        }
        Command::Config {
            command:
                ConfigCommand::Diff {
                    file,
                    site_dir,
                    central,
                },
        } => {
            return exit_code(resolve_site_dir(site_dir).and_then(|dir| {
                let args = central.resolve()?;
                config::diff(&file, &central::Operator::open(&args, &dir)?)
            }));
        }
        Command::Dashboard {
            central,
            site_dir,
            ttl,
        } => resolve_site_dir(site_dir).and_then(|dir| {
            let args = central.resolve()?;
            let operator = central::Operator::open(&args, &dir)?;
            let (url, expires_at) = operator.dashboard(ttl)?;
            let expires = std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires_at);
            println!("{url}");
            eprintln!(
                "the dashboard of site {} opens with this URL until {} (keep it private: it \
                 reads the site)",
                operator.site,
                humantime::format_rfc3339_seconds(expires)
            );
            Ok(())
        }),
        Command::Status {
            central,
            site_dir,
            output,
        } => {
            return match resolve_site_dir(site_dir).and_then(|dir| {
                central
                    .resolve()
                    .and_then(|central| central::status(&central, &dir, output))
            }) {
                Ok(code) => ExitCode::from(code),
                Err(message) => failed(&message),
            }
        }
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "pimeshctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Version {
            central,
            central_ca,
        } => version(CentralFlags {
            central,
            central_ca,
        }),
        Command::Context {
            command:
                ContextCommand::Add {
                    name,
                    central,
                    central_ca,
                    site_dir,
                },
        } => absolute(central_ca).and_then(|central_ca| {
            context::add(
                &name,
                context::Context {
                    central,
                    central_ca,
                    site_dir: absolute(site_dir)?,
                },
            )
        }),
        Command::Context {
            command: ContextCommand::Use { name },
        } => context::use_context(&name),
        Command::Seed {
            command: SeedCommand::Validate { file },
        } => config::validate_seed(&file),
        Command::Operator {
            command:
                OperatorCommand::Keygen {
                    name,
                    site,
                    role,
                    out,
                },
        } => site::operator_keygen(&name, &site, &role, &out),
        Command::Context {
            command: ContextCommand::List { output },
        } => context::list(output),
        Command::Node {
            command:
                NodeCommand::Sign {
                    csr,
                    site_dir,
                    node,
                    days,
                    out,
                },
        } => resolve_site_dir(site_dir)
            .and_then(|dir| node::sign(&csr, &dir, &node, days, out.as_deref())),
        Command::Image {
            command: ImageCommand::Configure { image, seed, trust },
        } => image::configure(&image, &seed, trust.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => failed(&message),
    }
}

/// The exit code a command chose, or 1 with its error printed.
fn exit_code(result: Result<u8, Failure>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(message) => failed(&message),
    }
}

fn failed(message: &Failure) -> ExitCode {
    eprintln!("pimeshctl: {message}");
    ExitCode::FAILURE
}

/// `pimeshctl version`: this build's, then the central server's when one is named (or the
/// current context names one).
fn version(flags: CentralFlags) -> Result<(), Failure> {
    println!("pimeshctl {}", env!("CARGO_PKG_VERSION"));
    let named = flags.central.is_some() || context::current()?.central.is_some();
    if named {
        let args = flags.resolve()?;
        let server = central::server_version(&args)?;
        println!("pimesh-central {server} at {}", args.central);
    }
    Ok(())
}

/// `path` made absolute against the working directory, so that a saved context means the
/// same folder from anywhere.
fn absolute(path: Option<PathBuf>) -> Result<Option<PathBuf>, Failure> {
    path.map(|p| std::path::absolute(&p).map_err(|err| format!("{}: {err}", p.display()).into()))
        .transpose()
}
