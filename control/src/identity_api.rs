//! The identity API, over mutual TLS.
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/identity` | body: a PEM `CERTIFICATE REQUEST` (at most [`MAX_CSR_BYTES`]); answer: the leaf and the issuer in PEM (`application/x-pem-file`), `pimesh-not-after: <unix seconds>` |
//! | `GET /v1/trust-bundle` | the replica's current anchors (the trust bundle) in PEM (`application/x-pem-file`), as read from `anchor.pem`: how a proxy learns a new anchor during an anchor rotation |
//! | `GET /v1/stats` | JSON: leaves issued and refused, handshakes refused, since start |
//!
//! The requester is the node named by the `spiffe://<site>/node/<node>` URI of the client
//! certificate it presented at the handshake (its node credential, or a leaf this API
//! issued earlier). Invariant: a leaf is signed only when every identity the request
//! names is in `site_config::permitted` for that node — its node ID and the services the
//! site config places on it — and the refusal names the first one that is not. A leaf
//! lives `State::leaf_lifetime` (`--leaf-lifetime`), never past the issuer. Refusals:
//! 400 for a request that is not a valid CSR or names something other than SPIFFE IDs,
//! 403 for an identity not permitted, 413 for a body over the limit; the handshake
//! itself has already refused clients without a certificate of the site's bundle.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{header, Method, Request, Response, StatusCode};
use pimesh_identity::{IssueError, Leaf};
use pimesh_meshtls::{Expected, Refusal as PeerRefusal, SiteTrust, SpiffeVerifier};
use pimesh_schema::DnsLabel;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use serde_json::json;
use tracing::{info, warn};

use crate::site_config;
use crate::state::{Counters, Snapshot, State};

/// Largest signing request accepted: a P-256 CSR with a few dozen SPIFFE IDs is well
/// below 4 KiB.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// The content type of the answer: PEM certificates, leaf first.
pub const PEM_CONTENT_TYPE: &str = crate::pem::CONTENT_TYPE;

use pimesh_runtime::answer::json_value as json_response;
use pimesh_runtime::answer::{error, read_body, Refusal};

/// Answers one request of a connection whose client presented `chain` (leaf first).
pub async fn route(
    request: Request<Incoming>,
    chain: Arc<Vec<CertificateDer<'static>>>,
    state: Arc<State>,
) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::POST, "/v1/identity") => identity(request, &chain, &state).await,
        (&Method::GET, "/v1/trust-bundle") => trust_bundle(&chain, &state),
        (&Method::GET, "/v1/stats") => stats(&state),
        (_, "/v1/identity" | "/v1/trust-bundle" | "/v1/stats") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "no such resource; try POST /v1/identity, GET /v1/trust-bundle, GET /v1/stats, \
             POST /v1/heartbeat or GET /v1/discovery",
        ),
    }
}

async fn identity(
    request: Request<Incoming>,
    chain: &[CertificateDer<'static>],
    state: &State,
) -> Response<Full<Bytes>> {
    let Some(snapshot) = state.snapshot() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "not ready");
    };
    let now = SystemTime::now();
    let node = match requesting_node(chain, &snapshot, now) {
        Ok(node) => node,
        Err(refusal) => return refused(state, None, refusal),
    };
    let body = match read_body(request, MAX_CSR_BYTES).await {
        Ok(body) => body,
        Err(refusal) => return refused(state, Some(&node), refusal),
    };
    match issue(&body, &node, &snapshot, now, state.leaf_lifetime) {
        Ok(leaf) => {
            Counters::count(&state.counters.issued);
            let ids: Vec<String> = leaf.identities.iter().map(ToString::to_string).collect();
            info!(%node, identities = ?ids, "leaf issued");
            let not_after = unix_seconds(leaf.not_after);
            let pem = format!("{}{}", leaf.pem, snapshot.trust.issuer_pem);
            let mut response = Response::new(Full::new(Bytes::from(pem)));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(PEM_CONTENT_TYPE),
            );
            headers.insert("pimesh-not-after", header::HeaderValue::from(not_after));
            response
        }
        Err(refusal) => refused(state, Some(&node), refusal),
    }
}

/// The anchors of the snapshot in use, in PEM, to a client that is (still) a node of the
/// site under them: the same check as for signing, so that only nodes learn the bundle.
fn trust_bundle(chain: &[CertificateDer<'static>], state: &State) -> Response<Full<Bytes>> {
    let Some(snapshot) = state.snapshot() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "not ready");
    };
    if let Err(refusal) = requesting_node(chain, &snapshot, SystemTime::now()) {
        return refused(state, None, refusal);
    }
    let pem = crate::pem::anchors(&snapshot);
    let mut response = Response::new(Full::new(Bytes::from(pem)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(PEM_CONTENT_TYPE),
    );
    response
}

fn refused(state: &State, node: Option<&DnsLabel>, refusal: Refusal) -> Response<Full<Bytes>> {
    Counters::count(&state.counters.refused);
    let node = node.map_or("?", DnsLabel::as_str);
    warn!(
        node,
        status = refusal.0.as_u16(),
        "identity refused: {}",
        refusal.1
    );
    error(refusal.0, &refusal.1)
}

