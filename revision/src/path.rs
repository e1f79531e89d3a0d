//! The central server's URL paths: built here by its clients (the node's OTA client,
//! `pimeshctl`) and parsed here by the server, so both sides name the same resources.
//!
//! | path | resource |
//! |---|---|
//! | `/v1/sites/<site>/revisions` | [`revisions`]: publish a signed revision (`PUT`) |
//! | `/v1/sites/<site>/config?after=<n>&wait=<s>[&trial=<n>]` | [`config`] and [`ConfigQuery`]: a node's long-poll (`GET`) |
//! | `/v1/sites/<site>/reports` | [`reports`]: a node's report (`POST`) |
//! | `/v1/sites/<site>/revisions/<n>` | [`revision`]: one stored revision (`GET`, operator) |
//! | `/v1/sites/<site>/rollouts` | [`rollouts`]: the site's rollouts, newest first (`GET`, operator) |
//! | `/v1/sites/<site>/rollouts/<n>/<command>` | [`rollout_command`]: pause, resume or abort (`POST`, operator) |
//! | `/v1/sites/<site>/sessions?ttl=<s>` | a dashboard session token (`POST`, operator) |
//! | `/v1/sites/<site>/overview` | the dashboard's view of the site (`GET`, operator or session) |
//! | `/v1/fleet` | [`FLEET`]: the fleet view (`GET`) |
//! | `/v1/version` | [`VERSION`]: the server's version, `{"version": "<semver>"}` (`GET`) |

use std::fmt;
use std::time::Duration;

use pimesh_schema::DnsLabel;

use crate::rollout::Command;

/// The fleet view.
pub const FLEET: &str = "/v1/fleet";

/// The server's version.
pub const VERSION: &str = "/v1/version";

/// What a path under `/v1/sites/<site>/` addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteResource {
    Revisions,
    Config,
    Reports,
    Rollouts,
    Sessions,
    Overview,
}

impl SiteResource {
    /// The path's last segment.
    pub const fn segment(self) -> &'static str {
        match self {
            SiteResource::Revisions => "revisions",
            SiteResource::Config => "config",
            SiteResource::Reports => "reports",
            SiteResource::Rollouts => "rollouts",
            SiteResource::Sessions => "sessions",
            SiteResource::Overview => "overview",
        }
    }

    fn from_segment(segment: &str) -> Option<SiteResource> {
        [
            SiteResource::Revisions,
            SiteResource::Config,
            SiteResource::Reports,
            SiteResource::Rollouts,
            SiteResource::Sessions,
            SiteResource::Overview,
        ]
        .into_iter()
        .find(|resource| resource.segment() == segment)
    }
}

/// `/v1/sites/<site>/<resource>`.
pub fn site(site: &DnsLabel, resource: SiteResource) -> String {
    format!("/v1/sites/{site}/{}", resource.segment())
}

/// `/v1/sites/<site>/revisions`.
pub fn revisions(site_name: &DnsLabel) -> String {
    site(site_name, SiteResource::Revisions)
}

/// `/v1/sites/<site>/config` (the query is a [`ConfigQuery`]).
pub fn config(site_name: &DnsLabel) -> String {
    site(site_name, SiteResource::Config)
}

/// `/v1/sites/<site>/reports`.
pub fn reports(site_name: &DnsLabel) -> String {
    site(site_name, SiteResource::Reports)
}

/// `/v1/sites/<site>/rollouts`.
pub fn rollouts(site_name: &DnsLabel) -> String {
    site(site_name, SiteResource::Rollouts)
}

/// `/v1/sites/<site>/revisions/<n>`.
pub fn revision(site_name: &DnsLabel, number: u64) -> String {
    format!("{}/{number}", revisions(site_name))
}

/// `/v1/sites/<site>/rollouts/<n>/<command>`.
pub fn rollout_command(site_name: &DnsLabel, number: u64, command: Command) -> String {
    format!("{}/{number}/{}", rollouts(site_name), command.as_str())
}

