use std::path::PathBuf;
use std::time::SystemTime;

use base64::Engine as _;
use pimesh_identity::{anchor_sha256_hex, TrustRoot};
use pimesh_schema::DnsLabel;
use ring::rand::{SecureRandom as _, SystemRandom};

use crate::secret_file;

/// The file in a site folder that names the site.
pub const SITE_NAME_FILE: &str = "site-name";
/// The file in a site folder holding the site's trust anchor certificate (PEM).
pub const ANCHOR_FILE: &str = "anchor.pem";
/// The file in a site folder holding the join token for new cards' seeds (0600).
pub const JOIN_TOKEN_FILE: &str = "join-token";

/// The site a site folder belongs to.
pub fn name_of(site_dir: &std::path::Path) -> Result<DnsLabel, crate::Failure> {
    let path = site_dir.join(SITE_NAME_FILE);
    let text = std::fs::read_to_string(&path).map_err(|err| {
        format!(
            "cannot read {}: {err} (is this a folder made by `pimeshctl site init`?)",
            path.display()
        )
    })?;
    Ok(DnsLabel::try_from(text.trim().to_owned())
        .map_err(|err| format!("{}: {err}", path.display()))?)
}

/// Length of the join token's secret, in letters and digits (about 143 bits).
const SECRET_LEN: usize = 24;

/// Creates a site's keys in `out` (default `./<site>`) and prints the seed values.
pub fn init(
    site: &str,
    central_url: Option<&str>,
    out: Option<PathBuf>,
) -> Result<(), crate::Failure> {
    let site = DnsLabel::try_from(site.to_owned()).map_err(|err| format!("site name: {err}"))?;
    if let Some(url) = central_url {
        crate::central_url::check_url(url).map_err(|err| format!("--central-url {err}"))?;
    }
    let out = out.unwrap_or_else(|| PathBuf::from(site.as_str()));
    if out.exists() {
        return Err(format!(
            "{} exists: a site is created once; choose another --out",
            out.display()
        )
        .into());
    }
    std::fs::create_dir_all(&out)
        .map_err(|err| format!("cannot create {}: {err}", out.display()))?;
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|err| format!("cannot restrict {}: {err}", out.display()))?;

    let root = TrustRoot::generate(&site, SystemTime::now()).map_err(|err| err.to_string())?;
    let rng = SystemRandom::new();
    let signing = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| "cannot generate the site signing key".to_owned())?;
    let public_key = public_key_of_pkcs8(signing.as_ref())
        .ok_or_else(|| "cannot read back the site signing key".to_owned())?;
    let join_token = format!(
        "K10{}::{}",
        anchor_sha256_hex(root.anchor.cert_der()),
        random_secret(&rng)?
    );

    let write = |name: &str, contents: &[u8], public: bool| {
        secret_file::create(&out.join(name), contents, public)
    };
    write(ANCHOR_FILE, root.anchor.cert_pem().as_bytes(), true)?;
    write("anchor.key", root.anchor.key_pem().as_bytes(), false)?;
    write("issuer.pem", root.issuer.cert_pem().as_bytes(), true)?;
    write("issuer.key", root.issuer.key_pem().as_bytes(), false)?;
    write("signing.pk8", signing.as_ref(), false)?;
    write(JOIN_TOKEN_FILE, format!("{join_token}\n").as_bytes(), false)?;
    write(SITE_NAME_FILE, format!("{site}\n").as_bytes(), true)?;

    println!("Created site {site} in {}/ (keep it private; *.key, signing.pk8 and join-token are secrets).", out.display());
    println!("Seed values for its nodes (pimesh.toml):\n");
    println!("site = \"{site}\"");
    println!("join_token = \"{join_token}\"");
    if let Some(url) = central_url {
        println!("\n[central]\nurl = \"{url}\"\npublic_key = \"{public_key}\"");
        println!("# fallback_urls = [\"https://...\"]  # more central replicas, tried in turn");
    } else {
        println!("# central public_key = \"{public_key}\"");
    }
    Ok(())
}

/// `pimeshctl operator keygen NAME --site SITE`: a person's own key for a site's operator
/// requests, written to `out` (0600); prints the central server's `[[sites.operators]]`
/// entry for it and how to use it.
pub fn operator_keygen(
    name: &str,
    site: &str,
    role: &str,
    out: &std::path::Path,
) -> Result<(), crate::Failure> {
    let name =
        DnsLabel::try_from(name.to_owned()).map_err(|err| format!("operator name: {err}"))?;
    let site = DnsLabel::try_from(site.to_owned()).map_err(|err| format!("--site: {err}"))?;
    if !matches!(role, "reader" | "operator") {
        return Err(format!("--role: expected reader or operator, found {role:?}").into());
    }
    if out.exists() {
        return Err(format!("{} exists: choose another --out", out.display()).into());
    }
    let rng = SystemRandom::new();
    let key = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| "cannot generate the operator key".to_owned())?;
    let public_key = public_key_of_pkcs8(key.as_ref())
        .ok_or_else(|| "cannot read back the operator key".to_owned())?;
    secret_file::create(out, key.as_ref(), false)?;
    println!(
        "Wrote {name}'s key to {} (a secret: it stays with {name}).",
        out.display()
    );
    println!(
        "Add to the site's entry in the central server's central.toml:
"
    );
    println!("[[sites.operators]]    # of site {site}");
    println!("name = \"{name}\"");
    println!("public_key = \"{public_key}\"");
    println!(
        "role = \"{role}\"       # reader: read the site; operator: also pause, resume, abort"
    );
    println!(
        "\n{name} then signs with it: PIMESH_OPERATOR={name} PIMESH_OPERATOR_KEY={} pimeshctl ... \
         (a site folder holding only site-name is enough; publishing still needs the site key)",
        out.display()
    );
    Ok(())
}

/// The public half of an Ed25519 PKCS#8 key, as sites and seeds write it:
/// `ed25519:<base64>`.
fn public_key_of_pkcs8(pkcs8: &[u8]) -> Option<String> {
    use ring::signature::KeyPair as _;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8).ok()?;
    Some(format!(
        "ed25519:{}",
        base64::engine::general_purpose::STANDARD.encode(pair.public_key().as_ref())
    ))
}

/// The public key of the site folder's revision-signing key (`signing.pk8`).
pub fn public_key_of(site_dir: &std::path::Path) -> Result<String, crate::Failure> {
    let path = site_dir.join("signing.pk8");
    let pkcs8 =
        std::fs::read(&path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    public_key_of_pkcs8(&pkcs8)
        .ok_or_else(|| format!("{}: not an Ed25519 PKCS#8 key", path.display()).into())
}

/// Letters and digits from the secure random source, without modulo bias.
pub(crate) fn random_secret(rng: &SystemRandom) -> Result<String, crate::Failure> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut secret = String::with_capacity(SECRET_LEN);
    while secret.len() < SECRET_LEN {
        let mut byte = [0u8; 1];
        rng.fill(&mut byte)
            .map_err(|_| "the system random source failed".to_owned())?;
        // 248 = 4 * 62: bytes at or above it would favour the first letters.
        if byte[0] < 248 {
            secret.push(char::from(ALPHABET[usize::from(byte[0]) % ALPHABET.len()]));
        }
    }
    Ok(secret)
}
