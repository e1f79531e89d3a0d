//! One `coordination.k8s.io/v1` Lease used as a lock (Pimesh's site-wide lock: two K3s
//! servers never restart K3s at the same time), as client-go's leader election uses one
//! (`tools/leaderelection`, `resourcelock.LeaseLock`): read it, and write it back
//! conditionally on the `resourceVersion` read.
//!
//! - [`try_acquire`] reads the Lease and, from that read alone ([`decide`]): creates it
//!   when missing (POST); takes it when it is free — no holder, or `renewTime` +
//!   `leaseDurationSeconds` in the past — (PUT: `acquireTime` = `renewTime` = now,
//!   `leaseTransitions` + 1); renews it when this holder has it (PUT: only `renewTime` and
//!   `leaseDurationSeconds` change); and otherwise answers [`LeaseOutcome::Held`]. A 409
//!   (another writer got in between the read and the write) makes it read again, at
//!   most [`ATTEMPTS`] times: a lost race then reads as `Held` by the winner.
//! - [`release`] clears `holderIdentity` (PUT, conditional as well) only while this
//!   holder has it.
//!
//! Invariant: there are never two holders of an unexpired Lease. Every write is
//! conditional on the resourceVersion of the read it was decided on (a POST on the name
//! not existing), and the API server refuses it (409) when anything was written since;
//! so a take succeeds only if, at the moment it is stored, the Lease was still the free
//! or expired one that was read. This rests on the API's optimistic concurrency and on
//! clocks: expiry is judged by the reader's clock against the `renewTime` the holder
//! wrote from its own clock, so clocks must agree to well within the lease duration.
//! A holder must stop acting as holder at the `until` it was given (by its own clock)
//! unless a renewal succeeded before; renew well before that.
//!
//! Times are MicroTime (RFC 3339, six fractional digits, UTC), kept as
//! [`std::time::SystemTime`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::kubeconfig::{ApiError, KubeClient};

/// The largest Lease read.
const MAX_BYTES: usize = 64 * 1024;
/// Reads and conditional writes per call, when the writes keep meeting 409.
pub const ATTEMPTS: usize = 3;

/// What [`try_acquire`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// This call made `holder` the holder (created the Lease, or took it free or
    /// expired), until `until`.
    Acquired { until: SystemTime },
    /// `holder` held it already and renewed it, until `until`.
    Renewed { until: SystemTime },
    /// Someone else holds it until `until` (by their `renewTime` and this clock).
    Held { holder: String, until: SystemTime },
}

/// What to do about a Lease, as read (`None`: it does not exist), for `holder` at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Missing: create it, held.
    Create,
    /// Free (no holder) or expired: take it.
    Take,
    /// `holder` holds it: renew it.
    Renew,
    /// Someone else holds it until `until`.
    Held { holder: String, until: SystemTime },
}

/// The decision for `holder` at `now` on `lease` as read.
pub fn decide(lease: Option<&Value>, holder: &str, now: SystemTime) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let spec = &lease["spec"];
    let current = spec["holderIdentity"].as_str().unwrap_or_default();
    if current.is_empty() {
        return Decision::Take;
    }
    if current == holder {
        return Decision::Renew;
    }
    match expiry(spec) {
        Some(until) if until > now => Decision::Held {
            holder: current.to_owned(),
            until,
        },
        // Expired, or without a readable renewTime/leaseDurationSeconds (client-go reads
        // a missing renewTime as the zero time: expired).
        _ => Decision::Take,
    }
}

/// `renewTime` + `leaseDurationSeconds` of a Lease's spec, when both read.
pub fn expiry(spec: &Value) -> Option<SystemTime> {
    let renewed = parse_micro_time(spec["renewTime"].as_str()?)?;
    let seconds = spec["leaseDurationSeconds"].as_u64()?;
    renewed.checked_add(Duration::from_secs(seconds))
}

/// `duration` as `leaseDurationSeconds`: whole seconds, rounded up, at least 1 (the API
/// requires more than 0).
pub fn duration_seconds(duration: Duration) -> u64 {
    let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    seconds.clamp(1, i32::MAX as u64)
}