/// A path the server answers, parsed. Only whole paths match: no trailing `/`, no extra
/// segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// [`FLEET`].
    Fleet,
    /// [`VERSION`].
    Version,
    /// `/v1/sites/<site>/<segment>`; `resource` is `None` when the segment names none.
    /// The site is as written in the path: not yet checked to be a name.
    Site {
        site: &'a str,
        resource: Option<SiteResource>,
    },
    /// `/v1/sites/<site>/revisions/<n>`; `revision` is `None` when not a whole number.
    Revision {
        site: &'a str,
        revision: Option<u64>,
    },
    /// `/v1/sites/<site>/rollouts/<n>/<command>`; `None` where a part names nothing.
    RolloutCommand {
        site: &'a str,
        revision: Option<u64>,
        command: Option<Command>,
    },
}

impl<'a> Route<'a> {
    /// The route `path` (a URL's path, without its query) addresses, if any.
    pub fn parse(path: &'a str) -> Option<Route<'a>> {
        let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        match segments.as_slice() {
            ["v1", "fleet"] => Some(Route::Fleet),
            ["v1", "version"] => Some(Route::Version),
            ["v1", "sites", site, segment] => Some(Route::Site {
                site,
                resource: SiteResource::from_segment(segment),
            }),
            ["v1", "sites", site, "revisions", number] => Some(Route::Revision {
                site,
                revision: number.parse().ok(),
            }),
            ["v1", "sites", site, "rollouts", number, command] => Some(Route::RolloutCommand {
                site,
                revision: number.parse().ok(),
                command: Command::from_segment(command),
            }),
            _ => None,
        }
    }
}

/// The query of a configuration long-poll: answer with a revision newer than `after`, or
/// wait up to `wait` (whole seconds) for one. A node that runs a `try` revision on trial
/// names it (`trial`): when that revision's rollout is halted or aborted, the server
/// answers `204` at once with [`TRIAL_STOPPED_HEADER`] naming the state, and the node
/// reverts without waiting for the end of its trial.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigQuery {
    pub after: u64,
    pub wait: Duration,
    pub trial: Option<u64>,
}

/// The header of a long-poll's `204` telling a node on trial that its trial revision's
/// rollout stopped: `halted` or `aborted`.
pub const TRIAL_STOPPED_HEADER: &str = "pimesh-trial-rollout";

/// A [`ConfigQuery`] parameter that is not a whole number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryError {
    /// `after` or `wait`.
    pub key: &'static str,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} must be a whole number", self.key)
    }
}

impl std::error::Error for QueryError {}

impl ConfigQuery {
    const AFTER: &'static str = "after";
    const WAIT: &'static str = "wait";
    const TRIAL: &'static str = "trial";

    /// `after=<n>&wait=<s>[&trial=<n>]`, the part of the URL after `?`.
    pub fn encode(&self) -> String {
        let trial = self
            .trial
            .map_or_else(String::new, |trial| format!("&{}={trial}", Self::TRIAL));
        format!(
            "{}={}&{}={}{trial}",
            Self::AFTER,
            self.after,
            Self::WAIT,
            self.wait.as_secs()
        )
    }