/// The node named by the client certificate `chain` (leaf first, then intermediates),
/// when it is valid for client authentication under `snapshot`'s anchors at `now` and
/// names exactly one node of the site (`Expected::OneNode`). rustls checked the chain at
/// the handshake; this check adds the site and extracts the node, and catches a
/// connection that outlived its certificate or an anchor removed since.
pub fn requesting_node(
    chain: &[CertificateDer<'static>],
    snapshot: &Snapshot,
    now: SystemTime,
) -> Result<DnsLabel, Refusal> {
    let site = &snapshot.site;
    let forbidden = |why: String| Refusal(StatusCode::FORBIDDEN, why);
    let trust = SiteTrust::new(site.clone(), snapshot.trust.anchors.clone())
        .map_err(|err| forbidden(format!("not a node of site {site}: {err}")))?;
    let verified = SpiffeVerifier::new(trust, Expected::OneNode)
        .check_client(chain, now)
        .map_err(|refusal| match refusal {
            PeerRefusal::NoCertificate => Refusal(
                StatusCode::UNAUTHORIZED,
                "a node certificate is required".to_owned(),
            ),
            PeerRefusal::Invalid(err) => forbidden(format!("not a node of site {site}: {err}")),
            PeerRefusal::SeveralNodes => {
                forbidden("the client certificate names more than one node".to_owned())
            }
            _ => forbidden(format!(
                "the client certificate names no node of site {site}"
            )),
        })?;
    verified.node().cloned().ok_or_else(|| {
        forbidden(format!(
            "the client certificate names no node of site {site}"
        ))
    })
}

/// Signs the PEM signing request `body` for `node` with `snapshot`'s issuer, for
/// `lifetime` from `now`, when every identity it names is permitted to `node` by
/// `snapshot`'s site config.
pub fn issue(
    body: &[u8],
    node: &DnsLabel,
    snapshot: &Snapshot,
    now: SystemTime,
    lifetime: Duration,
) -> Result<Leaf, Refusal> {
    let csr = CertificateSigningRequestDer::from_pem_slice(body).map_err(|err| {
        let message = format!("expected a PEM CERTIFICATE REQUEST: {err}");
        Refusal(StatusCode::BAD_REQUEST, message)
    })?;
    let permitted = site_config::permitted(snapshot.config.as_ref(), &snapshot.site, node);
    snapshot
        .trust
        .issuer
        .sign_leaf_for(&csr, &snapshot.site, &permitted, now, lifetime)
        .map_err(|err| {
            let code = match err {
                IssueError::MalformedRequest(_)
                | IssueError::NoIdentity
                | IssueError::UnsupportedName(_) => StatusCode::BAD_REQUEST,
                IssueError::ForeignSite(_) | IssueError::NotPermitted(_) => StatusCode::FORBIDDEN,
                IssueError::Sign(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let message = match err {
                IssueError::NotPermitted(id) => {
                    format!("{id} is not placed on node {node}")
                }
                other => other.to_string(),
            };
            Refusal(code, message)
        })
}

fn stats(state: &State) -> Response<Full<Bytes>> {
    let counters = &state.counters;
    let snapshot = state.snapshot();
    json_response(
        StatusCode::OK,
        &json!({
            "replica": state.replica,
            "site": snapshot.as_ref().map(|s| s.site.as_str().to_owned()),
            "issued": Counters::get(&counters.issued),
            "refused": Counters::get(&counters.refused),
            "handshakes_refused": Counters::get(&counters.handshakes_refused),
            "serving_not_after": snapshot.as_ref().map(|s| unix_seconds(s.serving.not_after)),
        }),
    )
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::Serving;
    use crate::trust::Trust;
    use pimesh_identity::{LeafRequest, SpiffeId, TrustRoot};
    use pimesh_schema::cluster::ClusterConfig;
    use std::collections::BTreeSet;
    use std::path::Path;

    const LIFETIME: Duration = Duration::from_secs(6);

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    struct Fixture {
        root: TrustRoot,
        snapshot: Snapshot,
    }

    fn fixture() -> Fixture {
        let site = label("depot-7");
        let now = SystemTime::now();
        let root = TrustRoot::generate(&site, now).expect("root");
        let trust = Trust {
            anchors: vec![root.anchor.cert_der().clone()],
            issuer: pimesh_identity::Authority::from_pem(
                root.issuer.cert_pem(),
                &root.issuer.key_pem(),
            )
            .expect("issuer"),
            issuer_pem: root.issuer.cert_pem().to_owned(),
            issuer_key_pem: root.issuer.key_pem(),
            k3s_token: None,
        };
        let serving = Serving::issue(&trust, &site, now).expect("serving");
        let text = "site = \"depot-7\"\n[services.web]\nport = 8080\nnodes = [\"pi-a\"]\n\
             [services.pimesh-control]\nport = 8086\nnodes = [\"pi-a\"]\n";
        let config = ClusterConfig::parse(Path::new("cluster.toml"), text).expect("config");
        Fixture {
            root,
            snapshot: Snapshot {
                site,
                config: Some(config),
                config_text: Some(text.to_owned()),
                trust: Arc::new(trust),
                serving: Arc::new(serving),
                trust_tokens: Arc::default(),
            },
        }
    }

    fn id(text: &str) -> SpiffeId {
        text.parse().expect("id")
    }

    fn csr(ids: &[&str]) -> Vec<u8> {
        let ids: Vec<SpiffeId> = ids.iter().map(|s| id(s)).collect();
        LeafRequest::new(&ids)
            .expect("request")
            .csr_pem
            .into_bytes()
    }

    /// A chain naming `ids`, signed by `root`'s issuer, as a client presents it.
    fn chain(root: &TrustRoot, ids: &[&str]) -> Vec<CertificateDer<'static>> {
        let ids: Vec<SpiffeId> = ids.iter().map(|s| id(s)).collect();
        let request = LeafRequest::new(&ids).expect("request");
        let permitted: BTreeSet<SpiffeId> = ids.iter().cloned().collect();
        let site = ids[0].site.clone();
        let leaf = root
            .issuer
            .sign_leaf(&request.csr, &site, &permitted, SystemTime::now())
            .expect("leaf");
        vec![leaf.der, root.issuer.cert_der().clone()]
    }

    #[test]
    fn the_node_comes_from_the_client_certificate_and_must_be_one_node_of_the_site() {
        let f = fixture();
        let now = SystemTime::now();
        let node = |chain: &[CertificateDer<'static>]| requesting_node(chain, &f.snapshot, now);
        assert_eq!(
            node(&chain(&f.root, &["spiffe://depot-7/node/pi-a"])),
            Ok(label("pi-a"))
        );
        // A leaf this API issued (node and services) renews like a node credential.
        let renewed = chain(
            &f.root,
            &["spiffe://depot-7/node/pi-a", "spiffe://depot-7/svc/web"],
        );
        assert_eq!(node(&renewed), Ok(label("pi-a")));
        assert_eq!(node(&[]).map_err(|r| r.0), Err(StatusCode::UNAUTHORIZED));
        let services_only = chain(&f.root, &["spiffe://depot-7/svc/web"]);
        let refused = node(&services_only).expect_err("no node");
        assert_eq!(refused.0, StatusCode::FORBIDDEN);
        let two = chain(
            &f.root,
            &["spiffe://depot-7/node/pi-a", "spiffe://depot-7/node/pi-b"],
        );
        assert!(node(&two)
            .expect_err("two nodes")
            .1
            .contains("more than one"));
        let other_site = TrustRoot::generate(&label("depot-8"), now).expect("root");
        let stranger = chain(&other_site, &["spiffe://depot-8/node/pi-a"]);
        let refused = node(&stranger).expect_err("stranger");
        assert_eq!(refused.0, StatusCode::FORBIDDEN);
    }

    #[test]
    fn a_node_gets_exactly_what_is_placed_on_it_and_refusals_name_the_identity() {
        let f = fixture();
        let now = SystemTime::now();
        let pi_a = label("pi-a");
        let leaf = issue(
            &csr(&["spiffe://depot-7/node/pi-a", "spiffe://depot-7/svc/web"]),
            &pi_a,
            &f.snapshot,
            now,
            LIFETIME,
        )
        .expect("issued");
        assert_eq!(leaf.identities.len(), 2);
        assert_eq!(leaf.not_after, now + LIFETIME);

        let refuse = |ids: &[&str], node: &DnsLabel| {
            issue(&csr(ids), node, &f.snapshot, now, LIFETIME).expect_err("refused")
        };
        let refusal = refuse(&["spiffe://depot-7/svc/db"], &pi_a);
        assert_eq!(refusal.0, StatusCode::FORBIDDEN);
        assert!(
            refusal.1.contains("spiffe://depot-7/svc/db"),
            "{}",
            refusal.1
        );
        let refusal = refuse(&["spiffe://depot-7/node/pi-a"], &label("pi-b"));
        assert_eq!(refusal.0, StatusCode::FORBIDDEN);
        assert!(
            refusal.1.contains("spiffe://depot-7/node/pi-a"),
            "{}",
            refusal.1
        );
        // Placed on pi-a by the config, but reserved for the replicas.
        let refusal = refuse(&["spiffe://depot-7/svc/pimesh-control"], &pi_a);
        assert_eq!(refusal.0, StatusCode::FORBIDDEN);
        let refusal = refuse(&["spiffe://depot-8/node/pi-a"], &pi_a);
        assert_eq!(refusal.0, StatusCode::FORBIDDEN);
    }

    #[test]
    fn garbage_is_a_bad_request() {
        let f = fixture();
        let now = SystemTime::now();
        let pi_a = label("pi-a");
        for body in [
            &b""[..],
            b"hello",
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            &[0xff, 0xfe, 0x00, 0x16][..],
        ] {
            let refusal = issue(body, &pi_a, &f.snapshot, now, LIFETIME).expect_err("garbage");
            assert_eq!(
                refusal.0,
                StatusCode::BAD_REQUEST,
                "{body:?}: {}",
                refusal.1
            );
        }
    }
}
