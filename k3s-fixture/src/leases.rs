//! `coordination.k8s.io/v1` Leases as kube-apiserver stores them, without the question of
//! where the store lives (see `sitewide`): decoding, validation, optimistic concurrency
//! and the Status each refusal answers, after kube-apiserver's generic registry
//! (`registry/generic/registry/store.go`) and the Lease strategy
//! (`pkg/registry/coordination/lease/strategy.go`: create-on-update allowed,
//! unconditional update not allowed).
//!
//! - `POST .../leases`: 201 and the Lease; an existing name is 409 `AlreadyExists`; a
//!   `metadata.resourceVersion` in the body is 500 ("resourceVersion should not be set on
//!   objects to be created"), as etcd3's storage answers.
//! - `PUT .../leases/<name>`: the body's `metadata.resourceVersion` must be the stored one
//!   (else 409 `Conflict`, "the object has been modified; …"); none at all is 422 `Invalid`
//!   ("metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"); a
//!   missing Lease is created (201) whatever resourceVersion the body has; a
//!   `metadata.uid` in the body is a precondition (409 when it is not the stored one's).
//! - `DELETE .../leases/<name>`: a `Status` `Success`; DeleteOptions `preconditions`
//!   (`uid`, `resourceVersion`) are checked (409).
//! - Every write, deletes included, takes the next resourceVersion of a store-wide
//!   counter (etcd's revision); `uid` and `creationTimestamp` are kept across updates.
//! - `spec.acquireTime`/`spec.renewTime` are MicroTime: RFC 3339 with exactly six
//!   fractional digits (Go's `2006-01-02T15:04:05.000000Z07:00`), served in UTC;
//!   `leaseDurationSeconds` must be > 0 and `leaseTransitions` >= 0 (422); a field of the
//!   wrong JSON type is 400 ("Lease in version \"v1\" cannot be handled as a Lease").
//!
//! Simplifications: no `generateName`, `managedFields`, `ownerReferences`, finalizers or
//! field selectors; unknown fields are dropped without a warning; a Lease in a namespace
//! that has no Namespace object is stored all the same (kube-apiserver's NamespaceLifecycle
//! admission would refuse it).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::objects::Selector;

pub const GROUP: &str = "coordination.k8s.io";
pub const API_VERSION: &str = "coordination.k8s.io/v1";
const QUALIFIED_RESOURCE: &str = "leases.coordination.k8s.io";
const QUALIFIED_KIND: &str = "Lease.coordination.k8s.io";
/// kube-apiserver's `OptimisticLockErrorMsg`.
pub const OPTIMISTIC_LOCK: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// Why a request is refused, as kube-apiserver's `Status` says it.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    NotFound(String),
    AlreadyExists(String),
    /// 409 `Conflict`: the name and why.
    Conflict(String, String),
    /// 422 `Invalid`: the qualified kind (`Lease.coordination.k8s.io`, or
    /// `leases.coordination.k8s.io` for the registry's own checks), the name, the field,
    /// and `Invalid value: …: …` or `Required value: …`.
    Invalid {
        qualified: &'static str,
        name: String,
        field: String,
        error: String,
    },
    BadRequest(String),
    Internal(String),
}

impl Failure {
    pub fn code(&self) -> u16 {
        match self {
            Failure::NotFound(_) => 404,
            Failure::AlreadyExists(_) | Failure::Conflict(..) => 409,
            Failure::Invalid { .. } => 422,
            Failure::BadRequest(_) => 400,
            Failure::Internal(_) => 500,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Failure::NotFound(_) => "NotFound",
            Failure::AlreadyExists(_) => "AlreadyExists",
            Failure::Conflict(..) => "Conflict",
            Failure::Invalid { .. } => "Invalid",
            Failure::BadRequest(_) => "BadRequest",
            Failure::Internal(_) => "InternalError",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Failure::NotFound(name) => format!("{QUALIFIED_RESOURCE} \"{name}\" not found"),
            Failure::AlreadyExists(name) => {
                format!("{QUALIFIED_RESOURCE} \"{name}\" already exists")
            }
            Failure::Conflict(name, why) => {
                format!("Operation cannot be fulfilled on {QUALIFIED_RESOURCE} \"{name}\": {why}")
            }
            Failure::Invalid {
                qualified,
                name,
                field,
                error,
            } => format!("{qualified} \"{name}\" is invalid: {field}: {error}"),
            Failure::BadRequest(message) | Failure::Internal(message) => message.clone(),
        }
    }