    /// Reads `after`, `wait` and `trial` from a URL query (`None`: no query); a missing
    /// `after` or `wait` is 0, a missing `trial` none, other parameters are ignored, the
    /// last of a repeated one counts.
    pub fn parse(query: Option<&str>) -> Result<ConfigQuery, QueryError> {
        let number =
            |key: &'static str, value: &str| value.parse::<u64>().map_err(|_| QueryError { key });
        let mut parsed = ConfigQuery::default();
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match key.as_ref() {
                Self::AFTER => parsed.after = number(Self::AFTER, &value)?,
                Self::WAIT => parsed.wait = Duration::from_secs(number(Self::WAIT, &value)?),
                Self::TRIAL => parsed.trial = Some(number(Self::TRIAL, &value)?),
                _ => {}
            }
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(s: &str) -> DnsLabel {
        DnsLabel::try_from(s.to_owned()).expect("label")
    }

    #[test]
    fn built_paths_are_the_servers_and_parse_back() {
        let depot = label("depot-7");
        assert_eq!(revisions(&depot), "/v1/sites/depot-7/revisions");
        assert_eq!(config(&depot), "/v1/sites/depot-7/config");
        assert_eq!(reports(&depot), "/v1/sites/depot-7/reports");
        assert_eq!(FLEET, "/v1/fleet");
        for (path, resource) in [
            (revisions(&depot), SiteResource::Revisions),
            (config(&depot), SiteResource::Config),
            (reports(&depot), SiteResource::Reports),
        ] {
            assert_eq!(
                Route::parse(&path),
                Some(Route::Site {
                    site: "depot-7",
                    resource: Some(resource)
                })
            );
        }
        assert_eq!(rollouts(&depot), "/v1/sites/depot-7/rollouts");
        assert_eq!(
            Route::parse(&revision(&depot, 12)),
            Some(Route::Revision {
                site: "depot-7",
                revision: Some(12)
            })
        );
        assert_eq!(
            Route::parse(&rollout_command(&depot, 12, Command::Abort)),
            Some(Route::RolloutCommand {
                site: "depot-7",
                revision: Some(12),
                command: Some(Command::Abort)
            })
        );
        assert_eq!(
            Route::parse("/v1/sites/depot-7/rollouts/x/delete"),
            Some(Route::RolloutCommand {
                site: "depot-7",
                revision: None,
                command: None
            })
        );
        assert_eq!(Route::parse(FLEET), Some(Route::Fleet));
        assert_eq!(Route::parse(VERSION), Some(Route::Version));
    }

    #[test]
    fn other_paths_are_no_route_or_no_resource() {
        for path in [
            "",
            "/",
            "/v1",
            "/v1/fleet/",
            "/v2/fleet",
            "/v1/sites/depot-7",
            "/v1/sites/depot-7/config/",
            "v1/fleet",
        ] {
            assert_eq!(Route::parse(path), None, "{path:?}");
        }
        assert_eq!(
            Route::parse("/v1/sites/NOT A SITE/status"),
            Some(Route::Site {
                site: "NOT A SITE",
                resource: None
            })
        );
    }

    #[test]
    fn the_config_query_round_trips_and_names_a_bad_number() {
        let query = ConfigQuery {
            after: 12,
            wait: Duration::from_secs(50),
            trial: None,
        };
        assert_eq!(query.encode(), "after=12&wait=50");
        assert_eq!(ConfigQuery::parse(Some(&query.encode())), Ok(query));
        let on_trial = ConfigQuery {
            trial: Some(12),
            ..query
        };
        assert_eq!(on_trial.encode(), "after=12&wait=50&trial=12");
        assert_eq!(ConfigQuery::parse(Some(&on_trial.encode())), Ok(on_trial));
        assert_eq!(ConfigQuery::parse(None), Ok(ConfigQuery::default()));
        assert_eq!(
            ConfigQuery::parse(Some("wait=5&other=x")),
            Ok(ConfigQuery {
                after: 0,
                wait: Duration::from_secs(5),
                trial: None,
            })
        );
        let err = ConfigQuery::parse(Some("trial=x")).expect_err("words");
        assert_eq!(err.to_string(), "trial must be a whole number");
        let err = ConfigQuery::parse(Some("after=-1")).expect_err("negative");
        assert_eq!(err.to_string(), "after must be a whole number");
        let err = ConfigQuery::parse(Some("after=1&wait=soon")).expect_err("words");
        assert_eq!(err.to_string(), "wait must be a whole number");
    }
}
