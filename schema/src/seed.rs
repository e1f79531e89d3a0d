//! The seed: `pimesh.toml` on the boot partition, the one file a user edits after flashing.
//!
//! It says which site the node belongs to and how it gets there. Everything else (services,
//! policies, replica counts) comes later from the site configuration.

use crate::ValueError;
use std::fmt;
use std::path::Path;

use crate::position::locate;
use crate::{parse_toml, ConfigError, DnsLabel};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Seeds larger than this are refused unread: a seed is a few hundred bytes.
pub const MAX_SEED_BYTES: u64 = 64 * 1024;

/// A validated seed. Holding one means every field is well formed and the fields agree
/// with each other (a joining node has a join token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub site: DnsLabel,
    pub role: Role,
    /// The node's name; `None` lets the node derive one from its board serial number.
    pub node: Option<DnsLabel>,
    pub join_token: Option<JoinToken>,
    /// Servers to join; empty means discover them on the local network.
    pub servers: Vec<ServerAddress>,
    pub ssh_authorized_keys: Vec<SshPublicKey>,
    pub central: Option<Central>,
    /// The network interfaces on which the node announces itself and looks for its site's
    /// servers by mDNS; `None`: every interface. A board with an uplink and a site LAN (or
    /// a VM with a NAT card) keeps mDNS on the LAN.
    pub mdns_interfaces: Option<Vec<InterfaceName>>,
    /// The seed's `[k3s]`: how K3s uses this node's disks.
    pub k3s: SeedK3s,
}

/// The seed's `[k3s]` table: what is decided per node before K3s's first start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedK3s {
    /// Where K3s keeps its data (`/var/lib/rancher`).
    #[serde(default)]
    pub datastore: DatastoreChoice,
}

/// `[k3s] datastore`: whether the supervisor may put `/var/lib/rancher` on a USB or NVMe
/// disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum DatastoreChoice {
    /// On a blank or already prepared USB/NVMe disk when there is one, else the SD card.
    #[default]
    Auto,
    /// Always on the SD card: no disk is touched.
    SdCard,
}

impl TryFrom<String> for DatastoreChoice {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        match text.as_str() {
            "auto" => Ok(DatastoreChoice::Auto),
            "sd-card" => Ok(DatastoreChoice::SdCard),
            _ => Err(ValueError(format!(
                "expected `auto` (a USB or NVMe disk when there is one) or `sd-card`, found {text:?}"
            ))),
        }
    }
}

impl DatastoreChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            DatastoreChoice::Auto => "auto",
            DatastoreChoice::SdCard => "sd-card",
        }
    }
}

/// What a node does on first boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Role {
    /// The site's first server: creates the trust root and the cluster.
    Init,
    /// Joins the site's existing servers.
    #[default]
    Join,
}

impl TryFrom<String> for Role {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        match text.as_str() {
            "init" => Ok(Role::Init),
            "join" => Ok(Role::Join),
            _ => Err(ValueError(format!(
                "expected `init` or `join`, found {text:?}"
            ))),
        }
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Init => "init",
            Role::Join => "join",
        }
    }
}

/// The central server that serves this site's signed configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Central {
    pub url: CentralUrl,
    /// More replicas of the same central server, tried in order when the ones before
    /// them give no answer.
    #[serde(default)]
    pub fallback_urls: Vec<CentralUrl>,
    pub public_key: SigningKey,
    /// The certificate authority that signed the central server's TLS certificate, when it
    /// is not one of the public roots the node ships with.
    #[serde(default)]
    pub ca: Option<PemCertificates>,
}

impl Central {
    /// Every URL of the central server, `url` first.
    pub fn urls(&self) -> impl Iterator<Item = &CentralUrl> {
        std::iter::once(&self.url).chain(&self.fallback_urls)
    }
}

/// One or more PEM `CERTIFICATE` blocks, as text. Holding one means the text has at least
/// one well-delimited certificate block and nothing but certificate blocks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct PemCertificates(String);