/// The Lease to POST: held by `holder` from `now`.
pub fn created(
    namespace: &str,
    name: &str,
    holder: &str,
    duration: Duration,
    now: SystemTime,
) -> Value {
    let now = format_micro_time(now);
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration_seconds(duration),
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 0,
        },
    })
}

/// The Lease as read (its metadata, resourceVersion included, kept: the PUT is
/// conditional on it), taken by `holder` at `now`.
pub fn taken(lease: &Value, holder: &str, duration: Duration, now: SystemTime) -> Value {
    let mut lease = lease.clone();
    let transitions = lease["spec"]["leaseTransitions"].as_u64().unwrap_or(0);
    let now = format_micro_time(now);
    set_spec(
        &mut lease,
        &[
            ("holderIdentity", json!(holder)),
            ("leaseDurationSeconds", json!(duration_seconds(duration))),
            ("acquireTime", json!(now)),
            ("renewTime", json!(now)),
            ("leaseTransitions", json!(transitions + 1)),
        ],
    );
    lease
}

/// The Lease as read, renewed by its holder at `now`.
pub fn renewed(lease: &Value, duration: Duration, now: SystemTime) -> Value {
    let mut lease = lease.clone();
    set_spec(
        &mut lease,
        &[
            ("leaseDurationSeconds", json!(duration_seconds(duration))),
            ("renewTime", json!(format_micro_time(now))),
        ],
    );
    lease
}

/// The Lease as read, without a holder.
pub fn released(lease: &Value) -> Value {
    let mut lease = lease.clone();
    if let Some(spec) = lease.get_mut("spec").and_then(Value::as_object_mut) {
        spec.remove("holderIdentity");
    }
    lease
}

fn set_spec(lease: &mut Value, fields: &[(&str, Value)]) {
    if !lease["spec"].is_object() {
        lease["spec"] = json!({});
    }
    for (key, value) in fields {
        lease["spec"][*key] = value.clone();
    }
}

fn collection_path(namespace: &str) -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases")
}

fn lease_path(namespace: &str, name: &str) -> String {
    format!("{}/{name}", collection_path(namespace))
}

fn status_error(
    client: &KubeClient,
    method: &str,
    path: &str,
    status: u16,
    body: &[u8],
) -> ApiError {
    let end = body.len().min(300);
    ApiError::Status {
        url: format!("{method} {}{path}", client.server),
        status,
        body: String::from_utf8_lossy(&body[..end]).into_owned(),
    }
}

/// `GET` the Lease: `None` when it does not exist.
async fn read(client: &KubeClient, namespace: &str, name: &str) -> Result<Option<Value>, ApiError> {
    let path = lease_path(namespace, name);
    let (status, body) = client
        .send_json(reqwest::Method::GET, &path, None, MAX_BYTES)
        .await?;
    match status {
        200 => serde_json::from_slice(&body)
            .map(Some)
            .map_err(|source| ApiError::Decode {
                url: format!("GET {}{path}", client.server),
                source,
            }),
        404 => Ok(None),
        _ => Err(status_error(client, "GET", &path, status, &body)),
    }
}

