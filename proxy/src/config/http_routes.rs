//! A service's routes compiled for the data path: the matches of every route of the
//! service in Gateway API precedence order, each leading to the policy of its rule.
//!
//! Invariants:
//! - `entries` is sorted by precedence (most specific first), ties kept in the order the
//!   site config lists routes, rules and matches — Gateway API's tie-break by creation
//!   time then name becomes "the order written", since a site config has no timestamps;
//! - every backend is a concrete service of the same table (the schema checked it), and
//!   a rule's weights are not all zero, so [`RulePolicy::choose`] always has an answer.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use pimesh_schema::routes::{PathMatch, RetryOn, Route, RouteMatch};
use prometheus_client::metrics::counter::Counter;

use super::routes::ServiceRoute;
use crate::outbound::metrics::OutboundMetrics;

/// The routes of one service.
pub struct HttpRoutes {
    entries: Vec<(Matcher, Arc<RulePolicy>)>,
}

/// What one rule does with the requests it matches.
pub struct RulePolicy {
    /// `<route>` or `<route>/<rule index>` when the route has several rules: the name in
    /// logs and metrics.
    pub name: String,
    /// `pimesh_route_matched_total` of this rule.
    pub matched: Counter,
    /// `None` stands for the route's own service.
    backends: Vec<(Option<Arc<ServiceRoute>>, u32)>,
    total_weight: u64,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
    /// The whole request's limit (the rule's, else the route's); `None`: the service's.
    pub timeout: Option<Duration>,
    /// Each attempt's limit until the response head; `None`: only `timeout` applies.
    pub attempt_timeout: Option<Duration>,
    pub retries: u8,
    pub retry_on: Vec<RetryOn>,
}

struct Matcher {
    path: Option<PathMatch>,
    method: Option<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
    query: Vec<(String, String)>,
}

impl HttpRoutes {
    /// Compiles `routes` (all of the service named `parent` in metrics, in config order);
    /// `service` resolves a backend's name, as the routes write it, to its concrete route.
    /// A header or backend the schema should have refused is left out rather than
    /// trusted.
    pub fn compile<'a>(
        routes: impl IntoIterator<Item = &'a Route>,
        parent: &str,
        service: impl Fn(&str) -> Option<Arc<ServiceRoute>>,
        metrics: &OutboundMetrics,
    ) -> HttpRoutes {
        let mut entries = Vec::new();
        for route in routes {
            let several = route.rules.len() > 1;
            for (index, rule) in route.rules.iter().enumerate() {
                let backends: Vec<_> = if rule.backends.is_empty() {
                    vec![(None, 1)]
                } else {
                    rule.backends
                        .iter()
                        .filter_map(|b| {
                            if b.service == route.service {
                                Some((None, b.weight))
                            } else {
                                service(b.service.as_str()).map(|s| (Some(s), b.weight))
                            }
                        })
                        .collect()
                };
                let pairs = |map: &std::collections::BTreeMap<String, String>| {
                    map.iter()
                        .filter_map(|(name, value)| {
                            Some((
                                HeaderName::from_bytes(name.as_bytes()).ok()?,
                                HeaderValue::from_str(value).ok()?,
                            ))
                        })
                        .collect::<Vec<_>>()
                };
                let name = if several {
                    format!("{}/{index}", route.name)
                } else {
                    route.name.to_string()
                };
                let policy = Arc::new(RulePolicy {
                    matched: metrics.route_matched(parent, &name),
                    name,
                    total_weight: backends.iter().map(|(_, w)| u64::from(*w)).sum(),
                    backends,
                    set: pairs(&rule.request_headers.set),
                    add: pairs(&rule.request_headers.add),
                    remove: rule
                        .request_headers
                        .remove
                        .iter()
                        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                        .collect(),
                    timeout: rule.timeout.or(route.timeout).map(|d| d.0),
                    attempt_timeout: rule
                        .backend_timeout
                        .or(route.retry_timeout.filter(|_| route.retries > 0))
                        .or(route.response_timeout)
                        .map(|d| d.0),
                    retries: route.retries,
                    retry_on: route.retry_on.clone(),
                });
                if rule.matches.is_empty() {
                    // Gateway API: a rule without matches matches every path.
                    let all = RouteMatch {
                        path: Some(PathMatch::Prefix("/".into())),
                        ..RouteMatch::default()
                    };
                    entries.push((all.precedence(), Matcher::of(&all), Arc::clone(&policy)));
                }
                for matched in &rule.matches {
                    entries.push((
                        matched.precedence(),
                        Matcher::of(matched),
                        Arc::clone(&policy),
                    ));
                }
            }
        }
        // Stable: equal precedence keeps the order written.
        entries.sort_by_key(|(precedence, _, _)| std::cmp::Reverse(*precedence));
        HttpRoutes {
            entries: entries.into_iter().map(|(_, m, p)| (m, p)).collect(),
        }
    }

    /// The rule for a request, or `None` when no match holds (the request is answered
    /// `404`, as Gateway API says).
    pub fn select(&self, parts: &http::request::Parts) -> Option<&Arc<RulePolicy>> {
        self.entries
            .iter()
            .find(|(matcher, _)| matcher.matches(parts))
            .map(|(_, policy)| policy)
    }
}

