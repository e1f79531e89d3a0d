//! `pimeshctl site token`: the site folder's join token, and the `[join]` block of the
//! site's `cluster.toml` that makes its control replicas accept it.
//!
//! A site folder holds one current token, `join-token` (0600): the one the seeds of cards
//! flashed from now on carry, `K10<sha256 of anchor.pem's DER, hex>::<secret>`.
//! [`rotate`] makes a new secret under the same anchor pin and keeps the token it replaced
//! as `join-token.previous` (0600; only the last one). Replicas never see a secret: the
//! printed block carries its SHA-256 as `pimesh_join` computes it, and a site config's
//! `[join] tokens` replaces every replica's list, so publishing it refuses the old token.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pimesh_identity::anchor_sha256_hex;
use pimesh_join::AcceptedToken;
use pimesh_schema::{DnsLabel, JoinToken};
use ring::rand::SystemRandom;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

use crate::site::{self, ANCHOR_FILE, JOIN_TOKEN_FILE};
use crate::{secret_file, Failure};

/// Where [`rotate`] keeps the token it replaced.
pub const PREVIOUS_TOKEN_FILE: &str = "join-token.previous";

/// Added to errors about a site folder's files.
const SITE_INIT_HINT: &str = "is this a folder made by `pimeshctl site init`?";

/// What [`rotate_at`] wrote, and what the operator is told.
///
/// Invariant: `token` is what `join-token` now holds, and `accepted` is the digest of its
/// secret (with the expiry asked for).
struct Rotation {
    site: DnsLabel,
    /// The new token, `K10<pin>::<secret>`.
    token: String,
    accepted: AcceptedToken,
    /// Where the replaced token went, when there was one.
    previous: Option<PathBuf>,
}

/// The new token's secret never appears in debug output (as with the schema's `JoinToken`).
impl std::fmt::Debug for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation")
            .field("site", &self.site)
            .field("token", &"K10…::<redacted>")
            .field("accepted", &self.accepted)
            .field("previous", &self.previous)
            .finish()
    }
}

/// `pimeshctl site token rotate`: a new token in `site_dir`, accepted until now +
/// `expires_in` (forever when `None`); prints its seed line and `[join]` block.
pub fn rotate(site_dir: &Path, expires_in: Option<Duration>) -> Result<(), Failure> {
    let rotation = rotate_at(site_dir, expires_in, SystemTime::now())?;
    print!("{}", report(site_dir, &rotation));
    Ok(())
}

/// `pimeshctl site token show`: prints the `[join]` block (without expiry) accepting the
/// token in `site_dir`'s `join-token`, e.g. to put a site's first token into
/// `cluster.toml`.
pub fn show(site_dir: &Path) -> Result<(), Failure> {
    let token = current(site_dir)?;
    eprintln!(
        "The [join] block accepting {}; it goes into the site's cluster.toml:",
        site_dir.join(JOIN_TOKEN_FILE).display()
    );
    print!(
        "{}",
        join_block(&AcceptedToken::for_secret(token.secret(), None))
    );
    Ok(())
}

