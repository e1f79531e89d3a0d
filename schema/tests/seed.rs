use std::path::Path;

use base64::Engine as _;
use pimesh_schema::seed::{is_blank, read_small, MAX_SEED_BYTES};
use pimesh_schema::{Role, Seed};

const FILE: &str = "/boot/firmware/pimesh.toml";

fn ed25519_line(comment: &str) -> String {
    let mut blob = Vec::new();
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend_from_slice(&[7u8; 32]);
    format!(
        "ssh-ed25519 {} {comment}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

fn token() -> String {
    format!("K10{}::{}", "ab".repeat(32), "s3cretS3cretS3cret")
}

fn parse(text: &str) -> Result<Seed, pimesh_schema::ConfigError> {
    Seed::parse(Path::new(FILE), text)
}

#[test]
fn a_complete_seed_is_read_whole() {
    let text = format!(
        r#"site = "fleet-depot-7"
role = "join"
node = "pi-a"
join_token = "{}"
servers = ["10.0.0.10", "pi-b.local:6443"]
ssh_authorized_keys = ["{}"]

[central]
url = "https://central.example:8443"
public_key = "ed25519:{}"
"#,
        token(),
        ed25519_line("ops@laptop"),
        base64::engine::general_purpose::STANDARD.encode([1u8; 32])
    );
    let seed = parse(&text).expect("valid seed");
    assert_eq!(seed.site.as_str(), "fleet-depot-7");
    assert_eq!(seed.role, Role::Join);
    assert_eq!(seed.node.as_ref().map(|n| n.as_str()), Some("pi-a"));
    assert_eq!(seed.servers.len(), 2);
    assert_eq!(
        seed.ssh_authorized_keys[0].as_line(),
        ed25519_line("ops@laptop")
    );
    let token = seed.join_token.expect("token");
    assert_eq!(token.anchor_sha256(), &[0xab; 32]);
    assert_eq!(token.secret(), "s3cretS3cretS3cret");
    assert!(
        !format!("{token:?}").contains("s3cret"),
        "Debug must not show the secret"
    );
    let central = seed.central.expect("central");
    assert_eq!(central.url.as_url().port(), Some(8443));
    assert_eq!(central.public_key.as_bytes(), &[1u8; 32]);
}

#[test]
fn the_first_server_needs_only_a_site() {
    let seed = parse("site = \"s\"\nrole = \"init\"\n").expect("valid");
    assert_eq!(seed.role, Role::Init);
    assert!(seed.join_token.is_none() && seed.central.is_none() && seed.servers.is_empty());
}

#[test]
fn a_bad_role_names_file_line_key_and_choices() {
    let err = parse("site = \"s\"\nrole = \"captain\"\n").expect_err("bad role");
    assert_eq!(err.file, Path::new(FILE));
    assert_eq!(err.line, Some(2));
    assert_eq!(err.key.as_deref(), Some("role"));
    assert!(
        err.message.contains("init") && err.message.contains("join"),
        "{err}"
    );
    assert!(
        err.to_string().starts_with("/boot/firmware/pimesh.toml:2:"),
        "{err}"
    );
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let err = parse("site = \"s\"\nrole = \"init\"\ncolour = \"blue\"\n").expect_err("unknown");
    assert_eq!(err.line, Some(3));
    assert!(err.message.contains("colour"), "{err}");
    assert!(
        err.message.contains("site"),
        "lists what is expected: {err}"
    );
}

#[test]
fn an_unknown_key_in_a_table_names_the_table() {
    let err = parse("site = \"s\"\nrole = \"init\"\n[central]\nurl = \"https://c\"\nkey = \"x\"\n")
        .expect_err("unknown nested");
    assert_eq!(err.line, Some(5));
    assert!(
        err.key.as_deref().is_some_and(|k| k.starts_with("central")),
        "{err}"
    );
}

#[test]
fn joining_without_a_token_points_at_the_role() {
    let err = parse("site = \"s\"\n\nrole = \"join\"\n").expect_err("no token");
    assert_eq!(err.key.as_deref(), Some("join_token"));
    assert_eq!(err.line, Some(3));
    let err = parse("site = \"s\"\n").expect_err("join is the default role");
    assert_eq!(err.key.as_deref(), Some("join_token"));
}

#[test]
fn each_malformed_value_is_refused_at_its_key() {
    let key = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
    let cases: Vec<(String, &str, usize)> = vec![
        ("site = \"Depot 7\"\nrole = \"init\"\n".into(), "site", 1),
        ("site = \"s\"\nrole = \"init\"\nnode = \"pi_a\"\n".into(), "node", 3),
        ("site = \"s\"\njoin_token = \"K10abc::short\"\n".into(), "join_token", 2),
        ("site = \"s\"\nrole = \"init\"\nservers = [\"a b\"]\n".into(), "servers[0]", 3),
        (
            format!("site = \"s\"\nrole = \"init\"\nssh_authorized_keys = [\"{}\", \"ssh-ed25519 AAAA\"]\n", ed25519_line("a")),
            "ssh_authorized_keys[1]",
            3,
        ),
        (
            format!("site = \"s\"\nrole = \"init\"\n[central]\nurl = \"http://c\"\npublic_key = \"ed25519:{key}\"\n"),
            "central.url",
            4,
        ),
        (
            "site = \"s\"\nrole = \"init\"\n[central]\nurl = \"https://c\"\npublic_key = \"ed25519:AAAA\"\n".into(),
            "central.public_key",
            5,
        ),
        ("site = \"s\"\nrole = 3\n".into(), "role", 2),
        (
            format!("site = \"s\"\nrole = \"init\"\n[central]\nurl = \"https://c\"\npublic_key = \"ed25519:{key}\"\nca = \"not a certificate\"\n"),
            "central.ca",
            6,
        ),
        (
            format!("site = \"s\"\nrole = \"init\"\n[central]\nurl = \"https://c\"\npublic_key = \"ed25519:{key}\"\nca = \"-----BEGIN CERTIFICATE-----\\n%%%\\n-----END CERTIFICATE-----\"\n"),
            "central.ca",
            6,
        ),
    ];
    for (text, key, line) in cases {
        let err = parse(&text).expect_err(&text);
        assert_eq!(err.key.as_deref(), Some(key), "{text}: {err}");
        assert_eq!(err.line, Some(line), "{text}: {err}");
        assert!(
            err.message.contains("expected"),
            "says what was expected: {err}"
        );
    }
}

#[test]
fn fallback_central_urls_follow_the_first_and_none_is_listed_twice() {
    let key = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
    let seed = parse(&format!(
        "site = \"s\"\nrole = \"init\"\n[central]\nurl = \"https://a:8443\"\n\
         fallback_urls = [\"https://b:8443\", \"https://c:8443\"]\npublic_key = \"ed25519:{key}\"\n"
    ))
    .expect("valid");
    let urls: Vec<String> = seed
        .central
        .expect("central")
        .urls()
        .map(|url| url.as_url().to_string())
        .collect();
    assert_eq!(
        urls,
        ["https://a:8443/", "https://b:8443/", "https://c:8443/"]
    );

    let err = parse(&format!(
        "site = \"s\"\nrole = \"init\"\n[central]\nurl = \"https://a:8443\"\n\
         fallback_urls = [\"https://a:8443\"]\npublic_key = \"ed25519:{key}\"\n"
    ))
    .expect_err("twice");
    assert_eq!(err.key.as_deref(), Some("central.fallback_urls"), "{err}");
    assert!(err.to_string().contains("https://a:8443/ twice"), "{err}");
    let err = parse(&format!(
        "site = \"s\"\nrole = \"init\"\n[central]\nurl = \"https://a\"\n\
         fallback_urls = [\"http://b\"]\npublic_key = \"ed25519:{key}\"\n"
    ))
    .expect_err("http");
    assert!(err.to_string().contains("https://"), "{err}");
}

#[test]
fn a_central_ca_in_pem_is_kept() {
    let key = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
    let pem = "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n";
    let seed = parse(&format!(
        "site = \"s\"\nrole = \"init\"\n[central]\nurl = \"https://c\"\npublic_key = \"ed25519:{key}\"\nca = \"\"\"\n{pem}\"\"\"\n"
    ))
    .expect("valid");
    let ca = seed.central.and_then(|c| c.ca).expect("ca");
    assert!(ca.as_str().contains("AQID"));
}

#[test]
fn a_syntax_error_names_its_line() {
    let err = parse("site = \"s\"\nrole = \"init\n").expect_err("unterminated string");
    assert_eq!(err.line, Some(2));
}

#[test]
fn a_missing_site_is_named() {
    let err = parse("role = \"init\"\n").expect_err("no site");
    assert!(err.message.contains("site"), "{err}");
}

#[test]
fn files_too_large_or_not_utf8_are_refused_unparsed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; MAX_SEED_BYTES as usize + 1]).expect("write");
    let err = read_small(&big).expect_err("too big");
    assert!(err.message.contains("at most"), "{err}");

    let latin1 = dir.path().join("latin1.toml");
    std::fs::write(&latin1, b"site = \"s\"\n# d\xe9p\xf4t\n").expect("write");
    let err = read_small(&latin1).expect_err("not utf-8");
    assert_eq!(err.line, Some(2));

    let missing = dir.path().join("missing.toml");
    let err = Seed::load(&missing).expect_err("missing");
    assert!(err.message.contains("cannot open"), "{err}");
}

#[test]
fn the_shipped_template_is_blank_and_the_example_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let template = root.join("configs/pimesh.toml");
    let text = std::fs::read_to_string(&template).expect("template");
    assert!(
        is_blank(&text),
        "the template on the boot partition sets nothing by default"
    );
    let example = root.join("configs/pimesh.example.toml");
    let seed = Seed::load(&example).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(seed.site.as_str(), "fleet-depot-7");
}
