//! `pimeshctl site token rotate` against a real control replica: a board joins with the
//! token `site init` made; once the rotated `[join]` block is in the replica's
//! cluster.toml, the old token is refused and a board with the new one joins.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::net::IpAddr;
use std::path::Path;
use std::time::SystemTime;

use pimesh_identity::{Authority, TrustRoot};
use pimesh_join::{Refusal, RefusalCode};
use pimesh_schema::JoinToken;
use pimesh_test_support::control::Replica;
use pimesh_test_support::http::HttpResponse;
use pimesh_test_support::join::{join, join_json, node_request, sha256_hex};
use pimesh_test_support::{label, path_str, replace, text, wait_until_blocking, Binary, Site};

const SITE: &str = "depot-7";

/// Runs pimeshctl with `args`, which must succeed; its standard output.
fn pimeshctl(args: &[&str]) -> String {
    let run = Binary::Ctl.output(args);
    assert!(
        run.status.success(),
        "pimeshctl {args:?}: {}",
        text(&run.stderr)
    );
    text(&run.stdout)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The site as `site init` wrote it into `site_dir`, for the joining node's pinned client.
fn site_of(site_dir: &Path) -> Site {
    let authority = |name: &str| {
        Authority::from_pem(
            &read(&site_dir.join(format!("{name}.pem"))),
            &read(&site_dir.join(format!("{name}.key"))),
        )
        .unwrap_or_else(|err| panic!("{name}: {err}"))
    };
    Site {
        name: label(SITE),
        root: TrustRoot {
            anchor: authority("anchor"),
            issuer: authority("issuer"),
        },
        now: SystemTime::now(),
    }
}

/// The secret of `token`, `K10<pin>::<secret>`.
fn secret_of(token: &str) -> String {
    JoinToken::try_from(token.trim().to_owned())
        .expect("a join token")
        .secret()
        .to_owned()
}

/// A loopback source address of its own per simulated board: failures count per source.
fn src(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

fn refused_as_wrong_token(response: &HttpResponse) -> bool {
    response.status == 403
        && serde_json::from_slice::<Refusal>(&response.body)
            .is_ok_and(|refusal| refusal.error == RefusalCode::WrongToken)
}

#[test]
fn after_rotation_the_replica_refuses_the_old_token_and_accepts_the_new_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site_dir = dir.path().join(SITE);
    pimeshctl(&["site", "init", SITE, "--out", &path_str(&site_dir)]);
    let original = secret_of(&read(&site_dir.join("join-token")));
    let site = site_of(&site_dir);

    // The replica's trust folder is the site's, accepting the token site init made.
    let trust = dir.path().join("trust");
    std::fs::create_dir(&trust).expect("trust dir");
    for name in ["anchor.pem", "issuer.pem", "issuer.key"] {
        std::fs::copy(site_dir.join(name), trust.join(name)).expect(name);
    }
    std::fs::write(trust.join("join.json"), join_json(&[(&original, None)])).expect("join.json");
    let config = dir.path().join("cluster.toml");
    let minimal = format!("site = \"{SITE}\"\n");
    std::fs::write(&config, &minimal).expect("cluster.toml");
    let replica = Replica::options(1)
        .trust_dir(&trust)
        .config(&config)
        .site(SITE)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .start_blocking();

    // `site token show` gives the block accepting the same token.
    let shown = pimeshctl(&["site", "token", "show", "--site-dir", &path_str(&site_dir)]);
    assert_eq!(
        shown,
        format!(
            "[join]\ntokens = [{{ sha256 = \"{}\" }}]\n",
            sha256_hex(original.as_bytes())
        )
    );

    let old_board = node_request(&site, "pi-a").csr_pem;
    let first = join(&site, replica.port, src(2), "pi-a", &original, &old_board);
    assert_eq!(first.status, 200, "{}", first.text());

    let printed = pimeshctl(&[
        "site",
        "token",
        "rotate",
        "--site-dir",
        &path_str(&site_dir),
    ]);
    let new_token = read(&site_dir.join("join-token"));
    assert!(
        printed.contains(&format!("join_token = \"{}\"", new_token.trim())),
        "{printed}"
    );
    assert_eq!(
        secret_of(&read(&site_dir.join("join-token.previous"))),
        original
    );
    let block: String = printed
        .lines()
        .skip_while(|line| *line != "[join]")
        .take(2)
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(block.contains("tokens = [{ sha256 = \""), "{printed}");
    replace(&config, &format!("{minimal}{block}"));

    // Each poll is a join that succeeds until the change is read: no failure counts
    // against the source until the last one.
    wait_until_blocking("the replica refuses the old token", || {
        refused_as_wrong_token(&join(
            &site,
            replica.port,
            src(2),
            "pi-a",
            &original,
            &old_board,
        ))
    });
    let new_board = node_request(&site, "pi-b").csr_pem;
    let second = join(
        &site,
        replica.port,
        src(3),
        "pi-b",
        &secret_of(&new_token),
        &new_board,
    );
    assert_eq!(second.status, 200, "{}", second.text());
}