/// Makes `holder` the holder of the Lease `namespace`/`name` for `duration`, if it is free,
/// expired or already `holder`'s (see the module's documentation).
pub async fn try_acquire(
    client: &KubeClient,
    namespace: &str,
    name: &str,
    holder: &str,
    duration: Duration,
) -> Result<LeaseOutcome, ApiError> {
    let mut last_conflict = None;
    for _ in 0..ATTEMPTS {
        let lease = read(client, namespace, name).await?;
        let now = SystemTime::now();
        let decision = decide(lease.as_ref(), holder, now);
        let (method, path, body) = match (&decision, &lease) {
            (Decision::Held { holder, until }, _) => {
                return Ok(LeaseOutcome::Held {
                    holder: holder.clone(),
                    until: *until,
                })
            }
            (Decision::Create, _) | (_, None) => (
                reqwest::Method::POST,
                collection_path(namespace),
                created(namespace, name, holder, duration, now),
            ),
            (Decision::Take, Some(lease)) => (
                reqwest::Method::PUT,
                lease_path(namespace, name),
                taken(lease, holder, duration, now),
            ),
            (Decision::Renew, Some(lease)) => (
                reqwest::Method::PUT,
                lease_path(namespace, name),
                renewed(lease, duration, now),
            ),
        };
        let (status, answer) = client
            .send_json(method.clone(), &path, Some(&body), MAX_BYTES)
            .await?;
        match status {
            200 | 201 => {
                // As stored; else as sent (renewTime is what was sent, to the microsecond).
                let until = serde_json::from_slice::<Value>(&answer)
                    .ok()
                    .and_then(|stored| expiry(&stored["spec"]))
                    .or_else(|| expiry(&body["spec"]))
                    .unwrap_or(now);
                return Ok(if decision == Decision::Renew {
                    LeaseOutcome::Renewed { until }
                } else {
                    LeaseOutcome::Acquired { until }
                });
            }
            // Written by someone else since the read: read again.
            409 => {
                last_conflict = Some(status_error(
                    client,
                    method.as_str(),
                    &path,
                    status,
                    &answer,
                ))
            }
            _ => {
                return Err(status_error(
                    client,
                    method.as_str(),
                    &path,
                    status,
                    &answer,
                ))
            }
        }
    }
    Err(last_conflict
        .unwrap_or_else(|| status_error(client, "PUT", &lease_path(namespace, name), 409, b"")))
}

/// Clears the holder of the Lease `namespace`/`name` if `holder` holds it: `true` when it
/// did, `false` when the Lease is missing or someone else's (or nobody's).
pub async fn release(
    client: &KubeClient,
    namespace: &str,
    name: &str,
    holder: &str,
) -> Result<bool, ApiError> {
    let path = lease_path(namespace, name);
    let mut last_conflict = None;
    for _ in 0..ATTEMPTS {
        let Some(lease) = read(client, namespace, name).await? else {
            return Ok(false);
        };
        if lease["spec"]["holderIdentity"].as_str() != Some(holder) {
            return Ok(false);
        }
        let (status, answer) = client
            .send_json(
                reqwest::Method::PUT,
                &path,
                Some(&released(&lease)),
                MAX_BYTES,
            )
            .await?;
        match status {
            200 => return Ok(true),
            409 => last_conflict = Some(status_error(client, "PUT", &path, status, &answer)),
            _ => return Err(status_error(client, "PUT", &path, status, &answer)),
        }
    }
    Err(last_conflict.unwrap_or_else(|| status_error(client, "PUT", &path, 409, b"")))
}

/// `t` as a MicroTime: `YYYY-MM-DDThh:mm:ss.ffffffZ` (UTC; times before 1970 print as
/// 1970-01-01T00:00:00.000000Z).
pub fn format_micro_time(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t.max(UNIX_EPOCH)).to_string()
}

