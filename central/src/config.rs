//! `central.toml`: where the central server listens, keeps its state, and which sites it
//! serves (each with the trust anchor its nodes' certificates chain to and the public key
//! its revisions are signed with).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pimesh_schema::cluster::HumanDuration;
use pimesh_schema::{parse_toml, ConfigError, DnsLabel, SigningKey};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CentralConfig {
    pub listen: SocketAddr,
    /// Where the embedded storage keeps its files; exactly one of this and `[postgres]`.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The PostgreSQL database that several central replicas share.
    #[serde(default)]
    pub postgres: Option<PostgresEntry>,
    /// The server's certificate chain and key (PEM).
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// The longest a node's long-poll is held before an empty answer.
    #[serde(default = "default_long_poll")]
    pub long_poll_max: HumanDuration,
    #[serde(default)]
    pub sites: Vec<SiteEntry>,
}

/// `[postgres]`: the database the replicas share.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresEntry {
    /// A libpq connection string (`host=/run/postgresql dbname=pimesh user=pimesh`, or a
    /// `postgresql://` URL).
    pub connect: String,
    /// The CA (PEM) of the database server's certificate: with it the connection is TLS
    /// (required; the certificate must name the host dialled), to a TCP host. Without it
    /// the connection is not encrypted, so the database is reached over a Unix socket or
    /// a network the replicas trust.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

/// Where the server keeps its state.
pub enum StorageChoice<'a> {
    Files(&'a Path),
    Postgres(&'a PostgresEntry),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteEntry {
    pub name: DnsLabel,
    /// The site's trust anchor (PEM), as written by `pimeshctl site init`.
    pub anchor: PathBuf,
    /// The site's revision-signing public key, `ed25519:<base64>`.
    pub public_key: SigningKey,
    /// People with keys of their own for the site's operator requests (the site key
    /// stays the site's own credential, and alone signs revisions).
    #[serde(default)]
    pub operators: Vec<OperatorEntry>,
}

/// `[[sites.operators]]`: a person, their public key and what they may do at the site.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorEntry {
    pub name: DnsLabel,
    /// `ed25519:<base64>`, as `pimeshctl operator keygen` prints it.
    pub public_key: SigningKey,
    pub role: Role,
}

/// What a person may do at a site; each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read the site: its fleet view, rollouts, stored revisions, dashboard sessions.
    Reader,
    /// Also steer its rollouts: pause, resume, abort.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
        }
    }
}

fn default_long_poll() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

/// `long_poll_max`'s bounds: a node's poll is held at least a second (no busy loop of
/// polls) and at most an hour (its connection stays within common NAT idle limits).
pub const LONG_POLL_MAX: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3_600);

impl CentralConfig {
    pub fn load(file: &Path) -> Result<CentralConfig, ConfigError> {
        let text = pimesh_schema::seed::read_small(file)?;
        CentralConfig::parse(file, &text)
    }

    /// Validates `text`, the contents of `file`.
    pub fn parse(file: &Path, text: &str) -> Result<CentralConfig, ConfigError> {
        let config: CentralConfig = parse_toml(file, text)?;
        match (&config.state_dir, &config.postgres) {
            (Some(_), None) => {}
            (None, Some(postgres)) => {
                if let Err(err) = crate::storage::connection_config(&postgres.connect) {
                    return Err(ConfigError::at_path(
                        file,
                        text,
                        &["postgres", "connect"],
                        format!("expected a libpq connection string or URL: {err}"),
                    ));
                }
                // The CA file itself is read at the start.
                let tls = postgres.ca.is_some();
                if let Err(err) = crate::storage::Database::settings(&postgres.connect, tls) {
                    return Err(ConfigError::at_path(
                        file,
                        text,
                        &["postgres", "connect"],
                        err,
                    ));
                }
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::at_path(
                    file,
                    text,
                    &["postgres"],
                    "expected either state_dir (embedded storage) or [postgres], not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::at_path(
                    file,
                    text,
                    &[],
                    "expected state_dir (embedded storage, one server) or [postgres] (replicas)",
                ))
            }
        }
        for (index, site) in config.sites.iter().enumerate() {
            let mut names = std::collections::BTreeSet::new();
            for (person, operator) in site.operators.iter().enumerate() {
                if !names.insert(&operator.name) {
                    return Err(ConfigError::at_path(
                        file,
                        text,
                        &[
                            "sites",
                            &index.to_string(),
                            "operators",
                            &person.to_string(),
                            "name",
                        ],
                        format!(
                            "operator {} is listed twice for site {}",
                            operator.name, site.name
                        ),
                    ));
                }
            }
        }
        let wait = config.long_poll_max.0;
        if !LONG_POLL_MAX.contains(&wait) {
            return Err(ConfigError::at_path(
                file,
                text,
                &["long_poll_max"],
                format!("expected 1s to 1h, found {wait:?}"),
            ));
        }
        Ok(config)
    }
}

