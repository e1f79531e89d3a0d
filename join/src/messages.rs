//! The JSON messages of the join exchange.

use std::fmt;
use std::net::IpAddr;

use pimesh_schema::DnsLabel;
use serde::{Deserialize, Serialize};

/// What a joining node posts to [`crate::path::JOIN`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The name the node takes (`spiffe://<site>/node/<node>`).
    pub node: DnsLabel,
    /// The secret part of the join token (after `::`).
    pub token_secret: String,
    /// A PEM `CERTIFICATE REQUEST` for exactly the node's SPIFFE ID, of a key the node made.
    pub csr: String,
}

/// The secret never appears in logs.
impl fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinRequest")
            .field("node", &self.node)
            .field("token_secret", &"<redacted>")
            .field("csr_bytes", &self.csr.len())
            .finish()
    }
}

/// What a node is on its site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Holds the site issuer and runs control replicas (and a K3s server).
    Server,
    /// Holds only its node credential (and runs a K3s agent).
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A server node of the site, as the answering replica knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerEntry {
    pub node: DnsLabel,
    /// The address other nodes reach it at.
    pub address: IpAddr,
    /// The ports of its control replicas.
    pub replicas: Vec<u16>,
}

/// The answer to an accepted [`JoinRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinAnswer {
    /// PEM: the node certificate, then the issuer.
    pub certificate: String,
    /// PEM: the site's anchors (the trust bundle).
    pub anchors: String,
    pub role: Role,
    /// The site's server nodes known to the answering replica, itself included.
    pub servers: Vec<ServerEntry>,
    /// The K3s token of the site, when the site has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k3s_token: Option<String>,
}

/// What a server node receives from [`crate::path::ISSUER`]: everything a replica signs
/// and decides with.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerHandover {
    /// PEM: the issuer's certificate.
    pub issuer_cert: String,
    /// PEM (PKCS#8): the issuer's private key.
    pub issuer_key: String,
    /// PEM: the site's anchors.
    pub anchors: String,
    /// The join tokens the site accepts.
    pub tokens: crate::AcceptedTokens,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k3s_token: Option<String>,
}

/// The key never appears in logs.
impl fmt::Debug for IssuerHandover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerHandover")
            .field("issuer_cert_bytes", &self.issuer_cert.len())
            .field("issuer_key", &"<redacted>")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

/// Why a replica refused a join or an issuer handover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// Not a join request: garbage, truncated, too large, or a CSR that does not parse.
    BadRequest,
    /// The secret matches no token the site accepts.
    WrongToken,
    /// The secret matches a token whose time is over.
    TokenExpired,
    /// The request names another site.
    WrongSite,
    /// A live node holds the name with another key.
    NameTaken,
    /// The CSR asks for something other than exactly the node's SPIFFE ID.
    CsrMismatch,
    /// Too many failed attempts from this address; retry after the `Retry-After` header.
    RateLimited,
    /// The issuer is handed to server nodes only.
    NotAServer,
    /// The replica cannot answer now (no trust folder, no issuer); try another.
    Unavailable,
}

impl RefusalCode {
    /// The HTTP status a replica answers with.
    pub fn status(self) -> u16 {
        match self {
            RefusalCode::BadRequest | RefusalCode::CsrMismatch => 400,
            RefusalCode::WrongToken
            | RefusalCode::TokenExpired
            | RefusalCode::WrongSite
            | RefusalCode::NotAServer => 403,
            RefusalCode::NameTaken => 409,
            RefusalCode::RateLimited => 429,
            RefusalCode::Unavailable => 503,
        }
    }

    /// Whether asking another server (or the same later) can change the answer.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RefusalCode::WrongToken
                | RefusalCode::TokenExpired
                | RefusalCode::WrongSite
                | RefusalCode::CsrMismatch
                | RefusalCode::BadRequest
        )
    }
}

/// The body of a refusal: a code for programs, a reason for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub error: RefusalCode,
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = serde_json::to_value(self.error)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        write!(f, "{code}: {}", self.reason)
    }
}

impl std::error::Error for Refusal {}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(text: &str) -> DnsLabel {
        DnsLabel::try_from(text.to_owned()).expect("label")
    }

    #[test]
    fn a_request_round_trips_and_hides_its_secret() {
        let request = JoinRequest {
            node: label("pi-b"),
            token_secret: "s3cr3ts3cr3ts3cr3t".into(),
            csr: "-----BEGIN CERTIFICATE REQUEST-----\n".into(),
        };
        let json = serde_json::to_string(&request).expect("json");
        let back: JoinRequest = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, request);
        assert!(!format!("{request:?}").contains("s3cr3t"));
    }

    #[test]
    fn unknown_fields_and_bad_names_are_refused() {
        let extra = r#"{"node":"pi-b","token_secret":"x","csr":"y","admin":true}"#;
        assert!(serde_json::from_str::<JoinRequest>(extra).is_err());
        let bad_name = r#"{"node":"Pi B","token_secret":"x","csr":"y"}"#;
        assert!(serde_json::from_str::<JoinRequest>(bad_name).is_err());
    }

    #[test]
    fn refusal_codes_have_stable_names_and_statuses() {
        let cases = [
            (RefusalCode::BadRequest, "bad_request", 400),
            (RefusalCode::WrongToken, "wrong_token", 403),
            (RefusalCode::TokenExpired, "token_expired", 403),
            (RefusalCode::WrongSite, "wrong_site", 403),
            (RefusalCode::NameTaken, "name_taken", 409),
            (RefusalCode::CsrMismatch, "csr_mismatch", 400),
            (RefusalCode::RateLimited, "rate_limited", 429),
            (RefusalCode::NotAServer, "not_a_server", 403),
            (RefusalCode::Unavailable, "unavailable", 503),
        ];
        for (code, name, status) in cases {
            assert_eq!(serde_json::to_value(code).expect("json"), name);
            assert_eq!(code.status(), status);
        }
        let refusal = Refusal {
            error: RefusalCode::NameTaken,
            reason: "pi-b is live with another key".into(),
        };
        assert_eq!(
            refusal.to_string(),
            "name_taken: pi-b is live with another key"
        );
    }

    #[test]
    fn an_answer_round_trips() {
        let answer = JoinAnswer {
            certificate: "CERT".into(),
            anchors: "ANCHOR".into(),
            role: Role::Server,
            servers: vec![ServerEntry {
                node: label("pi-a"),
                address: "169.254.10.2".parse().expect("ip"),
                replicas: vec![8086, 8087, 8088],
            }],
            k3s_token: None,
        };
        let json = serde_json::to_string(&answer).expect("json");
        assert!(json.contains(r#""role":"server""#));
        assert!(!json.contains("k3s_token"));
        assert_eq!(
            serde_json::from_str::<JoinAnswer>(&json).expect("parse"),
            answer
        );
    }
}