impl PemCertificates {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PemCertificates {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
        const END: &str = "-----END CERTIFICATE-----";
        let expected = "expected one or more PEM blocks `-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----`";
        let mut rest = text.trim();
        let mut blocks = 0;
        while !rest.is_empty() {
            let body = rest.strip_prefix(BEGIN).ok_or_else(|| {
                ValueError(format!(
                    "{expected}, found text outside a certificate block"
                ))
            })?;
            let end = body
                .find(END)
                .ok_or_else(|| ValueError(format!("{expected}; a block has no END line")))?;
            let (base64_lines, after) = body.split_at(end);
            let encoded: String = base64_lines.split_whitespace().collect();
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|err| ValueError(format!("{expected}; a block is not base64: {err}")))?;
            rest = after[END.len()..].trim_start();
            blocks += 1;
        }
        if blocks == 0 {
            return Err(ValueError(format!("{expected}, found nothing")));
        }
        Ok(PemCertificates(text))
    }
}

/// An `https://` URL with a host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct CentralUrl(url::Url);

impl CentralUrl {
    pub fn as_url(&self) -> &url::Url {
        &self.0
    }
}

impl TryFrom<String> for CentralUrl {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        let url = url::Url::parse(&text).map_err(|err| {
            ValueError(format!("expected an https:// URL, found {text:?} ({err})"))
        })?;
        if url.scheme() != "https" {
            return Err(ValueError(format!(
                "expected an https:// URL, found scheme {:?}",
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(ValueError(format!(
                "expected an https:// URL with a host, found {text:?}"
            )));
        }
        Ok(CentralUrl(url))
    }
}

/// The site's Ed25519 configuration-signing public key, written `ed25519:<base64>`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SigningKey([u8; 32]);

impl SigningKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl TryFrom<String> for SigningKey {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        let expected = "expected `ed25519:` followed by 32 bytes in base64";
        let encoded = text
            .strip_prefix("ed25519:")
            .ok_or_else(|| ValueError(format!("{expected}, found {text:?}")))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|err| ValueError(format!("{expected}: {err}")))?;
        let key: [u8; 32] = bytes.try_into().map_err(|bytes: Vec<u8>| {
            ValueError(format!("{expected}, found {} bytes", bytes.len()))
        })?;
        Ok(SigningKey(key))
    }
}

impl fmt::Display for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ed25519:{}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A site join token, `K10<sha256 of the site trust anchor, hex>::<secret>`: the joining
/// node proves the secret and checks that the server it reached holds that anchor.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct JoinToken {
    anchor_sha256: [u8; 32],
    secret: String,
}

impl JoinToken {
    pub fn anchor_sha256(&self) -> &[u8; 32] {
        &self.anchor_sha256
    }

    pub fn anchor_sha256_hex(&self) -> String {
        self.anchor_sha256
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }
}

impl TryFrom<String> for JoinToken {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        let expected = "expected `K10<64 hex digits>::<secret of at least 16 letters or digits>`";
        let (hash, secret) = text
            .strip_prefix("K10")
            .and_then(|rest| rest.split_once("::"))
            .ok_or_else(|| ValueError(format!("{expected}, found a token of another form")))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ValueError(format!(
                "{expected}; the anchor hash has {} characters",
                hash.len()
            )));
        }
        if secret.len() < 16 || !secret.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(ValueError(format!(
                "{expected}; the secret is too short or has other characters"
            )));
        }
        let mut anchor_sha256 = [0u8; 32];
        for (i, byte) in anchor_sha256.iter_mut().enumerate() {
            let pair = &hash[2 * i..2 * i + 2];
            *byte = u8::from_str_radix(pair, 16)
                .map_err(|err| ValueError(format!("{expected}: {err}")))?;
        }
        Ok(JoinToken {
            anchor_sha256,
            secret: secret.to_owned(),
        })
    }
}

/// The secret never appears in logs or status output.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "K10{}::<redacted>", self.anchor_sha256_hex())
    }
}

/// A network interface's name as the kernel knows it (`eth0`, `end0`): 1 to 15 bytes,
/// no `/`, no whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InterfaceName(String);

impl InterfaceName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for InterfaceName {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        let usable = (1..=15).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
        if usable {
            Ok(InterfaceName(text))
        } else {
            Err(ValueError(format!(
                "expected a network interface name (1 to 15 letters, digits, `-`, `_` or `.`), found {text:?}"
            )))
        }
    }
}