    /// The Status's `details`, when kube-apiserver gives them.
    pub fn details(&self) -> Option<Value> {
        let of = |name: &str, kind: &str| json!({"name": name, "group": GROUP, "kind": kind});
        match self {
            Failure::NotFound(name) | Failure::AlreadyExists(name) | Failure::Conflict(name, _) => {
                Some(of(name, "leases"))
            }
            Failure::Invalid {
                qualified,
                name,
                field,
                error,
            } => {
                let mut details = of(
                    name,
                    if *qualified == QUALIFIED_KIND {
                        "Lease"
                    } else {
                        "leases"
                    },
                );
                let reason = if error.starts_with("Required value") {
                    "FieldValueRequired"
                } else {
                    "FieldValueInvalid"
                };
                details["causes"] = json!([{"reason": reason, "message": error, "field": field}]);
                Some(details)
            }
            Failure::BadRequest(_) | Failure::Internal(_) => None,
        }
    }
}

/// A decoded request body: its metadata and spec as they will be stored.
struct Decoded {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<Value>,
    annotations: Option<Value>,
    spec: Map<String, Value>,
}

fn cannot_handle(detail: &str) -> Failure {
    Failure::BadRequest(format!(
        "Lease in version \"v1\" cannot be handled as a Lease: {detail}"
    ))
}

/// Decodes a Lease body (400 for what does not decode as a Lease).
fn decode(body: &Value) -> Result<Decoded, Failure> {
    let Value::Object(doc) = body else {
        return Err(cannot_handle("the body is not a JSON object"));
    };
    match doc.get("kind") {
        None | Some(Value::Null) => {}
        Some(Value::String(kind)) if kind == "Lease" => {}
        Some(other) => {
            return Err(Failure::BadRequest(format!(
                "the body is a {other}, not a Lease"
            )))
        }
    }
    match doc.get("apiVersion") {
        None | Some(Value::Null) => {}
        Some(Value::String(v)) if v == API_VERSION => {}
        Some(other) => {
            return Err(Failure::BadRequest(format!(
                "the API version in the data ({other}) does not match the expected API version ({API_VERSION})"
            )))
        }
    }
    let empty = Map::new();
    let meta = match doc.get("metadata") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(meta)) => meta,
        Some(_) => return Err(cannot_handle("metadata: expected an object")),
    };
    let text = |key: &str| -> Result<Option<String>, Failure> {
        match meta.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(cannot_handle(&format!("metadata.{key}: expected a string"))),
        }
    };
    let strings = |key: &str| -> Result<Option<Value>, Failure> {
        match meta.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(map)) if map.values().all(Value::is_string) => {
                Ok((!map.is_empty()).then(|| Value::Object(map.clone())))
            }
            Some(_) => Err(cannot_handle(&format!(
                "metadata.{key}: expected a map of strings"
            ))),
        }
    };
    let spec_in = match doc.get("spec") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(spec)) => spec,
        Some(_) => return Err(cannot_handle("spec: expected an object")),
    };
    let mut spec = Map::new();
    for key in ["holderIdentity", "strategy", "preferredHolder"] {
        match spec_in.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                spec.insert(key.into(), s.clone().into());
            }
            Some(_) => return Err(cannot_handle(&format!("spec.{key}: expected a string"))),
        }
    }
    for key in ["leaseDurationSeconds", "leaseTransitions"] {
        match spec_in.get(key) {
            None | Some(Value::Null) => {}
            Some(n) if n.as_i64().and_then(|n| i32::try_from(n).ok()).is_some() => {
                spec.insert(key.into(), n.clone());
            }
            Some(other) => {
                return Err(cannot_handle(&format!(
                    "spec.{key}: {other} is not a 32-bit integer"
                )))
            }
        }
    }
    for key in ["acquireTime", "renewTime"] {
        match spec_in.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => {
                let micros = parse_micro_time(text).ok_or_else(|| {
                    cannot_handle(&format!(
                        "parsing time {text:?} as \"2006-01-02T15:04:05.000000Z07:00\": cannot parse"
                    ))
                })?;
                spec.insert(key.into(), format_micro_time(micros).into());
            }
            Some(_) => return Err(cannot_handle(&format!("spec.{key}: expected a string"))),
        }
    }
    Ok(Decoded {
        name: text("name")?,
        namespace: text("namespace")?,
        uid: text("uid")?,
        resource_version: text("resourceVersion")?,
        labels: strings("labels")?,
        annotations: strings("annotations")?,
        spec,
    })
}

