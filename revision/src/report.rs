//! What a node tells the central server about its configuration, and what the central
//! server keeps of it.
//!
//! A node posts a [`NodeReport`] (`POST /v1/sites/<site>/reports`):
//!
//! ```json
//! {"revision": 12, "state": "rolled-back", "detail": "revision 13: the proxy ...",
//!  "k3s": {"role": "server", "ready": true}}
//! ```
//!
//! `k3s` is the node's K3s as it was when the report was sent (absent while K3s does
//! not run there), `certificates` its certificates' expiry dates and `traffic` what its
//! proxy carried over the last window ([`MeshTraffic`]); a node sends its last report
//! again when any of them changes.
//!
//! The central server stores it as a [`RecordedReport`]: the same fields and
//! `received_at`. A reader never loses a report over its state: a state it does not know
//! (one a newer node sends) is kept verbatim as [`ReportState::Unrecognised`], stored,
//! shown and serialised back exactly as received.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a node last said about its configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The revision the node runs after the event (`None`: none yet).
    pub revision: Option<u64>,
    pub state: ReportState,
    /// Why, for anything but [`ReportState::Applied`] (empty then).
    #[serde(default)]
    pub detail: String,
    /// The revision the event is about: the one applied, tried, refused or gone back from
    /// (`None`: not known, as for an unreadable offer or a node older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub about: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k3s: Option<K3sSummary>,
    /// When the node's certificates expire, as it knows them at the time of the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<CertificateDates>,
    /// The node's mesh traffic over the window before the report (absent: not measured,
    /// as on a node without a proxy or before its second scrape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<MeshTraffic>,
}

/// What a node's proxy carried for its local apps over a window: per service they
/// called, as they saw it (the proxy's outbound side, Linkerd's `direction="outbound"`).
///
/// Invariant (as a node sends it): at most [`MeshTraffic::MAX_SERVICES`] services, the
/// busiest, in name order; `failures <= answered` for each.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshTraffic {
    /// The seconds the counts cover.
    pub window_s: u64,
    pub services: Vec<ServiceTraffic>,
}

impl MeshTraffic {
    /// The most services a report carries (the busiest), which keeps a report far below
    /// the central server's size limit.
    pub const MAX_SERVICES: usize = 64;
}

/// One service's requests and answers in a [`MeshTraffic`] window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceTraffic {
    pub service: String,
    /// Requests sent in the window.
    pub requests: u64,
    /// Answers in the window (or failures to answer), successes and failures.
    pub answered: u64,
    /// Failed answers in the window: 5xx, none, or a failing gRPC status (Linkerd's
    /// classification).
    pub failures: u64,
    /// Latency quantiles in microseconds (from the proxy's histogram), when there were
    /// answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<u64>,
}

impl ServiceTraffic {
    /// Requests per second over `window_s` (0 for an empty window).
    pub fn requests_per_second(&self, window_s: u64) -> f64 {
        if window_s == 0 {
            return 0.0;
        }
        self.requests as f64 / window_s as f64
    }

    /// The share of answers that succeeded; `None` without answers.
    pub fn success_rate(&self) -> Option<f64> {
        (self.answered > 0)
            .then(|| self.answered.saturating_sub(self.failures) as f64 / self.answered as f64)
    }
}

/// When a node's certificates expire (`not_after`, seconds since the Unix epoch); a
/// date the node cannot read is left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateDates {
    /// The node's own certificate (its mesh and central identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// The site issuer that signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<u64>,
    /// The earliest of the site anchors the node trusts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<u64>,
}

/// A node's K3s in one line: its role and K3s's own readiness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K3sSummary {
    /// `server` or `agent`.
    pub role: String,
    pub ready: bool,
    /// K3s's version, when the image records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl fmt::Display for K3sSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ready = if self.ready { "ready" } else { "not ready" };
        write!(f, "k3s {} {ready}", self.role)
    }
}

/// A [`NodeReport`] as the central server recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedReport {
    #[serde(flatten)]
    pub report: NodeReport,
    /// Seconds since the Unix epoch when the central server received the report (0: not
    /// known).
    #[serde(default)]
    pub received_at: u64,
}

/// How a node's last change of configuration ended, as one word on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReportState {
    /// `applied`: the revision passed the health gate and is committed.
    Applied,
    /// `trying`: a `try` revision passed the health gate and runs on trial.
    Trying,
    /// `rejected`: an offered revision was refused; the node runs what it ran.
    Rejected,
    /// `rolled-back`: a revision failed to apply or its health gate; the node went back.
    RolledBack,
    /// `reverted`: a trial was not confirmed in time; the node went back.
    Reverted,
    /// A state this build does not know, kept as sent.
    Unrecognised(UnrecognisedState),
}

/// A state string none of [`ReportState`]'s known variants stands for. Invariant: never
/// one of the known strings (only [`ReportState::from`] makes one), so that each state
/// has exactly one value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UnrecognisedState(String);

impl UnrecognisedState {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ReportState {
    /// Every state this build knows, with its string.
    pub const KNOWN: [(ReportState, &'static str); 5] = [
        (ReportState::Applied, "applied"),
        (ReportState::Trying, "trying"),
        (ReportState::Rejected, "rejected"),
        (ReportState::RolledBack, "rolled-back"),
        (ReportState::Reverted, "reverted"),
    ];

    /// The state's string on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ReportState::Applied => "applied",
            ReportState::Trying => "trying",
            ReportState::Rejected => "rejected",
            ReportState::RolledBack => "rolled-back",
            ReportState::Reverted => "reverted",
            ReportState::Unrecognised(state) => state.as_str(),
        }
    }
}

