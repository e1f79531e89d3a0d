//! A site's trust root for tests, and the credentials and folders made from it: real
//! certificates from `pimesh-identity`, written where the daemons read them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pimesh_identity::{LeafRequest, SpiffeId, TrustRoot};
use pimesh_schema::DnsLabel;
use rustls::pki_types::CertificateDer;

/// `text` as a DNS label.
///
/// # Panics
/// When `text` is not one.
pub fn label(text: &str) -> DnsLabel {
    DnsLabel::try_from(text.to_owned()).unwrap_or_else(|err| panic!("{text:?}: {err}"))
}

/// A day: the life of the leaves a test makes when it does not care.
pub const DAY: Duration = Duration::from_secs(24 * 3600);

/// A site: its name and a trust root (anchor and issuer) made fresh for each test.
pub struct Site {
    pub name: DnsLabel,
    pub root: TrustRoot,
    /// When the site was made: the instant tests count from.
    pub now: SystemTime,
}

/// A credential as PEM text: the chain (leaf, issuer), its key, and the site's anchor.
pub struct PemCredential {
    pub chain: String,
    pub key: String,
    pub anchors: String,
}

/// A client certificate chain (leaf, issuer) in DER and its PKCS#8 key.
#[derive(Clone)]
pub struct Credential {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Vec<u8>,
}

impl Site {
    /// # Panics
    /// When `name` is not a DNS label or the trust root cannot be made.
    pub fn new(name: &str) -> Site {
        Site::rooted_at(name, SystemTime::now())
    }

    /// A site whose trust root was made three days ago, so that it can also sign leaves
    /// that are already expired.
    ///
    /// # Panics
    /// As [`Site::new`].
    pub fn backdated(name: &str) -> Site {
        let now = SystemTime::now();
        Site {
            now,
            ..Site::rooted_at(name, now - 3 * DAY)
        }
    }

    fn rooted_at(name: &str, at: SystemTime) -> Site {
        let name = label(name);
        let root = TrustRoot::generate(&name, at).expect("a trust root");
        Site {
            name,
            root,
            now: SystemTime::now(),
        }
    }

    pub fn node_id(&self, node: &str) -> SpiffeId {
        SpiffeId::node(&self.name, &label(node))
    }

    pub fn svc_id(&self, service: &str) -> SpiffeId {
        SpiffeId::service(&self.name, &label(service))
    }

    /// `(chain PEM, key PEM)` of a leaf for `node` and `services`, signed by the issuer at
    /// `at` for `lifetime`.
    pub fn leaf(
        &self,
        node: &str,
        services: &[&str],
        at: SystemTime,
        lifetime: Duration,
    ) -> (String, String) {
        let credential = self.credential(node, services, at, lifetime);
        (credential.chain, credential.key)
    }

    /// A credential for node `node` (plus `services`), signed as of `at` for `lifetime`.
    pub fn credential(
        &self,
        node: &str,
        services: &[&str],
        at: SystemTime,
        lifetime: Duration,
    ) -> PemCredential {
        let mut ids = vec![self.node_id(node)];
        ids.extend(services.iter().map(|service| self.svc_id(service)));
        self.credential_for(&ids, at, lifetime)
    }

    /// A credential for exactly `ids` (of this site or not: the issuer refuses nothing a
    /// test asks for), signed as of `at` for `lifetime`.
    pub fn credential_for(
        &self,
        ids: &[SpiffeId],
        at: SystemTime,
        lifetime: Duration,
    ) -> PemCredential {
        let request = LeafRequest::new(ids).expect("a CSR");
        let permitted: BTreeSet<SpiffeId> = ids.iter().cloned().collect();
        let leaf = self
            .root
            .issuer
            .sign_leaf_for(&request.csr, &self.name, &permitted, at, lifetime)
            .expect("a signed leaf");
        PemCredential {
            chain: format!("{}{}", leaf.pem, self.root.issuer.cert_pem()),
            key: request.key.serialize_pem(),
            anchors: self.root.anchor.cert_pem().to_owned(),
        }
    }

    /// A node credential of `node` in DER, as `pimeshctl node sign` makes them.
    pub fn node_credential(&self, node: &str) -> Credential {
        let (leaf, key) = self.node_leaf(node);
        Credential {
            chain: vec![leaf.der, self.root.issuer.cert_der().clone()],
            key: key.serialize_der(),
        }
    }

    /// A node credential of `node` as one PEM text: leaf, issuer, key (what a reqwest
    /// client identity reads).
    pub fn node_identity_pem(&self, node: &str) -> Vec<u8> {
        let (leaf, key) = self.node_leaf(node);
        format!(
            "{}{}{}",
            leaf.pem,
            self.root.issuer.cert_pem(),
            key.serialize_pem()
        )
        .into_bytes()
    }

    /// `(chain PEM, key PEM)` of a node credential of `node`.
    pub fn node_credential_pem(&self, node: &str) -> (String, String) {
        let (leaf, key) = self.node_leaf(node);
        (
            format!("{}{}", leaf.pem, self.root.issuer.cert_pem()),
            key.serialize_pem(),
        )
    }

    fn node_leaf(&self, node: &str) -> (pimesh_identity::Leaf, rcgen::KeyPair) {
        let id = self.node_id(node);
        let request = LeafRequest::new(std::slice::from_ref(&id)).expect("a CSR");
        let leaf = self
            .root
            .issuer
            .sign_leaf(
                &request.csr,
                &self.name,
                &BTreeSet::from([id]),
                SystemTime::now(),
            )
            .expect("a signed leaf");
        (leaf, request.key)
    }

    /// Writes `node.pem`, `node.key` and `anchor.pem` for `node` (a leaf for a day) into
    /// `dir/<node>-id`, the identity folder a proxy reads.
    pub fn identity_dir(&self, dir: &Path, node: &str, services: &[&str]) -> PathBuf {
        let (chain, key) = self.leaf(
            node,
            services,
            SystemTime::now(),
            Duration::from_secs(86_400),
        );
        let out = dir.join(format!("{node}-id"));
        std::fs::create_dir_all(&out).expect("identity dir");
        write(&out.join("node.pem"), &chain);
        write(&out.join("node.key"), &key);
        write(&out.join("anchor.pem"), self.root.anchor.cert_pem());
        out
    }

    /// Writes the trust folder a control replica reads: `anchor.pem`, `issuer.pem`,
    /// `issuer.key`.
    pub fn write_trust(&self, dir: &Path) {
        std::fs::create_dir_all(dir).expect("trust dir");
        write(&dir.join("anchor.pem"), self.root.anchor.cert_pem());
        write(&dir.join("issuer.pem"), self.root.issuer.cert_pem());
        write(&dir.join("issuer.key"), &self.root.issuer.key_pem());
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
}