/// ValidateLease: the name and the spec's numbers (422).
fn validate(name: &str, spec: &Map<String, Value>) -> Result<(), Failure> {
    let invalid = |field: &str, error: String| Failure::Invalid {
        qualified: QUALIFIED_KIND,
        name: name.to_owned(),
        field: field.to_owned(),
        error,
    };
    if !crate::objects::dns_subdomain(name) {
        return Err(invalid(
            "metadata.name",
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ),
        ));
    }
    if let Some(n) = spec.get("leaseDurationSeconds").and_then(Value::as_i64) {
        if n <= 0 {
            return Err(invalid(
                "spec.leaseDurationSeconds",
                format!("Invalid value: {n}: must be greater than 0"),
            ));
        }
    }
    if let Some(n) = spec.get("leaseTransitions").and_then(Value::as_i64) {
        if n < 0 {
            return Err(invalid(
                "spec.leaseTransitions",
                format!("Invalid value: {n}: must be greater than or equal to 0"),
            ));
        }
    }
    Ok(())
}

type Key = (String, String);

/// The Leases of a cluster, by namespace and name, as stored (no `kind`/`apiVersion`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Leases {
    entries: BTreeMap<Key, Value>,
    /// The resourceVersion of the last write (etcd's revision).
    version: u64,
}

impl Leases {
    /// The resourceVersion of the last write.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// One Lease, with its `kind` and `apiVersion`.
    pub fn get(&self, namespace: &str, name: &str) -> Result<Value, Failure> {
        let mut lease = self
            .entries
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
            .ok_or_else(|| Failure::NotFound(name.to_owned()))?;
        if let Some(map) = lease.as_object_mut() {
            map.insert("kind".into(), "Lease".into());
            map.insert("apiVersion".into(), API_VERSION.into());
        }
        Ok(lease)
    }

    /// A LeaseList (of `namespace`, or of all), items without `kind`/`apiVersion`.
    pub fn list(&self, namespace: Option<&str>, selector: &Selector) -> Value {
        let items: Vec<Value> = self
            .entries
            .iter()
            .filter(|((ns, _), lease)| {
                namespace.is_none_or(|n| n == ns)
                    && selector.matches(lease["metadata"]["labels"].as_object())
            })
            .map(|(_, lease)| lease.clone())
            .collect();
        json!({
            "kind": "LeaseList",
            "apiVersion": API_VERSION,
            "metadata": {"resourceVersion": self.version.to_string()},
            "items": items,
        })
    }

    /// `POST`: the created Lease (201).
    pub fn create(&mut self, namespace: &str, body: &Value, now: u64) -> Result<Value, Failure> {
        let decoded = decode(body)?;
        check_namespace(&decoded, namespace)?;
        let Some(name) = decoded.name.clone() else {
            return Err(Failure::Invalid {
                qualified: QUALIFIED_KIND,
                name: String::new(),
                field: "metadata.name".into(),
                error: "Required value: name or generateName is required".into(),
            });
        };
        validate(&name, &decoded.spec)?;
        if decoded.resource_version.is_some() {
            return Err(Failure::Internal(
                "resourceVersion should not be set on objects to be created".into(),
            ));
        }
        let key = (namespace.to_owned(), name.clone());
        if self.entries.contains_key(&key) {
            return Err(Failure::AlreadyExists(name));
        }
        self.store(key, decoded, crate::nodes::uuid(), crate::log::rfc3339(now));
        self.get(namespace, &name)
    }