/// The rotation of [`rotate`] as of `now`. Nothing is written unless the folder names its
/// site, its anchor reads, and the expiry is representable; the previous token is stored
/// before the new one replaces it, so an interruption never loses the current token.
fn rotate_at(
    site_dir: &Path,
    expires_in: Option<Duration>,
    now: SystemTime,
) -> Result<Rotation, Failure> {
    let site = site::name_of(site_dir)?;
    let pin = anchor_pin(site_dir)?;
    let expires = match expires_in {
        None => None,
        Some(span) if span.is_zero() => {
            return Err(
                "--expires-in must be longer than 0s: the token would never be accepted".into(),
            )
        }
        Some(span) => Some(
            now.checked_add(span)
                .ok_or_else(|| format!("--expires-in {span:?} is further than a time can say"))?,
        ),
    };
    let secret = site::random_secret(&SystemRandom::new())?;
    let token = format!("K10{pin}::{secret}");

    let current = site_dir.join(JOIN_TOKEN_FILE);
    let previous = match std::fs::read(&current) {
        Ok(old) => {
            let path = site_dir.join(PREVIOUS_TOKEN_FILE);
            secret_file::replace(&path, &old, false)?;
            Some(path)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(format!("cannot read {}: {err}", current.display()).into()),
    };
    secret_file::replace(&current, format!("{token}\n").as_bytes(), false)?;
    Ok(Rotation {
        site,
        token,
        accepted: AcceptedToken::for_secret(&secret, expires),
        previous,
    })
}

/// What `rotate` prints: where the tokens are, the seed line, the `[join]` block, and what
/// publishing it does.
fn report(site_dir: &Path, rotation: &Rotation) -> String {
    let mut out = format!(
        "Rotated the join token of site {} in {}/",
        rotation.site,
        site_dir.display()
    );
    match &rotation.previous {
        Some(path) => out.push_str(&format!(
            "; the token it replaced is kept in {}.\n",
            path.display()
        )),
        None => out.push_str(" (there was no token before).\n"),
    }
    out.push_str("\nSeed value for the cards flashed from now on (pimesh.toml):\n\n");
    out.push_str(&format!("join_token = \"{}\"\n", rotation.token));
    out.push_str(
        "\nThe [join] block for the site's cluster.toml (it replaces the tokens listed there):\n\n",
    );
    out.push_str(&join_block(&rotation.accepted));
    out.push_str(
        "\nPublishing a revision with this block makes every control replica refuse the old \
         token; nodes already joined are unaffected.\n",
    );
    out
}

/// `[join]\ntokens = [{ sha256 = "<hex>", expires = "<RFC 3339>" }]\n`, `expires` only
/// when the token has one: the TOML the schema's `[join]` table reads.
fn join_block(token: &AcceptedToken) -> String {
    let digest = String::from(token.sha256);
    match token.expires {
        Some(at) => format!(
            "[join]\ntokens = [{{ sha256 = \"{digest}\", expires = \"{}\" }}]\n",
            String::from(at)
        ),
        None => format!("[join]\ntokens = [{{ sha256 = \"{digest}\" }}]\n"),
    }
}

/// The hex SHA-256 of the DER of `site_dir`'s anchor: the pin every token of the site
/// carries.
fn anchor_pin(site_dir: &Path) -> Result<String, Failure> {
    let path = site_dir.join(ANCHOR_FILE);
    let pem = std::fs::read(&path)
        .map_err(|err| format!("cannot read {}: {err} ({SITE_INIT_HINT})", path.display()))?;
    let anchor = CertificateDer::from_pem_slice(&pem).map_err(|err| {
        format!(
            "{}: expected the site's anchor as a PEM CERTIFICATE: {err} ({SITE_INIT_HINT})",
            path.display()
        )
    })?;
    Ok(anchor_sha256_hex(&anchor))
}

/// The token in `site_dir`'s `join-token`, checked to pin the folder's anchor.
fn current(site_dir: &Path) -> Result<JoinToken, Failure> {
    let pin = anchor_pin(site_dir)?;
    let path = site_dir.join(JOIN_TOKEN_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|err| format!("cannot read {}: {err} ({SITE_INIT_HINT})", path.display()))?;
    let token = JoinToken::try_from(text.trim().to_owned())
        .map_err(|err| format!("{}: {err}", path.display()))?;
    if token.anchor_sha256_hex() != pin {
        return Err(format!(
            "{} pins the anchor {}, but {} is {pin}: the token is not of this site",
            path.display(),
            token.anchor_sha256_hex(),
            site_dir.join(ANCHOR_FILE).display()
        )
        .into());
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    use pimesh_join::secret_sha256;
    use pimesh_schema::cluster::ClusterConfig;

    /// A site folder made by `site init` in a fresh temporary folder.
    fn site_folder() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let site_dir = dir.path().join("depot-7");
        site::init("depot-7", None, Some(site_dir.clone())).expect("site init");
        (dir, site_dir)
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
    }

    fn token_of(text: &str) -> JoinToken {
        JoinToken::try_from(text.trim().to_owned()).expect("a join token")
    }

    /// The `[join]` block of `printed`, parsed as part of a minimal valid cluster.toml.
    fn parsed_block(printed: &str) -> pimesh_schema::cluster::JoinToken {
        let block: String = printed
            .lines()
            .skip_while(|line| *line != "[join]")
            .take(2)
            .map(|line| format!("{line}\n"))
            .collect();
        let text = format!("site = \"depot-7\"\n{block}");
        let config = ClusterConfig::parse(Path::new("cluster.toml"), &text)
            .unwrap_or_else(|err| panic!("{err}\n{text}"));
        let mut tokens = config.join.tokens.expect("[join] tokens");
        assert_eq!(tokens.len(), 1, "{text}");
        tokens.remove(0)
    }

    fn hex_sha256(secret: &str) -> String {
        pimesh_join::hex(&secret_sha256(secret))
    }

    #[test]
    fn the_printed_block_is_valid_cluster_toml_with_the_new_secrets_digest() {
        let (_dir, site_dir) = site_folder();
        let original = read(&site_dir.join(JOIN_TOKEN_FILE));
        let rotation = rotate_at(&site_dir, None, SystemTime::now()).expect("rotate");

        let new = token_of(&read(&site_dir.join(JOIN_TOKEN_FILE)));
        assert_eq!(
            read(&site_dir.join(JOIN_TOKEN_FILE)),
            format!("{}\n", rotation.token)
        );
        assert_ne!(new.secret(), token_of(&original).secret());
        assert_eq!(
            new.anchor_sha256_hex(),
            token_of(&original).anchor_sha256_hex(),
            "the anchor pin is kept"
        );
        assert_eq!(read(&site_dir.join(PREVIOUS_TOKEN_FILE)), original);

        let printed = report(&site_dir, &rotation);
        assert!(printed.contains(&format!("join_token = \"{}\"\n", rotation.token)));
        assert!(printed.contains("refuse the old token"), "{printed}");
        let accepted = parsed_block(&printed);
        assert_eq!(accepted.sha256.as_str(), hex_sha256(new.secret()));
        assert_eq!(accepted.expires, None);
    }

    #[test]
    fn expires_in_gives_an_rfc3339_expiry_of_now_plus_the_duration() {
        let (_dir, site_dir) = site_folder();
        let day = Duration::from_secs(24 * 3600);
        let now = SystemTime::now();
        let rotation = rotate_at(&site_dir, Some(day), now).expect("rotate");
        let printed = report(&site_dir, &rotation);
        let block_line = printed
            .lines()
            .find(|line| line.starts_with("tokens = "))
            .expect("tokens line");
        assert!(
            block_line.contains("expires = \"") && block_line.ends_with("Z\" }]"),
            "{block_line}"
        );
        let expires = parsed_block(&printed).expires.expect("an expiry").0;
        let expected = now + day;
        let off = expires
            .duration_since(expected)
            .or_else(|_| expected.duration_since(expires))
            .expect("a difference");
        assert!(off < Duration::from_secs(2), "{off:?}");

        let zero = rotate_at(&site_dir, Some(Duration::ZERO), now).expect_err("zero");
        assert!(zero.to_string().contains("--expires-in"), "{zero}");
    }

    #[test]
    fn rotating_twice_keeps_only_the_last_previous_token() {
        let (_dir, site_dir) = site_folder();
        let original = read(&site_dir.join(JOIN_TOKEN_FILE));
        let first = rotate_at(&site_dir, None, SystemTime::now()).expect("rotate");
        let second = rotate_at(&site_dir, None, SystemTime::now()).expect("rotate");
        assert_ne!(first.token, second.token);
        assert_eq!(
            read(&site_dir.join(JOIN_TOKEN_FILE)),
            format!("{}\n", second.token)
        );
        assert_eq!(
            read(&site_dir.join(PREVIOUS_TOKEN_FILE)),
            format!("{}\n", first.token)
        );
        let mut names: Vec<String> = std::fs::read_dir(&site_dir)
            .expect("read dir")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        assert!(
            !names.iter().any(|name| name.ends_with(".new")),
            "no staged file left: {names:?}"
        );
        assert!(
            !names
                .iter()
                .any(|name| std::fs::read(site_dir.join(name)).ok()
                    == Some(original.clone().into_bytes())),
            "the original token is gone: {names:?}"
        );
        for name in [JOIN_TOKEN_FILE, PREVIOUS_TOKEN_FILE] {
            let mode = std::fs::metadata(site_dir.join(name))
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }

    #[test]
    fn show_gives_the_current_tokens_block_without_expiry() {
        let (_dir, site_dir) = site_folder();
        let token = current(&site_dir).expect("current");
        let block = join_block(&AcceptedToken::for_secret(token.secret(), None));
        assert_eq!(
            parsed_block(&block).sha256.as_str(),
            hex_sha256(token.secret())
        );
        assert!(!block.contains("expires"));
    }

    #[test]
    fn a_folder_not_made_by_site_init_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = rotate_at(dir.path(), None, SystemTime::now()).expect_err("no site-name");
        let text = err.to_string();
        assert!(
            text.contains("site-name") && text.contains("site init"),
            "{text}"
        );

        std::fs::write(dir.path().join("site-name"), "depot-7\n").expect("write");
        let err = rotate_at(dir.path(), None, SystemTime::now()).expect_err("no anchor");
        let text = err.to_string();
        assert!(
            text.contains("anchor.pem") && text.contains("site init"),
            "{text}"
        );
        assert!(
            !dir.path().join(JOIN_TOKEN_FILE).exists(),
            "nothing written on error"
        );

        let (_other, site_dir) = site_folder();
        std::fs::write(site_dir.join(JOIN_TOKEN_FILE), "not a token\n").expect("write");
        let err = current(&site_dir).expect_err("bad token");
        assert!(err.to_string().contains("join-token"), "{err}");
    }
}
