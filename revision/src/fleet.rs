//! The fleet view: what `GET /v1/fleet` answers, every site the central server serves with
//! its newest revision and what each of its nodes last reported.
//!
//! ```json
//! {"sites": [{"site": "depot-7", "latest_revision": 12, "nodes": [
//!   {"node": "pi-a", "revision": 12, "state": "applied", "detail": "", "received_at": 1764000000}
//! ]}]}
//! ```

use pimesh_schema::DnsLabel;
use serde::{Deserialize, Serialize};

use crate::report::RecordedReport;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    pub sites: Vec<SiteView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteView {
    pub site: DnsLabel,
    /// The newest stored revision (`None`: none published yet).
    pub latest_revision: Option<u64>,
    /// The key the server checks the site's revisions with, `ed25519:<base64>` (absent
    /// from servers older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// The site's nodes that reported, by name.
    pub nodes: Vec<NodeView>,
}

/// One node's latest report, named by the node certificate it came with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub node: DnsLabel,
    #[serde(flatten)]
    pub recorded: RecordedReport,
}

impl FleetView {
    /// The view of `site`, when the server serves it.
    pub fn site(&self, site: &DnsLabel) -> Option<&SiteView> {
        self.sites.iter().find(|view| &view.site == site)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{NodeReport, ReportState};

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    #[test]
    fn the_fleet_view_round_trips_with_its_field_names() {
        let view = FleetView {
            sites: vec![SiteView {
                site: label("depot-7"),
                latest_revision: Some(12),
                public_key: None,
                nodes: vec![NodeView {
                    node: label("pi-a"),
                    recorded: RecordedReport {
                        report: NodeReport {
                            revision: Some(12),
                            state: ReportState::Applied,
                            detail: String::new(),
                            about: None,
                            k3s: None,
                            certificates: None,
                            traffic: None,
                        },
                        received_at: 1_764_000_000,
                    },
                }],
            }],
        };
        let json: serde_json::Value = serde_json::to_value(&view).expect("serialise");
        assert_eq!(
            json,
            serde_json::json!({"sites": [{"site": "depot-7", "latest_revision": 12, "nodes": [
                {"node": "pi-a", "revision": 12, "state": "applied", "detail": "",
                 "received_at": 1_764_000_000}
            ]}]})
        );
        let parsed: FleetView = serde_json::from_value(json).expect("parse");
        assert_eq!(parsed, view);
        assert_eq!(parsed.site(&label("depot-7")), Some(&view.sites[0]));
        assert_eq!(parsed.site(&label("depot-8")), None);
    }

    #[test]
    fn a_fleet_view_with_an_unknown_state_and_fields_reads() {
        let json = r#"{"sites": [{"site": "depot-7", "latest_revision": null, "nodes": [
            {"node": "pi-a", "revision": null, "state": "draining", "detail": "x",
             "received_at": 5, "uptime": 9}], "region": "eu"}], "generated_at": 1}"#;
        let view: FleetView = serde_json::from_str(json).expect("parse");
        let node = &view.sites[0].nodes[0];
        assert_eq!(view.sites[0].latest_revision, None);
        assert_eq!(node.recorded.report.state.as_str(), "draining");
        assert_eq!(node.recorded.received_at, 5);
    }
}
