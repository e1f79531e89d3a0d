//! The site trust root end to end: real certificates made by the authority, checked by
//! webpki (the verifier rustls uses).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use pimesh_identity::{
    anchor_sha256, verify_leaf, Authority, IssueError, LeafRequest, SpiffeId, TrustRoot, Usage,
    VerifyError, LEAF_LIFETIME,
};
use pimesh_schema::DnsLabel;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::CertificateSigningRequestDer;

fn label(s: &str) -> DnsLabel {
    DnsLabel::try_from(s.to_owned()).expect("label")
}

struct Site {
    name: DnsLabel,
    root: TrustRoot,
    now: SystemTime,
}

impl Site {
    fn new(name: &str) -> Site {
        let now = SystemTime::now();
        Site {
            name: label(name),
            root: TrustRoot::generate(&label(name), now).expect("trust root"),
            now,
        }
    }

    fn node(&self, node: &str) -> SpiffeId {
        SpiffeId::node(&self.name, &label(node))
    }

    fn svc(&self, svc: &str) -> SpiffeId {
        SpiffeId::service(&self.name, &label(svc))
    }

    /// The identities the site config places on node `pi-a`.
    fn placed_on_pi_a(&self) -> BTreeSet<SpiffeId> {
        [self.node("pi-a"), self.svc("staff")].into_iter().collect()
    }

    fn issue(&self, ids: &[SpiffeId]) -> Result<pimesh_identity::Leaf, IssueError> {
        let request = LeafRequest::new(ids).expect("request");
        self.root
            .issuer
            .sign_leaf(&request.csr, &self.name, &self.placed_on_pi_a(), self.now)
    }

    fn verify(
        &self,
        leaf: &pimesh_identity::Leaf,
        at: SystemTime,
    ) -> Result<Vec<SpiffeId>, VerifyError> {
        verify_leaf(
            &leaf.der,
            &[self.root.issuer.cert_der().clone()],
            &[self.root.anchor.cert_der().clone()],
            &self.name,
            Usage::Client,
            at,
        )
    }
}

#[test]
fn a_node_gets_its_own_and_its_services_identities_and_they_verify() {
    let site = Site::new("depot-7");
    let ids = [site.node("pi-a"), site.svc("staff")];
    let leaf = site.issue(&ids).expect("issued");
    assert_eq!(leaf.identities, ids);
    assert_eq!(
        leaf.not_after.duration_since(site.now).expect("after"),
        LEAF_LIFETIME
    );
    assert_eq!(site.verify(&leaf, site.now).expect("client use"), ids);
    let as_server = verify_leaf(
        &leaf.der,
        &[site.root.issuer.cert_der().clone()],
        &[site.root.anchor.cert_der().clone()],
        &site.name,
        Usage::Server,
        site.now,
    );
    assert_eq!(as_server.expect("server use"), ids);
}

#[test]
fn the_ca_refuses_identities_not_placed_on_the_requesting_node() {
    let site = Site::new("depot-7");
    assert_eq!(
        site.issue(&[site.node("pi-a"), site.svc("payroll")])
            .unwrap_err(),
        IssueError::NotPermitted("spiffe://depot-7/svc/payroll".into()),
        "a service placed elsewhere"
    );
    assert_eq!(
        site.issue(&[site.node("pi-b")]).unwrap_err(),
        IssueError::NotPermitted("spiffe://depot-7/node/pi-b".into()),
        "another node's identity"
    );
    let other = SpiffeId::node(&label("depot-8"), &label("pi-a"));
    assert_eq!(
        site.issue(&[other]).unwrap_err(),
        IssueError::ForeignSite("spiffe://depot-8/node/pi-a".into())
    );
    assert_eq!(site.issue(&[]).unwrap_err(), IssueError::NoIdentity);
}

#[test]
fn requests_for_other_names_or_without_proof_of_key_are_refused() {
    let site = Site::new("depot-7");
    // A DNS name next to a permitted identity.
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["pi-a.local".to_owned()]).expect("params");
    params.subject_alt_names.push(SanType::URI(
        site.node("pi-a").to_string().try_into().expect("uri"),
    ));
    let csr = params.serialize_request(&key).expect("csr");
    let err = site
        .root
        .issuer
        .sign_leaf(csr.der(), &site.name, &site.placed_on_pi_a(), site.now);
    assert!(
        matches!(err, Err(IssueError::UnsupportedName(_))),
        "{err:?}"
    );

    // Garbage, and a valid request whose signature was tampered with.
    let garbage = CertificateSigningRequestDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    let err = site
        .root
        .issuer
        .sign_leaf(&garbage, &site.name, &site.placed_on_pi_a(), site.now);
    assert!(
        matches!(err, Err(IssueError::MalformedRequest(_))),
        "{err:?}"
    );
    let request = LeafRequest::new(&[site.node("pi-a")]).expect("request");
    let mut tampered = request.csr.as_ref().to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let err = site.root.issuer.sign_leaf(
        &tampered.into(),
        &site.name,
        &site.placed_on_pi_a(),
        site.now,
    );
    assert!(
        matches!(err, Err(IssueError::MalformedRequest(_))),
        "{err:?}"
    );
}

