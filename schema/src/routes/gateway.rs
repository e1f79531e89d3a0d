//! Routes as Kubernetes writes them: Gateway API `HTTPRoute` and `GRPCRoute`
//! (`gateway.networking.k8s.io/v1`, mesh use: a Service as the only kind of `parentRef`),
//! with Linkerd's retry and timeout annotations, and SMI's `TrafficSplit`
//! (`split.smi-spec.io/v1alpha1` to `v1alpha4`, read as a legacy form: SMI is archived).
//!
//! [`parse`] reads a YAML file of such documents into [`Route`]s and checks them against
//! the site's services; every error names the file, the line and the field as the YAML
//! writes it (`spec.rules[0].backendRefs[1].name`). [`to_yaml`] writes routes back as
//! `HTTPRoute`/`GRPCRoute` documents (a `TrafficSplit` becomes an `HTTPRoute`, its modern
//! form).
//!
//! What is refused rather than ignored, so that a route never means less than it says:
//! parents other than Services, `RegularExpression` matches, filters other than
//! `RequestHeaderModifier`, backend filters, SMI `matches`, and annotations of
//! `retry.linkerd.io`/`timeout.linkerd.io` this proxy does not implement.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{
    check, GrpcMethod, HeaderEdits, PathMatch, RetryOn, Route, RouteFault, RouteKind, RouteMatch,
    RouteRule, WeightedBackend,
};
use crate::cluster::{HumanDuration, Service};
use crate::{ConfigError, DnsLabel};

const GATEWAY_V1: &str = "gateway.networking.k8s.io/v1";
const SMI_VERSIONS: &[&str] = &[
    "split.smi-spec.io/v1alpha1",
    "split.smi-spec.io/v1alpha2",
    "split.smi-spec.io/v1alpha3",
    "split.smi-spec.io/v1alpha4",
];

const RETRY_HTTP: &str = "retry.linkerd.io/http";
const RETRY_GRPC: &str = "retry.linkerd.io/grpc";
const RETRY_LIMIT: &str = "retry.linkerd.io/limit";
const RETRY_TIMEOUT: &str = "retry.linkerd.io/timeout";
const TIMEOUT_REQUEST: &str = "timeout.linkerd.io/request";
const TIMEOUT_RESPONSE: &str = "timeout.linkerd.io/response";

