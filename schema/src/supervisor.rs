//! The supervisor's own configuration: `/etc/pimesh/supervisor.toml`.
//!
//! It names the systemd units the supervisor keeps running (the mesh proxy and the control
//! replicas), how their readiness is probed, and how hard the supervisor tries to heal
//! them. A missing file means [`SupervisorConfig::default`]; every setting has a default,
//! so a file only holds what differs.

use crate::ValueError;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::position::{key_name, locate};
use crate::seed::read_small;
use crate::{parse_toml, ConfigError};

/// Where the supervisor looks for its configuration on a node.
pub const DEFAULT_PATH: &str = "/etc/pimesh/supervisor.toml";

/// Control replica N (`pimesh-control@N.service`) listens on `CONTROL_BASE_PORT + N`: the
/// design's contract between the replicas, the supervisor and the proxies.
pub const CONTROL_BASE_PORT: u16 = 8085;

/// How many control replicas a node runs when the file does not say otherwise.
pub const DEFAULT_CONTROL_REPLICAS: u16 = 3;

/// A validated supervisor configuration.
///
/// Invariants: unit names are unique; `0 < backoff_initial <= backoff_max`;
/// `probe_interval > 0`; `hang_threshold >= probe_interval`; `escalate_after >= 1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SupervisorConfig {
    pub heal: HealSettings,
    pub ota: OtaSettings,
    pub units: Vec<ManagedUnit>,
    /// Whether the number of control replicas follows the site configuration's
    /// `[control] replicas`: true exactly when the file lists no `[[unit]]` (the default
    /// set); a file that lists units fixes the set it lists.
    pub replicas_follow_site: bool,
}

/// How the supervisor takes configuration revisions over the air.
///
/// Invariants: `settle <= health_deadline`; `long_poll_wait > 0`; `max_bundle_bytes > 0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OtaSettings {
    /// After applying a revision, every managed unit must be active and ready, and the
    /// proxy must run the new configuration, within this long; otherwise the node rolls
    /// back to the previous revision.
    pub health_deadline: Duration,
    /// ...and stay so for this long before the revision counts as healthy.
    pub settle: Duration,
    /// A `try` revision reverts unless a newer revision confirms it within this window.
    pub try_window: Duration,
    /// How long the central server may hold one long-poll before answering "nothing new".
    pub long_poll_wait: Duration,
    /// Signed revisions larger than this are refused unread.
    pub max_bundle_bytes: usize,
    /// The proxy's admin endpoint that says which configuration it runs.
    pub proxy_config_url: ProbeUrl,
    /// The proxy's outbound port, where the gate sends a request to see that the data
    /// path answers with the new configuration (any HTTP answer does: unknown to the
    /// routes, it is a 503 from the proxy itself).
    pub proxy_probe_url: ProbeUrl,
    /// The proxy's Prometheus metrics, scraped every `traffic_every` for the mesh traffic
    /// the node's reports carry.
    pub proxy_metrics_url: ProbeUrl,
    /// How often the mesh traffic is measured, and so the window its numbers cover; a
    /// report carries it again when it changed (`None`: not measured, nor reported).
    pub traffic_every: Option<Duration>,
}

impl Default for OtaSettings {
    #[expect(clippy::expect_used, reason = "the default probe URL is a constant")]
    fn default() -> Self {
        OtaSettings {
            health_deadline: Duration::from_secs(60),
            settle: Duration::from_secs(2),
            try_window: Duration::from_secs(300),
            long_poll_wait: Duration::from_secs(55),
            max_bundle_bytes: 1024 * 1024,
            proxy_config_url: ProbeUrl(
                url::Url::parse("http://127.0.0.1:4191/config").expect("a constant valid URL"),
            ),
            proxy_probe_url: ProbeUrl(
                url::Url::parse("http://127.0.0.1:4140/").expect("a constant valid URL"),
            ),
            proxy_metrics_url: ProbeUrl(
                url::Url::parse("http://127.0.0.1:4191/metrics").expect("a constant valid URL"),
            ),
            traffic_every: Some(Duration::from_secs(300)),
        }
    }
}