impl Matcher {
    fn of(matched: &RouteMatch) -> Matcher {
        Matcher {
            path: matched.effective_path(),
            method: matched
                .method
                .as_ref()
                .and_then(|m| Method::from_bytes(m.as_bytes()).ok()),
            headers: matched
                .headers
                .iter()
                .filter_map(|(name, value)| {
                    Some((
                        HeaderName::from_bytes(name.as_bytes()).ok()?,
                        HeaderValue::from_str(value).ok()?,
                    ))
                })
                .collect(),
            query: matched
                .query
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    fn matches(&self, parts: &http::request::Parts) -> bool {
        if let Some(path) = &self.path {
            if !path.matches(parts.uri.path()) {
                return false;
            }
        }
        if let Some(method) = &self.method {
            if parts.method != *method {
                return false;
            }
        }
        let headers_hold = self
            .headers
            .iter()
            .all(|(name, value)| parts.headers.get(name) == Some(value));
        if !headers_hold {
            return false;
        }
        if self.query.is_empty() {
            return true;
        }
        let query = parts.uri.query().unwrap_or("");
        self.query
            .iter()
            .all(|(name, value)| first_query_value(query, name).as_deref() == Some(value))
    }
}

/// The value of the first `name` parameter of `query`, percent-decoded.
fn first_query_value(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

impl RulePolicy {
    /// The concrete service for one request: a weighted random backend; `parent` stands
    /// for the route's own service.
    pub fn choose(&self, parent: &Arc<ServiceRoute>) -> Arc<ServiceRoute> {
        let resolve = |backend: &Option<Arc<ServiceRoute>>| match backend {
            Some(service) => Arc::clone(service),
            None => Arc::clone(parent),
        };
        let mut ticket = fastrand::u64(0..self.total_weight.max(1));
        for (backend, weight) in &self.backends {
            let weight = u64::from(*weight);
            if ticket < weight {
                return resolve(backend);
            }
            ticket -= weight;
        }
        self.backends
            .iter()
            .rev()
            .find(|(_, w)| *w > 0)
            .map_or_else(|| Arc::clone(parent), |(b, _)| resolve(b))
    }

    /// Whether the rule sends anywhere but its own service (a split to report).
    pub fn splits(&self) -> bool {
        self.backends.len() > 1 || self.backends.iter().any(|(b, _)| b.is_some())
    }

    /// Gateway API's `RequestHeaderModifier`: set, then add, then remove.
    pub fn edit(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }

    /// Whether an answer with this head is retried (budget and limit aside).
    pub fn retries_answer(&self, status: u16, headers: &HeaderMap) -> bool {
        if self.retry_on.is_empty() {
            return false;
        }
        let grpc = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        self.retry_on.iter().any(|on| on.matches(status, grpc))
    }
}