#[derive(Debug, Deserialize, Serialize)]
struct Metadata {
    name: DnsLabel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct Document<S> {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: S,
    /// Written by controllers; read and ignored.
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    status: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    name: DnsLabel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    section_name: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpRouteSpec {
    parent_refs: Vec<ParentRef>,
    /// Ignored for mesh routes, as the Gateway API's mesh profile says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<HttpRule>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    matches: Vec<HttpMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    filters: Vec<Filter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeouts: Option<Timeouts>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<HttpPath>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<NameValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    query_params: Vec<NameValueMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    method: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct HttpPath {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default = "root")]
    value: String,
}

fn root() -> String {
    "/".to_owned()
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NameValueMatch {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    name: String,
    value: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NameValue {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Filter {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_header_modifier: Option<HeaderModifier>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    set: Vec<NameValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    add: Vec<NameValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    remove: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    name: DnsLabel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Timeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backend_request: Option<HumanDuration>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GrpcRouteSpec {
    parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<GrpcRule>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GrpcRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    matches: Vec<GrpcMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    filters: Vec<Filter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    backend_refs: Vec<BackendRef>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct GrpcMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    method: Option<GrpcMethodMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<NameValueMatch>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct GrpcMethodMatch {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrafficSplitSpec {
    service: DnsLabel,
    backends: Vec<SplitBackend>,
    /// SMI `HTTPRouteGroup` references: refused (write an `HTTPRoute` instead).
    #[serde(default)]
    matches: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitBackend {
    service: DnsLabel,
    weight: u32,
}

/// A fault in a document, before it is placed in the file: the YAML field and message.
struct Fault {
    field: String,
    message: String,
}

impl Fault {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Fault {
        Fault {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Reads the routes of `text`, the YAML contents of `file` (one or more documents
/// separated by `---`), and checks each against `services`; `taken` carries the
/// `(service, name)` pairs of routes read before (from `cluster.toml` or other files).
pub fn parse(
    file: &Path,
    text: &str,
    services: &BTreeMap<DnsLabel, Service>,
    taken: &mut BTreeSet<(DnsLabel, DnsLabel)>,
) -> Result<Vec<Route>, ConfigError> {
    let starts = document_starts(text);
    let mut routes = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let start = starts.get(index).copied().unwrap_or(1);
        let value = serde_yaml_ng::Value::deserialize(document)
            .map_err(|err| yaml_error(file, &err, None))?;
        if value.is_null() {
            continue;
        }
        let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or("");
        let (api_version, kind) = (field("apiVersion").to_owned(), field("kind").to_owned());
        let document_routes = match (kind.as_str(), api_version.as_str()) {
            ("HTTPRoute", GATEWAY_V1) => {
                typed::<HttpRouteSpec>(file, text, index).and_then(|doc| {
                    from_http_route(doc).map_err(|fault| place(file, text, start, fault))
                })?
            }
            ("GRPCRoute", GATEWAY_V1) => {
                typed::<GrpcRouteSpec>(file, text, index).and_then(|doc| {
                    from_grpc_route(doc).map_err(|fault| place(file, text, start, fault))
                })?
            }
            ("TrafficSplit", version) if SMI_VERSIONS.contains(&version) => {
                typed::<TrafficSplitSpec>(file, text, index).and_then(|doc| {
                    from_traffic_split(doc).map_err(|fault| place(file, text, start, fault))
                })?
            }
            _ => {
                return Err(place(
                    file,
                    text,
                    start,
                    Fault::new(
                        "kind",
                        format!(
                            "expected HTTPRoute or GRPCRoute ({GATEWAY_V1}) or TrafficSplit \
                             (split.smi-spec.io/v1alpha1-4), found {kind:?} of {api_version:?}"
                        ),
                    ),
                ))
            }
        };
        for route in document_routes {
            check(&route, services, taken).map_err(|fault| {
                let field = yaml_field(route.kind, &fault);
                place(file, text, start, Fault::new(field, fault.message))
            })?;
            routes.push(route);
        }
    }
    Ok(routes)
}

/// One `HTTPRoute` or `GRPCRoute` object as a Kubernetes API server serves it (JSON,
/// which YAML reads, with its `kind` and `apiVersion`): its namespace and its routes,
/// whose parent and backends name Services of that namespace. Not yet checked against
/// any services: the caller runs [`check`] with the Services it knows. `origin` names
/// the object in errors (`httproute fleet/tracker-canary`).
///
/// Refused besides what [`parse`] refuses: a parent or backend in another namespace
/// (Gateway API's consumer routes and ReferenceGrants are not supported), and SMI
/// `TrafficSplit`s (the cluster form of a split is an `HTTPRoute`).
pub fn parse_object(origin: &Path, text: &str) -> Result<(DnsLabel, Vec<Route>), ConfigError> {
    let value: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|err| yaml_error(origin, &err, None))?;
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or("");
    let (api_version, kind) = (field("apiVersion").to_owned(), field("kind").to_owned());
    let at = |fault: Fault| place(origin, text, 1, fault);
    match (kind.as_str(), api_version.as_str()) {
        ("HTTPRoute", GATEWAY_V1) => {
            let doc = typed::<HttpRouteSpec>(origin, text, 0)?;
            let namespace = object_namespace(&doc.metadata).map_err(at)?;
            same_namespace(&namespace, &doc.spec.parent_refs, |rule| {
                doc.spec.rules.get(rule).map(|r| r.backend_refs.as_slice())
            })
            .map_err(at)?;
            Ok((namespace, from_http_route(doc).map_err(at)?))
        }
        ("GRPCRoute", GATEWAY_V1) => {
            let doc = typed::<GrpcRouteSpec>(origin, text, 0)?;
            let namespace = object_namespace(&doc.metadata).map_err(at)?;
            same_namespace(&namespace, &doc.spec.parent_refs, |rule| {
                doc.spec.rules.get(rule).map(|r| r.backend_refs.as_slice())
            })
            .map_err(at)?;
            Ok((namespace, from_grpc_route(doc).map_err(at)?))
        }
        _ => Err(at(Fault::new(
            "kind",
            format!(
                "expected HTTPRoute or GRPCRoute ({GATEWAY_V1}), found {kind:?} of {api_version:?}"
            ),
        ))),
    }
}

/// The namespace of an object (`default` when the API left it out).
fn object_namespace(metadata: &Metadata) -> Result<DnsLabel, Fault> {
    let namespace = metadata.namespace.as_deref().unwrap_or("default");
    DnsLabel::try_from(namespace.to_owned()).map_err(|err| {
        Fault::new(
            "metadata.namespace",
            format!("expected a namespace name, found {namespace:?}: {err}"),
        )
    })
}

/// Every parent and every backend of rule 0, 1, ... (`backends(rule)` until `None`) is
/// in `namespace`, or names none.
fn same_namespace<'a>(
    namespace: &DnsLabel,
    parents: &[ParentRef],
    backends: impl Fn(usize) -> Option<&'a [BackendRef]>,
) -> Result<(), Fault> {
    let foreign = |given: Option<&str>| given.is_some_and(|ns| ns != namespace.as_str());
    for (i, parent) in parents.iter().enumerate() {
        if foreign(parent.namespace.as_deref()) {
            return Err(Fault::new(
                format!("spec.parentRefs[{i}].namespace"),
                format!(
                    "expected a Service of the route's namespace {namespace} (routes for \
                     another namespace's Service are not supported), found {:?}",
                    parent.namespace.as_deref().unwrap_or_default()
                ),
            ));
        }
    }
    let mut rule = 0;
    while let Some(refs) = backends(rule) {
        for (b, backend) in refs.iter().enumerate() {
            if foreign(backend.namespace.as_deref()) {
                return Err(Fault::new(
                    format!("spec.rules[{rule}].backendRefs[{b}].namespace"),
                    format!(
                        "expected a Service of the route's namespace {namespace} \
                         (ReferenceGrants are not supported), found {:?}",
                        backend.namespace.as_deref().unwrap_or_default()
                    ),
                ));
            }
        }
        rule += 1;
    }
    Ok(())
}

/// Document `index` of `text` as a `Document<S>`, errors located by serde.
fn typed<S: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
    index: usize,
) -> Result<Document<S>, ConfigError> {
    let Some(document) = serde_yaml_ng::Deserializer::from_str(text).nth(index) else {
        return Err(ConfigError::file(
            file,
            "the YAML documents changed while read",
        ));
    };
    let start = document_starts(text).get(index).copied().unwrap_or(1);
    serde_path_to_error::deserialize(document).map_err(|err| {
        let path = err.path().to_string();
        let mut error = yaml_error(file, err.inner(), Some(path.clone()));
        // serde_yaml_ng names the enclosing mapping in front of its message.
        if let Some((prefix, rest)) = error.message.split_once(": ") {
            if path.starts_with(prefix) {
                error.message = rest.to_owned();
            }
        }
        // A value refused by its own type is placed where the walk finds the field.
        if let Some(line) = locate_yaml(text, start, &path) {
            if error.line != Some(line) {
                error.line = Some(line);
                error.column = None;
            }
        }
        error
    })
}

fn yaml_error(file: &Path, err: &serde_yaml_ng::Error, key: Option<String>) -> ConfigError {
    let mut error = ConfigError::file(file, err.to_string());
    if let Some(location) = err.location() {
        error.line = Some(location.line());
        error.column = Some(location.column());
        // serde_yaml_ng appends " at line L column C"; the error carries them already.
        if let Some(cut) = error.message.find(" at line ") {
            error.message.truncate(cut);
        }
    }
    error.key = key.filter(|k| k != ".");
    error
}

/// The line each document of `text` starts on (1-based), in the order serde_yaml_ng
/// yields them: a document starts at the first line, or after a `---` line.
fn document_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut content_seen = false;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line == "---" || line.starts_with("--- ") {
            // A leading `---` opens the first document rather than ending an empty one.
            if content_seen || starts.is_empty() {
                starts.push(line_no + 1);
            }
            content_seen = false;
            continue;
        }
        let trimmed = line.trim();
        if !trimmed.is_empty() && !trimmed.starts_with('#') && !content_seen {
            content_seen = true;
            if starts.is_empty() {
                starts.push(line_no);
            }
        }
    }
    starts
}

/// An error at `fault.field` of the document starting at line `start` of `text`.
fn place(file: &Path, text: &str, start: usize, fault: Fault) -> ConfigError {
    let mut error = ConfigError::file(file, fault.message);
    let line = locate_yaml(text, start, &fault.field).unwrap_or(start);
    error.line = Some(line);
    error.key = Some(fault.field);
    error
}

/// The line of the block-style field `field` (`spec.rules[1].backendRefs[0].name`) in the
/// document starting at line `start`: a walk by indentation that follows keys and list
/// items. Where the walk cannot follow (flow style such as `[{name: x}]`), the line of the
/// deepest part it found; `None` when it found nothing.
fn locate_yaml(text: &str, start: usize, field: &str) -> Option<usize> {
    enum Segment<'a> {
        Key(&'a str),
        Index(usize),
    }
    let mut segments = Vec::new();
    for part in field.split('.') {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            segments.push(Segment::Key(key.trim_matches('"')));
        }
        while let Some(close) = rest.find(']') {
            segments.push(Segment::Index(rest.get(1..close)?.parse().ok()?));
            rest = &rest[close + 1..];
        }
    }
    let lines: Vec<&str> = text.lines().collect();
    // The node the walk is in: its line, the indentation of its key or dash (its
    // children are deeper), and whether its own line holds its first key ("- name: x").
    let mut at = start.checked_sub(1)?;
    let mut node_indent: isize = -1;
    let mut inclusive = true;
    let mut deepest = None;
    for segment in segments {
        let mut found = None;
        let mut child_indent: Option<isize> = None;
        let mut items_before = match segment {
            Segment::Index(n) => n,
            Segment::Key(_) => 0,
        };
        let first = if inclusive { at } else { at + 1 };
        for (i, line) in lines.iter().enumerate().skip(first) {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if *line == "---" || line.starts_with("--- ") {
                break;
            }
            let raw_indent = (line.len() - trimmed.len()) as isize;
            let dash = trimmed == "-" || trimmed.starts_with("- ");
            let own_line = inclusive && i == at;
            if !own_line && (raw_indent < node_indent || (raw_indent == node_indent && !dash)) {
                break;
            }
            match segment {
                Segment::Key(key) => {
                    let (content, position) = if own_line {
                        let content = trimmed.trim_start_matches("- ").trim_start();
                        (content, (line.len() - content.len()) as isize)
                    } else if dash {
                        continue;
                    } else {
                        (trimmed, raw_indent)
                    };
                    let level = *child_indent.get_or_insert(position);
                    if position == level
                        && (content.starts_with(&format!("{key}:"))
                            || content.starts_with(&format!("\"{key}\":")))
                    {
                        found = Some((i, position, false));
                        break;
                    }
                }
                Segment::Index(_) => {
                    if own_line || !dash {
                        continue;
                    }
                    let level = *child_indent.get_or_insert(raw_indent);
                    if raw_indent == level {
                        if items_before == 0 {
                            found = Some((i, raw_indent, true));
                            break;
                        }
                        items_before -= 1;
                    }
                }
            }
        }
        let Some((line, indent, item)) = found else {
            break;
        };
        (at, node_indent, inclusive) = (line, indent, item);
        deepest = Some(line + 1);
    }
    deepest
}

/// The YAML field of a model fault, for a route read from `kind`'s form.
fn yaml_field(kind: RouteKind, fault: &RouteFault) -> String {
    let f: Vec<&str> = fault.field.iter().map(String::as_str).collect();
    let split = kind == RouteKind::TrafficSplit;
    match f.as_slice() {
        ["service"] if split => "spec.service".into(),
        ["service"] => "spec.parentRefs[0].name".into(),
        ["name"] => "metadata.name".into(),
        ["retries"] => format!("metadata.annotations.\"{RETRY_LIMIT}\""),
        ["retry_timeout"] => format!("metadata.annotations.\"{RETRY_TIMEOUT}\""),
        ["timeout"] => format!("metadata.annotations.\"{TIMEOUT_REQUEST}\""),
        ["response_timeout"] => format!("metadata.annotations.\"{TIMEOUT_RESPONSE}\""),
        ["rules"] => "spec.rules".into(),
        ["rules", _, "backends", b, ..] if split => format!("spec.backends[{b}].service"),
        ["rules", _, "backends"] if split => "spec.backends".into(),
        ["rules", r, "backends", b, ..] => format!("spec.rules[{r}].backendRefs[{b}].name"),
        ["rules", r, "backends"] => format!("spec.rules[{r}].backendRefs"),
        ["rules", r, "timeout"] => format!("spec.rules[{r}].timeouts.request"),
        ["rules", r, "backend_timeout"] => format!("spec.rules[{r}].timeouts.backendRequest"),
        ["rules", r, "matches", m, "grpc", ..] => format!("spec.rules[{r}].matches[{m}].method"),
        ["rules", r, "matches", m, what, ..] => {
            let what = match *what {
                "query" => "queryParams",
                other => other,
            };
            format!("spec.rules[{r}].matches[{m}].{what}")
        }
        ["rules", r, "request_headers", ..] => format!("spec.rules[{r}].filters"),
        _ => fault.field.join("."),
    }
}

/// The Services a route's `parentRefs` name; anything but a Service is refused.
fn parents(refs: &[ParentRef]) -> Result<Vec<DnsLabel>, Fault> {
    if refs.is_empty() {
        return Err(Fault::new(
            "spec.parentRefs",
            "expected at least one Service as parentRef (a mesh route)",
        ));
    }
    let mut services = Vec::new();
    for (i, parent) in refs.iter().enumerate() {
        let group_ok = matches!(parent.group.as_deref(), Some("" | "core"));
        let kind_ok = parent.kind.as_deref() == Some("Service");
        if !group_ok || !kind_ok {
            return Err(Fault::new(
                format!("spec.parentRefs[{i}]"),
                format!(
                    "expected a Service parent (group: \"\" or core, kind: Service) — this mesh \
                     takes mesh routes, not Gateway routes; found group {:?}, kind {:?}",
                    parent
                        .group
                        .as_deref()
                        .unwrap_or("gateway.networking.k8s.io"),
                    parent.kind.as_deref().unwrap_or("Gateway"),
                ),
            ));
        }
        services.push(parent.name.clone());
    }
    Ok(services)
}

/// Route-wide settings from Linkerd's annotations.
#[derive(Default)]
struct Annotations {
    retries: u8,
    retry_on: Vec<RetryOn>,
    retry_timeout: Option<HumanDuration>,
    timeout: Option<HumanDuration>,
    response_timeout: Option<HumanDuration>,
}

fn annotations(metadata: &Metadata, grpc: bool) -> Result<Annotations, Fault> {
    let mut read = Annotations::default();
    let at = |key: &str| format!("metadata.annotations.\"{key}\"");
    let duration = |key: &str, text: &str| {
        HumanDuration::try_from(text.to_owned()).map_err(|err| Fault::new(at(key), err.0))
    };
    let mut limit = None;
    for (key, value) in &metadata.annotations {
        match key.as_str() {
            RETRY_HTTP if !grpc => {
                for part in value.split(',') {
                    let on = RetryOn::parse(part).map_err(|err| Fault::new(at(key), err.0))?;
                    if matches!(on, RetryOn::Grpc(_)) {
                        return Err(Fault::new(
                            at(key),
                            format!("expected HTTP statuses, found the gRPC code {part:?}"),
                        ));
                    }
                    read.retry_on.push(on);
                }
            }
            RETRY_GRPC if grpc => {
                for part in value.split(',') {
                    let on = RetryOn::parse(part).map_err(|err| Fault::new(at(key), err.0))?;
                    if !matches!(on, RetryOn::Grpc(_)) {
                        return Err(Fault::new(
                            at(key),
                            format!("expected gRPC codes such as \"unavailable\", found {part:?}"),
                        ));
                    }
                    read.retry_on.push(on);
                }
            }
            RETRY_LIMIT => {
                let n = value.trim().parse::<u8>().map_err(|_| {
                    Fault::new(at(key), format!("expected 0 to 5, found {value:?}"))
                })?;
                limit = Some(n);
            }
            RETRY_TIMEOUT => read.retry_timeout = Some(duration(key, value)?),
            TIMEOUT_REQUEST => read.timeout = Some(duration(key, value)?),
            TIMEOUT_RESPONSE => read.response_timeout = Some(duration(key, value)?),
            other
                if other.starts_with("retry.linkerd.io/")
                    || other.starts_with("timeout.linkerd.io/") =>
            {
                let kind = if grpc { "GRPCRoute" } else { "HTTPRoute" };
                return Err(Fault::new(
                    at(key),
                    format!(
                        "{other} is not supported on a {kind} here; supported: \
                         {RETRY_HTTP} (HTTPRoute), {RETRY_GRPC} (GRPCRoute), {RETRY_LIMIT}, \
                         {RETRY_TIMEOUT}, {TIMEOUT_REQUEST}, {TIMEOUT_RESPONSE}"
                    ),
                ));
            }
            _ => {}
        }
    }
    // Linkerd retries once unless told otherwise, when anything is to be retried.
    read.retries = limit.unwrap_or(if read.retry_on.is_empty() { 0 } else { 1 });
    Ok(read)
}

fn exact_only(kind: &Option<String>, field: String) -> Result<(), Fault> {
    match kind.as_deref() {
        None | Some("Exact") => Ok(()),
        Some(other) => Err(Fault::new(
            field,
            format!("expected type Exact, found {other:?} (regular expressions are not supported)"),
        )),
    }
}

fn name_values(matches: &[NameValueMatch], field: &str) -> Result<BTreeMap<String, String>, Fault> {
    let mut map = BTreeMap::new();
    for (i, m) in matches.iter().enumerate() {
        exact_only(&m.kind, format!("{field}[{i}].type"))?;
        // Gateway API: of several entries with one name, the first counts.
        map.entry(m.name.clone()).or_insert_with(|| m.value.clone());
    }
    Ok(map)
}

fn edits(filters: &[Filter], rule: &str) -> Result<HeaderEdits, Fault> {
    let mut edits = HeaderEdits::default();
    for (i, filter) in filters.iter().enumerate() {
        let field = format!("{rule}.filters[{i}]");
        match (filter.kind.as_str(), &filter.request_header_modifier) {
            ("RequestHeaderModifier", Some(modifier)) => {
                for pair in &modifier.set {
                    edits.set.insert(pair.name.clone(), pair.value.clone());
                }
                for pair in &modifier.add {
                    edits.add.insert(pair.name.clone(), pair.value.clone());
                }
                edits.remove.extend(modifier.remove.iter().cloned());
            }
            ("RequestHeaderModifier", None) => {
                return Err(Fault::new(
                    format!("{field}.requestHeaderModifier"),
                    "expected the requestHeaderModifier of a filter of that type",
                ))
            }
            (other, _) => {
                return Err(Fault::new(
                    format!("{field}.type"),
                    format!(
                        "expected RequestHeaderModifier (the filter supported), found {other:?}"
                    ),
                ))
            }
        }
    }
    Ok(edits)
}

fn backends(refs: &[BackendRef], rule: &str) -> Result<Vec<WeightedBackend>, Fault> {
    refs.iter()
        .enumerate()
        .map(|(i, backend)| {
            let kind_ok = matches!(backend.kind.as_deref(), None | Some("Service"))
                && matches!(backend.group.as_deref(), None | Some("" | "core"));
            if !kind_ok {
                return Err(Fault::new(
                    format!("{rule}.backendRefs[{i}].kind"),
                    "expected a Service backend",
                ));
            }
            Ok(WeightedBackend {
                service: backend.name.clone(),
                weight: backend.weight.unwrap_or(1),
            })
        })
        .collect()
}

fn route_of(
    metadata: &Metadata,
    kind: RouteKind,
    annotations: Annotations,
    service: DnsLabel,
    rules: Vec<RouteRule>,
) -> Route {
    Route {
        name: metadata.name.clone(),
        service,
        kind,
        retries: annotations.retries,
        retry_on: annotations.retry_on,
        retry_timeout: annotations.retry_timeout,
        timeout: annotations.timeout,
        response_timeout: annotations.response_timeout,
        rules,
    }
}

fn from_http_route(doc: Document<HttpRouteSpec>) -> Result<Vec<Route>, Fault> {
    let services = parents(&doc.spec.parent_refs)?;
    let mut rules = Vec::new();
    for (r, rule) in doc.spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        let mut matches = Vec::new();
        for (m, matched) in rule.matches.iter().enumerate() {
            let field = format!("{at}.matches[{m}]");
            let path = match &matched.path {
                None => None,
                Some(path) => Some(match path.kind.as_deref() {
                    None | Some("PathPrefix") => PathMatch::Prefix(path.value.clone()),
                    Some("Exact") => PathMatch::Exact(path.value.clone()),
                    Some(other) => {
                        return Err(Fault::new(
                            format!("{field}.path.type"),
                            format!("expected PathPrefix or Exact, found {other:?}"),
                        ))
                    }
                }),
            };
            matches.push(RouteMatch {
                path,
                grpc: None,
                method: matched.method.clone(),
                headers: name_values(&matched.headers, &format!("{field}.headers"))?,
                query: name_values(&matched.query_params, &format!("{field}.queryParams"))?,
            });
        }
        let timeouts = rule.timeouts.as_ref();
        rules.push(RouteRule {
            matches,
            backends: backends(&rule.backend_refs, &at)?,
            request_headers: edits(&rule.filters, &at)?,
            timeout: timeouts.and_then(|t| t.request),
            backend_timeout: timeouts.and_then(|t| t.backend_request),
        });
    }
    if rules.is_empty() {
        // Gateway API: a route without rules sends everything to its parent.
        rules.push(RouteRule::default());
    }
    services
        .into_iter()
        .map(|service| {
            let annotations = annotations(&doc.metadata, false)?;
            Ok(route_of(
                &doc.metadata,
                RouteKind::Http,
                annotations,
                service,
                rules.clone(),
            ))
        })
        .collect()
}

fn from_grpc_route(doc: Document<GrpcRouteSpec>) -> Result<Vec<Route>, Fault> {
    let services = parents(&doc.spec.parent_refs)?;
    let mut rules = Vec::new();
    for (r, rule) in doc.spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        let mut matches = Vec::new();
        for (m, matched) in rule.matches.iter().enumerate() {
            let field = format!("{at}.matches[{m}]");
            let grpc = match &matched.method {
                None => None,
                Some(method) => {
                    exact_only(&method.kind, format!("{field}.method.type"))?;
                    let Some(service) = method.service.clone() else {
                        return Err(Fault::new(
                            format!("{field}.method.service"),
                            "expected the gRPC service (matching by method alone is not supported)",
                        ));
                    };
                    Some(GrpcMethod {
                        service,
                        method: method.method.clone(),
                    })
                }
            };
            matches.push(RouteMatch {
                path: None,
                grpc,
                method: None,
                headers: name_values(&matched.headers, &format!("{field}.headers"))?,
                query: BTreeMap::new(),
            });
        }
        rules.push(RouteRule {
            matches,
            backends: backends(&rule.backend_refs, &at)?,
            request_headers: edits(&rule.filters, &at)?,
            timeout: None,
            backend_timeout: None,
        });
    }
    if rules.is_empty() {
        rules.push(RouteRule::default());
    }
    services
        .into_iter()
        .map(|service| {
            let annotations = annotations(&doc.metadata, true)?;
            Ok(route_of(
                &doc.metadata,
                RouteKind::Grpc,
                annotations,
                service,
                rules.clone(),
            ))
        })
        .collect()
}

fn from_traffic_split(doc: Document<TrafficSplitSpec>) -> Result<Vec<Route>, Fault> {
    if doc.spec.matches.is_some() {
        return Err(Fault::new(
            "spec.matches",
            "SMI HTTPRouteGroup matches are not supported; write an HTTPRoute with matches",
        ));
    }
    let backends = doc
        .spec
        .backends
        .iter()
        .map(|b| WeightedBackend {
            service: b.service.clone(),
            weight: b.weight,
        })
        .collect();
    let annotations = annotations(&doc.metadata, false)?;
    Ok(vec![route_of(
        &doc.metadata,
        RouteKind::TrafficSplit,
        annotations,
        doc.spec.service.clone(),
        vec![RouteRule {
            backends,
            ..RouteRule::default()
        }],
    )])
}

/// `routes` as Gateway API YAML documents (separated by `---`): `GRPCRoute` for gRPC
/// routes, `HTTPRoute` for the others. Reading the result with [`parse`] gives the same
/// routes back (a `TrafficSplit` comes back as an HTTP route).
pub fn to_yaml(routes: &[Route]) -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for route in routes {
        let mut metadata = Metadata {
            name: route.name.clone(),
            namespace: None,
            annotations: BTreeMap::new(),
        };
        let grpc = route.kind == RouteKind::Grpc;
        if !route.retry_on.is_empty() {
            let list: Vec<String> = route.retry_on.iter().map(ToString::to_string).collect();
            let key = if grpc { RETRY_GRPC } else { RETRY_HTTP };
            metadata.annotations.insert(key.into(), list.join(","));
        }
        if route.retries != u8::from(!route.retry_on.is_empty()) {
            metadata
                .annotations
                .insert(RETRY_LIMIT.into(), route.retries.to_string());
        }
        for (key, duration) in [
            (RETRY_TIMEOUT, route.retry_timeout),
            (TIMEOUT_REQUEST, route.timeout),
            (TIMEOUT_RESPONSE, route.response_timeout),
        ] {
            if let Some(duration) = duration {
                metadata
                    .annotations
                    .insert(key.into(), String::from(duration));
            }
        }
        let parent_refs = vec![ParentRef {
            group: Some(String::new()),
            kind: Some("Service".into()),
            name: route.service.clone(),
            namespace: None,
            port: None,
            section_name: None,
        }];
        let backend_refs = |rule: &RouteRule| -> Vec<BackendRef> {
            rule.backends
                .iter()
                .map(|b| BackendRef {
                    group: None,
                    kind: None,
                    name: b.service.clone(),
                    namespace: None,
                    port: None,
                    weight: Some(b.weight),
                })
                .collect()
        };
        let filters = |rule: &RouteRule| -> Vec<Filter> {
            if rule.request_headers.is_empty() {
                return Vec::new();
            }
            let pairs = |map: &BTreeMap<String, String>| {
                map.iter()
                    .map(|(name, value)| NameValue {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect()
            };
            vec![Filter {
                kind: "RequestHeaderModifier".into(),
                request_header_modifier: Some(HeaderModifier {
                    set: pairs(&rule.request_headers.set),
                    add: pairs(&rule.request_headers.add),
                    remove: rule.request_headers.remove.clone(),
                }),
            }]
        };
        let exact = |map: &BTreeMap<String, String>| -> Vec<NameValueMatch> {
            map.iter()
                .map(|(name, value)| NameValueMatch {
                    kind: None,
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect()
        };
        let text = if grpc {
            let rules = route
                .rules
                .iter()
                .map(|rule| GrpcRule {
                    name: None,
                    matches: rule
                        .matches
                        .iter()
                        .map(|m| GrpcMatch {
                            method: m.grpc.as_ref().map(|g| GrpcMethodMatch {
                                kind: None,
                                service: Some(g.service.clone()),
                                method: g.method.clone(),
                            }),
                            headers: exact(&m.headers),
                        })
                        .collect(),
                    filters: filters(rule),
                    backend_refs: backend_refs(rule),
                })
                .collect();
            serde_yaml_ng::to_string(&Document {
                api_version: GATEWAY_V1.into(),
                kind: "GRPCRoute".into(),
                metadata,
                spec: GrpcRouteSpec {
                    parent_refs,
                    hostnames: Vec::new(),
                    rules,
                },
                status: None,
            })?
        } else {
            let rules = route
                .rules
                .iter()
                .map(|rule| HttpRule {
                    name: None,
                    matches: rule
                        .matches
                        .iter()
                        .map(|m| HttpMatch {
                            path: m.effective_path().map(|p| match p {
                                PathMatch::Exact(value) => HttpPath {
                                    kind: Some("Exact".into()),
                                    value,
                                },
                                PathMatch::Prefix(value) => HttpPath {
                                    kind: Some("PathPrefix".into()),
                                    value,
                                },
                            }),
                            headers: exact(&m.headers),
                            query_params: exact(&m.query),
                            method: m.method.clone(),
                        })
                        .collect(),
                    filters: filters(rule),
                    backend_refs: backend_refs(rule),
                    timeouts: (rule.timeout.is_some() || rule.backend_timeout.is_some()).then_some(
                        Timeouts {
                            request: rule.timeout,
                            backend_request: rule.backend_timeout,
                        },
                    ),
                })
                .collect();
            serde_yaml_ng::to_string(&Document {
                api_version: GATEWAY_V1.into(),
                kind: "HTTPRoute".into(),
                metadata,
                spec: HttpRouteSpec {
                    parent_refs,
                    hostnames: Vec::new(),
                    rules,
                },
                status: None,
            })?
        };
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&text);
    }
    Ok(out)
}

/// `routes` as `[[routes]]` TOML tables, the form `cluster.toml` takes.
pub fn to_toml(routes: &[Route]) -> Result<String, toml::ser::Error> {
    #[derive(Serialize)]
    struct Tables<'a> {
        routes: &'a [Route],
    }
    toml::to_string(&Tables { routes })
}