/// How the supervisor probes and heals every managed unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealSettings {
    /// How often each unit's readiness endpoint is asked.
    pub probe_interval: Duration,
    /// An active unit whose readiness probe fails for this long is hung and is restarted.
    pub hang_threshold: Duration,
    /// The first retry waits this long (plus jitter); each further one twice as long...
    pub backoff_initial: Duration,
    /// ...up to this cap.
    pub backoff_max: Duration,
    /// Consecutive failed heal attempts before climbing the next rung of the escalation
    /// ladder (restart the unit's dependencies, then reboot).
    pub escalate_after: u32,
    /// Whether the last rung may reboot the node (through systemd). Off by default: a
    /// reboot loop is worse than one dead unit.
    pub allow_reboot: bool,
}

/// One unit the supervisor keeps running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedUnit {
    pub name: UnitName,
    /// `http://` URL that answers 2xx when the unit can do its job; none means the unit
    /// counts as ready whenever systemd says it is active.
    #[serde(default)]
    pub ready_url: Option<ProbeUrl>,
    /// Units restarted on the first escalation rung (e.g. what this unit talks to).
    #[serde(default)]
    pub dependencies: Vec<UnitName>,
}

/// A systemd service name: `name.service` or `template@instance.service`, in the
/// characters systemd allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UnitName(String);

impl UnitName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UnitName {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        const MAX_LEN: usize = 255;
        let Some(stem) = text.strip_suffix(".service") else {
            return Err(ValueError(format!(
                "expected a systemd service name ending in `.service`, found {text:?}"
            )));
        };
        let allowed = |c: char| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c);
        if stem.is_empty()
            || text.len() > MAX_LEN
            || !stem.chars().all(allowed)
            || stem.starts_with('@')
        {
            return Err(ValueError(format!(
                "expected a systemd service name (letters, digits, `:-_.\\@`, at most \
                 {MAX_LEN} characters, ending in `.service`), found {text:?}"
            )));
        }
        Ok(UnitName(text))
    }
}

impl From<UnitName> for String {
    fn from(name: UnitName) -> String {
        name.0
    }
}

impl fmt::Display for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A plain `http://host:port/path` URL (readiness endpoints are local and unencrypted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProbeUrl(url::Url);

impl ProbeUrl {
    pub fn as_url(&self) -> &url::Url {
        &self.0
    }

    /// `host:port`, the port defaulting to 80.
    pub fn authority(&self) -> String {
        let host = self.0.host_str().unwrap_or_default();
        let port = self.0.port_or_known_default().unwrap_or(80);
        format!("{host}:{port}")
    }

    /// The path and query, as sent in the request line.
    pub fn path_and_query(&self) -> String {
        match self.0.query() {
            Some(query) => format!("{}?{query}", self.0.path()),
            None => self.0.path().to_owned(),
        }
    }
}

impl TryFrom<String> for ProbeUrl {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        let url = url::Url::parse(&text).map_err(|err| {
            ValueError(format!("expected an http:// URL, found {text:?} ({err})"))
        })?;
        if url.scheme() != "http" || url.host_str().is_none() {
            return Err(ValueError(format!(
                "expected an http:// URL with a host, found {text:?}"
            )));
        }
        Ok(ProbeUrl(url))
    }
}

impl From<ProbeUrl> for String {
    fn from(url: ProbeUrl) -> String {
        url.0.into()
    }
}

impl fmt::Display for ProbeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl Default for HealSettings {
    fn default() -> Self {
        HealSettings {
            probe_interval: Duration::from_secs(1),
            hang_threshold: Duration::from_secs(3),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            escalate_after: 5,
            allow_reboot: false,
        }
    }
}

impl Default for SupervisorConfig {
    /// The mesh proxy and control replicas 1..=3, each with its readiness endpoint.
    fn default() -> Self {
        SupervisorConfig {
            heal: HealSettings::default(),
            ota: OtaSettings::default(),
            units: default_units(),
            replicas_follow_site: true,
        }
    }
}

fn managed(name: &str, ready_url: &str) -> ManagedUnit {
    ManagedUnit {
        name: UnitName(name.to_owned()),
        ready_url: url::Url::parse(ready_url).ok().map(ProbeUrl),
        dependencies: Vec::new(),
    }
}