impl From<&str> for ReportState {
    fn from(text: &str) -> ReportState {
        ReportState::KNOWN
            .into_iter()
            .find_map(|(state, known)| (known == text).then_some(state))
            .unwrap_or_else(|| ReportState::Unrecognised(UnrecognisedState(text.to_owned())))
    }
}

impl fmt::Display for ReportState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ReportState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ReportState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ReportState, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(ReportState::from(text.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_known_state_is_its_exact_string_both_ways() {
        let expected = ["applied", "trying", "rejected", "rolled-back", "reverted"];
        assert_eq!(ReportState::KNOWN.map(|(_, text)| text), expected);
        for (state, text) in ReportState::KNOWN {
            assert_eq!(state.as_str(), text);
            let json = serde_json::to_string(&state).expect("serialise");
            assert_eq!(json, format!("\"{text}\""));
            let parsed: ReportState = serde_json::from_str(&json).expect("parse");
            assert_eq!(parsed, state);
            assert!(!matches!(parsed, ReportState::Unrecognised(_)));
        }
    }

    #[test]
    fn traffic_travels_with_a_report_and_gives_rates_and_success() {
        let sent = r#"{"revision":4,"state":"applied","detail":"","traffic":{"window_s":60,"services":[{"service":"web","requests":120,"answered":100,"failures":5,"p50_us":2500,"p99_us":40000}]}}"#;
        let report: NodeReport = serde_json::from_str(sent).expect("parse");
        let traffic = report.traffic.clone().expect("traffic");
        let web = &traffic.services[0];
        assert_eq!(web.requests_per_second(traffic.window_s), 2.0);
        assert_eq!(web.success_rate(), Some(0.95));
        assert_eq!(
            (web.p50_us, web.p95_us, web.p99_us),
            (Some(2500), None, Some(40000))
        );
        assert_eq!(serde_json::to_string(&report).expect("serialise"), sent);
        let idle = ServiceTraffic::default();
        assert_eq!(
            (idle.requests_per_second(0), idle.success_rate()),
            (0.0, None)
        );
    }

    #[test]
    fn a_report_as_a_node_writes_it_parses_and_writes_back_the_same() {
        let sent =
            r#"{"revision":12,"state":"rolled-back","detail":"revision 13: the proxy refused it"}"#;
        let report: NodeReport = serde_json::from_str(sent).expect("parse");
        assert_eq!(
            report,
            NodeReport {
                revision: Some(12),
                state: ReportState::RolledBack,
                detail: "revision 13: the proxy refused it".to_owned(),
                about: None,
                k3s: None,
                certificates: None,
                traffic: None,
            }
        );
        assert_eq!(serde_json::to_string(&report).expect("serialise"), sent);

        let with_k3s =
            r#"{"revision":3,"state":"applied","detail":"","k3s":{"role":"agent","ready":false}}"#;
        let report: NodeReport = serde_json::from_str(with_k3s).expect("parse");
        let k3s = report.k3s.as_ref().expect("k3s");
        assert_eq!(k3s.to_string(), "k3s agent not ready");
        assert_eq!(serde_json::to_string(&report).expect("serialise"), with_k3s);

        let first =
            r#"{"revision":null,"state":"rejected","detail":"an unreadable revision refused"}"#;
        let report: NodeReport = serde_json::from_str(first).expect("parse");
        assert_eq!(report.revision, None);
        assert_eq!(serde_json::to_string(&report).expect("serialise"), first);
    }

    #[test]
    fn a_recorded_report_is_the_report_and_when_it_came() {
        let stored = r#"{"revision":2,"state":"applied","detail":"","received_at":1764000000}"#;
        let recorded: RecordedReport = serde_json::from_str(stored).expect("parse");
        assert_eq!(recorded.report.state, ReportState::Applied);
        assert_eq!(recorded.report.revision, Some(2));
        assert_eq!(recorded.received_at, 1_764_000_000);
        assert_eq!(serde_json::to_string(&recorded).expect("serialise"), stored);
        // Without a time, or a detail, it still reads.
        let bare: RecordedReport =
            serde_json::from_str(r#"{"revision":2,"state":"applied"}"#).expect("parse");
        assert_eq!((bare.received_at, bare.report.detail.as_str()), (0, ""));
    }

    #[test]
    fn an_unknown_state_is_kept_verbatim_and_the_report_with_it() {
        let sent = r#"{"revision":7,"state":"paused-for-maintenance","detail":"until 18:00","extra":true}"#;
        let report: NodeReport = serde_json::from_str(sent).expect("a newer node's report");
        assert_eq!(report.revision, Some(7));
        assert_eq!(report.detail, "until 18:00");
        assert!(
            matches!(&report.state, ReportState::Unrecognised(state) if state.as_str() == "paused-for-maintenance")
        );
        assert_eq!(report.state.to_string(), "paused-for-maintenance");
        assert_eq!(
            serde_json::to_string(&report).expect("serialise"),
            r#"{"revision":7,"state":"paused-for-maintenance","detail":"until 18:00"}"#
        );
        // A state is a string: anything else is not a report.
        assert!(serde_json::from_str::<NodeReport>(r#"{"revision":7,"state":3}"#).is_err());
        assert!(serde_json::from_str::<NodeReport>(r#"{"revision":7}"#).is_err());
    }
}
