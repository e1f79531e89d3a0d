//! `Authority::issue_server_leaf`: the serving certificate a control replica makes for
//! itself, checked by webpki (the verifier rustls uses) for names and usage.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

use pimesh_identity::{verify_leaf, SpiffeId, TrustRoot, Usage, LEAF_LIFETIME};
use pimesh_schema::DnsLabel;
use rustls_pki_types::ServerName;

fn label(s: &str) -> DnsLabel {
    DnsLabel::try_from(s.to_owned()).expect("label")
}

#[test]
fn a_server_leaf_names_its_hosts_and_serves_but_cannot_be_a_client() {
    let site = label("depot-7");
    let now = SystemTime::now();
    let root = TrustRoot::generate(&site, now).expect("trust root");
    let id = SpiffeId::service(&site, &label("pimesh-control"));
    let ips = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    let (leaf, key) = root
        .issuer
        .issue_server_leaf(&id, &["localhost".to_owned()], &ips, now)
        .expect("server leaf");
    assert_eq!(leaf.identities, vec![id.clone()]);
    assert!(leaf.not_after <= now + LEAF_LIFETIME);
    assert!(leaf.not_after > now);
    assert!(!key.serialize_pem().is_empty());

    let anchors = [root.anchor.cert_der().clone()];
    let issuer = [root.issuer.cert_der().clone()];
    let ids = verify_leaf(&leaf.der, &issuer, &anchors, &site, Usage::Server, now)
        .expect("valid for serving");
    assert_eq!(ids, vec![id]);
    verify_leaf(&leaf.der, &issuer, &anchors, &site, Usage::Client, now)
        .expect_err("a server leaf is no client credential");

    let cert = webpki::EndEntityCert::try_from(&leaf.der).expect("parse");
    for name in ["localhost", "127.0.0.1", "::1"] {
        let name = ServerName::try_from(name).expect("name");
        cert.verify_is_valid_for_subject_name(&name)
            .unwrap_or_else(|err| panic!("{name:?}: {err}"));
    }
    let other = ServerName::try_from("example.org").expect("name");
    assert!(cert.verify_is_valid_for_subject_name(&other).is_err());
}

#[test]
fn a_dns_name_that_is_not_ia5_is_refused_not_signed() {
    let site = label("depot-7");
    let now = SystemTime::now();
    let root = TrustRoot::generate(&site, now).expect("trust root");
    let id = SpiffeId::service(&site, &label("pimesh-control"));
    let refused = root
        .issuer
        .issue_server_leaf(&id, &["häuschen".to_owned()], &[], now)
        .expect_err("not IA5");
    assert!(
        matches!(refused, pimesh_identity::IssueError::Sign(_)),
        "{refused:?}"
    );
}
