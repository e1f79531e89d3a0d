use crate::ValueError;
use std::fmt;
use std::str::FromStr;

use crate::DnsLabel;

/// What a SPIFFE ID names within a site.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// A node and its proxy: `/node/<node>`.
    Node(DnsLabel),
    /// A service placed on a node: `/svc/<service>`.
    Service(DnsLabel),
}

/// A Pimesh SPIFFE ID, `spiffe://<site>/node/<node>` or `spiffe://<site>/svc/<service>`.
/// Holding one means the site and the name are DNS labels and the path has exactly two
/// segments of a known kind; its string form round-trips through [`FromStr`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub site: DnsLabel,
    pub workload: Workload,
}

impl SpiffeId {
    pub fn node(site: &DnsLabel, node: &DnsLabel) -> SpiffeId {
        SpiffeId {
            site: site.clone(),
            workload: Workload::Node(node.clone()),
        }
    }

    pub fn service(site: &DnsLabel, service: &DnsLabel) -> SpiffeId {
        SpiffeId {
            site: site.clone(),
            workload: Workload::Service(service.clone()),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.workload {
            Workload::Node(node) => write!(f, "spiffe://{}/node/{node}", self.site),
            Workload::Service(service) => write!(f, "spiffe://{}/svc/{service}", self.site),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<SpiffeId, ValueError> {
        let expected = "expected spiffe://<site>/node/<name> or spiffe://<site>/svc/<name>";
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or_else(|| ValueError(format!("{expected}, found {text:?}")))?;
        let mut parts = rest.split('/');
        let (Some(site), Some(kind), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ValueError(format!("{expected}, found {text:?}")));
        };
        let label = |s: &str| {
            DnsLabel::try_from(s.to_owned()).map_err(|err| ValueError(format!("{expected}: {err}")))
        };
        let site = label(site)?;
        let workload = match kind {
            "node" => Workload::Node(label(name)?),
            "svc" => Workload::Service(label(name)?),
            _ => return Err(ValueError(format!("{expected}, found kind {kind:?}"))),
        };
        Ok(SpiffeId { site, workload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_shapes() {
        for ok in [
            "spiffe://depot-7/node/pi-a",
            "spiffe://depot-7/svc/fleetman-staff-service",
        ] {
            let id: SpiffeId = ok.parse().expect(ok);
            assert_eq!(id.to_string(), ok);
        }
        for bad in [
            "https://depot-7/node/pi-a",
            "spiffe://depot-7/node",
            "spiffe://depot-7/node/pi-a/extra",
            "spiffe://depot-7/pod/x",
            "spiffe://Depot/node/pi-a",
            "spiffe://depot-7/node/",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
