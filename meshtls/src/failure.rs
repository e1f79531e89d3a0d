//! Why a handshake failed, as a short label for `tls_handshake_failure_total{reason}`.
//!
//! Invariant: the labels are fixed strings (dashboards, alerts and tests match them); a
//! new cause gets a new variant and label, an existing label never changes.

use std::io;

use rustls::{AlertDescription, CertificateError, Error};

/// The cause of a failed handshake, from either side's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// `not_tls`: the peer sent plaintext or garbage (bytes that are not TLS records or
    /// messages).
    NotTls,
    /// `no_client_cert`: the client presented no certificate (or, client side, the server
    /// said one is required).
    NoClientCert,
    /// `unknown_ca`: the peer's chain leads to none of our anchors (or the peer said so of
    /// ours).
    UnknownCa,
    /// `expired`: the peer's chain has expired (a peer refusing ours as expired *or* not
    /// yet valid sends one alert, counted here).
    Expired,
    /// `not_yet_valid`: the peer's chain is not valid yet.
    NotYetValid,
    /// `wrong_identity`: no SPIFFE ID of this site, or not the expected one (or the peer
    /// denied access).
    WrongIdentity,
    /// `timeout`: an [`io::ErrorKind::TimedOut`] error (the caller maps its own timeout).
    Timeout,
    /// `protocol`: any other TLS alert or protocol error.
    Protocol,
    /// `io`: anything else (reset, end of stream in the middle of the handshake, ...).
    Io,
}

impl HandshakeFailure {
    /// Every cause, in the order of their declaration.
    pub const ALL: [HandshakeFailure; 9] = [
        HandshakeFailure::NotTls,
        HandshakeFailure::NoClientCert,
        HandshakeFailure::UnknownCa,
        HandshakeFailure::Expired,
        HandshakeFailure::NotYetValid,
        HandshakeFailure::WrongIdentity,
        HandshakeFailure::Timeout,
        HandshakeFailure::Protocol,
        HandshakeFailure::Io,
    ];

    /// The metric label.
    pub const fn label(self) -> &'static str {
        match self {
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::NoClientCert => "no_client_cert",
            HandshakeFailure::UnknownCa => "unknown_ca",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::NotYetValid => "not_yet_valid",
            HandshakeFailure::WrongIdentity => "wrong_identity",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Io => "io",
        }
    }

    /// The cause of the error a tokio-rustls `accept` or `connect` failed with.
    pub fn of(err: &io::Error) -> HandshakeFailure {
        if err.kind() == io::ErrorKind::TimedOut {
            return HandshakeFailure::Timeout;
        }
        let Some(tls) = err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<Error>())
        else {
            return HandshakeFailure::Io;
        };
        HandshakeFailure::of_tls(tls)
    }

    /// The cause of a rustls error (see [`HandshakeFailure::of`]).
    pub fn of_tls(err: &Error) -> HandshakeFailure {
        match err {
            // Bytes that do not parse as TLS records or messages: plaintext or garbage.
            Error::InvalidMessage(_) => HandshakeFailure::NotTls,
            Error::NoCertificatesPresented => HandshakeFailure::NoClientCert,
            Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer => HandshakeFailure::UnknownCa,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    HandshakeFailure::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    HandshakeFailure::NotYetValid
                }
                CertificateError::ApplicationVerificationFailure
                | CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    HandshakeFailure::WrongIdentity
                }
                _ => HandshakeFailure::Protocol,
            },
            Error::AlertReceived(alert) => match alert {
                AlertDescription::CertificateRequired => HandshakeFailure::NoClientCert,
                AlertDescription::UnknownCA => HandshakeFailure::UnknownCa,
                AlertDescription::CertificateExpired => HandshakeFailure::Expired,
                AlertDescription::AccessDenied => HandshakeFailure::WrongIdentity,
                _ => HandshakeFailure::Protocol,
            },
            _ => HandshakeFailure::Protocol,
        }
    }
}

/// [`HandshakeFailure::of`]`(err).`[`label`](HandshakeFailure::label)`()`.
pub fn handshake_failure_reason(err: &io::Error) -> &'static str {
    HandshakeFailure::of(err).label()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_labels_are_the_metric_contract() {
        let labels: Vec<&str> = HandshakeFailure::ALL.iter().map(|f| f.label()).collect();
        assert_eq!(
            labels,
            [
                "not_tls",
                "no_client_cert",
                "unknown_ca",
                "expired",
                "not_yet_valid",
                "wrong_identity",
                "timeout",
                "protocol",
                "io"
            ]
        );
    }

    #[test]
    fn other_errors_have_coarse_reasons() {
        let reason = |err: io::Error| handshake_failure_reason(&err);
        assert_eq!(reason(io::ErrorKind::TimedOut.into()), "timeout");
        assert_eq!(reason(io::ErrorKind::ConnectionReset.into()), "io");
        assert_eq!(reason(io::ErrorKind::UnexpectedEof.into()), "io");
        let tls = |err: Error| io::Error::new(io::ErrorKind::InvalidData, err);
        assert_eq!(
            reason(tls(Error::AlertReceived(AlertDescription::UnknownCA))),
            "unknown_ca"
        );
        assert_eq!(
            reason(tls(Error::AlertReceived(
                AlertDescription::HandshakeFailure
            ))),
            "protocol"
        );
        assert_eq!(
            reason(tls(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure
            ))),
            "wrong_identity"
        );
        assert_eq!(reason(tls(Error::DecryptError)), "protocol");
    }
}