/// An RFC 3339 time in UTC, as the API server writes a MicroTime (fractional digits
/// optional); `None` when it does not read or is before 1970.
pub fn parse_micro_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// 2025-12-01T10:00:00Z.
    const T: u64 = 1_764_583_200;

    fn lease(holder: Option<&str>, renewed: u64, seconds: u64) -> Value {
        let mut spec = json!({
            "leaseDurationSeconds": seconds,
            "acquireTime": format_micro_time(at(renewed - 100)),
            "renewTime": format_micro_time(at(renewed)),
            "leaseTransitions": 4,
        });
        if let Some(holder) = holder {
            spec["holderIdentity"] = holder.into();
        }
        json!({"metadata": {"name": "restart", "namespace": "kube-system",
                            "resourceVersion": "42", "uid": "u-1"},
               "spec": spec})
    }

    #[test]
    fn a_missing_free_or_expired_lease_is_taken_and_a_live_one_is_held() {
        assert_eq!(decide(None, "a", at(T)), Decision::Create);
        assert_eq!(
            decide(Some(&lease(None, T, 30)), "a", at(T)),
            Decision::Take
        );
        assert_eq!(
            decide(Some(&lease(Some(""), T, 30)), "a", at(T)),
            Decision::Take
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), T, 30)), "a", at(T + 29)),
            Decision::Held {
                holder: "b".into(),
                until: at(T + 30)
            }
        );
        // Expired at renewTime + leaseDurationSeconds exactly.
        assert_eq!(
            decide(Some(&lease(Some("b"), T, 30)), "a", at(T + 30)),
            Decision::Take
        );
        // Ours, expired or not: renewed (nobody else held it since, or it would not be ours).
        assert_eq!(
            decide(Some(&lease(Some("a"), T, 30)), "a", at(T + 5)),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&lease(Some("a"), T, 30)), "a", at(T + 500)),
            Decision::Renew
        );
        // Someone else's without a readable renewTime: expired.
        let mut odd = lease(Some("b"), T, 30);
        odd["spec"]["renewTime"] = "yesterday".into();
        assert_eq!(decide(Some(&odd), "a", at(T)), Decision::Take);
    }

    #[test]
    fn writes_keep_the_read_resource_version_and_count_transitions() {
        let read = lease(Some("b"), T, 30);
        let took = taken(&read, "a", Duration::from_millis(20_500), at(T + 60));
        assert_eq!(took["metadata"]["resourceVersion"], "42");
        assert_eq!(took["metadata"]["uid"], "u-1");
        assert_eq!(took["spec"]["holderIdentity"], "a");
        assert_eq!(took["spec"]["leaseDurationSeconds"], 21);
        assert_eq!(took["spec"]["leaseTransitions"], 5);
        assert_eq!(took["spec"]["acquireTime"], "2025-12-01T10:01:00.000000Z");
        assert_eq!(took["spec"]["renewTime"], took["spec"]["acquireTime"]);
        assert_eq!(expiry(&took["spec"]), Some(at(T + 81)));

        let mine = lease(Some("a"), T, 30);
        let renew = renewed(&mine, Duration::from_secs(30), at(T + 10));
        assert_eq!(renew["metadata"]["resourceVersion"], "42");
        assert_eq!(renew["spec"]["holderIdentity"], "a");
        assert_eq!(renew["spec"]["acquireTime"], mine["spec"]["acquireTime"]);
        assert_eq!(renew["spec"]["leaseTransitions"], 4);
        assert_eq!(renew["spec"]["renewTime"], "2025-12-01T10:00:10.000000Z");

        let free = released(&mine);
        assert!(free["spec"].get("holderIdentity").is_none());
        assert_eq!(free["metadata"]["resourceVersion"], "42");
        assert_eq!(decide(Some(&free), "b", at(T)), Decision::Take);

        let new = created("kube-system", "restart", "a", Duration::ZERO, at(T));
        assert_eq!(new["spec"]["leaseDurationSeconds"], 1);
        assert_eq!(new["spec"]["leaseTransitions"], 0);
        assert!(new["metadata"].get("resourceVersion").is_none());
        assert_eq!(decide(Some(&new), "a", at(T)), Decision::Renew);
    }

    #[test]
    fn micro_times_print_and_read_back() {
        let t = at(T) + Duration::from_micros(123_456) + Duration::from_nanos(789);
        assert_eq!(format_micro_time(t), "2025-12-01T10:00:00.123456Z");
        assert_eq!(
            parse_micro_time("2025-12-01T10:00:00.123456Z"),
            Some(at(T) + Duration::from_micros(123_456))
        );
        assert_eq!(format_micro_time(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            parse_micro_time("2024-02-29T23:59:59.999999Z").map(format_micro_time),
            Some("2024-02-29T23:59:59.999999Z".to_owned())
        );
        assert_eq!(parse_micro_time("2025-12-01T10:00:00Z"), Some(at(T)));
        for bad in [
            "",
            "2025-12-01",
            "2025-13-01T10:00:00Z",
            "2025-02-29T10:00:00Z",
            "1969-12-31T23:59:59Z",
        ] {
            assert_eq!(parse_micro_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations_round_up_to_whole_seconds() {
        assert_eq!(duration_seconds(Duration::from_secs(15)), 15);
        assert_eq!(duration_seconds(Duration::from_millis(15_001)), 16);
        assert_eq!(duration_seconds(Duration::ZERO), 1);
    }
}