#[test]
fn leaves_from_another_site_expired_or_not_yet_valid_are_rejected() {
    let site = Site::new("depot-7");
    let leaf = site.issue(&[site.node("pi-a")]).expect("issued");

    let other = Site::new("depot-7"); // same name, another anchor
    let foreign = other.issue(&[other.node("pi-a")]).expect("issued");
    assert!(matches!(
        site.verify(&foreign, site.now),
        Err(VerifyError::UnknownIssuer(_))
    ));

    let expired = site.verify(&leaf, site.now + LEAF_LIFETIME + Duration::from_secs(60));
    assert!(
        matches!(&expired, Err(VerifyError::Expired(why)) if why.contains("Expired")),
        "{expired:?}"
    );
    let early = site.verify(&leaf, site.now - Duration::from_secs(3600));
    assert!(
        matches!(&early, Err(VerifyError::NotValidYet(why)) if why.contains("NotValidYet")),
        "{early:?}"
    );
}

#[test]
fn issuer_rotation_keeps_old_leaves_valid_under_the_same_anchor() {
    let site = Site::new("depot-7");
    let old_leaf = site.issue(&[site.node("pi-a")]).expect("issued");
    let new_issuer = site
        .root
        .anchor
        .new_issuer(&site.name, site.now)
        .expect("rotated issuer");
    let request = LeafRequest::new(&[site.node("pi-a")]).expect("request");
    let new_leaf = new_issuer
        .sign_leaf(&request.csr, &site.name, &site.placed_on_pi_a(), site.now)
        .expect("issued by the new issuer");
    let bundle = [site.root.anchor.cert_der().clone()];
    let issuers = [
        site.root.issuer.cert_der().clone(),
        new_issuer.cert_der().clone(),
    ];
    for leaf in [&old_leaf, &new_leaf] {
        verify_leaf(
            &leaf.der,
            &issuers,
            &bundle,
            &site.name,
            Usage::Client,
            site.now,
        )
        .expect("verifies");
    }
}

#[test]
fn a_bundle_with_old_and_new_anchors_accepts_both_during_anchor_rotation() {
    let old = Site::new("depot-7");
    let new = Site::new("depot-7");
    let bundle = [
        old.root.anchor.cert_der().clone(),
        new.root.anchor.cert_der().clone(),
    ];
    let issuers = [
        old.root.issuer.cert_der().clone(),
        new.root.issuer.cert_der().clone(),
    ];
    for site in [&old, &new] {
        let leaf = site.issue(&[site.node("pi-a")]).expect("issued");
        verify_leaf(
            &leaf.der,
            &issuers,
            &bundle,
            &site.name,
            Usage::Client,
            site.now,
        )
        .expect("verifies");
    }
    // After the overlap the old anchor is dropped: its leaves stop verifying.
    let old_leaf = old.issue(&[old.node("pi-a")]).expect("issued");
    let only_new = [new.root.anchor.cert_der().clone()];
    assert!(verify_leaf(
        &old_leaf.der,
        &issuers,
        &only_new,
        &new.name,
        Usage::Client,
        new.now
    )
    .is_err());
}

#[test]
fn authorities_round_trip_through_pem_and_the_pin_is_stable() {
    let site = Site::new("depot-7");
    let anchor = Authority::from_pem(site.root.anchor.cert_pem(), &site.root.anchor.key_pem())
        .expect("anchor");
    let issuer = Authority::from_pem(site.root.issuer.cert_pem(), &site.root.issuer.key_pem())
        .expect("issuer");
    assert_eq!(
        anchor_sha256(anchor.cert_der()),
        anchor_sha256(site.root.anchor.cert_der())
    );
    let request = LeafRequest::new(&[site.node("pi-a")]).expect("request");
    let leaf = issuer
        .sign_leaf(&request.csr, &site.name, &site.placed_on_pi_a(), site.now)
        .expect("issued after reload");
    site.verify(&leaf, site.now).expect("verifies");

    let mismatched = Authority::from_pem(site.root.anchor.cert_pem(), &site.root.issuer.key_pem());
    assert!(
        mismatched.is_err(),
        "a key that is not the certificate's is refused"
    );
    let leaf_as_ca = Authority::from_pem(&leaf.pem, &request.key.serialize_pem());
    assert!(leaf_as_ca.is_err(), "a leaf is not a CA");
}

#[test]
fn issued_by_names_the_anchor_that_signed_an_issuer() {
    let site = Site::new("depot-7");
    let other = Site::new("depot-7");
    let issuer = site.root.issuer.cert_der();
    assert!(pimesh_identity::issued_by(
        issuer,
        site.root.anchor.cert_der()
    ));
    assert!(!pimesh_identity::issued_by(
        issuer,
        other.root.anchor.cert_der()
    ));
    assert!(!pimesh_identity::issued_by(issuer, issuer));
    let (not_before, not_after) =
        pimesh_identity::cert_validity(issuer).expect("validity of the issuer");
    assert!(not_before <= site.now && site.now < not_after);
    // Certificates hold whole seconds.
    let expected = site.now + pimesh_identity::ISSUER_LIFETIME;
    assert!(not_after <= expected && expected - Duration::from_secs(1) <= not_after);
}
