//! The replica's serving certificate, which it issues itself, and the two server
//! configurations around it: `pimesh_meshtls::control_server` (TLS 1.3 only, a client
//! certificate required and verified against the trust bundle at the handshake) and
//! `pimesh_meshtls::join_server` (the same certificate, no client certificate asked for:
//! the join routes only, see `server`).
//!
//! The serving certificate is a leaf signed by the site's issuer (which the replica holds
//! anyway) for `spiffe://<site>/svc/pimesh-control` (a reserved name: see
//! `pimesh_meshtls::CONTROL_SERVICE`), plus the DNS names `localhost` and the machine's host
//! name and the IPs `127.0.0.1` and `::1`, so that a proxy can check "a control replica of
//! my site" by SPIFFE ID and a local operator by host name. It lives
//! `pimesh_identity::LEAF_LIFETIME` (never past the issuer) and is renewed at two thirds
//! of its life (see `state`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::SystemTime;

use pimesh_identity::{verify_leaf, IssueError, Usage, VerifyError};
use pimesh_meshtls::{ConfigError, Credential, CredentialError};
use pimesh_schema::{DnsLabel, NameError};
use rustls::ServerConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::trust::Trust;

/// A server configuration with a fresh serving certificate.
///
/// Invariant: the certificate chains to one of the trust's anchors through its issuer and
/// was valid for serving at `issued_at` (checked with `verify_leaf` when made, which also
/// proves that the issuer belongs under the bundle); client certificates must chain to
/// the same anchors. `join_config` presents the same certificate and asks for none.
pub struct Serving {
    pub config: Arc<ServerConfig>,
    /// For ClientHellos naming `pimesh_join::JOIN_SERVER_NAME`.
    pub join_config: Arc<ServerConfig>,
    pub not_after: SystemTime,
    /// Two thirds into the certificate's life: make a new one from then on.
    pub renew_at: SystemTime,
}

/// Why a serving certificate cannot be made from a trust folder.
#[derive(Debug)]
pub enum ServingError {
    /// The site's name does not make the reserved control identity.
    Identity(NameError),
    /// The issuer cannot sign the leaf.
    Issue(IssueError),
    /// The leaf does not verify under the anchors: the issuer is expired or was signed by
    /// an anchor that is not in the bundle.
    OutsideAnchors(VerifyError),
    /// The leaf's key does not fit its certificate.
    Key(CredentialError),
    /// The server configuration cannot be built (`anchor.pem` unusable as client roots).
    Config(ConfigError),
}

impl fmt::Display for ServingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServingError::Identity(err) => write!(f, "{err}"),
            ServingError::Issue(err) => write!(f, "cannot issue the serving certificate: {err}"),
            ServingError::OutsideAnchors(err) => write!(
                f,
                "issuer.pem is not usable under anchor.pem (expired, or signed by another anchor): {err}"
            ),
            ServingError::Key(err) => {
                write!(f, "the serving key does not fit its certificate: {err}")
            }
            ServingError::Config(ConfigError::Trust(err)) => write!(f, "anchor.pem: {err}"),
            ServingError::Config(err) => write!(f, "{err}"),
        }
    }
}

impl std::error::Error for ServingError {}

impl Serving {
    /// Issues a serving certificate for `site` from `trust`'s issuer and builds the server
    /// configuration around it.
    pub fn issue(trust: &Trust, site: &DnsLabel, now: SystemTime) -> Result<Serving, ServingError> {
        let id = pimesh_meshtls::control_id(site).map_err(ServingError::Identity)?;
        let ips = [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        let (leaf, key) = trust
            .issuer
            .issue_server_leaf(&id, &dns_names(), &ips, now)
            .map_err(ServingError::Issue)?;
        let issuer = trust.issuer.cert_der().clone();
        verify_leaf(
            &leaf.der,
            std::slice::from_ref(&issuer),
            &trust.anchors,
            site,
            Usage::Server,
            now,
        )
        .map_err(ServingError::OutsideAnchors)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let credential = Credential::new(vec![leaf.der, issuer], key).map_err(ServingError::Key)?;
        let config = pimesh_meshtls::control_server(&credential, &trust.anchors)
            .map_err(ServingError::Config)?;
        let join_config = pimesh_meshtls::join_server(&credential).map_err(ServingError::Config)?;
        let life = leaf.not_after.duration_since(now).unwrap_or_default();
        Ok(Serving {
            config: Arc::new(config),
            join_config: Arc::new(join_config),
            not_after: leaf.not_after,
            renew_at: now + life * 2 / 3,
        })
    }
}

/// `localhost` and this machine's host name when it is a DNS label.
fn dns_names() -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    if let Ok(host) = DnsLabel::try_from(host.trim().to_owned()) {
        if host.as_str() != "localhost" {
            names.push(host.as_str().to_owned());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use pimesh_identity::TrustRoot;
    use rustls_pki_types::CertificateDer;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    fn trust(root: TrustRoot, anchors: Vec<CertificateDer<'static>>) -> Trust {
        Trust {
            anchors,
            issuer_pem: root.issuer.cert_pem().to_owned(),
            issuer_key_pem: root.issuer.key_pem(),
            k3s_token: None,
            issuer: root.issuer,
        }
    }

    #[test]
    fn the_serving_certificate_is_renewed_at_two_thirds_of_its_life() {
        let site = label("depot-7");
        let now = SystemTime::now();
        let root = TrustRoot::generate(&site, now).expect("root");
        let anchors = vec![root.anchor.cert_der().clone()];
        let serving = Serving::issue(&trust(root, anchors), &site, now).expect("serving");
        let life = serving.not_after.duration_since(now).expect("future");
        assert_eq!(life, pimesh_identity::LEAF_LIFETIME);
        assert_eq!(serving.renew_at, now + life * 2 / 3);
    }

    #[test]
    fn an_issuer_outside_the_bundle_is_refused() {
        let site = label("depot-7");
        let now = SystemTime::now();
        let root = TrustRoot::generate(&site, now).expect("root");
        let stranger = TrustRoot::generate(&site, now).expect("root");
        let anchors = vec![stranger.anchor.cert_der().clone()];
        let err = Serving::issue(&trust(root, anchors), &site, now)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("issuer.pem") && err.contains("anchor.pem"),
            "{err}"
        );
    }
}
