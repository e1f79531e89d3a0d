use std::fmt;

/// Creating or loading an authority failed.
#[derive(Debug)]
pub enum IdentityError {
    /// The certificate or key could not be generated or signed.
    Generate(rcgen::Error),
    /// A PEM certificate or key given to us is not usable; the string says which and why.
    Load(String),
    /// The system's secure random source failed.
    Entropy,
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityError::Generate(err) => write!(f, "cannot generate certificate: {err}"),
            IdentityError::Load(why) => write!(f, "cannot load certificate authority: {why}"),
            IdentityError::Entropy => f.write_str("the system's secure random source failed"),
        }
    }
}

impl std::error::Error for IdentityError {}

impl From<rcgen::Error> for IdentityError {
    fn from(err: rcgen::Error) -> Self {
        IdentityError::Generate(err)
    }
}

/// Why the issuer refused to sign a certificate signing request. Each refusal names the
/// offending identity so that it can be reported to the requester and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueError {
    /// Not a DER certificate signing request, or its self-signature is wrong (the requester
    /// does not hold the key).
    MalformedRequest(String),
    /// The request names no SPIFFE ID.
    NoIdentity,
    /// A subject alternative name that is not a SPIFFE URI (DNS names, IPs, e-mail).
    UnsupportedName(String),
    /// A SPIFFE ID of another site.
    ForeignSite(String),
    /// A SPIFFE ID of this site that the requester may not hold (another node's, or a
    /// service not placed on the requesting node).
    NotPermitted(String),
    /// Signing itself failed.
    Sign(String),
}

impl fmt::Display for IssueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IssueError::MalformedRequest(why) => {
                write!(f, "malformed certificate signing request: {why}")
            }
            IssueError::NoIdentity => f.write_str("the request names no spiffe:// identity"),
            IssueError::UnsupportedName(name) => {
                write!(
                    f,
                    "the request names {name}; only spiffe:// URIs are issued"
                )
            }
            IssueError::ForeignSite(id) => write!(f, "{id} belongs to another site"),
            IssueError::NotPermitted(id) => write!(f, "{id} is not placed on the requesting node"),
            IssueError::Sign(why) => write!(f, "cannot sign: {why}"),
        }
    }
}

impl std::error::Error for IssueError {}

/// Why a presented certificate chain is not a valid identity of the site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// A certificate in the chain is malformed or not allowed for the usage (or any other
    /// chain failure not listed below); the string is webpki's reason.
    Chain(String),
    /// The chain leads to none of the trusted anchors (another site's, or a dropped
    /// anchor): no issuer is found, or a same-named one whose signature does not verify;
    /// the string is webpki's reason.
    UnknownIssuer(String),
    /// A certificate in the chain expired before the time of the check; the string is
    /// webpki's reason (with the times).
    Expired(String),
    /// A certificate in the chain is not valid yet at the time of the check; the string is
    /// webpki's reason (with the times).
    NotValidYet(String),
    /// The leaf carries no SPIFFE ID of the site.
    NoIdentity,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::Chain(why)
            | VerifyError::UnknownIssuer(why)
            | VerifyError::Expired(why)
            | VerifyError::NotValidYet(why) => write!(f, "certificate not trusted: {why}"),
            VerifyError::NoIdentity => {
                f.write_str("certificate carries no spiffe:// identity of this site")
            }
        }
    }
}

impl std::error::Error for VerifyError {}
