//! `pimeshctl status`: the fleet view judged the way an operator reads it — per site, how
//! many nodes run the newest revision and what the others did — printed as a table, JSON
//! or YAML, with an exit code that says whether the fleet is healthy.
//!
//! The JSON and YAML shape ([`FleetStatus`]) is stable: fields are only ever added.
//!
//! Invariants: a node is healthy exactly when it reported `applied` or `trying` for its
//! site's newest revision; a site is healthy when it has a newest revision and every node
//! that reported is healthy; the fleet is healthy when every site is. A site that no node
//! reported to is healthy (nothing runs there to be wrong).

use std::fmt::Write as _;

use pimesh_revision::{
    FleetView, K3sSummary, MeshTraffic, NodeView, ReportState, ServiceTraffic, SiteView,
};
use serde::Serialize;

/// `pimeshctl status`'s exit code when the fleet answered and is not healthy (1 is any
/// failure to get an answer).
pub const UNHEALTHY_EXIT: u8 = 3;

/// The whole answer, as `-o json|yaml` prints it.
#[derive(Debug, Serialize)]
pub struct FleetStatus {
    pub healthy: bool,
    pub sites: Vec<SiteStatus>,
}

#[derive(Debug, Serialize)]
pub struct SiteStatus {
    pub site: String,
    /// The newest revision published (`null`: none yet).
    pub newest_revision: Option<u64>,
    pub healthy: bool,
    /// One line: "4/5 on revision 12, 1 rolled back".
    pub summary: String,
    pub counts: Counts,
    pub nodes: Vec<NodeStatus>,
}

/// How many of a site's nodes are where: `on_newest` plus the others by what they did.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub nodes: usize,
    /// Applied (or trying) the newest revision.
    pub on_newest: usize,
    /// Applied an older revision, and said nothing of the newest yet.
    pub behind: usize,
    pub rolled_back: usize,
    pub rejected: usize,
    pub reverted: usize,
    /// A state this build of pimeshctl does not know.
    pub unknown: usize,
}

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub revision: Option<u64>,
    pub state: String,
    pub detail: String,
    pub k3s: Option<K3sSummary>,
    /// When the node's certificate, its issuer and the earliest anchor it trusts expire
    /// (`not_after`, seconds since the Unix epoch), as its last report said.
    pub certificates: Option<pimesh_revision::CertificateDates>,
    /// What the node's proxy carried for its apps over the window before its last report
    /// (requests, answers and failures per service, latency quantiles in microseconds).
    pub traffic: Option<pimesh_revision::MeshTraffic>,
    /// Seconds since the Unix epoch when the central server received the node's last
    /// report (`null`: not known).
    pub last_report_at: Option<u64>,
    /// Seconds between that and the time of this status (`null`: not known).
    pub last_report_age_seconds: Option<u64>,
    pub healthy: bool,
}

impl FleetStatus {
    /// Judges `fleet` at `now` (seconds since the Unix epoch).
    pub fn of(fleet: &FleetView, now: u64) -> FleetStatus {
        let sites: Vec<SiteStatus> = fleet.sites.iter().map(|s| site_status(s, now)).collect();
        FleetStatus {
            healthy: sites.iter().all(|s| s.healthy),
            sites,
        }
    }

