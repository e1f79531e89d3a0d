#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly
use base64::Engine as _;
use pimesh_revision::{Mode, Rejection, Revision, Verifier};
use pimesh_schema::{DnsLabel, SigningKey};
use ring::signature::KeyPair as _;

struct SiteKey {
    pkcs8: Vec<u8>,
    public: SigningKey,
}

fn site_key() -> SiteKey {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .expect("key")
        .as_ref()
        .to_vec();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8).expect("pair");
    let encoded = format!(
        "ed25519:{}",
        base64::engine::general_purpose::STANDARD.encode(pair.public_key().as_ref())
    );
    SiteKey {
        pkcs8,
        public: SigningKey::try_from(encoded).expect("public key"),
    }
}

fn label(s: &str) -> DnsLabel {
    DnsLabel::try_from(s.to_owned()).expect("label")
}

fn revision(site: &str, number: u64, config: &str) -> Revision {
    Revision {
        site: label(site),
        revision: number,
        mode: Mode::Apply,
        config: config.to_owned(),
    }
}

const CONFIG: &str = "site = \"depot-7\"\n[services.web]\nport = 8080\nnodes = [\"pi-a\"]\n";

#[test]
fn a_signed_newer_revision_is_accepted_with_its_config() {
    let key = site_key();
    let signed = revision("depot-7", 4, CONFIG)
        .sign(&key.pkcs8)
        .expect("sign");
    let verifier = Verifier::new(label("depot-7"), key.public);
    let verified = verifier
        .verify(&signed.to_json(), Some(3))
        .expect("accepted");
    assert_eq!(verified.signed.revision, 4);
    assert!(verified.config.services.contains_key(&label("web")));
    verifier
        .verify(&signed.to_json(), None)
        .expect("a first revision");
}

#[test]
fn each_bad_revision_is_rejected_with_its_reason() {
    let key = site_key();
    let verifier = Verifier::new(label("depot-7"), key.public.clone());
    let good = revision("depot-7", 4, CONFIG)
        .sign(&key.pkcs8)
        .expect("sign");
    let json = good.to_json();

    // Replayed and older revisions.
    assert_eq!(
        verifier.verify(&json, Some(4)).unwrap_err(),
        Rejection::NotNewer {
            current: 4,
            offered: 4
        }
    );
    assert_eq!(
        verifier.verify(&json, Some(9)).unwrap_err(),
        Rejection::NotNewer {
            current: 9,
            offered: 4
        }
    );

    // Signed by another key.
    let other = site_key();
    let forged = revision("depot-7", 5, CONFIG)
        .sign(&other.pkcs8)
        .expect("sign");
    assert_eq!(
        verifier.verify(&forged.to_json(), Some(4)).unwrap_err(),
        Rejection::BadSignature
    );

    // A field changed after signing: the revision number, the config.
    let mut bumped = good.clone();
    bumped.revision = 99;
    assert_eq!(
        verifier.verify(&bumped.to_json(), Some(4)).unwrap_err(),
        Rejection::BadSignature
    );
    let mut edited = good.clone();
    edited.config.push_str("# sneaky\n");
    assert_eq!(
        verifier.verify(&edited.to_json(), Some(3)).unwrap_err(),
        Rejection::BadSignature
    );

    // Another site's revision, properly signed with this key.
    let elsewhere = revision("depot-8", 5, &CONFIG.replace("depot-7", "depot-8"))
        .sign(&key.pkcs8)
        .expect("sign");
    assert!(matches!(
        verifier.verify(&elsewhere.to_json(), Some(4)),
        Err(Rejection::WrongSite { .. })
    ));

    // Truncated, garbage, oversized.
    assert!(matches!(
        verifier.verify(&json[..json.len() / 2], None),
        Err(Rejection::Malformed(_))
    ));
    assert!(matches!(
        verifier.verify(b"\x00\xffnot json", None),
        Err(Rejection::Malformed(_))
    ));
    let small = Verifier {
        max_bytes: 64,
        ..Verifier::new(label("depot-7"), key.public.clone())
    };
    assert!(matches!(
        small.verify(&json, None),
        Err(Rejection::TooLarge { max: 64, .. })
    ));

    // A valid signature over an invalid configuration.
    let invalid = revision(
        "depot-7",
        6,
        "site = \"depot-7\"\n[services.web]\nnodes = [\"pi-a\"]\n",
    )
    .sign(&key.pkcs8)
    .expect("sign");
    match verifier.verify(&invalid.to_json(), Some(4)) {
        Err(Rejection::InvalidConfig(err)) => {
            assert_eq!(err.key.as_deref(), Some("services.web.nodes"));
            assert!(err.to_string().contains("revision 6"), "{err}");
        }
        other => panic!("expected an invalid-config rejection, got {other:?}"),
    }

    // A config whose own site differs from the signed site.
    let mismatched = revision("depot-7", 7, &CONFIG.replace("depot-7", "depot-8"))
        .sign(&key.pkcs8)
        .expect("sign");
    assert!(matches!(
        verifier.verify(&mismatched.to_json(), Some(4)),
        Err(Rejection::WrongSite { .. })
    ));
}