    /// `PUT`: the Lease, and whether it was created (201) rather than updated (200).
    pub fn update(
        &mut self,
        namespace: &str,
        name: &str,
        body: &Value,
        now: u64,
    ) -> Result<(bool, Value), Failure> {
        let decoded = decode(body)?;
        check_namespace(&decoded, namespace)?;
        if decoded.name.as_deref() != Some(name) {
            return Err(Failure::BadRequest(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                decoded.name.as_deref().unwrap_or_default()
            )));
        }
        let key = (namespace.to_owned(), name.to_owned());
        let existing = self.entries.get(&key);
        let stored = |field: &str| {
            existing
                .and_then(|lease| lease["metadata"][field].as_str())
                .unwrap_or_default()
                .to_owned()
        };
        if let Some(uid) = &decoded.uid {
            if *uid != stored("uid") {
                return Err(Failure::Conflict(
                    name.to_owned(),
                    format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        stored("uid")
                    ),
                ));
            }
        }
        let Some(existing) = existing else {
            validate(name, &decoded.spec)?;
            self.store(key, decoded, crate::nodes::uuid(), crate::log::rfc3339(now));
            return Ok((true, self.get(namespace, name)?));
        };
        match &decoded.resource_version {
            None => {
                return Err(Failure::Invalid {
                    qualified: QUALIFIED_RESOURCE,
                    name: name.to_owned(),
                    field: "metadata.resourceVersion".into(),
                    error: "Invalid value: 0x0: must be specified for an update".into(),
                })
            }
            Some(rv) if rv.parse::<u64>().is_err() => {
                return Err(Failure::Internal(format!(
                    "strconv.ParseUint: parsing {rv:?}: invalid syntax"
                )))
            }
            Some(rv) if *rv != stored("resourceVersion") => {
                return Err(Failure::Conflict(name.to_owned(), OPTIMISTIC_LOCK.into()))
            }
            Some(_) => {}
        }
        validate(name, &decoded.spec)?;
        let created = existing["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.store(key, decoded, stored("uid"), created);
        Ok((false, self.get(namespace, name)?))
    }

    /// `DELETE`: the `Status` it answers. `options` is the request's DeleteOptions, if any.
    pub fn delete(
        &mut self,
        namespace: &str,
        name: &str,
        options: Option<&Value>,
    ) -> Result<Value, Failure> {
        let key = (namespace.to_owned(), name.to_owned());
        let lease = self
            .entries
            .get(&key)
            .ok_or_else(|| Failure::NotFound(name.to_owned()))?;
        let preconditions = options.map(|o| &o["preconditions"]);
        for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            let wanted = preconditions.and_then(|p| p[field].as_str());
            let actual = lease["metadata"][field].as_str().unwrap_or_default();
            if let Some(wanted) = wanted.filter(|w| *w != actual) {
                return Err(Failure::Conflict(
                    name.to_owned(),
                    format!(
                        "Precondition failed: {label} in precondition: {wanted}, {label} in object meta: {actual}"
                    ),
                ));
            }
        }
        let uid = lease["metadata"]["uid"].clone();
        self.entries.remove(&key);
        self.version += 1;
        Ok(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "group": GROUP, "kind": "leases", "uid": uid},
        }))
    }

    fn store(&mut self, key: Key, decoded: Decoded, uid: String, created: String) {
        self.version += 1;
        let mut meta = Map::new();
        meta.insert("name".into(), key.1.clone().into());
        meta.insert("namespace".into(), key.0.clone().into());
        meta.insert("uid".into(), uid.into());
        meta.insert("resourceVersion".into(), self.version.to_string().into());
        meta.insert("creationTimestamp".into(), created.into());
        if let Some(labels) = decoded.labels {
            meta.insert("labels".into(), labels);
        }
        if let Some(annotations) = decoded.annotations {
            meta.insert("annotations".into(), annotations);
        }
        self.entries.insert(
            key,
            json!({"metadata": Value::Object(meta), "spec": Value::Object(decoded.spec)}),
        );
    }

    /// The store as JSON: to keep on disk and to hand to the other servers.
    pub fn snapshot(&self) -> Value {
        let items: Vec<&Value> = self.entries.values().collect();
        json!({"version": self.version, "items": items})
    }

    /// A store from a [`Leases::snapshot`]; `None` when it does not read as one.
    pub fn restore(snapshot: &Value) -> Option<Leases> {
        let version = snapshot["version"].as_u64()?;
        let mut entries = BTreeMap::new();
        for item in snapshot["items"].as_array()? {
            let meta = &item["metadata"];
            let (Some(ns), Some(name)) = (meta["namespace"].as_str(), meta["name"].as_str()) else {
                return None;
            };
            entries.insert((ns.to_owned(), name.to_owned()), item.clone());
        }
        Some(Leases { entries, version })
    }
}