    /// The table: per site a header line with its summary, then one row per node.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for (i, site) in self.sites.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let newest = site
                .newest_revision
                .map_or_else(|| "none".to_owned(), |n| n.to_string());
            let _ = writeln!(
                out,
                "site {}: newest revision {newest}: {}",
                site.site, site.summary
            );
            if site.nodes.is_empty() {
                continue;
            }
            let rows: Vec<[String; 7]> = site
                .nodes
                .iter()
                .map(|n| {
                    [
                        n.node.clone(),
                        n.revision.map_or_else(|| "-".to_owned(), |r| r.to_string()),
                        n.state.clone(),
                        n.k3s
                            .as_ref()
                            .map_or_else(|| "-".to_owned(), |k| k.to_string().replace("k3s ", "")),
                        n.traffic.as_ref().map_or_else(|| "-".to_owned(), traffic),
                        n.last_report_age_seconds
                            .map_or_else(|| "-".to_owned(), |age| format!("{} ago", ago(age))),
                        n.detail.clone(),
                    ]
                })
                .collect();
            let header = [
                "NODE",
                "REVISION",
                "STATE",
                "K3S",
                "TRAFFIC",
                "LAST REPORT",
                "DETAIL",
            ];
            let widths: Vec<usize> = (0..6)
                .map(|c| {
                    rows.iter()
                        .map(|r| r[c].chars().count())
                        .chain([header[c].len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: [&str; 7]| {
                let mut text = String::new();
                for (c, cell) in cells.iter().enumerate().take(6) {
                    let _ = write!(text, "{cell:<width$}  ", width = widths[c]);
                }
                text.push_str(cells[6]);
                text.trim_end().to_owned()
            };
            let _ = writeln!(out, "  {}", line(header));
            for row in &rows {
                let cells = [
                    row[0].as_str(),
                    row[1].as_str(),
                    row[2].as_str(),
                    row[3].as_str(),
                    row[4].as_str(),
                    row[5].as_str(),
                    row[6].as_str(),
                ];
                let _ = writeln!(out, "  {}", line(cells));
            }
        }
        if self.sites.is_empty() {
            out.push_str("no site on this central server\n");
        }
        out
    }
}

/// A node's mesh traffic in one cell: requests per second over every service its apps
/// called, and the share of answers that succeeded ("12.5 rps 99.2% ok").
fn traffic(traffic: &MeshTraffic) -> String {
    let requests: u64 = traffic.services.iter().map(|s| s.requests).sum();
    let answered: u64 = traffic.services.iter().map(|s| s.answered).sum();
    let failures: u64 = traffic.services.iter().map(|s| s.failures).sum();
    let all = ServiceTraffic {
        requests,
        answered,
        failures,
        ..ServiceTraffic::default()
    };
    let mut cell = format!("{:.1} rps", all.requests_per_second(traffic.window_s));
    if let Some(success) = all.success_rate() {
        let _ = write!(cell, " {:.1}% ok", 100.0 * success);
    }
    cell
}

fn site_status(site: &SiteView, now: u64) -> SiteStatus {
    let newest = site.latest_revision;
    let mut counts = Counts {
        nodes: site.nodes.len(),
        ..Counts::default()
    };
    let nodes: Vec<NodeStatus> = site
        .nodes
        .iter()
        .map(|node| {
            let status = node_status(node, newest, now);
            let state = &node.recorded.report.state;
            match state {
                _ if status.healthy => counts.on_newest += 1,
                ReportState::Applied | ReportState::Trying => counts.behind += 1,
                ReportState::RolledBack => counts.rolled_back += 1,
                ReportState::Rejected => counts.rejected += 1,
                ReportState::Reverted => counts.reverted += 1,
                ReportState::Unrecognised(_) => counts.unknown += 1,
            }
            status
        })
        .collect();
    let healthy = nodes.is_empty() || (newest.is_some() && nodes.iter().all(|n| n.healthy));
    SiteStatus {
        site: site.site.to_string(),
        newest_revision: newest,
        healthy,
        summary: summary(newest, &counts),
        counts,
        nodes,
    }
}

fn node_status(node: &NodeView, newest: Option<u64>, now: u64) -> NodeStatus {
    let report = &node.recorded.report;
    let received = Some(node.recorded.received_at).filter(|at| *at > 0);
    let on_newest = newest.is_some() && report.revision == newest;
    NodeStatus {
        node: node.node.to_string(),
        revision: report.revision,
        state: report.state.as_str().to_owned(),
        detail: report.detail.clone(),
        k3s: report.k3s.clone(),
        certificates: report.certificates,
        traffic: report.traffic.clone(),
        last_report_at: received,
        last_report_age_seconds: received.map(|at| now.saturating_sub(at)),
        healthy: on_newest && matches!(report.state, ReportState::Applied | ReportState::Trying),
    }
}

/// "4/5 on revision 12, 1 rolled back, 1 behind".
fn summary(newest: Option<u64>, counts: &Counts) -> String {
    let Some(newest) = newest else {
        return if counts.nodes == 0 {
            "no revision published, no node reported".to_owned()
        } else {
            format!("no revision published; {} nodes reported", counts.nodes)
        };
    };
    if counts.nodes == 0 {
        return "no node reported yet".to_owned();
    }
    let mut text = format!("{}/{} on revision {newest}", counts.on_newest, counts.nodes);
    for (n, what) in [
        (counts.rolled_back, "rolled back"),
        (counts.rejected, "rejected it"),
        (counts.reverted, "reverted"),
        (counts.behind, "behind"),
        (counts.unknown, "in an unknown state"),
    ] {
        if n > 0 {
            let _ = write!(text, ", {n} {what}");
        }
    }
    text
}

/// `age` seconds for a person: `42s`, `7m`, `3h`, `12d`.
fn ago(age: u64) -> String {
    match age {
        0..=119 => format!("{age}s"),
        120..=7199 => format!("{}m", age / 60),
        7200..=172_799 => format!("{}h", age / 3600),
        _ => format!("{}d", age / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(json: &str) -> FleetView {
        serde_json::from_str(json).expect("a fleet view")
    }

    const FLEET: &str = r#"{"sites":[
      {"site":"depot-7","latest_revision":12,"nodes":[
        {"node":"pi-a","revision":12,"state":"applied","detail":"","received_at":990,
         "k3s":{"role":"server","ready":true},
         "traffic":{"window_s":60,"services":[
           {"service":"api","requests":600,"answered":600,"failures":6},
           {"service":"web","requests":150,"answered":140,"failures":0}]}},
        {"node":"pi-b","revision":12,"state":"trying","detail":"","received_at":400},
        {"node":"pi-c","revision":11,"state":"rolled-back","detail":"revision 12: unhealthy","received_at":995},
        {"node":"pi-d","revision":11,"state":"applied","detail":"","received_at":0},
        {"node":"pi-e","revision":12,"state":"applied","detail":"","received_at":1000}]},
      {"site":"empty","latest_revision":null,"nodes":[]}]}"#;

    #[test]
    fn a_site_is_summed_up_and_judged_by_its_nodes_on_the_newest_revision() {
        let status = FleetStatus::of(&fleet(FLEET), 1000);
        assert!(!status.healthy);
        let depot = &status.sites[0];
        assert!(!depot.healthy);
        assert_eq!(depot.summary, "3/5 on revision 12, 1 rolled back, 1 behind");
        assert_eq!(
            depot.counts,
            Counts {
                nodes: 5,
                on_newest: 3,
                behind: 1,
                rolled_back: 1,
                ..Counts::default()
            }
        );
        let ages: Vec<Option<u64>> = depot
            .nodes
            .iter()
            .map(|n| n.last_report_age_seconds)
            .collect();
        assert_eq!(ages, [Some(10), Some(600), Some(5), None, Some(0)]);
        let empty = &status.sites[1];
        assert!(empty.healthy, "nothing runs there to be wrong");
        assert_eq!(empty.summary, "no revision published, no node reported");
    }

    #[test]
    fn every_node_on_the_newest_revision_is_a_healthy_fleet() {
        let healthy = fleet(
            r#"{"sites":[{"site":"depot-7","latest_revision":3,"nodes":[
                {"node":"pi-a","revision":3,"state":"applied","detail":"","received_at":5}]}]}"#,
        );
        let status = FleetStatus::of(&healthy, 65);
        assert!(status.healthy);
        assert_eq!(status.sites[0].summary, "1/1 on revision 3");
        let table = status.table();
        assert!(
            table.starts_with("site depot-7: newest revision 3: 1/1 on revision 3\n"),
            "{table}"
        );
        assert!(
            table.contains("NODE  REVISION  STATE    K3S  TRAFFIC  LAST REPORT  DETAIL"),
            "{table}"
        );
        assert!(
            table.contains("pi-a  3         applied  -    -        60s ago"),
            "{table}"
        );
    }

    #[test]
    fn the_table_shows_k3s_age_and_detail_and_json_keeps_its_shape() {
        let status = FleetStatus::of(&fleet(FLEET), 1000);
        let table = status.table();
        assert!(table.contains("server ready"), "{table}");
        // 750 requests in 60 s; 734 of 740 answers succeeded.
        assert!(table.contains("12.5 rps 99.2% ok"), "{table}");
        assert!(table.contains("10m ago"), "{table}");
        assert!(table.contains("revision 12: unhealthy"), "{table}");
        assert!(
            table.contains("site empty: newest revision none:"),
            "{table}"
        );
        let json = serde_json::to_value(&status).expect("json");
        assert_eq!(json["healthy"], false);
        assert_eq!(json["sites"][0]["newest_revision"], 12);
        assert_eq!(json["sites"][0]["counts"]["rolled_back"], 1);
        assert_eq!(json["sites"][0]["nodes"][0]["k3s"]["role"], "server");
        assert_eq!(
            json["sites"][0]["nodes"][0]["traffic"]["services"][1]["service"],
            "web"
        );
        assert_eq!(
            json["sites"][0]["nodes"][1]["traffic"],
            serde_json::Value::Null
        );
        assert_eq!(
            json["sites"][0]["nodes"][3]["last_report_at"],
            serde_json::Value::Null
        );
        assert_eq!(json["sites"][0]["nodes"][2]["state"], "rolled-back");
        assert_eq!(json["sites"][0]["nodes"][2]["healthy"], false);
    }

    #[test]
    fn ages_read_as_a_person_would_say_them() {
        assert_eq!(ago(59), "59s");
        assert_eq!(ago(600), "10m");
        assert_eq!(ago(3 * 3600), "3h");
        assert_eq!(ago(3 * 86_400), "3d");
    }
}