/// The proxy and [`DEFAULT_CONTROL_REPLICAS`] control replicas.
pub fn default_units() -> Vec<ManagedUnit> {
    let mut units = vec![managed(
        "pimesh-proxy.service",
        "http://127.0.0.1:4191/ready",
    )];
    units.extend((1..=DEFAULT_CONTROL_REPLICAS).map(control_replica));
    units
}

/// Control replica `replica` (`pimesh-control@<replica>.service`), ready on its port
/// [`CONTROL_BASE_PORT`] + `replica`.
pub fn control_replica(replica: u16) -> ManagedUnit {
    managed(
        &format!("pimesh-control@{replica}.service"),
        &format!("http://127.0.0.1:{}/ready", CONTROL_BASE_PORT + replica),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    heal: RawHeal,
    #[serde(default)]
    ota: RawOta,
    /// `[[unit]]` tables; absent means the default set.
    unit: Option<Vec<ManagedUnit>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHeal {
    probe_interval_ms: u64,
    hang_threshold_ms: u64,
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
    escalate_after: u32,
    allow_reboot: bool,
}

impl Default for RawHeal {
    fn default() -> Self {
        let heal = HealSettings::default();
        RawHeal {
            probe_interval_ms: millis(heal.probe_interval),
            hang_threshold_ms: millis(heal.hang_threshold),
            backoff_initial_ms: millis(heal.backoff_initial),
            backoff_max_ms: millis(heal.backoff_max),
            escalate_after: heal.escalate_after,
            allow_reboot: heal.allow_reboot,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawOta {
    health_deadline_ms: u64,
    settle_ms: u64,
    try_window_ms: u64,
    long_poll_wait_s: u64,
    max_bundle_bytes: usize,
    proxy_config_url: ProbeUrl,
    proxy_probe_url: ProbeUrl,
    proxy_metrics_url: ProbeUrl,
    traffic_every_s: u64,
}

impl Default for RawOta {
    fn default() -> Self {
        let ota = OtaSettings::default();
        RawOta {
            health_deadline_ms: millis(ota.health_deadline),
            settle_ms: millis(ota.settle),
            try_window_ms: millis(ota.try_window),
            long_poll_wait_s: ota.long_poll_wait.as_secs(),
            max_bundle_bytes: ota.max_bundle_bytes,
            proxy_config_url: ota.proxy_config_url,
            proxy_probe_url: ota.proxy_probe_url,
            proxy_metrics_url: ota.proxy_metrics_url,
            traffic_every_s: ota.traffic_every.map_or(0, |every| every.as_secs()),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The most a millisecond setting may be: a day (a node that waits longer than that on
/// one probe or one gate is not healing, and no clock arithmetic overflows below it).
const MOST_MS: u64 = 86_400_000;

/// Each bounded field of `[heal]` and `[ota]`: its key path, its value, its highest.
fn upper_bounds(h: &RawHeal, o: &RawOta) -> [([&'static str; 2], u64, u64); 11] {
    let bytes = u64::try_from(o.max_bundle_bytes).unwrap_or(u64::MAX);
    [
        (["heal", "probe_interval_ms"], h.probe_interval_ms, MOST_MS),
        (["heal", "hang_threshold_ms"], h.hang_threshold_ms, MOST_MS),
        (
            ["heal", "backoff_initial_ms"],
            h.backoff_initial_ms,
            MOST_MS,
        ),
        (["heal", "backoff_max_ms"], h.backoff_max_ms, MOST_MS),
        (
            ["heal", "escalate_after"],
            u64::from(h.escalate_after),
            1_000,
        ),
        (["ota", "health_deadline_ms"], o.health_deadline_ms, MOST_MS),
        (["ota", "settle_ms"], o.settle_ms, MOST_MS),
        // A trial revision may run for a week before it must be confirmed.
        (["ota", "try_window_ms"], o.try_window_ms, 7 * MOST_MS),
        (["ota", "long_poll_wait_s"], o.long_poll_wait_s, 3_600),
        (["ota", "max_bundle_bytes"], bytes, 64 * 1024 * 1024),
        (["ota", "traffic_every_s"], o.traffic_every_s, 86_400),
    ]
}

impl SupervisorConfig {
    /// Reads `file`; a file that does not exist means the defaults.
    pub fn load(file: &Path) -> Result<SupervisorConfig, ConfigError> {
        match std::fs::metadata(file) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(SupervisorConfig::default())
            }
            _ => {}
        }
        let text = read_small(file)?;
        SupervisorConfig::parse(file, &text)
    }

    /// Validates `text`, the contents of `file`.
    pub fn parse(file: &Path, text: &str) -> Result<SupervisorConfig, ConfigError> {
        let raw: RawConfig = parse_toml(file, text)?;
        let at = |path: &[&str], message: String| {
            ConfigError::at_key(file, text, locate(text, path), &key_name(path), message)
        };
        let h = raw.heal;
        if h.probe_interval_ms == 0 {
            return Err(at(
                &["heal", "probe_interval_ms"],
                "expected a positive number of milliseconds, found 0".into(),
            ));
        }
        if h.hang_threshold_ms < h.probe_interval_ms {
            return Err(at(
                &["heal", "hang_threshold_ms"],
                format!(
                    "expected at least heal.probe_interval_ms ({}), found {}",
                    h.probe_interval_ms, h.hang_threshold_ms
                ),
            ));
        }
        if h.backoff_initial_ms == 0 {
            return Err(at(
                &["heal", "backoff_initial_ms"],
                "expected a positive number of milliseconds, found 0".into(),
            ));
        }
        if h.backoff_max_ms < h.backoff_initial_ms {
            return Err(at(
                &["heal", "backoff_max_ms"],
                format!(
                    "expected at least heal.backoff_initial_ms ({}), found {}",
                    h.backoff_initial_ms, h.backoff_max_ms
                ),
            ));
        }
        if h.escalate_after == 0 {
            return Err(at(
                &["heal", "escalate_after"],
                "expected at least 1, found 0".into(),
            ));
        }
        let o = raw.ota;
        if o.settle_ms > o.health_deadline_ms {
            return Err(at(
                &["ota", "settle_ms"],
                format!(
                    "expected at most ota.health_deadline_ms ({}), found {}",
                    o.health_deadline_ms, o.settle_ms
                ),
            ));
        }
        if o.long_poll_wait_s == 0 {
            return Err(at(
                &["ota", "long_poll_wait_s"],
                "expected a positive number of seconds, found 0".into(),
            ));
        }
        if o.max_bundle_bytes == 0 {
            return Err(at(
                &["ota", "max_bundle_bytes"],
                "expected a positive number of bytes, found 0".into(),
            ));
        }
        for (path, found, most) in upper_bounds(&h, &o) {
            if found > most {
                return Err(at(&path, format!("expected at most {most}, found {found}")));
            }
        }
        let replicas_follow_site = raw.unit.is_none();
        let units = raw.unit.unwrap_or_else(default_units);
        let mut seen = std::collections::BTreeSet::new();
        for (index, unit) in units.iter().enumerate() {
            if !seen.insert(&unit.name) {
                let index = index.to_string();
                let message = format!("unit {} is listed twice", unit.name);
                return Err(at(&["unit", &index, "name"], message));
            }
        }
        Ok(SupervisorConfig {
            heal: HealSettings {
                probe_interval: Duration::from_millis(h.probe_interval_ms),
                hang_threshold: Duration::from_millis(h.hang_threshold_ms),
                backoff_initial: Duration::from_millis(h.backoff_initial_ms),
                backoff_max: Duration::from_millis(h.backoff_max_ms),
                escalate_after: h.escalate_after,
                allow_reboot: h.allow_reboot,
            },
            ota: OtaSettings {
                health_deadline: Duration::from_millis(o.health_deadline_ms),
                settle: Duration::from_millis(o.settle_ms),
                try_window: Duration::from_millis(o.try_window_ms),
                long_poll_wait: Duration::from_secs(o.long_poll_wait_s),
                max_bundle_bytes: o.max_bundle_bytes,
                proxy_config_url: o.proxy_config_url,
                proxy_probe_url: o.proxy_probe_url,
                proxy_metrics_url: o.proxy_metrics_url,
                traffic_every: (o.traffic_every_s > 0)
                    .then(|| Duration::from_secs(o.traffic_every_s)),
            },
            units,
            replicas_follow_site,
        })
    }
}
