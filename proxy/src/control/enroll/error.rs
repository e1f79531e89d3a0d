//! Why an enrollment attempt got no leaf to use.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;

use pimesh_schema::DnsLabel;
use x509_parser::error::X509Error;

use super::client::ExchangeError;
use crate::identity::LoadError;

/// Why an attempt got no usable leaf; shown as one line, naming the replica when one
/// answered.
#[derive(Debug)]
pub enum EnrollError {
    /// Neither a valid leaf nor a node credential to authenticate with.
    NoCredential,
    /// Neither a node credential nor a leaf to name the identities to ask for.
    NothingToAsk,
    /// The key or the signing request could not be made.
    Request(pimesh_identity::IdentityError),
    /// The exchange with the replica failed.
    Exchange(ExchangeError),
    /// The replica's trust bundle is not PEM.
    BundleNotPem {
        replica: SocketAddr,
        err: rustls::pki_types::pem::Error,
    },
    /// The replica's trust bundle holds no certificate.
    EmptyBundle { replica: SocketAddr },
    /// The leaf, its key and the bundle fail the checks of a node identity.
    Leaf(LoadError),
    /// The leaf is for another node than this one.
    OtherNode {
        replica: SocketAddr,
        /// (site, node) of the leaf, boxed to keep the error small.
        leaf: Box<(DnsLabel, DnsLabel)>,
        /// (site, node) of this node.
        this: Box<(DnsLabel, DnsLabel)>,
    },
    /// The leaf's names cannot be read.
    LeafNames {
        replica: SocketAddr,
        err: LeafNamesError,
    },
    /// The leaf names other identities than those asked for.
    NamesDiffer {
        replica: SocketAddr,
        named: BTreeSet<String>,
        asked: BTreeSet<String>,
    },
}

/// Why a leaf's subject alternative names cannot be listed.
#[derive(Debug)]
pub enum LeafNamesError {
    NotX509(x509_parser::nom::Err<X509Error>),
    Malformed(X509Error),
}

impl fmt::Display for EnrollError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnrollError::NoCredential => f.write_str(
                "no node credential to authenticate with (see the log for why it did not load)",
            ),
            EnrollError::NothingToAsk => f.write_str("no node credential"),
            EnrollError::Request(err) => write!(f, "cannot make a signing request: {err}"),
            EnrollError::Exchange(err) => err.fmt(f),
            EnrollError::BundleNotPem { replica, err } => write!(
                f,
                "replica {replica}: answer: the trust bundle is not PEM: {err}"
            ),
            EnrollError::EmptyBundle { replica } => write!(
                f,
                "replica {replica}: answer: the trust bundle holds no certificate"
            ),
            EnrollError::Leaf(err) => err.fmt(f),
            EnrollError::OtherNode {
                replica,
                leaf,
                this,
            } => {
                let ((leaf_site, leaf_node), (site, node)) = (&**leaf, &**this);
                write!(
                f,
                "replica {replica}: answer: the leaf is for node {leaf_node} of site {leaf_site}, not this node {node} of site {site}"
            )
            }
            EnrollError::LeafNames { replica, err } => {
                write!(f, "replica {replica}: answer: {err}")
            }
            EnrollError::NamesDiffer {
                replica,
                named,
                asked,
            } => write!(
                f,
                "replica {replica}: answer: the leaf names {named:?}, but {asked:?} was asked for"
            ),
        }
    }
}

impl std::error::Error for EnrollError {}

impl From<ExchangeError> for EnrollError {
    fn from(err: ExchangeError) -> EnrollError {
        EnrollError::Exchange(err)
    }
}

impl fmt::Display for LeafNamesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeafNamesError::NotX509(err) => write!(f, "the leaf is not X.509: {err}"),
            LeafNamesError::Malformed(err) => {
                write!(
                    f,
                    "the leaf's subject alternative names are malformed: {err}"
                )
            }
        }
    }
}