impl From<InterfaceName> for String {
    fn from(name: InterfaceName) -> String {
        name.0
    }
}

/// A server to join: `host` or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServerAddress(String);

impl TryFrom<String> for ServerAddress {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        let expected = "expected `host` or `host:port`";
        let url = url::Url::parse(&format!("https://{text}/"))
            .map_err(|err| ValueError(format!("{expected}, found {text:?} ({err})")))?;
        if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
            return Err(ValueError(format!("{expected}, found {text:?}")));
        }
        Ok(ServerAddress(text))
    }
}

impl From<ServerAddress> for String {
    fn from(address: ServerAddress) -> String {
        address.0
    }
}

/// One OpenSSH public key line, `<type> <base64 blob> [comment]`, whose blob is a key of
/// the named type.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SshPublicKey(String);

const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

impl SshPublicKey {
    /// The key as one `authorized_keys` line (without the newline).
    pub fn as_line(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SshPublicKey {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        let expected =
            "expected an OpenSSH public key line such as `ssh-ed25519 AAAA... user@host`";
        let line = text.trim();
        if line.contains('\n') {
            return Err(ValueError(format!("{expected}, found several lines")));
        }
        let mut parts = line.split_whitespace();
        let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
            return Err(ValueError(format!("{expected}, found {line:?}")));
        };
        if !SSH_KEY_TYPES.contains(&kind) {
            return Err(ValueError(format!("{expected}; unknown key type {kind:?}")));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(blob)
            .map_err(|err| ValueError(format!("{expected}; the key data is not base64: {err}")))?;
        // The blob starts with the key type as an SSH string: a 4-byte length, then the name.
        let declared = bytes
            .get(..4)
            .and_then(|len| <[u8; 4]>::try_from(len).ok())
            .map(|len| u32::from_be_bytes(len) as usize)
            .and_then(|len| bytes.get(4..4 + len));
        if declared != Some(kind.as_bytes()) {
            return Err(ValueError(format!(
                "{expected}; the key data is not a {kind} key"
            )));
        }
        Ok(SshPublicKey(line.to_owned()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSeed {
    site: DnsLabel,
    #[serde(default)]
    role: Role,
    node: Option<DnsLabel>,
    join_token: Option<JoinToken>,
    #[serde(default)]
    servers: Vec<ServerAddress>,
    #[serde(default)]
    ssh_authorized_keys: Vec<SshPublicKey>,
    central: Option<Central>,
    mdns_interfaces: Option<Vec<InterfaceName>>,
    #[serde(default)]
    k3s: SeedK3s,
}

impl Seed {
    /// Reads and validates the seed at `file`.
    pub fn load(file: &Path) -> Result<Seed, ConfigError> {
        let text = read_small(file)?;
        Seed::parse(file, &text)
    }

    /// Validates `text`, the contents of `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Seed, ConfigError> {
        let raw: RawSeed = parse_toml(file, text)?;
        let role = raw.role;
        if role == Role::Join && raw.join_token.is_none() {
            return Err(ConfigError::at_key(
                file,
                text,
                locate(text, &["role"]),
                "join_token",
                "missing: a node with role `join` needs the site's join token \
                 (`pimeshctl site init` prints it); set role = \"init\" for the site's first server",
            ));
        }
        if let Some(central) = &raw.central {
            let urls: Vec<&CentralUrl> = central.urls().collect();
            if let Some(twice) = urls
                .iter()
                .enumerate()
                .find_map(|(i, url)| urls[..i].contains(url).then_some(url))
            {
                return Err(ConfigError::at_path(
                    file,
                    text,
                    &["central", "fallback_urls"],
                    format!(
                        "expected each central URL once, found {} twice",
                        twice.as_url()
                    ),
                ));
            }
        }
        Ok(Seed {
            site: raw.site,
            role,
            node: raw.node,
            join_token: raw.join_token,
            servers: raw.servers,
            ssh_authorized_keys: raw.ssh_authorized_keys,
            central: raw.central,
            mdns_interfaces: raw.mdns_interfaces,
            k3s: raw.k3s,
        })
    }
}

/// Whether `text` holds no settings at all (only comments and blank lines): an unedited
/// template rather than a broken file.
pub fn is_blank(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .all(|line| line.is_empty() || line.starts_with('#'))
}

/// Reads a configuration file, refusing one larger than [`MAX_SEED_BYTES`] or not UTF-8.
pub fn read_small(file: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let handle = std::fs::File::open(file)
        .map_err(|err| ConfigError::file(file, format!("cannot open: {err}")))?;
    let mut bytes = Vec::new();
    handle
        .take(MAX_SEED_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|err| ConfigError::file(file, format!("cannot read: {err}")))?;
    if bytes.len() as u64 > MAX_SEED_BYTES {
        return Err(ConfigError::file(
            file,
            format!("expected at most {MAX_SEED_BYTES} bytes, the file is larger"),
        ));
    }
    String::from_utf8(bytes).map_err(|err| {
        let text = String::from_utf8_lossy(err.as_bytes()).into_owned();
        let offset = err.utf8_error().valid_up_to();
        let mut error = ConfigError::file(file, "expected UTF-8 text, found invalid bytes");
        let (line, column) = crate::position::line_column(&text, offset);
        error.line = Some(line);
        error.column = Some(column);
        error
    })
}

#[cfg(test)]
mod mdns_interface_tests {
    use super::*;

    #[test]
    fn mdns_interfaces_are_interface_names() {
        let file = Path::new("/boot/firmware/pimesh.toml");
        let seed = Seed::parse(
            file,
            "site = \"s\"\nrole = \"init\"\nmdns_interfaces = [\"eth1\"]\n",
        )
        .expect("valid");
        let names: Vec<&str> = seed
            .mdns_interfaces
            .iter()
            .flatten()
            .map(InterfaceName::as_str)
            .collect();
        assert_eq!(names, ["eth1"]);
        let err = Seed::parse(
            file,
            "site = \"s\"\nrole = \"init\"\nmdns_interfaces = [\"eth 1\"]\n",
        )
        .expect_err("a space")
        .to_string();
        assert!(
            err.contains("mdns_interfaces") && err.contains("network interface name"),
            "{err}"
        );
        assert!(Seed::parse(file, "site = \"s\"\nrole = \"init\"\n")
            .expect("valid")
            .mdns_interfaces
            .is_none());
    }
}

#[cfg(test)]
mod k3s_tests {
    use super::*;

    const FILE: &str = "/boot/firmware/pimesh.toml";

    #[test]
    fn the_datastore_is_auto_unless_the_seed_says_sd_card() {
        let file = Path::new(FILE);
        let seed = Seed::parse(file, "site = \"s\"\nrole = \"init\"\n").expect("valid");
        assert_eq!(seed.k3s.datastore, DatastoreChoice::Auto);
        let seed = Seed::parse(
            file,
            "site = \"s\"\nrole = \"init\"\n[k3s]\ndatastore = \"sd-card\"\n",
        )
        .expect("valid");
        assert_eq!(seed.k3s.datastore, DatastoreChoice::SdCard);
        assert_eq!(seed.k3s.datastore.as_str(), "sd-card");
    }

    #[test]
    fn a_bad_datastore_names_file_line_key_and_choices() {
        let file = Path::new(FILE);
        let err = Seed::parse(
            file,
            "site = \"s\"\nrole = \"init\"\n[k3s]\ndatastore = \"usb\"\n",
        )
        .expect_err("not a choice");
        assert_eq!(err.file, Path::new(FILE));
        assert_eq!(err.line, Some(4));
        assert_eq!(err.key.as_deref(), Some("k3s.datastore"));
        let text = err.to_string();
        assert!(
            text.contains("`auto`") && text.contains("`sd-card`"),
            "{text}"
        );
        let err = Seed::parse(file, "site = \"s\"\nrole = \"init\"\n[k3s]\nservers = 3\n")
            .expect_err("not a seed key");
        assert_eq!(err.line, Some(4), "{err}");
        assert!(err.to_string().contains("servers"), "{err}");
    }
}