fn check_namespace(decoded: &Decoded, namespace: &str) -> Result<(), Failure> {
    match &decoded.namespace {
        Some(ns) if ns != namespace => Err(Failure::BadRequest(
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// The namespace and name a Lease path names: `None` for other paths; `Some((None, None))`
/// for the list of all namespaces.
pub fn route(path: &str) -> Option<(Option<&str>, Option<&str>)> {
    let rest = path.strip_prefix("/apis/coordination.k8s.io/v1/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["leases"] => Some((None, None)),
        ["namespaces", ns, "leases"] if !ns.is_empty() => Some((Some(ns), None)),
        ["namespaces", ns, "leases", name] if !ns.is_empty() && !name.is_empty() => {
            Some((Some(ns), Some(name)))
        }
        _ => None,
    }
}

/// A MicroTime (`YYYY-MM-DDThh:mm:ss.ffffff` and `Z` or `±hh:mm`, six fractional digits
/// exactly, as Go parses `2006-01-02T15:04:05.000000Z07:00`) as microseconds since the
/// Unix epoch.
pub fn parse_micro_time(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 27
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
    {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let micros = num(20..26)?;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => return None,
    };
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let offset = match &text[26..] {
        "Z" => 0,
        zone if zone.len() == 6 && zone.as_bytes()[3] == b':' => {
            let sign = match zone.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (h, m) = (num(27..29)?, num(30..32)?);
            if h > 23 || m > 59 {
                return None;
            }
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    let days = crate::log::days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(secs * 1_000_000 + micros)
}

/// Microseconds since the Unix epoch as a MicroTime in UTC.
pub fn format_micro_time(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let fraction = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    let (year, month, day) = crate::log::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{fraction:06}Z",
        rest / 3600,
        (rest % 3600) / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_583_200;

    fn lease(name: &str, holder: &str, rv: Option<&str>) -> Value {
        let mut meta = json!({"name": name});
        if let Some(rv) = rv {
            meta["resourceVersion"] = rv.into();
        }
        json!({"apiVersion": API_VERSION, "kind": "Lease", "metadata": meta,
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                        "renewTime": "2025-12-01T10:00:05.123456Z", "leaseTransitions": 0}})
    }

    fn rv(lease: &Value) -> String {
        lease["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn a_created_lease_has_system_fields_and_a_second_create_is_already_exists() {
        let mut leases = Leases::default();
        let created = leases
            .create("kube-system", &lease("pimesh", "a", None), NOW)
            .unwrap();
        assert_eq!(created["kind"], "Lease");
        assert_eq!(created["apiVersion"], API_VERSION);
        assert_eq!(created["metadata"]["namespace"], "kube-system");
        assert_eq!(
            created["metadata"]["creationTimestamp"],
            "2025-12-01T10:00:00Z"
        );
        assert_eq!(created["metadata"]["uid"].as_str().unwrap().len(), 36);
        assert_eq!(rv(&created), "1");
        assert_eq!(
            created["spec"]["renewTime"], "2025-12-01T10:00:05.123456Z",
            "{created}"
        );
        let again = leases
            .create("kube-system", &lease("pimesh", "b", None), NOW)
            .unwrap_err();
        assert_eq!(again, Failure::AlreadyExists("pimesh".into()));
        assert_eq!(again.code(), 409);
        assert_eq!(
            again.message(),
            "leases.coordination.k8s.io \"pimesh\" already exists"
        );
        // Another namespace is another Lease.
        leases
            .create("default", &lease("pimesh", "b", None), NOW)
            .unwrap();
        assert_eq!(
            leases.list(Some("kube-system"), &Selector::parse("").unwrap())["items"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            leases.create("default", &lease("x", "a", Some("3")), NOW),
            Err(Failure::Internal(
                "resourceVersion should not be set on objects to be created".into()
            ))
        );
    }

    #[test]
    fn an_update_must_name_the_stored_resource_version() {
        let mut leases = Leases::default();
        let first = leases.create("ns", &lease("l", "a", None), NOW).unwrap();
        let (created, second) = leases
            .update("ns", "l", &lease("l", "b", Some(&rv(&first))), NOW + 1)
            .unwrap();
        assert!(!created);
        assert_eq!(second["spec"]["holderIdentity"], "b");
        assert_eq!(second["metadata"]["uid"], first["metadata"]["uid"]);
        assert_eq!(
            second["metadata"]["creationTimestamp"],
            first["metadata"]["creationTimestamp"]
        );
        assert!(rv(&second).parse::<u64>().unwrap() > rv(&first).parse::<u64>().unwrap());
        // The first version again: someone else wrote in between.
        let stale = leases
            .update("ns", "l", &lease("l", "c", Some(&rv(&first))), NOW + 2)
            .unwrap_err();
        assert_eq!(stale.code(), 409);
        assert_eq!(stale.reason(), "Conflict");
        assert_eq!(
            stale.message(),
            format!("Operation cannot be fulfilled on leases.coordination.k8s.io \"l\": {OPTIMISTIC_LOCK}")
        );
        assert_eq!(
            leases.get("ns", "l").unwrap()["spec"]["holderIdentity"],
            "b"
        );
        // No resourceVersion: an unconditional update, which Leases do not allow.
        let unconditional = leases
            .update("ns", "l", &lease("l", "c", None), NOW + 2)
            .unwrap_err();
        assert_eq!(unconditional.code(), 422);
        assert_eq!(
            unconditional.message(),
            "leases.coordination.k8s.io \"l\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
        );
        // Of two writers with the same read, one wins.
        let read = rv(&leases.get("ns", "l").unwrap());
        assert!(leases
            .update("ns", "l", &lease("l", "d", Some(&read)), NOW + 3)
            .is_ok());
        assert!(leases
            .update("ns", "l", &lease("l", "e", Some(&read)), NOW + 3)
            .is_err());
        assert_eq!(
            leases.get("ns", "l").unwrap()["spec"]["holderIdentity"],
            "d"
        );
    }

    #[test]
    fn a_put_creates_a_missing_lease_and_checks_a_uid_precondition() {
        let mut leases = Leases::default();
        let (created, made) = leases
            .update("ns", "l", &lease("l", "a", Some("77")), NOW)
            .unwrap();
        assert!(created);
        assert_eq!(rv(&made), "1");
        let mut other_uid = lease("l", "b", Some("1"));
        other_uid["metadata"]["uid"] = "not-the-uid".into();
        let refused = leases.update("ns", "l", &other_uid, NOW).unwrap_err();
        assert_eq!(refused.code(), 409);
        assert!(
            refused.message().contains("Precondition failed: UID"),
            "{refused:?}"
        );
        other_uid["metadata"]["uid"] = made["metadata"]["uid"].clone();
        assert!(leases.update("ns", "l", &other_uid, NOW).is_ok());
        assert_eq!(
            leases
                .update("ns", "m", &lease("l", "a", Some("1")), NOW)
                .unwrap_err()
                .code(),
            400,
            "the body's name is not the URL's"
        );
    }

    #[test]
    fn bodies_are_decoded_and_validated_as_kube_apiserver_does() {
        let mut leases = Leases::default();
        let mut zero = lease("l", "a", None);
        zero["spec"]["leaseDurationSeconds"] = 0.into();
        let refused = leases.create("ns", &zero, NOW).unwrap_err();
        assert_eq!(refused.code(), 422);
        assert_eq!(
            refused.message(),
            "Lease.coordination.k8s.io \"l\" is invalid: spec.leaseDurationSeconds: Invalid value: 0: must be greater than 0"
        );
        assert_eq!(
            refused.details().unwrap()["causes"][0]["field"],
            "spec.leaseDurationSeconds"
        );
        let mut nanos = lease("l", "a", None);
        nanos["spec"]["renewTime"] = "2025-12-01T10:00:05.123456789Z".into();
        assert_eq!(leases.create("ns", &nanos, NOW).unwrap_err().code(), 400);
        let mut text = lease("l", "a", None);
        text["spec"]["leaseDurationSeconds"] = "15".into();
        assert_eq!(leases.create("ns", &text, NOW).unwrap_err().code(), 400);
        let mut offset = lease("l", "a", None);
        offset["spec"]["acquireTime"] = "2025-12-01T11:00:05.000001+01:00".into();
        offset["spec"]["unknown"] = true.into();
        let made = leases.create("ns", &offset, NOW).unwrap();
        assert_eq!(made["spec"]["acquireTime"], "2025-12-01T10:00:05.000001Z");
        assert!(made["spec"].get("unknown").is_none());
        assert_eq!(
            leases
                .create("ns", &json!({"spec": {}}), NOW)
                .unwrap_err()
                .code(),
            422,
            "a name is required"
        );
        let mut elsewhere = lease("k", "a", None);
        elsewhere["metadata"]["namespace"] = "other".into();
        assert_eq!(
            leases.create("ns", &elsewhere, NOW).unwrap_err().code(),
            400
        );
        assert_eq!(
            leases
                .create("ns", &lease("Not_A_Name", "a", None), NOW)
                .unwrap_err()
                .code(),
            422
        );
    }

    #[test]
    fn deletes_check_preconditions_and_bump_the_version() {
        let mut leases = Leases::default();
        let made = leases.create("ns", &lease("l", "a", None), NOW).unwrap();
        let stale = json!({"preconditions": {"resourceVersion": "999"}});
        assert_eq!(
            leases.delete("ns", "l", Some(&stale)).unwrap_err().code(),
            409
        );
        let before = leases.version();
        let status = leases
            .delete(
                "ns",
                "l",
                Some(&json!({"preconditions": {"uid": made["metadata"]["uid"]}})),
            )
            .unwrap();
        assert_eq!(status["status"], "Success");
        assert_eq!(status["details"]["uid"], made["metadata"]["uid"]);
        assert!(leases.version() > before);
        assert_eq!(leases.get("ns", "l").unwrap_err().code(), 404);
        assert_eq!(
            leases.delete("ns", "l", None).unwrap_err().message(),
            "leases.coordination.k8s.io \"l\" not found"
        );
    }

    #[test]
    fn a_snapshot_restores_the_store() {
        let mut leases = Leases::default();
        leases.create("ns", &lease("l", "a", None), NOW).unwrap();
        leases
            .create("kube-system", &lease("m", "b", None), NOW)
            .unwrap();
        let restored = Leases::restore(&leases.snapshot()).unwrap();
        assert_eq!(restored, leases);
        assert!(Leases::restore(&json!({"items": []})).is_none());
    }

    #[test]
    fn micro_times_read_and_print() {
        assert_eq!(
            parse_micro_time("1970-01-01T00:00:01.000002Z"),
            Some(1_000_002)
        );
        let t = parse_micro_time("2024-02-29T23:59:59.999999Z").unwrap();
        assert_eq!(format_micro_time(t), "2024-02-29T23:59:59.999999Z");
        assert_eq!(
            parse_micro_time("2025-12-01T10:00:00.000000-02:30"),
            parse_micro_time("2025-12-01T12:30:00.000000Z")
        );
        for bad in [
            "2025-12-01T10:00:00Z",
            "2025-12-01T10:00:00.123Z",
            "2025-02-30T10:00:00.000000Z",
            "2025-12-01 10:00:00.000000Z",
            "2025-12-01T10:00:00.000000",
            "2025-12-01T10:00:00.00000aZ",
        ] {
            assert_eq!(parse_micro_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn lease_paths_route() {
        assert_eq!(
            route("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/pimesh"),
            Some((Some("kube-system"), Some("pimesh")))
        );
        assert_eq!(
            route("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"),
            Some((Some("kube-system"), None))
        );
        assert_eq!(
            route("/apis/coordination.k8s.io/v1/leases"),
            Some((None, None))
        );
        assert_eq!(
            route("/apis/coordination.k8s.io/v1/namespaces/x/pods"),
            None
        );
        assert_eq!(route("/api/v1/nodes"), None);
    }
}
