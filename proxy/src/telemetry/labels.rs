//! Label values several metric families share.

use std::fmt::{self, Write as _};

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// Which side of the proxy traffic is on; label `direction="inbound"|"outbound"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// `tls="true"`, as Linkerd labels mutually authenticated traffic: a route's traffic always
/// crosses the mesh's mutual TLS (inbound is accepted only over it, and outbound is sent
/// to other proxies only over it), so no route series has another value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MeshTls;

impl EncodeLabelValue for MeshTls {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        encoder.write_str("true")
    }
}

/// A label value from the config (service names): escaped as the exposition format requires
/// (`\\`, `\"`, `\n`), since prometheus-client writes label values verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Name(pub String);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        let mut rest = self.0.as_str();
        while let Some(at) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..at])?;
            encoder.write_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[at + 1..];
        }
        encoder.write_str(rest)
    }
}

/// `result="ok"|"error"`: the outcome of an attempt (a reload, a renewal).
#[derive(Clone, Debug, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct ResultLabels {
    result: &'static str,
}

impl ResultLabels {
    pub fn of(ok: bool) -> ResultLabels {
        ResultLabels {
            result: if ok { "ok" } else { "error" },
        }
    }
}