impl CentralConfig {
    /// The storage the configuration names (it names exactly one: [`Self::parse`]).
    pub fn storage(&self) -> StorageChoice<'_> {
        match (&self.postgres, &self.state_dir) {
            (Some(postgres), _) => StorageChoice::Postgres(postgres),
            (None, Some(dir)) => StorageChoice::Files(dir),
            (None, None) => StorageChoice::Files(Path::new("/var/lib/pimesh-central")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "listen = \"127.0.0.1:8443\"\nstate_dir = \"/s\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\n";

    #[test]
    fn the_long_poll_is_bounded_and_the_error_names_its_line() {
        let file = Path::new("central.toml");
        let config = CentralConfig::parse(file, BASE).expect("the defaults are valid");
        assert_eq!(config.long_poll_max.0, Duration::from_secs(60));
        for wait in ["0s", "2h", "100000000000s"] {
            let text = format!("{BASE}long_poll_max = \"{wait}\"\n");
            let err = CentralConfig::parse(file, &text).expect_err(wait);
            assert_eq!(err.key.as_deref(), Some("long_poll_max"), "{err}");
            assert_eq!(err.line, Some(5), "{err}");
            assert!(err.to_string().contains("1s to 1h"), "{err}");
        }
    }

    #[test]
    fn the_storage_is_the_state_folder_or_postgres_never_both_nor_neither() {
        let file = Path::new("central.toml");
        let head = "listen = \"127.0.0.1:8443\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\n";
        let pg = "[postgres]\nconnect = \"host=/run/postgresql dbname=pimesh\"\n";
        let config = CentralConfig::parse(file, &format!("{head}{pg}")).expect("postgres");
        assert!(
            matches!(config.storage(), StorageChoice::Postgres(c) if c.connect.contains("dbname"))
        );
        let config = CentralConfig::parse(file, BASE).expect("files");
        assert!(matches!(config.storage(), StorageChoice::Files(dir) if dir == Path::new("/s")));

        let both = CentralConfig::parse(file, &format!("{BASE}{pg}")).expect_err("both");
        assert!(both.to_string().contains("not both"), "{both}");
        let neither = CentralConfig::parse(file, head).expect_err("neither");
        assert!(neither.to_string().contains("state_dir"), "{neither}");
        let broken = "[postgres]\nconnect = \"host='unclosed\"\n";
        let err = CentralConfig::parse(file, &format!("{head}{broken}")).expect_err("bad");
        assert_eq!(err.key.as_deref(), Some("postgres.connect"), "{err}");
    }

    #[test]
    fn a_sites_operators_have_a_role_and_one_entry_each() {
        let file = Path::new("central.toml");
        let key = "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
        let site =
            format!("[[sites]]\nname = \"depot-7\"\nanchor = \"/a.pem\"\npublic_key = \"{key}\"\n");
        let person = |name: &str, role: &str| {
            format!("[[sites.operators]]\nname = \"{name}\"\npublic_key = \"{key}\"\nrole = \"{role}\"\n")
        };
        let config = CentralConfig::parse(
            file,
            &format!(
                "{BASE}{site}{}{}",
                person("alice", "reader"),
                person("bob", "operator")
            ),
        )
        .expect("two people");
        let roles: Vec<Role> = config.sites[0].operators.iter().map(|o| o.role).collect();
        assert_eq!(roles, [Role::Reader, Role::Operator]);
        assert!(Role::Reader < Role::Operator);
        let twice = format!(
            "{BASE}{site}{}{}",
            person("alice", "reader"),
            person("alice", "operator")
        );
        let err = CentralConfig::parse(file, &twice).expect_err("twice");
        assert!(
            err.to_string().contains("operator alice is listed twice"),
            "{err}"
        );
        let err = CentralConfig::parse(file, &format!("{BASE}{site}{}", person("eve", "admin")))
            .expect_err("no such role");
        assert!(err.to_string().contains("role"), "{err}");
    }

    #[test]
    fn tls_to_postgres_needs_its_ca_and_a_tcp_host() {
        let file = Path::new("central.toml");
        let head = "listen = \"127.0.0.1:8443\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\n";
        let parse =
            |postgres: &str| CentralConfig::parse(file, &format!("{head}[postgres]\n{postgres}"));
        let tcp = "connect = \"host=db.example port=5432 dbname=pimesh\"\n";
        let config = parse(&format!("{tcp}ca = \"/etc/pimesh/db-ca.pem\"\n")).expect("TLS");
        assert!(matches!(config.storage(), StorageChoice::Postgres(p) if p.ca.is_some()));

        let unix = "connect = \"host=/run/postgresql dbname=pimesh\"\nca = \"/ca.pem\"\n";
        let err = parse(unix).expect_err("a socket cannot be TLS");
        assert_eq!(err.key.as_deref(), Some("postgres.connect"), "{err}");
        assert!(err.to_string().contains("Unix sockets"), "{err}");

        let required = "connect = \"host=db.example dbname=pimesh sslmode=require\"\n";
        let err = parse(required).expect_err("TLS without a CA");
        assert!(err.to_string().contains("set [postgres] ca"), "{err}");
    }
}
